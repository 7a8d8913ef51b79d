"""Reading a dataset's folder or ZIP (SPEC §7.3-7.4): the machinery behind :mod:`mpdiff.data.datasets`.

:func:`scan_source` lists the files and reads the labels, decoding nothing; :func:`probe_file` reads one
file's shape from its header, bounding its memory; :func:`read_checked` reads a file whole only after its
header; :func:`decode_checked` decodes one file and checks it against the dataset's shape. Decoding a whole dataset into memory is :func:`check_headers` (every header, one shape), then
:func:`check_memory` (the array they need against :func:`max_dataset_bytes`), then :func:`decode_all`.
"""

from typing import NamedTuple

import numpy as np

from mpdiff.budgets import memory_limit
from mpdiff.data.image_files import decode_image, probe_image
from mpdiff.data.labels import (
    CHUNK_FOLDERS_UNLABELLED,
    class_names_of_directories,
    in_chunk_folders,
    labels_file_limit,
    labels_from_directories,
    parse_labels_document,
)
from mpdiff.data.latent_files import decode_latent, probe_latent
from mpdiff.data.shapes import check_first_shape, raise_shape_mismatch
from mpdiff.data.sources import (
    IMAGE_EXTENSIONS,
    LATENT_EXTENSIONS,
    is_data_name,
    is_latent_name,
    is_visible,
    read_all,
)
from mpdiff.errors import DatasetError
from mpdiff.storage.dataset_json import LABELS_FILE

MAX_DATASET_BYTES_ENV = "MPDIFF_MAX_DATASET_BYTES"  # overrides the memory limit (default: half of physical memory)


class SourceScan(NamedTuple):
    """What a folder or ZIP holds, before any image is decoded (see :func:`scan_source`)."""
    image_names: list     # sorted relative posix paths of the images
    ignored: list         # sorted relative paths of the other files (not dataset.json)
    labels: object        # int64 [N], or None
    num_classes: int
    label_source: str     # "dataset.json", "directories", "none" or CHUNK_FOLDERS_UNLABELLED
    class_names: object = None  # tuple of num_classes names (the folders, or dataset.json's "class_names"), or None


def scan_source(source, use_labels=True):
    """List the images of an open source (:func:`~mpdiff.data.sources.open_source`) and read their labels,
    as described in :func:`~mpdiff.data.datasets.open_dataset`; nothing is decoded. Raises DatasetError when there is no image or the
    labels are unusable."""
    files = source.list_files()
    image_names = sorted(name for name in files if is_data_name(name))
    ignored = sorted(name for name in files if not is_data_name(name) and name != LABELS_FILE)
    if not image_names:
        raise DatasetError(f"{source.shown}: no images found (searched recursively for "
                           f"{', '.join(IMAGE_EXTENSIONS + LATENT_EXTENSIONS)} files; other files ignored: "
                           f"{len(ignored)})")
    latent = [is_latent_name(name) for name in image_names]
    if any(latent) and not all(latent):
        npy, image = image_names[latent.index(True)], image_names[latent.index(False)]
        raise DatasetError(f"{source.where(npy)} is a latent (.npy) but {source.where(image)} is an image; a "
                           f"dataset holds images or latents, not both")
    labels, num_classes, label_source, class_names = None, 0, "none", None
    if use_labels and LABELS_FILE in files:
        where = source.where(LABELS_FILE)
        limit = labels_file_limit(len(image_names))
        data = source.read(LABELS_FILE, limit, f" for the {LABELS_FILE} of a dataset of {_count(len(image_names), 'image')} "
                                              f"(1 MiB + 1 KiB per image)")
        labels, num_classes, class_names = parse_labels_document(data, where, image_names)
        label_source = LABELS_FILE if labels is not None else "none"
    elif use_labels:
        nested = sorted(name for name in files if name.endswith("/" + LABELS_FILE) and is_visible(name))
        if nested:  # e.g. a ZIP made from outside the folder: its labels would be lost silently
            raise DatasetError(f"{source.where(nested[0])}: {LABELS_FILE} must be at the dataset root, "
                               f"not in a subfolder (or pass use_labels=False)")
        labels, num_classes = labels_from_directories(image_names, source.shown)
        if labels is not None:
            label_source, class_names = "directories", class_names_of_directories(image_names)
        elif in_chunk_folders(image_names):
            label_source = CHUNK_FOLDERS_UNLABELLED
    return SourceScan(image_names, ignored, labels, num_classes, label_source, class_names)


