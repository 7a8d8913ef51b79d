"""Writing generated samples as an EDM2-style dataset folder, with a grid image beside it.

:class:`StreamingSampleFolder` (``mpdiff generate``) writes images as they are made into the hidden
sibling ``.NAME.generating``, which records the settings the images depend on; a killed generation is
resumed there, and the folder takes NAME's place when complete. :func:`write_samples` writes images
already in memory. Either way a folder is written whole or not at all: the images and ``dataset.json`` go into a hidden sibling
``.NAME.partial-XXXXXXXX``, which takes NAME's place only when complete. A kill therefore leaves the
previous folder (or none) and never new images under old labels. A previous sample folder (nothing in
it but ``NNNNNN.png`` files and ``dataset.json``) is replaced whole, by an atomic exchange of the two
directories (Linux ``renameat2``); any other non-empty folder is refused rather than mixed with new
images. The grid is never written inside the folder (it would be an unlabelled image of the dataset).
"""

import json
import os
import re
import shutil
import stat
import tempfile

import numpy as np

from mpdiff.errors import ConfigError, MpdiffError
from mpdiff.storage.dataset_json import write_dataset_json
from mpdiff.storage.files import (
    UMASK,
    can_exchange_entries,
    destination_stat,
    folder_written_whole,
    kind_of,
    put_folder_in_place,
    show_path,
    write_destination,
    write_json,
)
from mpdiff.storage.images import class_grid, save_grid, save_png

_SAMPLE_NAME = re.compile(r"\d{6,}\.png|dataset\.json")
_IMAGE_NAME = re.compile(r"\d{6,}\.png")
_SUBDIR_NAME = re.compile(r"\d{6,}")
GENERATING = ".generating"            # .NAME.generating: a folder being generated
MANIFEST = ".generation.json"         # in it: the settings its images were made with
NFE_KEY = "evaluations"               # and, in the manifest, the network evaluations per image counted


def sample_file(seed, subdirs=False):
    """The relative path of a seed's image: NNNNNN.png, or with subdirs (EDM2's layout, one folder per
    1000 seeds) NNN000/NNNNNN.png."""
    name = f"{seed:06d}.png"
    return f"{seed - seed % 1000:06d}/{name}" if subdirs else name


def _is_previous_sample_folder(path):
    """Only NNNNNN.png, dataset.json and NNNNNN/ folders of NNNNNN.png files: what generation writes."""
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False) and _SUBDIR_NAME.fullmatch(entry.name):
            if not all(_IMAGE_NAME.fullmatch(n) for n in os.listdir(entry.path)):
                return False
        elif not (entry.is_file(follow_symlinks=False) and _SAMPLE_NAME.fullmatch(entry.name)):
            return False
    return True


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
        if names and not (_is_previous_sample_folder(out_dir) and can_exchange_entries()):
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


