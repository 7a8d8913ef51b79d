"""Writing generated samples as an EDM2-style dataset folder, with a grid image beside it.

A folder is written whole or not at all: the images and ``dataset.json`` go into a hidden sibling
``.NAME.partial-XXXXXXXX``, which takes NAME's place only when complete. A kill therefore leaves the
previous folder (or none) and never new images under old labels. A previous sample folder (nothing in
it but ``NNNNNN.png`` files and ``dataset.json``) is replaced whole, by an atomic exchange of the two
directories (Linux ``renameat2``); any other non-empty folder is refused rather than mixed with new
images. The grid is never written inside the folder (it would be an unlabelled image of the dataset).
"""

import os
import re
import stat

from mpdiff.data.datasets import write_dataset_json
from mpdiff.errors import ConfigError
from mpdiff.storage.files import (
    can_exchange_entries,
    destination_stat,
    folder_written_whole,
    kind_of,
    show_path,
    write_destination,
)
from mpdiff.storage.images import class_grid, save_grid, save_png

_SAMPLE_NAME = re.compile(r"\d{6,}\.png|dataset\.json")


def default_grid_path(out_dir):
    return os.path.normpath(os.fspath(out_dir)) + "-grid.png"


def check_sample_destination(out_dir, grid_path=None):
    """Refuse, before any work, a destination that generation could not write whole and alone.

    Returns (out_dir, grid_path) with the default grid path filled in.
    """
    out_dir = os.path.normpath(os.fspath(out_dir))
    grid_path = default_grid_path(out_dir) if grid_path is None else os.fspath(grid_path)
    if os.path.islink(out_dir):
        out_dir = os.path.realpath(out_dir)  # write the folder the link points to; the link stays
    write_destination(grid_path)  # the grid must be writable as a file (not a FIFO, device or directory)
    info = destination_stat(out_dir)
    if info is not None:
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{{out}} {show_path(out_dir)} is {kind_of(info.st_mode)}, not a folder",
                              fields=("out",))
        names = os.listdir(out_dir)
        if names and not (all(_SAMPLE_NAME.fullmatch(n) for n in names) and can_exchange_entries()):
            raise ConfigError(f"{{out}} {show_path(out_dir)} is not empty and is not a previous sample folder; "
                              f"generation writes a complete new folder (choose another, or remove this one)",
                              fields=("out",))
    out_real = os.path.realpath(out_dir)
    grid_real = os.path.realpath(write_destination(grid_path))
    if os.path.commonpath([out_real, grid_real]) == out_real:
        raise ConfigError(f"{{grid}} {show_path(grid_path)} is inside {{out}} {show_path(out_dir)}; the folder "
                          f"must hold only labelled samples", fields=("grid", "out"))
    return out_dir, grid_path


def write_samples(out_dir, images_uint8, seeds, classes, num_classes=0, grid_path=None):
    """One PNG per seed ({seed:06d}.png) and an EDM2-style dataset.json in `out_dir`, written whole,
    and a grid image next to the folder (default ``<out_dir>-grid.png``)."""
    out_dir, grid_path = check_sample_destination(out_dir, grid_path)
    with folder_written_whole(out_dir, replace_existing=True) as partial:
        entries = []
        for image, seed, cls in zip(images_uint8, seeds, classes):
            file_name = f"{seed:06d}.png"
            save_png(os.path.join(partial, file_name), image)
            entries.append((file_name, cls))
        write_dataset_json(partial, entries, num_classes=num_classes or None)
    save_grid(grid_path, *class_grid(images_uint8, classes))
    return out_dir
