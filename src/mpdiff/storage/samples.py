"""Writing generated samples as an EDM2-style dataset folder, with a grid image beside it."""

import os

from mpdiff.data.datasets import write_dataset_json
from mpdiff.errors import MpdiffError
from mpdiff.storage.images import class_grid, save_grid, save_png


def write_samples(out_dir, images_uint8, seeds, classes, num_classes=0, grid_path=None):
    """One PNG per seed ({seed:06d}.png), an EDM2-style dataset.json, and a grid image.

    The grid goes next to the folder (default ``<out_dir>-grid.png``), not inside it, so that the
    folder stays a valid dataset (every image in it has a label entry).
    """
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise MpdiffError(f"{out_dir}: cannot write here ({e.strerror or e})") from None
    entries = []
    for image, seed, cls in zip(images_uint8, seeds, classes):
        name = f"{seed:06d}.png"
        save_png(os.path.join(out_dir, name), image)
        entries.append((name, cls))
    write_dataset_json(out_dir, entries, num_classes=num_classes or None)
    save_grid(grid_path or default_grid_path(out_dir), *class_grid(images_uint8, classes))
    return out_dir


def default_grid_path(out_dir):
    return os.path.normpath(os.fspath(out_dir)) + "-grid.png"
