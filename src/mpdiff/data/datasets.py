"""Datasets: folders and ZIP archives of images, or of latents, with EDM2 labels (SPEC §7.3-7.4).

A dataset has `labels` (int64 [N] or None), `num_classes` (0 = unlabelled), `name`, `shape`
(C, H, W), `channels`, `resolution`, ``read(i)`` (uint8 [C, H, W]) and ``batches(n)``. There are two
kinds, with that one interface:

* :class:`StreamedImageDataset`, what :func:`open_dataset` gives for a folder or ZIP: an index of
  the files (names, labels, and the shape of the first image), each image read and decoded when it
  is asked for. Opening ImageNet costs a listing of its files, not hours of decoding and a terabyte.
* :class:`ImageDataset`, every image decoded into one uint8 array [N, C, H, W]: the built-in
  datasets, and :func:`load_dataset` (or ``open_dataset(...).load()``) for folders and ZIPs small
  enough to hold in memory.

A folder or ZIP of ``.npy`` files instead of images is a latent dataset (SPEC §7.1, §7.3: what
`mpdiff dataset encode` writes): each file a float32 [8, R, R], the VAE encoder's 4 means then 4
standard deviations; ``read(i)`` gives that float32 array, `latent` is True and `dtype` float32. It is
streamed only (``load()`` is for images).

Every problem raises :class:`~mpdiff.errors.DatasetError` with one line naming the file; nothing is
skipped silently. Problems of the index (labels, no images, an unusable first image) fail at open; a
damaged image elsewhere fails when it is read, which :func:`check_dataset` (`mpdiff dataset check`)
finds up front, every bad file in one pass.
"""

import contextlib
import json
import operator
import os
import re
import shlex
import threading
import warnings
import zipfile
from typing import NamedTuple

import numpy as np
import torch

from mpdiff.budgets import memory_limit
from mpdiff.errors import DatasetError, first_line
from mpdiff.storage.dataset_json import LABELS_FILE
from mpdiff.storage.files import open_regular, show_path

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")  # matched case-insensitively
LATENT_EXTENSIONS = (".npy",)          # latents: float32 [LATENT_DATA_CHANNELS, R, R] per file (SPEC §7.1)
LATENT_DATA_CHANNELS = 8               # the VAE encoder's 4 means, then its 4 standard deviations
PIL_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")  # the only decoders run (JPEG includes multi-picture MPO)
MIN_RESOLUTION = 4                     # the U-Net halves the resolution once per level
MAX_IMAGE_PIXELS = 8192 * 8192         # larger images are refused as possible decompression bombs
MAX_FILE_BYTES = 512 * 2**20           # per image file and for dataset.json
LABELS_BASE_BYTES = 2**20              # dataset.json may have LABELS_BASE_BYTES + LABELS_BYTES_PER_IMAGE per image
LABELS_BYTES_PER_IMAGE = 2**10         # (an EDM2 entry ["00000/img00000000.png", 999] is 30 bytes)
MAX_DATASET_BYTES_ENV = "MPDIFF_MAX_DATASET_BYTES"  # overrides the memory limit (default: half of physical memory)
MAX_NUM_CLASSES = 65536                # class indices must lie in [0, MAX_NUM_CLASSES)
PROGRESS_MIN_IMAGES = 1000             # progress=None shows a bar above this many images
CHUNK_FOLDER = re.compile(r"\d{5}")    # EDM2's dataset tool writes 00000/img00000000.png ... 00001/img00001000.png
CHUNK_FOLDERS_UNLABELLED = "none (EDM2 chunk folders 00000/... are not classes)"  # label_source for them


class ImageDataset:
    """A dataset held in memory: uint8 images [N, C, H, W] (`images`) and integer labels [N] (or None).

    The built-in datasets, and what :func:`load_dataset` gives. It has the interface of
    :class:`StreamedImageDataset` (``read``, ``shape``, ``batches``, ``load``), with ``in_memory = True``.
    """

    in_memory = True

    def __init__(self, images, labels=None, num_classes=None, name="dataset",
                 label_source=None,     # where labels came from: "dataset.json", "directories", "built-in", "none",
                                        # or CHUNK_FOLDERS_UNLABELLED ("none (EDM2 chunk folders ...)")
                 ignored_files=(),      # relative paths of files that were skipped (links to folders end in "/"), for the log
                 path=None):            # the folder or ZIP it was read from (None: built in or given)
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 array [N, C, H, W]")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None and self.labels.shape != (len(images),):
            raise ValueError("labels must be an int array [N] matching the images")
        if num_classes is None:
            num_classes = 0 if self.labels is None else int(self.labels.max()) + 1
        self.num_classes = num_classes
        self.name = name
        self.label_source = label_source or ("none" if self.labels is None else "given")
        self.ignored_files = tuple(ignored_files)
        self.path = path

    def __len__(self):
        return len(self.images)

    @property
    def shape(self):
        """(channels, height, width) of every image."""
        return tuple(self.images.shape[1:])

    @property
    def channels(self):
        return self.images.shape[1]

    @property
    def resolution(self):
        return self.images.shape[2]

    def read(self, i):
        """Image `i` as uint8 [C, H, W] (a view of `images`)."""
        return self.images[i]

    def __getitem__(self, i):
        return self.read(i)

    def batches(self, batch_size=64, progress=False):
        """uint8 arrays [b, C, H, W] of at most `batch_size` images, in order (views of `images`)."""
        batch_size = _check_batch_size(batch_size)
        with _bar(len(self), progress, f"Reading {self.name}") as bar:
            for start in range(0, len(self), batch_size):
                batch = self.images[start:start + batch_size]
                bar.update(len(batch))
                yield batch

    def load(self, progress=None):
        """The dataset in memory: itself."""
        return self

    def check(self, progress=None):
        """The problems of its images, one line each: none (they were checked when decoded)."""
        return []


