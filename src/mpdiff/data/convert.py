"""Converting any folder or ZIP of images into an EDM2-style dataset (`mpdiff dataset convert`).

The source is read as :func:`~mpdiff.data.datasets.open_dataset` reads a dataset (the same files,
decoder, checks and labels: `dataset.json` at the root, else class-per-folder, else none), except
that its images may have any size and may mix grayscale and RGB. Each image is brought to one
square power-of-two size by a transform, and the result is written the way EDM2's dataset tool
writes it: ``00000/img00000000.png`` ... (1000 images per chunk folder) and ``dataset.json`` with
``{"labels": [["00000/img00000000.png", 6], ...]}`` (or ``"labels": null``).

Choices:

* Transparency: an image with any transparent pixel is refused, as the reader refuses it (compositing
  onto a guessed background would invent pixels); flatten such images first.
* Channels: 1 when every image is grayscale, else 3 (grayscale images are repeated into RGB).
* Every header is read before anything is written, so a size that a transform cannot take (an image
  larger than the canvas of `pad`), a missing resolution or transform fails before any output exists.
  Each file is then read whole only after its header was looked at again (a decompression bomb, or a
  ZIP entry that inflates to much more than it claims, costs nothing).
* Nothing is left out without a word: files named as images of kinds the reader does not decode (GIF,
  TIFF, HEIC, ...) are refused, naming them, unless `skip_other_images` (then listed, as the files that
  are not images are: :meth:`Conversion.notes`).
* Class names: the folder names (class-per-folder), or the source dataset.json's "class_names", are
  kept under that extra key of DEST's dataset.json (EDM2 reads "labels" only).
* Output: PNG files (compressed; a ZIP stores them as they are). A folder is written into a hidden
  sibling ``.NAME.partial-XXXXXXXX`` and renamed to NAME when complete; a ZIP is written with
  :func:`~mpdiff.storage.files.atomic_write`. An interrupted conversion leaves no DEST. A DEST that
  exists and is not empty is refused.
"""

import json
import os
import zipfile
from typing import NamedTuple

import numpy as np

from mpdiff.data.image_files import MAX_IMAGE_PIXELS, decode_image
from mpdiff.data.labels import CHUNK_FOLDERS_UNLABELLED, shown_class_names
from mpdiff.data.reading import read_checked, read_headers, scan_source
from mpdiff.data.shapes import MIN_RESOLUTION, suggested_conversion
from mpdiff.data.sources import (
    IMAGE_EXTENSIONS,
    describe_other_images,
    is_latent_name,
    open_source,
    other_images,
    show_name,
)
from mpdiff.errors import ConfigError, DatasetError
from mpdiff.storage.dataset_json import LABELS_FILE, labels_document
from mpdiff.storage.files import (
    atomic_write,
    destination_stat,
    show_path,
    write_bytes,
)
from mpdiff.storage.staging import folder_written_whole

TRANSFORMS = ("pad", "resize", "center-crop", "center-crop-dhariwal")
IMAGES_PER_FOLDER = 1000        # EDM2: 00000/img00000000.png ... 00000/img00000999.png, 00001/img00001000.png
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # ZIP entries carry this fixed time: the same input gives the same bytes


class Conversion(NamedTuple):
    """What :func:`convert_dataset` wrote."""
    dest: str
    count: int
    resolution: int
    channels: int
    num_classes: int
    label_source: str   # as ImageDataset.label_source: "dataset.json", "directories", "none", ...
    class_names: tuple = None  # the classes' names, kept in DEST's dataset.json ("class_names"), or None
    skipped: dict = None  # {".gif": [names], ...}: images of kinds not read, left out (skip_other_images)
    ignored: tuple = ()   # the source's other files (not images, not dataset.json), not read

    def notes(self):
        """Lines about the files of the source that were not converted (for stderr): none when all were."""
        lines = []
        if self.skipped:
            count = sum(len(names) for names in self.skipped.values())
            lines.append(f"skipped {count:,} image{'' if count == 1 else 's'} of kinds convert does not read: "
                         f"{describe_other_images(self.skipped)}")
        skipped = {name for names in (self.skipped or {}).values() for name in names}
        others = [name for name in self.ignored if name not in skipped]
        if others:
            shown = ", ".join(show_name(name, 80) for name in others[:5]) + (", ..." if len(others) > 5 else "")
            what = "file that is not an image" if len(others) == 1 else "files that are not images"
            lines.append(f"ignored {len(others):,} {what}: {shown}")
        return lines

    def summary(self):
        """One line: wrote N images (RxR, C channels, K classes from <labels source>) to DEST."""
        if self.num_classes:
            origin = "top-level folders" if self.label_source == "directories" else self.label_source
            labels = f"{self.num_classes} {'class' if self.num_classes == 1 else 'classes'} from {origin}"
            if self.class_names:
                labels += f": {shown_class_names(self.class_names)}"
        elif self.label_source == CHUNK_FOLDERS_UNLABELLED:
            labels = "unlabelled: EDM2 chunk folders 00000/... are not classes"
        else:
            labels = "unlabelled"
        channels = f"{self.channels} channel{'' if self.channels == 1 else 's'}"
        return (f"wrote {self.count:,} image{'' if self.count == 1 else 's'} ({self.resolution}x{self.resolution}, "
                f"{channels}, {labels}) to {show_path(self.dest)}")


