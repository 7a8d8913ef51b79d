"""Writing generated samples as an EDM2-style dataset folder, with a grid image beside it.

A folder is written whole or not at all: the images and ``dataset.json`` go into a hidden sibling
``.NAME.partial-XXXXXXXX``, which takes NAME's place only when complete. A kill therefore leaves the
previous folder (or none) and never new images under old labels. A previous sample folder (nothing in
it but ``NNNNNN.png`` files and ``dataset.json``) is replaced whole, by an atomic exchange of the two
directories (Linux ``renameat2``); any other non-empty folder is refused rather than mixed with new
images. The grid is never written inside the folder (it would be an unlabelled image of the dataset).
"""

import ctypes
import os
import re
import shutil
import stat
import tempfile

from mpdiff.data.datasets import write_dataset_json
from mpdiff.errors import ConfigError, MpdiffError
from mpdiff.storage.files import _fsync_dir, kind_of, show_path, write_destination
from mpdiff.storage.images import class_grid, save_grid, save_png

_PARTIAL = ".partial-"
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
    try:
        info = os.stat(out_dir)
    except FileNotFoundError:
        info = None
    except OSError as e:
        raise MpdiffError(f"{show_path(out_dir)}: cannot write here ({e.strerror or e})") from None
    if info is not None:
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{{out}} {show_path(out_dir)} is {kind_of(info.st_mode)}, not a folder",
                              fields=("out",))
        names = os.listdir(out_dir)
        if names and not (all(_SAMPLE_NAME.fullmatch(n) for n in names) and _can_exchange()):
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
    parent = os.path.dirname(os.path.abspath(out_dir))
    name = os.path.basename(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_partials(parent, name)
        partial = tempfile.mkdtemp(prefix=f".{name}{_PARTIAL}", dir=parent)
    except OSError as e:
        raise MpdiffError(f"{show_path(out_dir)}: cannot write here ({e.strerror or e})") from None
    try:
        entries = []
        for image, seed, cls in zip(images_uint8, seeds, classes):
            file_name = f"{seed:06d}.png"
            save_png(os.path.join(partial, file_name), image)
            entries.append((file_name, cls))
        write_dataset_json(partial, entries, num_classes=num_classes or None)
        os.chmod(partial, 0o777 & ~_umask())
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            _exchange(partial, out_dir)  # atomic: the old folder or the new one, never a mix
            shutil.rmtree(partial)       # now holds the previous samples
        else:
            os.rename(partial, out_dir)  # atomic; replaces nothing but an empty folder
        _fsync_dir(parent)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise MpdiffError(f"{show_path(out_dir)}: cannot write here ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    save_grid(grid_path, *class_grid(images_uint8, classes))
    return out_dir


def _remove_partials(parent, name):
    """Remove what an interrupted write of folder `name` left: hidden '.NAME.partial-*' directories only."""
    prefix = f".{name}{_PARTIAL}"
    for entry in os.scandir(parent):
        if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _libc_renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


def _can_exchange():
    return _libc_renameat2() is not None


def _exchange(a, b):
    """Swap two directory entries atomically (Linux renameat2 with RENAME_EXCHANGE)."""
    renameat2 = _libc_renameat2()
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
