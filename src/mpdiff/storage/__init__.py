"""Storage: every file format and path, and nothing else.

* :mod:`~mpdiff.storage.files` — atomic writes, JSON and JSON-lines.
* :mod:`~mpdiff.storage.tensors` — safetensors files, safe torch loading.
* :mod:`~mpdiff.storage.network_files` — networks as safetensors + their config.
* :mod:`~mpdiff.storage.layout` — the run directory's paths and file names.
* :mod:`~mpdiff.storage.images` — PNGs and grids; :mod:`~mpdiff.storage.samples` — sample folders.
"""