def convert_dataset(src, dest, resolution=None, transform=None, *, progress=True, skip_other_images=False):
    """Convert the images at `src` (a folder, ZIP or class-per-folder tree) into an EDM2-style dataset at
    `dest` (a folder, or a ZIP when the name ends in .zip); return a :class:`Conversion`.

    resolution: the output side R (a power of two >= 4). Needed unless every source image is already
    one R x R size. transform (one of TRANSFORMS), needed unless every image is already R x R:

    * ``pad``: centre the image on an R x R black canvas; an image larger than R is refused.
    * ``resize``: Lanczos resize to R x R; the aspect ratio is not kept.
    * ``center-crop``: the largest centred square, then a Lanczos resize to R x R.
    * ``center-crop-dhariwal``: the ADM recipe EDM2 uses for ImageNet: halve the image with a box
      filter while its short side is at least 2R, resize it (bicubic) so that the short side is R,
      then take the centred R x R square.

    progress: tqdm bars over the images (header check, then conversion).

    Files named as images of other kinds (GIF, TIFF, HEIC, ...: :data:`~mpdiff.data.sources.OTHER_IMAGE_EXTENSIONS`)
    are refused before anything is read, naming them, unless `skip_other_images`: then they are left out
    and listed in the result (``skipped``; :meth:`Conversion.notes` says so), as are the other files
    (``ignored``).
    """
    src = os.fsdecode(os.fspath(src))
    dest = os.fsdecode(os.fspath(dest))
    _check_options(resolution, transform)
    check_destination(src, dest)  # before reading anything: a refused DEST costs nothing
    with open_source(src) as source:
        scan = scan_source(source)
        skipped = _other_images(source, scan.ignored, skip_other_images)
        if is_latent_name(scan.image_names[0]):
            raise DatasetError(f"{source.shown}: holds latents (.npy files); convert takes images (mpdiff dataset "
                               f"encode makes latents from a converted image dataset)")
        shapes = [shape for _, shape in read_headers(source, scan.image_names, progress)]  # nothing decoded
        resolution = _plan(source, scan.image_names, shapes, resolution, transform)
        channels = 3 if any(shape[0] == 3 for shape in shapes) else 1
        names = scan.class_names if scan.labels is not None else None
        files = _png_files(source, scan.image_names, resolution, transform, channels, progress)
        write_dataset(dest, files, len(shapes), scan.labels, scan.num_classes, names)
    return Conversion(dest, len(shapes), resolution, channels, scan.num_classes if scan.labels is not None else 0,
                      scan.label_source, names, skipped, tuple(scan.ignored))


def _other_images(source, ignored, skip):
    """{".gif": [names], ...} of the source's images of kinds convert does not read; refused unless `skip`."""
    kinds = other_images(ignored)
    if kinds and not skip:
        count = sum(len(names) for names in kinds.values())
        readable = ", ".join(IMAGE_EXTENSIONS[:-1]) + " and " + IMAGE_EXTENSIONS[-1]
        raise DatasetError(f"{source.shown}: {count:,} file{'s are' if count > 1 else ' is'} named as images of "
                           f"kinds convert does not read ({describe_other_images(kinds)}); it reads {readable} files: "
                           f"convert {'them' if count > 1 else 'it'} to PNG first, or pass --skip-other-images "
                           f"to leave {'them' if count > 1 else 'it'} out")
    return kinds or None