class StreamedImageDataset:
    """A folder or ZIP of images opened as an index (:func:`open_dataset`): file names, labels and the
    shape (C, H, W) of the first image; every image is read and decoded when it is asked for.

    ``read(i)`` decodes image i with the strict decoder of :func:`decode_image` and checks its shape
    against the first image's; a damaged file, or one of another size or channel count, raises
    DatasetError with one line naming it. ``ds[i]`` is ``ds.read(i)``, so the dataset can be given to a
    ``torch.utils.data.DataLoader``: it pickles without open files (only the path and the index), and each
    process opens the folder or ZIP for itself on its first read (after a fork too). The index keeps the
    names in one compact buffer, not a Python string per image.

    ``batches(n)`` streams the images in order, ``load()`` decodes them all into an
    :class:`ImageDataset` (refused when they would not fit in memory), ``check()`` lists every bad file.
    """

    in_memory = False

    def __init__(self, path, image_names, shape, labels=None, num_classes=0, name="dataset",
                 label_source="none", ignored_files=(), first_where=None, progress=None):
        self.path = path                        # the folder or ZIP, as given (str; undecodable bytes as surrogates)
        encoded = [name.encode("utf-8", "surrogatepass") for name in image_names]
        self._names = b"".join(encoded)
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._shape = tuple(int(n) for n in shape)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None and self.labels.shape != (len(encoded),):
            raise ValueError("labels must be an int array [N] matching the images")
        self.num_classes = num_classes
        self.name = name
        self.label_source = label_source
        self.ignored_files = tuple(ignored_files)
        self.progress = progress                # the default of load() (None: a bar above PROGRESS_MIN_IMAGES images)
        self._first_where = first_where or (self.image_name(0) if encoded else "")  # how messages name image 0
        self.latent = bool(encoded) and is_latent_name(self.image_name(0))  # .npy latents (a dataset never mixes)
        self._reset()

    def _reset(self):
        self._source, self._pid, self._lock = None, os.getpid(), threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_source", "_pid", "_lock"):  # open files and locks stay in their process
            del state[key]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def __len__(self):
        return len(self._offsets) - 1

    @property
    def shape(self):
        """(channels, height, width) of every image (from the first image's header)."""
        return self._shape

    @property
    def channels(self):
        return self._shape[0]

    @property
    def resolution(self):
        return self._shape[1]

    @property
    def dtype(self):
        """What ``read`` gives: uint8 images, or float32 latents."""
        return np.dtype(np.float32) if self.latent else np.dtype(np.uint8)

    @property
    def images(self):
        raise AttributeError("a streamed dataset holds no array of images: read(i), batches(n), or load() "
                             "(load_dataset) to decode them all into memory")

    def image_name(self, i):
        """The relative posix path of image `i` in the folder or ZIP."""
        i = operator.index(i)
        count = len(self)
        if i < 0:
            i += count
        if not 0 <= i < count:
            raise IndexError(f"image index {i} is out of range for a dataset of {count} images")
        return self._names[self._offsets[i]:self._offsets[i + 1]].decode("utf-8", "surrogatepass")

    def read(self, i):
        """Image `i` as uint8 [C, H, W] (a latent dataset: float32 [8, R, R]), read and decoded now;
        DatasetError (one line naming the file) when it is damaged or its shape differs from the first one's."""
        return _decode_checked(self._source_here(), self.image_name(i), self._first_where, self._shape)

    def __getitem__(self, i):
        return self.read(i)

    def batches(self, batch_size=64, progress=False):
        """uint8 arrays [b, C, H, W] (latents: float32) of at most `batch_size` images, in order; only the
        current batch is held. progress: a tqdm bar (True/False; None: above PROGRESS_MIN_IMAGES images)."""
        batch_size = _check_batch_size(batch_size)
        with _bar(len(self), progress, f"Reading {self.name}") as bar:
            for start in range(0, len(self), batch_size):
                batch = np.empty((min(batch_size, len(self) - start), *self._shape), dtype=self.dtype)
                for k in range(len(batch)):
                    batch[k] = self.read(start + k)
                bar.update(len(batch))
                yield batch

    def load(self, progress=None):
        """Every image decoded into an :class:`ImageDataset`, as :func:`load_dataset` gives it: every header
        is read first (all images must share one shape), the array they need is compared with
        :func:`max_dataset_bytes`, and only then is anything decoded. progress: tqdm bars (True/False;
        None: the `progress` given to open_dataset, whose None shows them above PROGRESS_MIN_IMAGES images)."""
        if self.latent:
            raise DatasetError(f"{_show(self.path, None)}: a latent dataset (.npy files) is read file by file "
                               f"(read, batches); load() decodes images only")
        progress = self.progress if progress is None else progress
        names = [self.image_name(i) for i in range(len(self))]
        show = _show_bar(len(names), progress)
        with open_source(self.path) as source:
            first_where, shape = _check_headers(source, names, show)  # nothing decoded or allocated yet
            _check_memory(source.shown, len(names), shape)
            images = _decode_all(source, names, first_where, shape, show)
        return ImageDataset(images, self.labels, self.num_classes, name=self.name, label_source=self.label_source,
                            ignored_files=self.ignored_files, path=self.path)

    def check(self, progress=None):
        """Read and decode every image, as ``read`` does; return one line per bad file (damaged, of another
        shape than the first image, transparent, too large, ...), in the order of the images.
        progress: a tqdm bar (True/False; None: above PROGRESS_MIN_IMAGES images)."""
        problems = []
        with open_source(self.path) as source, \
                _bar(len(self), progress, f"Checking {source.shown}") as bar:
            for i in range(len(self)):
                try:
                    _decode_checked(source, self.image_name(i), self._first_where, self._shape)
                except DatasetError as e:
                    problems.append(str(e))
                bar.update(1)
                if problems:
                    bar.set_postfix(bad=len(problems), refresh=False)
        return problems

    def close(self):
        """Close the folder or ZIP this process opened for ``read`` (it is opened again when needed)."""
        source, self._source = self._source, None
        if source is not None and self._pid == os.getpid():
            source.__exit__(None, None, None)

    def _source_here(self):
        """This process's open source: opened on its first read, and again in a forked child (a ZIP's file
        offset would otherwise be shared with the parent)."""
        if self._pid != os.getpid():
            self._reset()  # the parent's handles and lock are not ours
        source = self._source
        if source is None:
            with self._lock:
                if self._source is None:
                    self._source = open_source(self.path).__enter__()
                source = self._source
        return source


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or operator.index(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return operator.index(batch_size)


def _show_bar(count, progress):
    return count > PROGRESS_MIN_IMAGES if progress is None else bool(progress)


def _bar(count, progress, desc):
    from tqdm import tqdm

    return tqdm(total=count, desc=desc, unit="img", disable=not _show_bar(count, progress))


# ----------------------------------------------------------------------------------------------
# Folders and ZIP archives (SPEC §7.3-7.4)

def open_dataset(spec, use_labels=True, *, progress=None):
    """Open "digits" or "mnist" (a built-in dataset's train split, an in-memory :class:`ImageDataset`) or
    a folder / ZIP archive of images (a :class:`StreamedImageDataset`: an index; images are decoded when read).

    Opening a folder or ZIP lists its files, reads the labels and the FIRST image's header (its shape
    sets the dataset's); no other image is opened, so a damaged file elsewhere fails when it is read
    (``read``, ``batches``, ``load``), with one line naming it. :func:`check_dataset` (`mpdiff dataset
    check`) decodes every image and lists every bad file; :func:`load_dataset` decodes them all into memory.

    Images: files ending in .png .jpg .jpeg .bmp .webp (any case), searched recursively and
    sorted by their relative path with "/" separators (as EDM2's dataset tool names them). A
    ZIP may be stored or deflated. Ignored: files with other extensions, `dataset.json` itself, anything
    under `__MACOSX/`, and any path with a component starting with "." (dotfiles such as
    `.DS_Store`, `._x.png`, `.ipynb_checkpoints/`); their relative paths are kept in
    `ds.ignored_files`. A local folder literally named "digits" or "mnist" must be given as "./digits".
    In a folder, symbolic links to files are followed; links to folders are not (a link to "/"
    would read the whole disk, a link to ".." would loop): they are listed in `ds.ignored_files`
    with a trailing "/". Only regular files are read: a FIFO, device or socket named like an
    image (or dataset.json) is an error, never a hang.

    Pixels (when an image is decoded): 8-bit grayscale (mode L, also 1-bit) gives 1 channel, RGB gives 3.
    Palette images become RGB; YCbCr/CMYK JPEGs are converted to RGB; 16-bit grayscale is rounded to 8 bits
    (x / 257). An image with transparency (an alpha channel: LA, RGBA, PA; or a PNG tRNS chunk:
    a transparent palette entry or a grayscale/RGB colour key) is accepted only when every pixel
    is opaque, and then the transparency is dropped; otherwise it is an error. 32-bit/float modes
    are refused. Multi-frame files give their first frame; EXIF orientation is not applied (as in
    EDM2). All images must share one channel count and one square size whose side is a power of
    two >= 4 (the size errors say how to convert other images: :mod:`mpdiff.data.convert`): the
    first image's header is checked at open, every other image against it when it is decoded.
    Images above MAX_IMAGE_PIXELS pixels or files above MAX_FILE_BYTES are refused.

    Latents: a folder or ZIP of ``.npy`` files (any case) instead is a latent dataset, as `mpdiff dataset
    encode` writes it (``00000/img-mean-std-00000000.npy``): every file a float32 array [8, R, R] (the VAE
    encoder's 4 means, then its 4 standard deviations >= 0), R a power of two >= 4, finite, in NumPy's
    .npy format without pickled objects (read with allow_pickle=False); ``read(i)`` gives it as float32
    (native byte order). Images and .npy files in one dataset are an error. Labels as for images.

    Memory: the index holds the names and labels, never pixels. ``load()`` (and :func:`load_dataset`)
    first reads every header and compares the array they need (N x C x H x W bytes) with
    :func:`max_dataset_bytes` (half of physical memory, or $MPDIFF_MAX_DATASET_BYTES).

    Labels (use_labels=True): from `dataset.json` at the root, EDM2's format
    `{"labels": [["00000/img00000000.png", 6], ...]}` or `{"labels": null}`, with an optional
    `"num_classes": int` (for subsets that lack the highest classes; otherwise num_classes =
    max class + 1). Every image needs exactly one entry with an integer class >= 0, and every
    entry must name an image of the dataset; other top-level fields are ignored, and no object
    may name a key twice. dataset.json may have at most 1 MiB + 1 KiB per image (and
    MAX_FILE_BYTES). Without dataset.json at the root (one in a subfolder is an error: its labels
    would be lost), if every image lies inside a top-level folder and there are at least two of
    them, the sorted folder names are the classes (as EDM2's dataset tool does); otherwise the
    dataset is unlabelled. Folders that are all named by five digits are EDM2's chunks of 1000
    images (00000/img00000000.png), not classes: such a dataset is unlabelled (`ds.label_source`
    says so; numbered class folders need a dataset.json). use_labels=False ignores dataset.json
    and folders entirely.

    progress: the default of ``load()``'s bars (None = a tqdm bar when there are more than
    PROGRESS_MIN_IMAGES images; True/False); opening itself shows none.
    Every problem raises DatasetError with one line naming the file (and entry) at fault.
    """
    from mpdiff.data.digits import BUILTIN_DATASETS  # the built-in datasets build on this module

    if isinstance(spec, str) and spec in BUILTIN_DATASETS:
        ds = BUILTIN_DATASETS[spec]("train")
        return ds if use_labels else ImageDataset(ds.images, name=ds.name)
    path = os.fsdecode(os.fspath(spec))  # bytes paths too; undecodable bytes become surrogate escapes
    with open_source(path) as source:
        found = scan_source(source, use_labels)  # labels first: a bad dataset.json fails before any image is read
        first = found.image_names[0]
        first_where = source.where(first)
        with source.open(first) as stream:
            shape = probe_file(stream, first_where, first)  # the one header read at open
        _check_first_shape(shape, first_where, source.path)
    return StreamedImageDataset(path, found.image_names, shape, found.labels, found.num_classes,
                                name=_dataset_name(path), label_source=found.label_source,
                                ignored_files=found.ignored, first_where=first_where, progress=progress)


def load_dataset(spec, use_labels=True, *, progress=None):
    """A dataset decoded whole into memory (an :class:`ImageDataset`): :func:`open_dataset`, then every
    image's header is read and checked (one shape for all), the memory they need is compared with
    :func:`max_dataset_bytes`, and every image is decoded, before this returns. For datasets small enough
    to hold in memory (evaluation folders, MNIST-sized sets). progress: tqdm bars (None = above
    PROGRESS_MIN_IMAGES images; True/False)."""
    return open_dataset(spec, use_labels, progress=progress).load()


def check_dataset(spec, use_labels=True, progress=None):
    """Decode and check every image of a dataset in one pass; return one line per bad file (empty when all
    are good): a damaged or unreadable file, a shape other than the first image's, transparency, a file or
    image too large, ... Problems of the index (dataset.json, no images, an unusable first image) raise
    DatasetError as :func:`open_dataset` does. progress: a tqdm bar (None = above PROGRESS_MIN_IMAGES
    images; True/False). This is `mpdiff dataset check`."""
    return open_dataset(spec, use_labels, progress=progress).check(progress)


class SourceScan(NamedTuple):
    """What a folder or ZIP holds, before any image is decoded (see :func:`scan_source`)."""
    image_names: list     # sorted relative posix paths of the images
    ignored: list         # sorted relative paths of the other files (not dataset.json)
    labels: object        # int64 [N], or None
    num_classes: int
    label_source: str     # "dataset.json", "directories", "none" or CHUNK_FOLDERS_UNLABELLED


def scan_source(source, use_labels=True):
    """List the images of an open source (:func:`open_source`) and read their labels, as described
    in :func:`open_dataset`; nothing is decoded. Raises DatasetError when there is no image or the
    labels are unusable."""
    files = source.list_files()
    image_names = sorted(name for name in files if _is_data_name(name))
    ignored = sorted(name for name in files if not _is_data_name(name) and name != LABELS_FILE)
    if not image_names:
        raise DatasetError(f"{source.shown}: no images found (searched recursively for "
                           f"{', '.join(IMAGE_EXTENSIONS + LATENT_EXTENSIONS)} files; other files ignored: "
                           f"{len(ignored)})")
    latent = [is_latent_name(name) for name in image_names]
    if any(latent) and not all(latent):
        npy, image = image_names[latent.index(True)], image_names[latent.index(False)]
        raise DatasetError(f"{source.where(npy)} is a latent (.npy) but {source.where(image)} is an image; a "
                           f"dataset holds images or latents, not both")
    labels, num_classes, label_source = None, 0, "none"
    if use_labels and LABELS_FILE in files:
        where = source.where(LABELS_FILE)
        limit = labels_file_limit(len(image_names))
        data = source.read(LABELS_FILE, limit, f" for the {LABELS_FILE} of a dataset of {_count(len(image_names), 'image')} "
                                              f"(1 MiB + 1 KiB per image)")
        labels, num_classes = parse_labels_json(data, where, image_names)
        label_source = LABELS_FILE if labels is not None else "none"
    elif use_labels:
        nested = sorted(name for name in files if name.endswith("/" + LABELS_FILE) and _is_visible(name))
        if nested:  # e.g. a ZIP made from outside the folder: its labels would be lost silently
            raise DatasetError(f"{source.where(nested[0])}: {LABELS_FILE} must be at the dataset root, "
                               f"not in a subfolder (or pass use_labels=False)")
        labels, num_classes = labels_from_directories(image_names, source.shown)
        if labels is not None:
            label_source = "directories"
        elif in_chunk_folders(image_names):
            label_source = CHUNK_FOLDERS_UNLABELLED
    return SourceScan(image_names, ignored, labels, num_classes, label_source)


def labels_file_limit(num_images):
    """The most bytes dataset.json may have in a dataset of `num_images` images."""
    return min(MAX_FILE_BYTES, LABELS_BASE_BYTES + LABELS_BYTES_PER_IMAGE * num_images)


def max_dataset_bytes():
    """(limit in bytes or None, where it comes from) for the uint8 array of a dataset's images:
    $MPDIFF_MAX_DATASET_BYTES when set, else half of the machine's physical memory."""
    return memory_limit(MAX_DATASET_BYTES_ENV, error=DatasetError)


def _check_memory(shown, count, shape):
    channels, height, width = shape
    need = count * channels * height * width
    limit, origin = max_dataset_bytes()
    if limit is not None and need > limit:
        raise DatasetError(f"{shown}: {_count(count, 'image')} of {width}x{height} pixels with "
                           f"{_count(channels, 'channel')} need {_gib(need)} of memory ({need:,} bytes), more than "
                           f"the limit of {_gib(limit)} ({limit:,} bytes, {origin})")


def _gib(count):
    """A byte count for people: 25.0 GiB, 3.2 MiB, 4.0 KiB, 576 bytes."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def _count(number, noun):
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def one_hot(class_ids, num_classes):
    """Float32 one-hot rows [N, num_classes] for integer class ids (a tensor or a list)."""
    return torch.nn.functional.one_hot(torch.as_tensor(class_ids), num_classes).to(torch.float32)


# ---- labels ----------------------------------------------------------------------------------

def parse_labels_json(data, where, image_names):
    """Validate dataset.json bytes against the sorted image names; return (labels or None, num_classes).

    `where` names the file in messages. Raises DatasetError with one line for every defect.
    """
    try:
        doc = json.loads(data, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise DatasetError(f"{where}: key \"{_show(e.args[0], 40)}\" appears twice in one object; "
                           f"refusing to guess which one is meant") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8, too many digits, nesting too deep
        raise DatasetError(f"{where}: not valid JSON ({first_line(e)})") from None
    if not isinstance(doc, dict):
        raise DatasetError(f'{where}: top level must be a JSON object with a "labels" field, got {_describe(doc)}')
    if "labels" not in doc:
        raise DatasetError(f'{where}: missing the "labels" field (a list of [path, class] pairs, or null)')
    declared = doc.get("num_classes")
    if declared is not None and (not _is_int(declared) or not 1 <= declared <= MAX_NUM_CLASSES):
        raise DatasetError(f'{where}: "num_classes" must be an integer from 1 to {MAX_NUM_CLASSES}, '
                           f'got {_describe(declared)}')
    entries = doc["labels"]
    if entries is None:
        return None, 0
    if not isinstance(entries, list):
        raise DatasetError(f'{where}: "labels" must be a list of [path, class] pairs or null, got {_describe(entries)}')

    limit = declared if declared is not None else MAX_NUM_CLASSES
    index_of = {name: i for i, name in enumerate(image_names)}
    labels = np.full(len(image_names), -1, dtype=np.int64)
    entry_of = {}  # path -> first entry index, to report duplicates
    for i, entry in enumerate(entries):
        if not isinstance(entry, list) or len(entry) != 2:
            raise DatasetError(f"{where}: labels[{i}] must be a [path, class] pair, got {_describe(entry)}")
        path, cls = entry
        if not isinstance(path, str):
            raise DatasetError(f"{where}: labels[{i}] path must be a string, got {_describe(path)}")
        if isinstance(cls, list):
            raise DatasetError(f"{where}: labels[{i}] ('{_show(path)}') is a vector label; only integer class labels are supported")
        if not _is_int(cls) or cls < 0:
            raise DatasetError(f"{where}: labels[{i}] ('{_show(path)}') class must be an integer >= 0, got {_describe(cls)}")
        if cls >= limit:
            bound = f'"num_classes" is {declared}' if declared is not None else f"the limit is {MAX_NUM_CLASSES} classes"
            raise DatasetError(f"{where}: labels[{i}] ('{_show(path)}') class {cls} is out of range ({bound})")
        if path in entry_of:
            raise DatasetError(f"{where}: labels[{i}] repeats '{_show(path)}' (already labelled by labels[{entry_of[path]}])")
        entry_of[path] = i
        if path not in index_of:
            raise DatasetError(f"{where}: labels[{i}] names '{_show(path)}', which is not an image in the dataset")
        labels[index_of[path]] = cls
    unlabelled = np.flatnonzero(labels < 0)
    if len(unlabelled):
        raise DatasetError(f"{where}: image '{_show(image_names[unlabelled[0]])}' has no label "
                           f"({len(unlabelled)} of {len(image_names)} images have none)")
    num_classes = declared if declared is not None else int(labels.max()) + 1
    return labels, num_classes


class _DuplicateKey(Exception):
    """A JSON object names a key twice (json.loads would silently keep the last value)."""


def _unique_keys(pairs):
    """object_pairs_hook for json.loads: the object as a dict, refusing a key that appears twice."""
    doc = {}
    for key, value in pairs:
        if key in doc:
            raise _DuplicateKey(key)
        doc[key] = value
    return doc


def labels_from_directories(image_names, where="dataset"):
    """Classes from sorted top-level folder names (EDM2 dataset tool), or (None, 0) when the
    images are not all inside top-level folders, there is only one folder, or every folder is
    an EDM2 chunk folder (:func:`in_chunk_folders`)."""
    if any("/" not in name for name in image_names) or in_chunk_folders(image_names):
        return None, 0
    tops = [name.split("/", 1)[0] for name in image_names]
    classes = sorted(set(tops))
    if len(classes) < 2:
        return None, 0
    if len(classes) > MAX_NUM_CLASSES:
        raise DatasetError(f"{where}: {len(classes)} top-level folders would be classes; the limit is {MAX_NUM_CLASSES} "
                           f"(write a dataset.json or pass use_labels=False)")
    class_of = {top: i for i, top in enumerate(classes)}
    return np.array([class_of[top] for top in tops], dtype=np.int64), len(classes)


def in_chunk_folders(image_names):
    """True when every image lies in a top-level folder named by five digits (00000/, 00001/, ...):
    the chunks of 1000 images that EDM2's dataset tool writes, which are not classes."""
    return all("/" in name and CHUNK_FOLDER.fullmatch(name.split("/", 1)[0]) for name in image_names)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value):
    """Short JSON-flavoured description of a parsed value, for messages (never recursive)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= 24 else text[:21] + "..."
    if isinstance(value, str):
        return "'" + _show(value, 40) + "'"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    return "an object"


# ---- image decoding --------------------------------------------------------------------------

# Channels after the mode rules of open_dataset, by the mode PIL reports from the header alone.
_MODE_CHANNELS = {"1": 1, "L": 1, "LA": 1, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1,
                  "P": 3, "PA": 3, "RGB": 3, "RGBA": 3, "RGBX": 3, "CMYK": 3, "YCbCr": 3}
_KEYED_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "RGB")  # where PNG's tRNS chunk is a colour key


def probe_image(stream, where):
    """(channels, height, width) of an image from its header alone, without decoding any pixel.

    `stream` is a seekable binary file; the same files are refused as by :func:`decode_image`
    (not an image of our formats, damaged header, decompression bomb, unsupported mode).
    """
    from PIL import Image

    with _image_errors(where):
        if not stream.read(1):
            raise DatasetError(f"{where}: cannot read image (empty file)")
        stream.seek(0)
        with Image.open(stream, formats=_formats()) as image:  # lazy: reads the header only
            width, height = image.size
            mode = image.mode
    if mode not in _MODE_CHANNELS:
        raise _unsupported_mode(mode, where)
    return _MODE_CHANNELS[mode], height, width


def decode_image(data, where):
    """Decode one image file's bytes into uint8 [C, H, W] (C = 1 or 3), refusing anything doubtful.

    `where` names the file in messages. The whole file is decoded and, for PNG, every chunk
    checksum is verified, with PIL's truncated-image tolerance forced off.
    """
    import io

    from PIL import Image

    if len(data) == 0:
        raise DatasetError(f"{where}: cannot read image (empty file)")
    with _image_errors(where):
        with Image.open(io.BytesIO(data), formats=_formats()) as image:
            image.verify()  # PNG: CRC of every chunk, through IEND
        with Image.open(io.BytesIO(data), formats=_formats()) as image:
            image.load()
            # PNG's IHDR (verified above) gives the bit depth, which PIL's modes hide: tRNS keys are raw samples
            depth = data[24] if image.format == "PNG" and len(data) > 24 else 8
            return _to_array(image, where, depth)


def _formats():
    from PIL import Image

    Image.init()  # register every plugin, so that the names in PIL_FORMATS are known
    return [name for name in PIL_FORMATS if name in Image.OPEN]  # WEBP needs libwebp


@contextlib.contextmanager
def _image_errors(where):
    """PIL's strict settings, and any exception of PIL's as one DatasetError line naming the file."""
    from PIL import Image

    try:
        with _strict_pil(), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # checked by Image.open
            yield
    except DatasetError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):  # PIL's own check, at open
        raise DatasetError(f"{where}: cannot read image (more than {MAX_IMAGE_PIXELS} pixels; refused as a "
                           f"possible decompression bomb)") from None
    except Image.UnidentifiedImageError:
        raise DatasetError(f"{where}: cannot read image (not a PNG, JPEG, BMP or WebP image, or its header is "
                           f"damaged)") from None
    except MemoryError:
        raise DatasetError(f"{where}: cannot read image (out of memory while decoding it)") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error, ...) on damaged data
        raise DatasetError(f"{where}: cannot read image ({first_line(e)})") from None


@contextlib.contextmanager
def _strict_pil():
    """Force PIL's global tolerances to our values while decoding, whatever another library set."""
    from PIL import Image, ImageFile

    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False   # True would pad a truncated file with grey, silently
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL warns above this, errors above twice this
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def _to_array(image, where, depth=8):
    """PIL image -> uint8 [C, H, W] following the mode rules of :func:`open_dataset`.

    depth: the file's bits per sample (PNG: 1, 2, 4, 8 or 16), needed to compare a colour key.
    """
    mode = image.mode
    key = image.info.get("transparency") if mode in _KEYED_MODES else None
    if mode in ("L", "RGB"):
        array = np.asarray(image)
    elif mode == "1":
        array = np.asarray(image.convert("L"))
    elif mode in ("P", "PA"):
        if mode == "PA" or "transparency" in image.info:
            array = _drop_opaque_alpha(np.asarray(image.convert("RGBA")), mode, where)
        else:
            array = np.asarray(image.convert("RGB"))
    elif mode in ("LA", "RGBA"):
        array = _drop_opaque_alpha(np.asarray(image), mode, where)
    elif mode in ("RGBX", "CMYK", "YCbCr"):
        array = np.asarray(image.convert("RGB"))
    elif mode.startswith("I;16") or (mode == "I" and _fits_16_bits(image)):  # older Pillow opens 16-bit PNG as I
        wide = np.asarray(image).astype(np.int64)
        if key is not None:
            _refuse_transparent(wide == key, where, f"mode {mode}, colour key {key}")
            key = None
        array = ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(x / 257): 16 -> 8 bits
    else:
        raise _unsupported_mode(mode, where)
    if key is not None:
        _check_colour_key(array, key, depth, mode, where)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.uint8)


