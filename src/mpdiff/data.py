"""Datasets: the built-in UCI digits, and folders / ZIP archives of images (SPEC §7.3-7.4).

Every dataset is an :class:`ImageDataset`: `len(ds)`, `ds[i] -> (uint8 array [C, H, W], int label)`,
plus `resolution`, `channels`, `num_classes` (0 = unlabelled) and `name`.
"""

import numpy as np

# The built-in dataset's fixed held-out split: every 5th image (index % 5 == 0) of
# sklearn.datasets.load_digits() is held out for evaluation (360 images); the other 1437 train.
DIGITS_HOLDOUT_EVERY = 5


class ImageDataset:
    """In-memory dataset of uint8 images [N, C, H, W] and integer labels [N] (or None)."""

    def __init__(self, images, labels=None, num_classes=None, name="dataset"):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 array [N, C, H, W]")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if num_classes is None:
            num_classes = 0 if self.labels is None else int(self.labels.max()) + 1
        self.num_classes = num_classes
        self.name = name

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        label = -1 if self.labels is None else int(self.labels[idx])
        return self.images[idx], label

    @property
    def channels(self):
        return self.images.shape[1]

    @property
    def resolution(self):
        return self.images.shape[2]


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
    return ImageDataset(parts[f"{split}_images"], parts[f"{split}_labels"], num_classes=10, name=f"digits-{split}")


def encode_images(images_uint8):
    """uint8 [0, 255] -> float32 [-1, 1] (the RGB 'encoder' of SPEC §7.2)."""
    import torch
    return images_uint8.to(torch.float32) / 127.5 - 1


def decode_images(x):
    """float [-1, 1] -> uint8 [0, 255], rounding as SPEC §7.2."""
    import torch
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)
