"""The built-in dataset: the UCI handwritten digits shipped with scikit-learn (no download)."""

import numpy as np

from mpdiff.data.datasets import ImageDataset

# The built-in dataset's fixed held-out split: every 5th image (index % 5 == 0) of
# sklearn.datasets.load_digits() is held out for evaluation (360 images); the other 1437 train.
DIGITS_HOLDOUT_EVERY = 5

BUILTIN_DIGITS = "digits"              # open_dataset("digits") = the built-in train split


def load_builtin_digits():
    """UCI handwritten digits from scikit-learn (no download): 1797 8x8 grayscale images.

    Returns a dict of numpy arrays: train_images / test_images (uint8 [N, 1, 8, 8], 0..255) and
    train_labels / test_labels (int64 [N]). The split is fixed (see DIGITS_HOLDOUT_EVERY).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    held_out = np.arange(len(images)) % DIGITS_HOLDOUT_EVERY == 0
    return dict(train_images=images[~held_out], train_labels=labels[~held_out],
                test_images=images[held_out], test_labels=labels[held_out])


def digits_dataset(split="train"):
    parts = load_builtin_digits()
    return ImageDataset(parts[f"{split}_images"], parts[f"{split}_labels"], num_classes=10, name=f"digits-{split}",
                        label_source="built-in")