def _unsupported_mode(mode, where):
    return DatasetError(f"{where}: unsupported image mode {mode} (expected 8-bit grayscale or RGB)")


def _fits_16_bits(image):
    low, high = image.getextrema()
    return 0 <= low and high <= 65535


def _check_colour_key(array, key, depth, mode, where):
    """Refuse an 8-bit grayscale or RGB image (uint8 [H, W] or [H, W, 3]) in which a pixel has the colour key.

    PNG's tRNS chunk for grayscale and RGB images names one colour (in raw samples of the file's bit
    depth) that is fully transparent. PIL reads 1, 2 and 4-bit grayscale scaled to 0..255 and 16-bit RGB
    by its high bytes, so the key is brought to the same scale; for 16-bit RGB this cannot tell apart
    colours that differ only in their low bytes, and such an image is refused as possibly transparent.
    """
    if mode == "1":  # PIL already gives 0 or 255
        _refuse_transparent(array == key, where, f"mode 1, colour key {key}")
    elif mode == "L":
        top = 2**min(depth, 8) - 1
        if isinstance(key, int) and 0 <= key <= top:  # a key outside the samples' range marks no pixel
            _refuse_transparent(array == key * (255 // top), where, f"mode L, {depth}-bit colour key {key}")
    elif mode == "RGB" and isinstance(key, tuple) and len(key) == 3:
        if depth == 16:
            high = tuple(int(k) >> 8 for k in key)
            _refuse_transparent(np.all(array == np.array(high, np.uint8), axis=-1), where,
                                f"mode RGB, 16-bit colour key {key}, compared by its high bytes {high}", maybe=True)
        elif all(0 <= k <= 255 for k in key):
            _refuse_transparent(np.all(array == np.array(key, np.uint8), axis=-1), where,
                                f"mode RGB, colour key {key}")


def _drop_opaque_alpha(array, mode, where):
    """Drop the alpha channel of uint8 [H, W, C+1] when every pixel is opaque; refuse it otherwise."""
    _refuse_transparent(array[..., -1] != 255, where, f"mode {mode}")
    return array[..., :-1]


def _refuse_transparent(transparent, where, detail, maybe=False):
    """The one rule for transparency: an image in which any pixel is not fully opaque is refused."""
    count = int(np.count_nonzero(transparent))
    if count:
        raise DatasetError(f"{where}: image {'may have' if maybe else 'has'} transparent pixels ({detail}; "
                           f"{count:,} of {transparent.size:,} pixels); flatten it onto a background first")


# ---- latent files (.npy) ---------------------------------------------------------------------

def probe_file(stream, where, name):
    """(channels, height, width) from the header of an image or, for a name ending in .npy, a latent."""
    return probe_latent(stream, where) if is_latent_name(name) else probe_image(stream, where)


def probe_latent(stream, where):
    """(8, R, R) of a latent .npy file from its header alone; DatasetError (one line naming the file) when
    the header is damaged or does not describe a float32 [8, R, R] array (see :func:`decode_latent`)."""
    with _latent_errors(where):
        shape, dtype = _npy_header(stream)
    _check_latent_header(shape, dtype, where)
    return tuple(int(n) for n in shape)


_NPY_HEADER_BYTES = 10000  # NumPy's own default limit on an .npy header


def _npy_header(stream):
    """(shape, dtype) from an .npy header (format versions 1.0 and 2.0, which NumPy writes for arrays
    such as ours; 3.0 only adds UTF-8 field names, which a float32 array has none of)."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=_NPY_HEADER_BYTES)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=_NPY_HEADER_BYTES)
    else:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
    return shape, dtype


def decode_latent(data, where):
    """One latent .npy file's bytes -> float32 [8, R, R] (native byte order), refusing anything doubtful:
    not NumPy's .npy format, a damaged or truncated file, trailing bytes, pickled objects (never
    unpickled: allow_pickle=False), another dtype than float32, another shape than [8, R, R] with R a
    power of two >= MIN_RESOLUTION, non-finite values, or a negative standard deviation."""
    import io

    if len(data) == 0:
        raise DatasetError(f"{where}: cannot read latent (empty file)")
    stream = io.BytesIO(data)
    with _latent_errors(where):
        shape, dtype = _npy_header(stream)
    _check_latent_header(shape, dtype, where)  # before reading any data: no object array is ever built
    stream.seek(0)
    with _latent_errors(where):
        array = np.lib.format.read_array(stream, allow_pickle=False, max_header_size=_NPY_HEADER_BYTES)
    if stream.tell() != len(data):
        raise DatasetError(f"{where}: cannot read latent ({len(data) - stream.tell():,} bytes after the array; "
                           f"the file is damaged)")
    array = np.ascontiguousarray(array, dtype=np.float32)  # native byte order
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise DatasetError(f"{where}: latent has {bad:,} non-finite values (NaN or infinity) of {array.size:,}")
    half = LATENT_DATA_CHANNELS // 2
    negative = int(np.count_nonzero(array[half:] < 0))
    if negative:
        raise DatasetError(f"{where}: latent has {negative:,} negative standard deviations (channels "
                           f"{half}-{LATENT_DATA_CHANNELS - 1} hold the VAE's standard deviations)")
    return array


def _check_latent_header(shape, dtype, where):
    if dtype.hasobject:
        raise DatasetError(f"{where}: latent holds Python objects (a pickled array); refused, expected float32 "
                           f"[{LATENT_DATA_CHANNELS}, R, R]")
    if dtype.kind != "f" or dtype.itemsize != 4 or dtype.fields is not None or dtype.subdtype is not None:
        raise DatasetError(f"{where}: latent is {dtype.str.lstrip('<>|=')} ({dtype.name}), expected float32 "
                           f"[{LATENT_DATA_CHANNELS}, R, R] (the VAE's 4 means and 4 standard deviations)")
    if len(shape) != 3 or shape[0] != LATENT_DATA_CHANNELS:
        raise DatasetError(f"{where}: latent has shape {list(shape)}, expected [{LATENT_DATA_CHANNELS}, R, R] "
                           f"(the VAE's 4 means and 4 standard deviations)")
    _, height, width = shape
    if height != width or width < MIN_RESOLUTION or width & (width - 1):
        raise DatasetError(f"{where}: latent has shape {list(shape)}; its two sides must be equal, a power of two "
                           f"of at least {MIN_RESOLUTION}")


@contextlib.contextmanager
def _latent_errors(where):
    """Any exception of NumPy's .npy reader as one DatasetError line naming the file."""
    try:
        yield
    except DatasetError:
        raise
    except MemoryError:
        raise DatasetError(f"{where}: cannot read latent (out of memory while reading it)") from None
    except Exception as e:  # ValueError (not .npy, bad header, pickled data, truncated), EOFError, OSError, ...
        raise DatasetError(f"{where}: cannot read latent, not a valid .npy file ({first_line(e)})") from None


def _dims(shape):
    return "x".join(str(n) for n in shape)


def _check_headers(source, image_names, show):
    """Read every image's header; check that all share one valid shape. Returns (where, shape) of the first."""
    from tqdm import tqdm

    first = None  # (where, shape) of the first image: every other must match it
    with tqdm(total=len(image_names), desc=f"Checking {source.shown}", unit="img", disable=not show) as bar:
        for name in image_names:
            where = source.where(name)
            with source.open(name) as stream:
                shape = probe_file(stream, where, name)
            if first is None:
                _check_first_shape(shape, where, source.path)
                first = (where, shape)
            elif shape != first[1]:
                _raise_shape_mismatch(shape, where, *first, source.path)
            bar.update(1)
    return first


def _decode_all(source, image_names, first_where, shape, show):
    """Decode every image into one preallocated uint8 [N, C, R, R] array (their headers said `shape`)."""
    from tqdm import tqdm

    try:
        images = np.empty((len(image_names), *shape), dtype=np.uint8)
    except MemoryError:
        need = len(image_names) * int(np.prod(shape))
        raise DatasetError(f"{source.shown}: cannot allocate {_gib(need)} for {_count(len(image_names), 'image')} "
                           f"(out of memory)") from None
    with tqdm(total=len(image_names), desc=f"Reading {source.shown}", unit="img", disable=not show) as bar:
        for i, name in enumerate(image_names):
            images[i] = _decode_checked(source, name, first_where, shape)
            bar.update(1)
    return images


def _decode_checked(source, name, first_where, shape):
    """Image `name` of an open source decoded into uint8 [C, H, W]; DatasetError naming it when it cannot be
    read or decoded, or when its shape is not `shape` (that of the first image, named `first_where`)."""
    where = source.where(name)
    try:
        data = source.read(name)
    except KeyError:  # a ZIP opened again (another process) that no longer holds it
        raise DatasetError(f"{where}: not in the archive any more (it changed after the dataset was opened)") from None
    array = decode_latent(data, where) if is_latent_name(name) else decode_image(data, where)
    if array.shape != shape:  # another size or channel count, or the file changed since its header was read
        _raise_shape_mismatch(array.shape, where, first_where, shape, source.path)
    return array


def _check_first_shape(shape, where, path):
    _, height, width = shape
    if height != width:
        raise DatasetError(f"{where}: image is {width}x{height} pixels; images must be square, with a "
                           f"power-of-two side of at least {MIN_RESOLUTION}{convert_hint(path, [shape])}")
    if width < MIN_RESOLUTION or width & (width - 1):
        raise DatasetError(f"{where}: image is {width}x{height} pixels; the side must be a power of two of at "
                           f"least {MIN_RESOLUTION} (the U-Net halves the resolution at each level)"
                           f"{convert_hint(path, [shape])}")


def _raise_shape_mismatch(shape, where, first_where, first_shape, path):
    if first_shape[0] == LATENT_DATA_CHANNELS or shape[0] == LATENT_DATA_CHANNELS:  # latents: no convert advice
        raise DatasetError(f"{where}: latent is {_dims(shape)} but {first_where} is {_dims(first_shape)}; all "
                           f"latents must have the same shape")
    if shape[1:] != first_shape[1:]:
        raise DatasetError(f"{where}: image is {shape[2]}x{shape[1]} pixels but {first_where} is "
                           f"{first_shape[2]}x{first_shape[1]}; all images must have the same size"
                           f"{convert_hint(path, [first_shape, shape])}")
    kind = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}
    raise DatasetError(f"{where}: image is {kind[shape[0]]} but {first_where} is {kind[first_shape[0]]}; "
                       f"all images must have the same channel count{convert_hint(path, [first_shape, shape])}")