def transform_image(image, transform, resolution):
    """uint8 [C, H, W] -> uint8 [C, R, R] by `transform` (see :func:`convert_dataset`); an image that
    is already R x R is returned as it is, by every transform."""
    image = np.asarray(image)
    _, height, width = image.shape
    size = resolution
    if (height, width) == (size, size):
        return image
    if transform == "pad":
        if height > size or width > size:
            raise ValueError(f"a {width}x{height} image does not fit on a {size}x{size} canvas")
        canvas = np.zeros((image.shape[0], size, size), dtype=np.uint8)
        top, left = (size - height) // 2, (size - width) // 2
        canvas[:, top:top + height, left:left + width] = image
        return canvas
    from PIL import Image

    from mpdiff.storage.images import from_pil, to_pil

    if transform == "resize":
        return from_pil(to_pil(image).resize((size, size), Image.Resampling.LANCZOS))
    if transform == "center-crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = image[:, top:top + side, left:left + side]
        return from_pil(to_pil(square).resize((size, size), Image.Resampling.LANCZOS))
    if transform == "center-crop-dhariwal":
        picture = to_pil(image)
        while min(picture.size) >= 2 * size:  # halve with a box filter (an average of 2x2 pixels)
            picture = picture.resize((picture.width // 2, picture.height // 2), Image.Resampling.BOX)
        return from_pil(_bicubic_center_crop(picture, size))
    raise ValueError(f"unknown transform {transform!r}; expected one of {', '.join(TRANSFORMS)}")


def _bicubic_center_crop(picture, size):
    """The last steps of the ADM recipe: a bicubic resize that makes the short side `size`, then the centred
    `size` x `size` square. The resized picture is made whole (as ADM does) only when it has at most
    MAX_IMAGE_PIXELS pixels: a long thin image (8192x1 to 512 would be 4,194,304x512) is resized straight
    into the square instead (PIL's resize of a box of the source: the same filter at the same places,
    rounded once per pass as PIL orders them; memory bounded by the output)."""
    from PIL import Image

    scale = size / min(picture.size)
    width, height = round(picture.width * scale), round(picture.height * scale)
    top, left = (height - size) // 2, (width - size) // 2
    if width * height <= MAX_IMAGE_PIXELS:
        whole = picture.resize((width, height), Image.Resampling.BICUBIC)
        return whole.crop((left, top, left + size, top + size))
    x, y = picture.width / width, picture.height / height  # source pixels per resized pixel
    return picture.resize((size, size), Image.Resampling.BICUBIC,
                          box=(left * x, top * y, (left + size) * x, (top + size) * y))


# ---- checks before any work -----------------------------------------------------------------------

def _is_resolution(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= MIN_RESOLUTION \
        and not value & (value - 1)


def _check_options(resolution, transform):
    if resolution is not None and not _is_resolution(resolution):
        raise ConfigError(f"--resolution must be a power of two of at least {MIN_RESOLUTION} (4, 8, 16, 32, 64, ...), "
                          f"got {resolution}")
    if transform is not None and transform not in TRANSFORMS:
        raise ConfigError(f"--transform must be one of {', '.join(TRANSFORMS)}, got {transform!r}")


def check_destination(src, dest, command="convert"):
    """Refuse a DEST that exists and is not empty (or is not what its name says), or a folder DEST
    inside the source folder (its images would join the source's). `command` names the command in
    the messages (convert, encode)."""
    shown = show_path(dest)
    if not dest or os.path.basename(os.path.normpath(dest)) in ("", ".", ".."):
        raise ConfigError(f"DEST '{shown}' must name a new folder or a .zip file")
    info = destination_stat(dest)
    is_zip = dest.lower().endswith(".zip")
    if info is not None:
        if os.path.isdir(dest):
            if is_zip:
                raise ConfigError(f"{shown} is a folder; a .zip DEST must be a file (choose another name)")
            if os.listdir(dest):
                raise ConfigError(f"{shown} is not empty; {command} writes a complete new dataset (choose another "
                                  f"DEST, or remove this one)")
        elif is_zip and os.path.isfile(dest):
            if info.st_size:
                raise ConfigError(f"{shown} already exists; {command} writes a complete new dataset (choose another "
                                  f"DEST, or remove this one)")
        else:
            raise ConfigError(f"{shown} already exists and is not a folder; name a new folder or a .zip file")
    if not is_zip and os.path.isdir(src):
        inner, outer = os.path.realpath(dest), os.path.realpath(src)
        if os.path.commonpath([inner, outer]) == outer:
            raise ConfigError(f"DEST {shown} is inside SRC {show_path(src)}; its images would become part of "
                              f"the source (choose a folder outside it)")


def _plan(source, names, shapes, resolution, transform):
    """The output side, once the headers show that `transform` can make every image that size."""
    sizes = {shape[1:] for shape in shapes}
    choices = "|".join(TRANSFORMS)
    if resolution is None:
        if len(sizes) > 1:
            first = shapes[0][1:]
            other = next(i for i, shape in enumerate(shapes) if shape[1:] != first)
            raise ConfigError(f"{source.shown}: images have {len(sizes)} different sizes (e.g. {_wxh(first)} and "
                              f"{_wxh(shapes[other][1:])} at {source.where(names[other])}); choose --resolution R "
                              f"(a power of two >= {MIN_RESOLUTION}) and --transform {choices}{_suggested(shapes)}")
        height, width = sizes.pop()
        if height != width or not _is_resolution(width):
            raise ConfigError(f"{source.shown}: images are {_wxh((height, width))} pixels, not square with a "
                              f"power-of-two side >= {MIN_RESOLUTION}; choose --resolution R and --transform {choices}"
                              f"{_suggested(shapes)}")
        return width
    if transform is None:
        other = next((i for i, shape in enumerate(shapes) if shape[1:] != (resolution, resolution)), None)
        if other is not None:
            raise ConfigError(f"{source.where(names[other])}: image is {_wxh(shapes[other][1:])} pixels, not "
                              f"{resolution}x{resolution}; choose --transform {choices}")
    if transform == "pad":
        other = next((i for i, shape in enumerate(shapes) if max(shape[1:]) > resolution), None)
        if other is not None:
            raise DatasetError(f"{source.where(names[other])}: image is {_wxh(shapes[other][1:])} pixels, larger "
                               f"than {resolution}x{resolution}; --transform pad only adds borders (choose a larger "
                               f"--resolution, or --transform resize, center-crop or center-crop-dhariwal)")
    return resolution


def _suggested(shapes):
    """' (these images: --resolution R --transform T)', as :func:`~mpdiff.data.shapes.suggested_conversion`
    would convert them."""
    _, options = suggested_conversion(shapes)
    return f" (for these images:{options})" if options else ""


def _wxh(size):
    height, width = size
    return f"{width}x{height}"


# ---- conversion and writing -----------------------------------------------------------------------

def _png_files(source, names, resolution, transform, channels, progress):
    """(EDM2 name, PNG bytes) of every converted image, in the source's order."""
    from tqdm import tqdm

    for index, name in enumerate(tqdm(names, desc=f"Converting {source.shown}", unit="img", disable=not progress)):
        where = source.where(name)
        image = decode_image(read_checked(source, name), where)  # nothing read whole before its header
        if image.shape[1:] != (resolution, resolution):
            if transform == "pad" and max(image.shape[1:]) > resolution:  # changed since its header was read
                raise DatasetError(f"{where}: image is {_wxh(image.shape[1:])} pixels, larger than "
                                   f"{resolution}x{resolution}; --transform pad only adds borders")
            if transform is None:
                raise DatasetError(f"{where}: image is {_wxh(image.shape[1:])} pixels, not {resolution}x{resolution}")
            image = transform_image(image, transform, resolution)
        if image.shape[0] < channels:
            image = np.repeat(image, channels, axis=0)  # grayscale among RGB images: gray RGB
        yield entry_name(index), _png(image)


def entry_name(index):
    """EDM2's name for the image of this index: 00000/img00000000.png, 00001/img00001000.png, ..."""
    return f"{index // IMAGES_PER_FOLDER:05d}/img{index:08d}.png"


def _png(image):
    from mpdiff.storage.images import png_bytes  # PIL is imported when an image is written, not with this module

    return png_bytes(image)


def write_dataset(dest, files, count, labels, num_classes, class_names=None):
    """The `count` (EDM2 name, bytes) `files` and their dataset.json, written whole: a ZIP when `dest` ends in
    .zip, else a folder. `labels` (int [count], with `num_classes` and `class_names`) or None: unlabelled."""
    if labels is None:
        labels, num_classes, class_names = [None] * count, None, None
    write = write_zip if dest.lower().endswith(".zip") else write_folder
    write(dest, files, [c if c is None else int(c) for c in labels], num_classes, class_names)


def write_zip(dest, files, labels, num_classes, class_names=None):
    """A ZIP (stored entries: PNG is compressed already) written whole by atomic_write."""
    with atomic_write(dest) as out, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        names = []
        for name, data in files:
            archive.writestr(_zip_entry(name), data)
            names.append(name)
        archive.writestr(_zip_entry(LABELS_FILE), _labels_json(names, labels, num_classes, class_names))


def _labels_json(names, labels, num_classes, class_names=None):
    """dataset.json as EDM2 writes it: one line, {"labels": [["00000/img00000000.png", 6], ...]} (then
    "num_classes" and mpdiff's "class_names", which EDM2 does not read)."""
    return (json.dumps(labels_document(zip(names, labels), num_classes, class_names)) + "\n").encode("utf-8")


def _zip_entry(name):
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16  # -rw-r--r-- when unpacked
    return info


def write_folder(dest, files, labels, num_classes, class_names=None):
    """A folder written whole (:func:`~mpdiff.storage.staging.folder_written_whole`), one writer at a time."""
    with folder_written_whole(dest, command="dataset") as partial:
        names = []
        for entry, data in files:
            folder, _ = entry.split("/")
            os.makedirs(os.path.join(partial, folder), exist_ok=True)
            write_bytes(os.path.join(partial, *entry.split("/")), data)
            names.append(entry)
        write_bytes(os.path.join(partial, LABELS_FILE), _labels_json(names, labels, num_classes, class_names))
