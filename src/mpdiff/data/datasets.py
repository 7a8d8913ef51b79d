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
finds up front, every bad file in one pass. What this module uses lies below it, one job a module (see
:mod:`mpdiff.data`).
"""

import operator
import os
import threading

import numpy as np

from mpdiff.data.digits import BUILTIN_DATASETS, BUILTIN_NUM_CLASSES
from mpdiff.data.reading import check_headers, check_memory, decode_all, decode_checked, probe_file, scan_source
from mpdiff.data.shapes import check_first_shape
from mpdiff.data.sources import dataset_name, is_latent_name, open_source, show_name
from mpdiff.errors import DatasetError

PROGRESS_MIN_IMAGES = 1000             # progress=None shows a bar above this many images


class _Dataset:
    """What both kinds derive from their `shape` (C, H, W) and ``read``."""

    @property
    def channels(self):
        return self.shape[0]

    @property
    def resolution(self):
        return self.shape[1]

    def __getitem__(self, i):
        return self.read(i)


class ImageDataset(_Dataset):
    """A dataset held in memory: uint8 images [N, C, H, W] (`images`) and integer labels [N] (or None).

    The built-in datasets, and what :func:`load_dataset` gives. It has the interface of
    :class:`StreamedImageDataset` (``read``, ``shape``, ``batches``, ``load``), with ``in_memory = True``.
    """

    in_memory = True

    def __init__(self, images, labels=None, num_classes=None, name="dataset",
                 label_source=None,     # where labels came from: "dataset.json", "directories", "built-in", "none",
                                        # or CHUNK_FOLDERS_UNLABELLED ("none (EDM2 chunk folders ...)")
                 ignored_files=(),      # relative paths of files that were skipped (links to folders end in "/"), for the log
                 path=None,             # the folder or ZIP it was read from (None: built in or given)
                 class_names=None):     # the classes' names (folder names, dataset.json's "class_names"), or None
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
        self.class_names = None if class_names is None else tuple(class_names)

    def __len__(self):
        return len(self.images)

    @property
    def shape(self):
        """(channels, height, width) of every image."""
        return tuple(self.images.shape[1:])

    def read(self, i):
        """Image `i` as uint8 [C, H, W] (a view of `images`)."""
        return self.images[i]

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


class StreamedImageDataset(_Dataset):
    """A folder or ZIP of images opened as an index (:func:`open_dataset`): file names, labels and the
    shape (C, H, W) of the first image; every image is read and decoded when it is asked for.

    ``read(i)`` decodes image i with the strict decoder of :func:`~mpdiff.data.image_files.decode_image` and checks its shape
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
                 label_source="none", ignored_files=(), first_where=None, progress=None, class_names=None):
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
        self.class_names = None if class_names is None else tuple(class_names)
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
        return decode_checked(self._source_here(), self.image_name(i), self._first_where, self._shape)

    def batches(self, batch_size=64, progress=False):
        """uint8 arrays [b, C, H, W] (latents: float32) of at most `batch_size` images, in order; only the
        current batch is held. progress: a tqdm bar (True/False; None: above PROGRESS_MIN_IMAGES images)."""
        batch_size = _check_batch_size(batch_size)
        check_memory(show_name(self.path, None), min(batch_size, len(self)), self._shape,  # before np.empty
                     self.dtype.itemsize)
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
        :func:`~mpdiff.data.reading.max_dataset_bytes`, and only then is anything decoded. progress: tqdm
        bars (True/False; None: the `progress` given to open_dataset, whose None shows them above
        PROGRESS_MIN_IMAGES images)."""
        if self.latent:
            raise DatasetError(f"{show_name(self.path, None)}: a latent dataset (.npy files) is read file by file "
                               f"(read, batches); load() decodes images only")
        progress = self.progress if progress is None else progress
        names = [self.image_name(i) for i in range(len(self))]
        show = _show_bar(len(names), progress)
        with open_source(self.path) as source:
            first_where, shape = check_headers(source, names, show)  # nothing decoded or allocated yet
            check_memory(source.shown, len(names), shape)
            images = decode_all(source, names, first_where, shape, show)
        return ImageDataset(images, self.labels, self.num_classes, name=self.name, label_source=self.label_source,
                            ignored_files=self.ignored_files, path=self.path, class_names=self.class_names)

    def check(self, progress=None):
        """Read and decode every image, as ``read`` does; return one line per bad file (damaged, of another
        shape than the first image, transparent, too large, ...), in the order of the images.
        progress: a tqdm bar (True/False; None: above PROGRESS_MIN_IMAGES images)."""
        problems = []
        with open_source(self.path) as source, \
                _bar(len(self), progress, f"Checking {source.shown}") as bar:
            for i in range(len(self)):
                try:
                    decode_checked(source, self.image_name(i), self._first_where, self._shape)
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
    Images above MAX_IMAGE_PIXELS pixels or files above MAX_FILE_BYTES are refused; every file (a ZIP entry
    too) is read whole only after its header was looked at (:func:`~mpdiff.data.reading.read_checked`).

    Latents: a folder or ZIP of ``.npy`` files (any case) instead is a latent dataset, as `mpdiff dataset
    encode` writes it (``00000/img-mean-std-00000000.npy``): every file a float32 array [8, R, R] (the VAE
    encoder's 4 means, then its 4 standard deviations >= 0), R a power of two >= 4, finite, in NumPy's
    .npy format without pickled objects (read with allow_pickle=False); ``read(i)`` gives it as float32
    (native byte order). Images and .npy files in one dataset are an error. Labels as for images.

    Memory: the index holds the names and labels, never pixels. ``load()`` (and :func:`load_dataset`)
    first reads every header and compares the array they need (N x C x H x W bytes) with
    :func:`~mpdiff.data.reading.max_dataset_bytes` (half of physical memory, or $MPDIFF_MAX_DATASET_BYTES).

    Labels (use_labels=True): from `dataset.json` at the root, EDM2's format
    `{"labels": [["00000/img00000000.png", 6], ...]}` or `{"labels": null}`, with an optional
    `"num_classes": int` (for subsets that lack the highest classes; otherwise num_classes =
    max class + 1). Every image needs exactly one entry with an integer class >= 0, and every
    entry must name an image of the dataset; an optional `"class_names"` (mpdiff's: one distinct
    name per class, as `mpdiff dataset convert` keeps the folder names) gives `ds.class_names`; other
    top-level fields are ignored, and no object may name a key twice. dataset.json may have at most 1 MiB + 1 KiB per image (and
    MAX_FILE_BYTES). Without dataset.json at the root (one in a subfolder is an error: its labels
    would be lost), if every image lies inside a top-level folder and there are at least two of
    them, the sorted folder names are the classes (as EDM2's dataset tool does; `ds.class_names`); otherwise the
    dataset is unlabelled. Folders that are all named by five digits are EDM2's chunks of 1000
    images (00000/img00000000.png), not classes: such a dataset is unlabelled (`ds.label_source`
    says so; numbered class folders need a dataset.json). use_labels=False ignores dataset.json
    and folders entirely.

    progress: the default of ``load()``'s bars (None = a tqdm bar when there are more than
    PROGRESS_MIN_IMAGES images; True/False); opening itself shows none.
    Every problem raises DatasetError with one line naming the file (and entry) at fault.
    """
    if isinstance(spec, str) and spec in BUILTIN_DATASETS:
        ds = builtin_dataset(spec, "train")
        return ds if use_labels else ImageDataset(ds.images, name=ds.name)
    path = os.fsdecode(os.fspath(spec))  # bytes paths too; undecodable bytes become surrogate escapes
    with open_source(path) as source:
        found = scan_source(source, use_labels)  # labels first: a bad dataset.json fails before any image is read
        first = found.image_names[0]
        first_where = source.where(first)
        with source.open(first) as stream:
            shape = probe_file(stream, first_where, first)  # the one header read at open
        check_first_shape(shape, first_where, source.path)
    return StreamedImageDataset(path, found.image_names, shape, found.labels, found.num_classes,
                                name=dataset_name(path), label_source=found.label_source,
                                ignored_files=found.ignored, first_where=first_where, progress=progress,
                                class_names=found.class_names)