def convert_hint(path, shapes):
    """'; convert it with: mpdiff dataset convert SRC DEST ...' for the dataset at `path`, whose images
    include those of `shapes` ((C, H, W) each): a resolution and transform that suit them (small images
    such as MNIST's 28x28 are padded to the next power of two, larger ones centre-cropped to the
    largest power of two that fits), and DEST named after SRC."""
    sides = [side for _, height, width in shapes for side in (height, width)]
    if len({shape[1:] for shape in shapes}) == 1 and sides[0] == sides[1] and sides[0] >= MIN_RESOLUTION \
            and not sides[0] & (sides[0] - 1):  # the sizes are fine (mixed channels): no resizing
        resolution, options = sides[0], ""
    elif max(sides) <= 64:
        resolution = max(MIN_RESOLUTION, 1 << (max(sides) - 1).bit_length())
        options = f" --resolution {resolution} --transform pad"
    else:
        resolution = max(MIN_RESOLUTION, 1 << (min(sides).bit_length() - 1))
        options = f" --resolution {resolution} --transform center-crop"
    source = os.path.normpath(path)
    stem, ext = (source[:-4], source[-4:]) if source.lower().endswith(".zip") else (source, "")
    dest = f"{stem}-{resolution}{ext}"
    return f"; convert it with: mpdiff dataset convert {shlex.quote(_show(source, None))} " \
           f"{shlex.quote(_show(dest, None))}{options}"


