"""Datasets: folders and ZIP archives of images with EDM2 labels (SPEC §7.3-7.4).

Every dataset is an :class:`ImageDataset`: uint8 images [N, C, H, W], integer labels, and
`resolution`, `channels`, `num_classes` (0 = unlabelled) and `name`.

:func:`open_dataset` reads an EDM2-style dataset (a folder or ZIP of images with an optional
`dataset.json`), or the built-in digits, and checks all of it up front: every image is fully
decoded at open time, and every problem raises :class:`~mpdiff.errors.DatasetError` with one line
naming the file. Nothing is skipped silently.
"""

import contextlib
import json
import os
import warnings
import zipfile

import numpy as np
import torch

from mpdiff.errors import DatasetError, first_line
from mpdiff.storage.files import open_regular, show_path

LABELS_FILE = "dataset.json"           # EDM2 label file, at the dataset root only
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")  # matched case-insensitively
PIL_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")  # the only decoders run (JPEG includes multi-picture MPO)
MIN_RESOLUTION = 4                     # the U-Net halves the resolution once per level
MAX_IMAGE_PIXELS = 8192 * 8192         # larger images are refused as possible decompression bombs
MAX_FILE_BYTES = 512 * 2**20           # per image file and for dataset.json
LABELS_BASE_BYTES = 2**20              # dataset.json may have LABELS_BASE_BYTES + LABELS_BYTES_PER_IMAGE per image
LABELS_BYTES_PER_IMAGE = 2**10         # (an EDM2 entry ["00000/img00000000.png", 999] is 30 bytes)
MAX_DATASET_BYTES_ENV = "MPDIFF_MAX_DATASET_BYTES"  # overrides the memory limit (default: half of physical memory)
MAX_NUM_CLASSES = 65536                # class indices must lie in [0, MAX_NUM_CLASSES)
PROGRESS_MIN_IMAGES = 1000             # progress=None shows a bar above this many images


class ImageDataset:
    """In-memory dataset of uint8 images [N, C, H, W] and integer labels [N] (or None).

    Everything is held in memory, which suits the dataset sizes this project trains on; very
    large datasets (e.g. ImageNet at 64x64 is ~16 GB) would want lazy per-item loading instead.
    """

    def __init__(self, images, labels=None, num_classes=None, name="dataset",
                 label_source=None,     # where labels came from: "dataset.json", "directories", "built-in", "none"
                 ignored_files=()):     # relative paths of non-image files that were skipped, for the log
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

    def __len__(self):
        return len(self.images)

    @property
    def channels(self):
        return self.images.shape[1]

    @property
    def resolution(self):
        return self.images.shape[2]


# ----------------------------------------------------------------------------------------------
# Folders and ZIP archives (SPEC §7.3-7.4)