def builtin_dataset(name, split="train"):
    """The built-in dataset `name` ("digits" or "mnist", :data:`~mpdiff.data.digits.BUILTIN_DATASETS`): its
    fixed `split` ("train" or "test") as an :class:`ImageDataset` named "NAME-SPLIT", labelled 0-9."""
    parts = BUILTIN_DATASETS[name]()
    return ImageDataset(parts[f"{split}_images"], parts[f"{split}_labels"], num_classes=BUILTIN_NUM_CLASSES,
                        name=f"{name}-{split}", label_source="built-in")


def load_dataset(spec, use_labels=True, *, progress=None):
    """:func:`open_dataset`, then every image decoded into memory (:meth:`StreamedImageDataset.load`, headers and
    memory checked first): for datasets small enough to hold (evaluation folders, MNIST-sized sets)."""
    return open_dataset(spec, use_labels, progress=progress).load()


def count_images(spec):
    """How many image (or latent) files the folder or ZIP `spec` holds, labels and shapes unread; None when
    it cannot be listed or holds none (for `mpdiff dataset check`'s summary when the dataset as a whole is
    refused)."""
    if isinstance(spec, str) and spec in BUILTIN_DATASETS:
        return len(builtin_dataset(spec, "train"))
    try:
        with open_source(os.fsdecode(os.fspath(spec))) as source:
            return len(scan_source(source, use_labels=False).image_names)
    except DatasetError:
        return None


def check_dataset(spec, use_labels=True, progress=None):
    """`mpdiff dataset check`: one line per bad file (:meth:`StreamedImageDataset.check`), empty when all are
    good; problems of the index (dataset.json, no images, an unusable first image) raise DatasetError as
    :func:`open_dataset` does."""
    return open_dataset(spec, use_labels, progress=progress).check(progress)