# ---- sources: a folder or a ZIP archive -----------------------------------------------------

def _is_visible(name):
    """False for macOS archive debris (__MACOSX/) and for dotfiles or anything in a dot-folder."""
    parts = name.split("/")
    return parts[0] != "__MACOSX" and not any(part.startswith(".") for part in parts)


def _is_image_name(name):
    return _is_visible(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_latent_name(name):
    return _is_visible(name) and os.path.splitext(name)[1].lower() in LATENT_EXTENSIONS


def _is_data_name(name):
    """An image or a latent file: what a dataset is made of."""
    return _is_image_name(name) or is_latent_name(name)


def _dataset_name(path):
    base = os.path.basename(os.path.normpath(os.path.abspath(path)))
    return show_path(base[:-4] if base.lower().endswith(".zip") else base)  # printable: it goes into logs


def open_source(path):
    if os.path.isdir(path):
        return _FolderSource(path)
    if not os.path.exists(path):
        raise DatasetError(f"{_show(path, None)}: no such file or directory (expected a folder or ZIP of images, "
                           f"or 'digits')")
    if not os.path.isfile(path):
        raise DatasetError(f"{_show(path, None)}: not a directory or a ZIP archive")
    return _ZipSource(path)


def _too_big(where, size, limit, why=""):
    return DatasetError(f"{where}: file is {size:,} bytes, above the limit of {limit:,} bytes{why}")


class _FolderSource:
    """Files of a directory tree, named by relative posix path.

    Every file is opened with :func:`mpdiff.storage.files.open_regular`: only regular files (after
    following symbolic links) are read; a FIFO, device, socket, directory or dangling link is one line.
    """

    def __init__(self, path):
        self.path = path
        self.shown = _show(path, None)  # for messages

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def where(self, name):
        return os.path.join(self.shown, *_show(name, None).split("/"))

    def list_files(self):
        """Relative posix paths of every non-directory entry, walking without following links to
        folders (each such link is listed as "NAME/", so that it shows among the ignored files)."""
        names = set()
        pending = [""]
        while pending:  # iterative: no recursion limit, however deep the tree
            relative = pending.pop()
            directory = os.path.join(self.path, *relative.split("/")) if relative else self.path
            try:
                with os.scandir(directory) as entries:
                    entries = list(entries)
            except OSError as e:
                raise DatasetError(f"{_show(directory, None)}: cannot list directory "
                                   f"({e.strerror or first_line(e)})") from None
            for entry in entries:
                name = relative + "/" + entry.name if relative else entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(name)
                    elif entry.is_symlink() and entry.is_dir():
                        names.add(name + "/")  # a link to a folder: not followed
                    else:
                        names.add(name)
                except OSError:  # e.g. a symbolic link loop: listed; read, if ever, by open_regular
                    names.add(name)
        return names

    def _file(self, name):
        return os.path.join(self.path, *name.split("/"))

    def open(self, name, max_bytes=None, why=""):
        """The file `name` opened for binary reading, if it is a regular file of at most `max_bytes`
        (default MAX_FILE_BYTES); `why` ends the message of a file that is too large."""
        max_bytes = MAX_FILE_BYTES if max_bytes is None else max_bytes
        f = open_regular(self._file(name), None, "file", DatasetError)
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            f.close()
            raise _too_big(self.where(name), size, max_bytes, why)
        return f

    def read(self, name, max_bytes=None, why=""):
        where, max_bytes = self.where(name), MAX_FILE_BYTES if max_bytes is None else max_bytes
        with self.open(name, max_bytes, why) as f:
            try:
                data = f.read(max_bytes + 1)
            except OSError as e:
                raise DatasetError(f"{where}: cannot read file ({e.strerror or first_line(e)})") from None
        if len(data) > max_bytes:  # it grew since it was opened
            raise _too_big(where, len(data), max_bytes, why)
        return data


class _ZipSource:
    """Members of a ZIP archive (stored or deflated), named by posix path."""

    def __init__(self, path):
        self.path = path
        self.shown = _show(path, None)  # for messages
        self.file = None
        self.zip = None
        self.members = {}

    def __enter__(self):
        try:
            self.file = open_regular(self.path, None, "ZIP archive", DatasetError)
            self.zip = zipfile.ZipFile(self.file)
            infos = self.zip.infolist()
            for info in infos:
                name = info.filename.replace("\\", "/")
                if name.endswith("/"):  # a folder entry
                    continue
                if not name:
                    raise DatasetError(f"{self.shown}: damaged ZIP archive (an entry has an empty name)")
                if name in self.members:
                    raise DatasetError(f"{self.shown}: damaged ZIP archive (two entries named '{_show(name)}')")
                self.members[name] = info
        except BaseException as e:
            self.__exit__()  # __exit__ does not run when __enter__ raises
            if isinstance(e, zipfile.BadZipFile) and not self.path.lower().endswith(".zip"):
                raise DatasetError(f"{self.shown}: not a directory or a ZIP archive") from None
            if isinstance(e, Exception) and not isinstance(e, DatasetError):  # zipfile raises assorted types
                raise DatasetError(f"{self.shown}: damaged ZIP archive ({first_line(e)})") from None
            raise
        return self

    def __exit__(self, *exc):
        if self.zip is not None:
            self.zip.close()
        if self.file is not None:
            self.file.close()  # ZipFile does not close a file object it was given
        return False

    def where(self, name):
        return f"{self.shown}/{_show(name, None)}"

    def list_files(self):
        return set(self.members)

    def open(self, name, max_bytes=None, why=""):
        """The entry `name` as a seekable binary stream; its declared size (the ZIP directory's) is checked
        against `max_bytes` (default MAX_FILE_BYTES) before any byte is read."""
        info, where = self.members[name], self.where(name)
        max_bytes = MAX_FILE_BYTES if max_bytes is None else max_bytes
        if info.file_size > max_bytes:
            raise _too_big(where, info.file_size, max_bytes, why)
        with _zip_errors(where):
            return _ZipEntry(self.zip.open(info), where)

    def read(self, name, max_bytes=None, why=""):
        with self.open(name, max_bytes, why) as f:
            return f.read()  # zipfile stops at the declared size and checks the CRC


@contextlib.contextmanager
def _zip_errors(where):
    try:
        yield
    except DatasetError:
        raise
    except Exception as e:  # BadZipFile (bad CRC), zlib.error, EOFError, NotImplementedError, encrypted, ...
        raise DatasetError(f"{where}: damaged ZIP entry ({first_line(e)})") from None


class _ZipEntry:
    """A ZIP entry's stream whose read and seek errors are one DatasetError line naming the entry
    (so that PIL, reading a header from it, reports a damaged archive as such)."""

    def __init__(self, stream, where):
        self.stream, self.where = stream, where

    def read(self, *args):
        with _zip_errors(self.where):
            return self.stream.read(*args)

    def seek(self, *args):
        with _zip_errors(self.where):
            return self.stream.seek(*args)

    def tell(self):
        return self.stream.tell()

    def seekable(self):
        return True

    def readable(self):
        return True

    def close(self):
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _show(text, limit=200):
    """A name as it may appear in a one-line message (:func:`~mpdiff.storage.files.show_path`), cut to `limit`."""
    try:
        text = show_path(text)
    except UnicodeError:  # a lone surrogate from a JSON escape such as "\\ud800": not a file system name
        text = repr(text)[1:-1]
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