def open_dataset(spec, use_labels=True, *, progress=None):
    """Open "digits" (the built-in train split) or a folder / ZIP archive of images.

    Images: files ending in .png .jpg .jpeg .bmp .webp (any case), searched recursively and
    sorted by their relative path with "/" separators (as EDM2's dataset tool names them). A
    ZIP may be stored or deflated. Every image is fully decoded here, so a damaged file fails
    now, not mid-training. Ignored: files with other extensions, `dataset.json` itself, anything
    under `__MACOSX/`, and any path with a component starting with "." (dotfiles such as
    `.DS_Store`, `._x.png`, `.ipynb_checkpoints/`); their relative paths are kept in
    `ds.ignored_files`. A local folder literally named "digits" must be given as "./digits".

    Pixels: 8-bit grayscale (mode L, also 1-bit) gives 1 channel, RGB gives 3. Palette images
    become RGB; YCbCr/CMYK JPEGs are converted to RGB; 16-bit grayscale is rounded to 8 bits
    (x / 257). An alpha channel (LA, RGBA, transparent palette) is dropped only when every pixel
    is opaque, otherwise it is an error. 32-bit/float modes are refused. Multi-frame files give
    their first frame; EXIF orientation is not applied (as in EDM2). All images must share one
    channel count and one square size whose side is a power of two >= 4. Images above
    MAX_IMAGE_PIXELS pixels or files above MAX_FILE_BYTES are refused.

    Labels (use_labels=True): from `dataset.json` at the root, EDM2's format
    `{"labels": [["00000/img00000000.png", 6], ...]}` or `{"labels": null}`, with an optional
    `"num_classes": int` (for subsets that lack the highest classes; otherwise num_classes =
    max class + 1). Every image needs exactly one entry with an integer class >= 0, and every
    entry must name an image of the dataset; other top-level fields are ignored. Without
    dataset.json at the root (one in a subfolder is an error: its labels would be lost), if
    every image lies inside a top-level folder and there are at least two of them, the sorted
    folder names are the classes (as EDM2's dataset tool does); otherwise the dataset is
    unlabelled. use_labels=False ignores dataset.json and folders entirely.

    progress: None = a tqdm bar when there are more than PROGRESS_MIN_IMAGES images; True/False.
    Every problem raises DatasetError with one line naming the file (and entry) at fault.
    """
    from mpdiff.data.digits import (  # the built-in dataset builds on this module
        BUILTIN_DIGITS,
        digits_dataset,
    )

    if isinstance(spec, str) and spec == BUILTIN_DIGITS:
        ds = digits_dataset("train")
        return ds if use_labels else ImageDataset(ds.images, name=ds.name)
    path = os.fspath(spec)
    with _open_source(path) as source:
        files = source.list_files()
        image_names = sorted(name for name in files if _is_image_name(name))
        ignored = sorted(name for name in files if not _is_image_name(name) and name != LABELS_FILE)
        if not image_names:
            raise DatasetError(f"{source.shown}: no images found (searched recursively for "
                               f"{', '.join(IMAGE_EXTENSIONS)} files; other files ignored: {len(ignored)})")
        # Labels first: a bad dataset.json fails before minutes of decoding.
        labels, num_classes, label_source = None, 0, "none"
        if use_labels and LABELS_FILE in files:
            where = source.where(LABELS_FILE)
            labels, num_classes = parse_labels_json(source.read(LABELS_FILE), where, image_names)
            label_source = LABELS_FILE if labels is not None else "none"
        elif use_labels:
            nested = sorted(name for name in files if name.endswith("/" + LABELS_FILE) and _is_visible(name))
            if nested:  # e.g. a ZIP made from outside the folder: its labels would be lost silently
                raise DatasetError(f"{source.where(nested[0])}: {LABELS_FILE} must be at the dataset root, "
                                   f"not in a subfolder (or pass use_labels=False)")
            labels, num_classes = labels_from_directories(image_names, _show(path, None))
            label_source = "directories" if labels is not None else "none"
        images = _decode_all(source, image_names, progress)
    return ImageDataset(images, labels, num_classes, name=_dataset_name(path),
                        label_source=label_source, ignored_files=ignored)


def one_hot(class_ids, num_classes):
    """Float32 one-hot rows [N, num_classes] for integer class ids (a tensor or a list)."""
    return torch.nn.functional.one_hot(torch.as_tensor(class_ids), num_classes).to(torch.float32)


def write_dataset_json(directory, entries, num_classes=None):
    """Write EDM2-style `dataset.json` into `directory` (atomically); return its path.

    entries: (relative posix path, class int or None) per image. All None -> `"labels": null`;
    mixing None and classes is a caller error. `num_classes` is written when labels exist.
    """
    from mpdiff.storage.files import write_json

    entries = [(path, cls) for path, cls in entries]
    seen = set()
    for path, cls in entries:
        if not isinstance(path, str) or not path or "\\" in path or path.startswith("/"):
            raise ValueError(f"dataset entry path must be a relative posix path, got {path!r}")
        if path in seen:
            raise ValueError(f"dataset entry {path!r} appears twice")
        seen.add(path)
        if cls is not None and (isinstance(cls, bool) or not isinstance(cls, (int, np.integer)) or cls < 0):
            raise ValueError(f"class of {path!r} must be a non-negative int or None, got {cls!r}")
    classes = [cls for _, cls in entries]
    if all(cls is None for cls in classes):
        doc = {"labels": None}
    elif any(cls is None for cls in classes):
        raise ValueError("either every entry has a class or none has")
    else:
        doc = {"labels": [[path, int(cls)] for path, cls in entries]}
        if num_classes is not None:
            if int(num_classes) <= max(classes):
                raise ValueError(f"num_classes={num_classes} but the largest class is {max(classes)}")
            doc["num_classes"] = int(num_classes)
    out = os.path.join(os.fspath(directory), LABELS_FILE)
    write_json(out, doc)
    return out


# ---- labels ----------------------------------------------------------------------------------