class StreamingSampleFolder:
    """A sample folder filled seed by seed (possibly by several processes) and completed at the end.

    ``open()`` creates ``.NAME.generating`` next to NAME with the settings in its manifest, or reopens
    one left by a killed generation if its settings are the same (and refuses it otherwise, naming the
    settings that differ: its images would not belong with the new ones). ``write()`` stores one image
    atomically; ``record_nfe()`` adds the network evaluations per image, as counted, to the manifest
    (once; a resumed generation reads them back); ``finish()`` checks that every seed is there, writes
    dataset.json (with the settings and the NFE under "generation") and the grid, and puts the folder in
    NAME's place (atomically replacing a previous sample folder).
    """

    def __init__(self, out_dir, settings, grid_path=None, subdirs=False, num_classes=0):
        self.out_dir, self.grid_path = check_sample_destination(out_dir, grid_path)
        parent, name = os.path.split(os.path.abspath(self.out_dir))
        self.partial = os.path.join(parent, f".{name}{GENERATING}")
        self.manifest = {"format": 1, "subdirs": bool(subdirs), "settings": settings}
        self.subdirs, self.num_classes = bool(subdirs), num_classes
        self.done = set()
        self.nfe = None  # {"nfe": ..., "guide_nfe": ...} per image, once a batch has been counted

    def open(self, create=True):
        """Create or reopen the folder being generated; with create=False (processes other than the
        first, after it opened it) only reopen it. Returns the number of images already there."""
        manifest_path = os.path.join(self.partial, MANIFEST)
        if not os.path.lexists(self.partial):
            if not create:
                raise MpdiffError(f"{show_path(self.partial)}: missing (the first process should have made it)")
            parent = os.path.dirname(self.partial)
            os.makedirs(parent, exist_ok=True)
            for entry in os.scandir(parent):  # staging folders of a start that was killed: empty but for a manifest
                if entry.name.startswith(os.path.basename(self.partial) + ".") and entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
            staging = tempfile.mkdtemp(prefix=os.path.basename(self.partial) + ".", dir=parent)
            write_json(os.path.join(staging, MANIFEST), self.manifest)
            os.chmod(staging, 0o777 & ~UMASK)
            os.rename(staging, self.partial)  # never visible without its manifest
        elif not os.path.isdir(self.partial) or os.path.islink(self.partial):
            raise MpdiffError(f"{show_path(self.partial)}: in the way of generation (not a folder); remove it")
        else:
            found = _read_manifest(manifest_path)
            if isinstance(found, dict) and isinstance(found.get(NFE_KEY), dict):
                self.nfe = found.pop(NFE_KEY)  # counted by an earlier run: not a setting
            if found != self.manifest:
                differ = _differences(found, self.manifest) if isinstance(found, dict) else ["its manifest is unreadable"]
                raise ConfigError(f"{{out}}: {show_path(self.partial)} holds an unfinished generation with other "
                                  f"settings ({'; '.join(differ)[:300]}); finish it with the command that started it, "
                                  f"or remove that folder", fields=("out",))
        self.done = set(self._scan())
        return len(self.done)

    def _scan(self):
        folders = [self.partial]
        if self.subdirs:
            folders += [e.path for e in os.scandir(self.partial)
                        if e.is_dir(follow_symlinks=False) and _SUBDIR_NAME.fullmatch(e.name)]
        for folder in folders:
            for entry in os.scandir(folder):
                if _IMAGE_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    yield int(entry.name[:-4])

    def has(self, seed):
        return seed in self.done

    def record_nfe(self, evaluations):
        """Keep the evaluations per image of a batch (a dict such as {"nfe": 25, "guide_nfe": 7}) in the
        manifest, the first time: every batch of a generation makes the same number."""
        if self.nfe is None:
            self.nfe = dict(evaluations)
            write_json(os.path.join(self.partial, MANIFEST), {**self.manifest, NFE_KEY: self.nfe})

    def write(self, seed, image_uint8, cls=None):
        path = os.path.join(self.partial, sample_file(seed, self.subdirs))
        if self.subdirs:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        save_png(path, image_uint8)  # atomic: a file that exists is a whole image
        self.done.add(seed)

    def finish(self, seeds, classes):
        """Complete the folder: every seed must have its image. Returns the final folder path."""
        self.done = set(self._scan())
        missing = [s for s in seeds if s not in self.done]
        if missing:
            raise MpdiffError(f"{show_path(self.partial)}: {len(missing)} of {len(seeds)} images are missing "
                              f"(first: seed {missing[0]}); run the same command again to make them")
        entries = [(sample_file(s, self.subdirs), c) for s, c in zip(seeds, classes)]
        _remove_strays(self.partial, {e[0] for e in entries})
        write_dataset_json(self.partial, entries, num_classes=self.num_classes or None,
                           generation={"settings": self.manifest["settings"], **(self.nfe or {})})
        tiles = self._grid_tiles(seeds, classes)
        os.remove(os.path.join(self.partial, MANIFEST))
        put_folder_in_place(self.partial, self.out_dir, replace_existing=True)  # a previous sample folder goes
        save_grid(self.grid_path, *tiles)
        return self.out_dir

    def _grid_tiles(self, seeds, classes, per_class=16, max_images=256):
        """The grid's images, read back from the files: at most `per_class` per class (or `max_images`)."""
        from PIL import Image

        picked, count = [], {}
        for seed, cls in zip(seeds, classes):
            if count.get(cls, 0) < (per_class if cls is not None else max_images):
                count[cls] = count.get(cls, 0) + 1
                picked.append((seed, cls))
        images = []
        for seed, _ in picked:
            with Image.open(os.path.join(self.partial, sample_file(seed, self.subdirs))) as im:
                array = np.asarray(im)
            images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        return class_grid(np.stack(images), [c for _, c in picked])


def _read_manifest(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _differences(found, wanted, prefix=""):
    """'key: old -> new' for each leaf that differs between two manifests."""
    out = []
    for key in sorted(set(found) | set(wanted), key=str):
        a, b = found.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {str(a)[:40]} -> {str(b)[:40]}")
    return out


def _remove_strays(folder, keep):
    """Remove what a killed write left (temporaries) so the finished folder holds only its images."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel not in keep and rel != MANIFEST:
                os.remove(os.path.join(root, name))