def probe_file(stream, where, name):
    """(channels, height, width) from the header of an image or, for a name ending in .npy, a latent: the
    one place where what a file will take in memory is known, and bounded, before anything is allocated.
    An image's header must promise at most MAX_IMAGE_PIXELS pixels, a latent's exactly the bytes that
    follow it; and the decoded array must fit :func:`max_dataset_bytes` (:func:`check_memory`)."""
    latent = is_latent_name(name)
    shape = probe_latent(stream, where) if latent else probe_image(stream, where)
    check_memory(where, 1, shape, itemsize=4 if latent else 1)
    return shape


def read_headers(source, names, show):
    """(where, shape) of each file from its header (:func:`probe_file`), nothing decoded; `show`: a tqdm bar."""
    from tqdm import tqdm

    for name in tqdm(names, desc=f"Checking {source.shown}", unit="img", disable=not show):
        where = source.where(name)
        with source.open(name) as stream:
            yield where, probe_file(stream, where, name)


def check_headers(source, image_names, show):
    """Read every image's header; check that all share one valid shape. Returns (where, shape) of the first."""
    first = None  # (where, shape) of the first image: every other must match it
    for where, shape in read_headers(source, image_names, show):
        if first is None:
            check_first_shape(shape, where, source.path)
            first = (where, shape)
        elif shape != first[1]:
            raise_shape_mismatch(shape, where, *first, source.path)
    return first


def decode_all(source, image_names, first_where, shape, show):
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
            images[i] = decode_checked(source, name, first_where, shape)
            bar.update(1)
    return images


def decode_checked(source, name, first_where, shape):
    """Image `name` of an open source decoded into uint8 [C, H, W] (a latent: float32 [8, R, R]); DatasetError
    naming it when it cannot be read (:func:`read_checked`: its header first) or decoded, or when its shape
    is not `shape` (that of the first image, named `first_where`)."""
    where = source.where(name)
    data = read_checked(source, name, first_where, shape)
    array = decode_latent(data, where) if is_latent_name(name) else decode_image(data, where)
    if array.shape != shape:  # the decoder disagrees with the header (or the file changed since it was read)
        raise_shape_mismatch(array.shape, where, first_where, shape, source.path)
    return array


def read_checked(source, name, first_where=None, shape=None):
    """The bytes of file `name` of an open source, read only after its header was looked at through the
    same stream (:func:`probe_file`: a few bytes, of a ZIP entry too): an image over the pixel limit, a
    latent whose header does not match its size, an array over the memory budget or (when `shape` is
    given) another shape than the first file's (named `first_where`) is refused before the file is read
    whole or anything is decoded. The one way every file of a dataset is read (training, check, convert)."""
    where = source.where(name)
    try:
        with source.open(name) as stream:
            found = probe_file(stream, where, name)
            if shape is not None and found != shape:
                raise_shape_mismatch(found, where, first_where, shape, source.path)
            return read_all(stream, where)
    except KeyError:  # a ZIP opened again (another process) that no longer holds it
        raise DatasetError(f"{where}: not in the archive any more (it changed after the dataset was opened)") from None


def max_dataset_bytes():
    """(limit in bytes or None, where it comes from) for the uint8 array of a dataset's images:
    $MPDIFF_MAX_DATASET_BYTES when set, else half of the machine's physical memory."""
    return memory_limit(MAX_DATASET_BYTES_ENV, error=DatasetError)


def check_memory(shown, count, shape, itemsize=1):
    """DatasetError unless `count` arrays of `shape` (C, H, W) with `itemsize` bytes per value (uint8 images:
    1; float32 latents: 4) fit :func:`max_dataset_bytes`: checked before they are allocated."""
    channels, height, width = shape
    need = count * channels * height * width * itemsize
    limit, origin = max_dataset_bytes()
    if limit is not None and need > limit:
        what = "latent" if itemsize == 4 else "image"
        raise DatasetError(f"{shown}: {_count(count, what)} of {width}x{height} pixels with "
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