def parse_labels_json(data, where, image_names):
    """Validate dataset.json bytes against the sorted image names; return (labels or None, num_classes).

    `where` names the file in messages. Raises DatasetError with one line for every defect.
    """
    try:
        doc = json.loads(data)
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


def labels_from_directories(image_names, where="dataset"):
    """Classes from sorted top-level folder names (EDM2 dataset tool), or (None, 0) when the
    images are not all inside top-level folders or there is only one folder."""
    if any("/" not in name for name in image_names):
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

def decode_image(data, where):
    """Decode one image file's bytes into uint8 [C, H, W] (C = 1 or 3), refusing anything doubtful.

    `where` names the file in messages. The whole file is decoded and, for PNG, every chunk
    checksum is verified, with PIL's truncated-image tolerance forced off.
    """
    from PIL import Image

    if len(data) == 0:
        raise DatasetError(f"{where}: cannot read image (empty file)")
    Image.init()  # register every plugin, so that the names in PIL_FORMATS are known
    formats = [name for name in PIL_FORMATS if name in Image.OPEN]  # WEBP needs libwebp
    try:
        with _strict_pil(), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # checked by Image.open
            with Image.open(io.BytesIO(data), formats=formats) as image:
                image.verify()  # PNG: CRC of every chunk, through IEND
            with Image.open(io.BytesIO(data), formats=formats) as image:
                image.load()
                return _to_array(image, where)
    except DatasetError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):  # PIL's own check, at open
        reason = (f"more than {MAX_IMAGE_PIXELS} pixels; refused as a possible decompression bomb")
    except Image.UnidentifiedImageError:
        reason = "not a PNG, JPEG, BMP or WebP image, or its header is damaged"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error, ...) on damaged data
        reason = first_line(e)
    raise DatasetError(f"{where}: cannot read image ({reason})")


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


def _to_array(image, where):
    """PIL image -> uint8 [C, H, W] following the mode rules of :func:`open_dataset`."""
    mode = image.mode
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
        array = ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(x / 257): 16 -> 8 bits
    else:
        raise DatasetError(f"{where}: unsupported image mode {mode} (expected 8-bit grayscale or RGB)")
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.uint8)


def _fits_16_bits(image):
    low, high = image.getextrema()
    return 0 <= low and high <= 65535


def _drop_opaque_alpha(array, mode, where):
    if np.any(array[..., -1] != 255):
        raise DatasetError(f"{where}: image has transparent pixels (mode {mode}); "
                           f"flatten it onto a background first")
    return array[..., :-1]


def _decode_all(source, image_names, progress):
    """Decode every image into one preallocated uint8 [N, C, R, R] array, checking shapes."""
    from tqdm import tqdm

    show = len(image_names) > PROGRESS_MIN_IMAGES if progress is None else bool(progress)
    images = None
    first = None  # (where, shape) of the first image: every other must match it
    with tqdm(total=len(image_names), desc=f"Reading {source.shown}", unit="img", disable=not show) as bar:
        for i, name in enumerate(image_names):
            where = source.where(name)
            array = decode_image(source.read(name), where)
            if first is None:
                _check_first_shape(array.shape, where)
                first = (where, array.shape)
                images = np.empty((len(image_names), *array.shape), dtype=np.uint8)
            elif array.shape != first[1]:
                _raise_shape_mismatch(array.shape, where, *first)
            images[i] = array
            bar.update(1)
    return images


def _check_first_shape(shape, where):
    _, height, width = shape
    if height != width:
        raise DatasetError(f"{where}: image is {width}x{height} pixels; images must be square, with a "
                           f"power-of-two side of at least {MIN_RESOLUTION}")
    if width < MIN_RESOLUTION or width & (width - 1):
        raise DatasetError(f"{where}: image is {width}x{height} pixels; the side must be a power of two of at "
                           f"least {MIN_RESOLUTION} (the U-Net halves the resolution at each level)")


def _raise_shape_mismatch(shape, where, first_where, first_shape):
    if shape[1:] != first_shape[1:]:
        raise DatasetError(f"{where}: image is {shape[2]}x{shape[1]} pixels but {first_where} is "
                           f"{first_shape[2]}x{first_shape[1]}; all images must have the same size")
    kind = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}
    raise DatasetError(f"{where}: image is {kind[shape[0]]} but {first_where} is {kind[first_shape[0]]}; "
                       f"all images must have the same channel count")


# ---- sources: a folder or a ZIP archive -----------------------------------------------------

