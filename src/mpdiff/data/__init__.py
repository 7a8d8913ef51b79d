"""Data: what the network is trained on.

* :mod:`~mpdiff.data.datasets` — folders and ZIPs of images with EDM2 ``dataset.json`` labels, opened as an index
  and decoded image by image (or whole, :func:`~mpdiff.data.datasets.load_dataset`); `mpdiff dataset check`.
* :mod:`~mpdiff.data.digits` — the built-in dataset (UCI digits from scikit-learn).
* :mod:`~mpdiff.data.pixels` — the encoder between uint8 images and network values.
* :mod:`~mpdiff.data.convert` — any folder/ZIP of images to an EDM2-style dataset (`mpdiff dataset convert`).
"""
