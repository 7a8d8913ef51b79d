"""Writing generated samples as an EDM2-style dataset folder, with a grid image beside it.

:class:`StreamingSampleFolder` (``mpdiff generate``) writes images as they are made into the hidden
sibling ``.NAME.generating``, which records the settings the images depend on; a killed generation is
resumed there, and the folder takes NAME's place when complete. A kill therefore leaves the previous
folder (or none) and never new images under old labels. The grid is never written inside the folder (it
would be an unlabelled image of the dataset).

Nothing is trusted for its name (:mod:`mpdiff.storage.staging`): ``.NAME.generating`` and its chunk folders
are ours only if its manifest carries their token (name and inode as made), which a copy or a folder renamed
by hand does not; what the folder holds is read back with the checks of user input (a link, a FIFO or any
entry generation did not write is refused in one line, never written through or deleted). A previous
sample folder is replaced (atomically, Linux ``renameat2``) only if it holds nothing but ``NNNNNN.png``
files and a ``dataset.json`` whose record fingerprints exactly these files (names and sizes: a token that
two runs of one command write alike, so that their folders stay identical byte for byte); any other
non-empty folder is refused. Every batch is checked before it is written (:func:`refuse_blank_images`).
"""

import hashlib
import os
import re
import stat
import tempfile

import numpy as np

from mpdiff.errors import ConfigError, MpdiffError
from mpdiff.storage.dataset_json import LABELS_FILE, write_dataset_json
from mpdiff.storage.files import (
    UMASK,
    can_exchange_entries,
    destination_stat,
    kind_of,
    put_folder_in_place,
    read_json,
    show_path,
    temporary_target,
    write_destination,
    write_json,
)
from mpdiff.storage.images import class_grid, from_pil, save_grid, save_png
from mpdiff.storage.staging import carries_token, new_token, read_token, sweep_ours

_IMAGE_NAME = re.compile(r"\d{6,}\.png")
_SUBDIR_NAME = re.compile(r"\d{6,}")
GENERATING = ".generating"            # .NAME.generating: a folder being generated
MANIFEST = ".generation.json"         # in it: the settings its images were made with
NFE_KEY = "evaluations"               # and, in the manifest, the network evaluations per image counted
OWNER_KEY = "owner"                   # and the folder's token, with its chunk folders'
RECORD_KEY = "generation"             # dataset.json's key for how the folder was made
FILES_KEY = "files"                   # and in it, the fingerprint of its images (_files_fingerprint)


def sample_file(seed, subdirs=False):
    """The relative path of a seed's image: NNNNNN.png, or with subdirs (EDM2's layout, one folder per
    1000 seeds) NNN000/NNNNNN.png."""
    name = f"{seed:06d}.png"
    return f"{seed - seed % 1000:06d}/{name}" if subdirs else name


def _is_previous_sample_folder(path):
    """A folder as generation finished it: nothing but NNNNNN.png files (at the top or in NNNNNN/ chunk
    folders) and a dataset.json whose record names exactly these files with these sizes."""
    record = read_token(os.path.join(path, LABELS_FILE), RECORD_KEY)
    files = _image_files(path)
    return record is not None and files is not None and record.get(FILES_KEY) == _files_fingerprint(files)


def _image_files(path):
    """{relative path: size} of the images of a sample folder; None if it holds anything else."""
    files = {}
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False) and _SUBDIR_NAME.fullmatch(entry.name):
            for inner in os.scandir(entry.path):
                if not (inner.is_file(follow_symlinks=False) and _IMAGE_NAME.fullmatch(inner.name)):
                    return None
                files[f"{entry.name}/{inner.name}"] = inner.stat(follow_symlinks=False).st_size
        elif entry.is_file(follow_symlinks=False) and _IMAGE_NAME.fullmatch(entry.name):
            files[entry.name] = entry.stat(follow_symlinks=False).st_size
        elif entry.name != LABELS_FILE or not entry.is_file(follow_symlinks=False):
            return None
    return files