def _is_visible(name):
    """False for macOS archive debris (__MACOSX/) and for dotfiles or anything in a dot-folder."""
    parts = name.split("/")
    return parts[0] != "__MACOSX" and not any(part.startswith(".") for part in parts)


def _is_image_name(name):
    return _is_visible(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _dataset_name(path):
    base = os.path.basename(os.path.normpath(os.path.abspath(path)))
    return base[:-4] if base.lower().endswith(".zip") else base


def _open_source(path):
    if os.path.isdir(path):
        return _FolderSource(path)
    if not os.path.exists(path):
        raise DatasetError(f"{_show(path, None)}: no such file or directory (expected a folder or ZIP of images, "
                           f"or 'digits')")
    if not os.path.isfile(path):
        raise DatasetError(f"{_show(path, None)}: not a directory or a ZIP archive")
    return _ZipSource(path)


class _FolderSource:
    """Files of a directory tree, named by relative posix path."""

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
        def fail(error):
            raise DatasetError(f"{_show(str(error.filename), None)}: cannot list directory "
                               f"({error.strerror or first_line(error)})")

        names = set()
        visited = set()  # (device, inode) of directories seen: symlinked folders are followed once
        for directory, subdirs, files in os.walk(self.path, onerror=fail, followlinks=True):
            info = os.stat(directory)
            if (info.st_dev, info.st_ino) in visited:
                subdirs[:] = []
                continue
            visited.add((info.st_dev, info.st_ino))
            relative = os.path.relpath(directory, self.path)
            for file in files:
                name = file if relative == "." else os.path.join(relative, file)
                names.add(name.replace(os.sep, "/"))
        return names

    def read(self, name):
        file, where = os.path.join(self.path, *name.split("/")), self.where(name)
        try:
            info = os.stat(file)  # before open(): opening a FIFO named x.png would block forever
            if not stat.S_ISREG(info.st_mode):
                raise DatasetError(f"{where}: cannot read file (not a regular file)")
            if info.st_size > MAX_FILE_BYTES:
                raise DatasetError(f"{where}: file is {info.st_size} bytes, above the limit of {MAX_FILE_BYTES}")
            with open(file, "rb") as f:
                return f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise DatasetError(f"{where}: cannot read file ({e.strerror or first_line(e)})") from None


class _ZipSource:
    """Members of a ZIP archive (stored or deflated), named by posix path."""

    def __init__(self, path):
        self.path = path
        self.shown = _show(path, None)  # for messages
        self.zip = None
        self.members = {}

    def __enter__(self):
        try:
            self.zip = zipfile.ZipFile(self.path)
            infos = self.zip.infolist()
        except zipfile.BadZipFile as e:
            if self.path.lower().endswith(".zip"):
                raise DatasetError(f"{self.shown}: damaged ZIP archive ({first_line(e)})") from None
            raise DatasetError(f"{self.shown}: not a directory or a ZIP archive") from None
        except Exception as e:  # zipfile raises assorted types on hostile headers
            raise DatasetError(f"{self.shown}: damaged ZIP archive ({first_line(e)})") from None
        try:
            for info in infos:
                name = info.filename.replace("\\", "/")
                if name.endswith("/"):  # a folder entry
                    continue
                if not name:
                    raise DatasetError(f"{self.shown}: damaged ZIP archive (an entry has an empty name)")
                if name in self.members:
                    raise DatasetError(f"{self.shown}: damaged ZIP archive (two entries named '{_show(name)}')")
                self.members[name] = info
        except DatasetError:
            self.zip.close()  # __exit__ does not run when __enter__ raises
            raise
        return self

    def __exit__(self, *exc):
        if self.zip is not None:
            self.zip.close()
        return False

    def where(self, name):
        return f"{self.shown}/{_show(name, None)}"

    def list_files(self):
        return set(self.members)

    def read(self, name):
        info = self.members[name]
        where = self.where(name)
        if info.file_size > MAX_FILE_BYTES:
            raise DatasetError(f"{where}: file is {info.file_size} bytes, above the limit of {MAX_FILE_BYTES}")
        try:
            with self.zip.open(info) as f:
                return f.read()  # zipfile stops at the declared size and checks the CRC
        except Exception as e:  # BadZipFile (bad CRC), zlib.error, EOFError, NotImplementedError, encrypted, ...
            raise DatasetError(f"{where}: damaged ZIP entry ({first_line(e)})") from None


def _show(text, limit=200):
    """A name as it may appear in a one-line message: control characters escaped, long names cut."""
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