def _files_fingerprint(files):
    """What proves a sample folder ours, recorded in its dataset.json at the end: a digest of the names and
    sizes of its images. The same images give the same digest (two runs of one command write the same
    bytes); a folder we did not finish, or whose images were changed, added or removed since, has another."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\t{files[name]}\n".encode())
    return "sha256:" + digest.hexdigest()


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
            raise ConfigError(f"{{out}} {show_path(out_dir)} is not empty and is not a previous sample folder (one "
                              f"that generate wrote there, holding only its images); generation writes a complete "
                              f"new folder (choose another, or remove this one)", fields=("out",))
    out_real = os.path.realpath(out_dir)
    grid_real = os.path.realpath(write_destination(grid_path))
    if os.path.commonpath([out_real, grid_real]) == out_real:
        raise ConfigError(f"{{grid}} {show_path(grid_path)} is inside {{out}} {show_path(out_dir)}; the folder "
                          f"must hold only labelled samples", fields=("grid", "out"))
    return out_dir, grid_path


def refuse_blank_images(images_uint8, seeds):
    """The check every batch passes before it is written: images that all came out one flat value are what
    non-finite or collapsed output becomes (NaN -> 0), never a sample."""
    images = np.asarray(images_uint8)
    if len(images) and all(image.min() == image.max() for image in images):
        shown = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}..{seeds[-1]}"
        raise MpdiffError(f"{shown}: every image came out one flat value ({int(images.flat[0])}): the network, or the "
                          f"VAE decoding its latents (--vae), produced NaN or collapsed output; check the network "
                          f"file and --vae")


class StreamingSampleFolder:
    """A sample folder filled seed by seed (possibly by several processes) and completed at the end.

    ``open()`` creates ``.NAME.generating`` next to NAME with the settings and the folder's token in its
    manifest (and, with `subdirs`, every chunk folder), or reopens one left by a killed generation if it
    carries its token and its settings are the same (and refuses it otherwise, naming the settings that
    differ: its images would not belong with the new ones). ``write_batch()`` stores a batch's images
    atomically; ``record_nfe()`` adds the network evaluations per image, as counted, to the manifest (once;
    a resumed generation reads them back); ``finish()`` checks that every seed is there, writes dataset.json
    (with the settings, the NFE and the fingerprint of its images under "generation") and the grid, and puts
    the folder in NAME's place (atomically replacing a previous sample folder).
    """

    def __init__(self, out_dir, settings, seeds, grid_path=None, subdirs=False, num_classes=0):
        self.out_dir, self.grid_path = check_sample_destination(out_dir, grid_path)
        parent, name = os.path.split(os.path.abspath(self.out_dir))
        self.partial = os.path.join(parent, f".{name}{GENERATING}")
        self.manifest = {"format": 1, "subdirs": bool(subdirs), "settings": settings}
        self.seeds = [int(s) for s in seeds]
        self.subdirs, self.num_classes = bool(subdirs), num_classes
        self.chunks = sorted({os.path.dirname(sample_file(s, True)) for s in self.seeds}) if subdirs else []
        self.owner = None  # the folder's token, from its manifest
        self.done = set()
        self.nfe = None  # {"nfe": ..., "guide_nfe": ...} per image, once a batch has been counted

    def open(self, create=True):
        """Create or reopen the folder being generated; with create=False (processes other than the
        first, after it opened it) only reopen it. Returns the number of images already there."""
        manifest_path = os.path.join(self.partial, MANIFEST)
        if not os.path.lexists(self.partial):
            if not create:
                raise MpdiffError(f"{show_path(self.partial)}: missing (the first process should have made it)")
            self._create()
        elif not os.path.isdir(self.partial) or os.path.islink(self.partial):
            raise MpdiffError(f"{show_path(self.partial)}: in the way of generation (not a folder); remove it")
        if os.path.islink(manifest_path):
            raise MpdiffError(f"{show_path(manifest_path)}: a symlink, not the manifest generation wrote; remove "
                              f"{show_path(self.partial)}")
        found = read_json(manifest_path, what="generation manifest")
        owner = found.pop(OWNER_KEY, None) if isinstance(found, dict) else None
        if not carries_token(self.partial, owner):
            raise MpdiffError(f"{show_path(self.partial)}: not a folder that generation made here (its manifest does "
                              f"not carry its token: a copy, or renamed?); move it away or remove it")
        if isinstance(found.get(NFE_KEY), dict):
            self.nfe = found.pop(NFE_KEY)  # counted by an earlier run: not a setting
        if found != self.manifest:
            raise ConfigError(f"{{out}}: {show_path(self.partial)} holds an unfinished generation with other "
                              f"settings ({'; '.join(_differences(found, self.manifest))[:300]}); finish it with the "
                              f"command that started it, or remove that folder", fields=("out",))
        self.owner = owner
        made = owner.get("chunks") if isinstance(owner.get("chunks"), dict) else {}
        for chunk in self.chunks:  # each one the folder made, as made: never a link to elsewhere
            if not carries_token(os.path.join(self.partial, chunk), {**owner, "name": chunk, "inode": made.get(chunk)}):
                raise MpdiffError(f"{show_path(os.path.join(self.partial, chunk))}: not the chunk folder generation "
                                  f"made (a link, or replaced); nothing is written through it: remove "
                                  f"{show_path(self.partial)} and run again")
        self.done = self._scan()[0]
        return len(self.done)

    def _create(self):
        """Make the folder, complete with its manifest and chunk folders, under a staging name, then name it:
        never visible half made. Staging folders of a start that was killed (carrying their token) go first."""
        parent, name = os.path.split(self.partial)
        os.makedirs(parent, exist_ok=True)
        sweep_ours(parent, name + ".", lambda path: read_token(os.path.join(path, MANIFEST), OWNER_KEY), "staging")
        staging = tempfile.mkdtemp(prefix=name + ".", dir=parent)
        owner = {**new_token(staging, name), "staging": os.path.basename(staging)}
        for chunk in self.chunks:
            os.mkdir(os.path.join(staging, chunk))
            owner.setdefault("chunks", {})[chunk] = os.lstat(os.path.join(staging, chunk)).st_ino
        write_json(os.path.join(staging, MANIFEST), {**self.manifest, OWNER_KEY: owner})
        os.chmod(staging, 0o777 & ~UMASK)
        os.rename(staging, self.partial)

    def _scan(self):
        """(seeds whose image is there, temporaries of killed writes); anything else that generation did not
        write (a link, a FIFO, a stray name) is refused, never written through, listed or deleted."""
        expected = {sample_file(s, self.subdirs): s for s in self.seeds}
        ours = {*expected, MANIFEST, LABELS_FILE}  # dataset.json: written at the end, just before a kill
        done, temporaries = set(), []
        for folder in [""] + self.chunks:
            for entry in os.scandir(os.path.join(self.partial, folder)):
                rel = f"{folder}/{entry.name}" if folder else entry.name
                if rel in expected and entry.is_file(follow_symlinks=False):
                    done.add(expected[rel])
                elif entry.is_file(follow_symlinks=False) and \
                        (rel == LABELS_FILE or _temporary_of(folder, entry.name) in ours):
                    temporaries.append(entry.path)
                elif not (rel == MANIFEST or rel in self.chunks):
                    kind = "a symlink" if entry.is_symlink() else kind_of(entry.stat(follow_symlinks=False).st_mode)
                    raise MpdiffError(f"{show_path(entry.path)}: {kind} that this generation did not write; nothing "
                                      f"is written through or over it: move it away and run the same command again")
        return done, temporaries

    def has(self, seed):
        return seed in self.done

    def path_of(self, seed):
        return os.path.join(self.partial, sample_file(seed, self.subdirs))

    def record_nfe(self, evaluations):
        """Keep the evaluations per image of a batch (a dict such as {"nfe": 25, "guide_nfe": 7}) in the
        manifest, the first time: every batch of a generation makes the same number."""
        if self.nfe is None:
            self.nfe = dict(evaluations)
            write_json(os.path.join(self.partial, MANIFEST), {**self.manifest, OWNER_KEY: self.owner,
                                                              NFE_KEY: self.nfe})

    def write_batch(self, seeds, images_uint8):
        """Check a batch (:func:`refuse_blank_images`) and store the images of its seeds not yet there."""
        refuse_blank_images(images_uint8, seeds)
        for seed, image in zip(seeds, images_uint8):
            if seed not in self.done:  # a batch cut short by a kill: only its missing images
                save_png(self.path_of(seed), image)  # atomic: a file that exists is a whole image
                self.done.add(seed)

    def finish(self, seeds, classes):
        """Complete the folder: every seed must have its image. Returns the final folder path."""
        self.done, temporaries = self._scan()
        missing = [s for s in seeds if s not in self.done]
        if missing:
            raise MpdiffError(f"{show_path(self.partial)}: {len(missing)} of {len(seeds)} images are missing "
                              f"(first: seed {missing[0]}); run the same command again to make them")
        for path in temporaries:
            os.remove(path)
        check_sample_destination(self.out_dir, self.grid_path)  # OUT may have changed since the start
        entries = [(sample_file(s, self.subdirs), c) for s, c in zip(seeds, classes)]
        files = {name: os.lstat(os.path.join(self.partial, name)).st_size for name, _ in entries}
        write_dataset_json(self.partial, entries, num_classes=self.num_classes or None,
                           generation={"settings": self.manifest["settings"], **(self.nfe or {}),
                                       FILES_KEY: _files_fingerprint(files)})
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
            with Image.open(self.path_of(seed)) as im:
                images.append(from_pil(im))
        return class_grid(np.stack(images), [c for _, c in picked])


def _temporary_of(folder, name):
    """The relative path that `name` in `folder` is a temporary of (an atomic write killed midway), or None."""
    target = temporary_target(name)
    return None if target is None else f"{folder}/{target}" if folder else target


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
