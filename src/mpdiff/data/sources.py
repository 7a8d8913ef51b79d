"""Where a dataset's files come from: a folder or a ZIP archive (SPEC §7.3-7.4), and which names are data.

:func:`open_source` opens either as a source with one interface: ``list_files`` (relative posix paths),
``where(name)`` (how messages name a file), ``open`` and ``read`` (regular files only, within a size limit:
:data:`MAX_FILE_BYTES` unless told; :func:`stream_size` and :func:`read_all` let a reader look at a header
through the opened stream before reading it whole). The name predicates say which files are images, latents, or hidden
(dotfiles, ``__MACOSX/``); :func:`show_name` is how a name appears in a one-line message.
"""

import os
import zipfile

from mpdiff.errors import DatasetError, first_line
from mpdiff.storage.files import errors_as, open_regular, show_path

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")  # matched case-insensitively
# Images of kinds the reader does not decode (its decoders are PIL_FORMATS): named, never skipped silently
OTHER_IMAGE_EXTENSIONS = (".apng", ".avif", ".cr2", ".dds", ".dng", ".eps", ".exr", ".gif", ".hdr", ".heic",
                          ".heif", ".ico", ".j2k", ".jfif", ".jp2", ".jpe", ".jxl", ".nef", ".pbm", ".pcx", ".pgm",
                          ".pnm", ".ppm", ".psd", ".qoi", ".svg", ".tga", ".tif", ".tiff", ".xbm")
LATENT_EXTENSIONS = (".npy",)          # latents: float32 [LATENT_DATA_CHANNELS, R, R] per file (SPEC §7.1)
MAX_FILE_BYTES = 512 * 2**20           # per image file and for dataset.json


def is_visible(name):
    """False for macOS archive debris (__MACOSX/) and for dotfiles or anything in a dot-folder."""
    parts = name.split("/")
    return parts[0] != "__MACOSX" and not any(part.startswith(".") for part in parts)


def _is_image_name(name):
    return is_visible(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_latent_name(name):
    return is_visible(name) and os.path.splitext(name)[1].lower() in LATENT_EXTENSIONS


def other_images(names):
    """{".gif": [names...], ...}: the visible files among `names` whose extension is that of an image of a
    kind the reader does not decode (:data:`OTHER_IMAGE_EXTENSIONS`), by extension (lower case), sorted."""
    kinds = {}
    for name in sorted(names):
        ext = os.path.splitext(name)[1].lower()
        if is_visible(name) and ext in OTHER_IMAGE_EXTENSIONS:
            kinds.setdefault(ext, []).append(name)
    return dict(sorted(kinds.items()))


def describe_other_images(kinds, limit=3):
    """'2 .gif (a.gif, b.gif), 1 .tiff (c.tiff)' for :func:`other_images`' result: one part per kind, with
    its count and at most `limit` names."""
    parts = []
    for ext, names in kinds.items():
        shown = ", ".join(show_name(name, 80) for name in names[:limit]) + (", ..." if len(names) > limit else "")
        parts.append(f"{len(names):,} {ext} ({shown})")
    return ", ".join(parts)


def is_data_name(name):
    """An image or a latent file: what a dataset is made of."""
    return _is_image_name(name) or is_latent_name(name)


def dataset_name(path):
    base = os.path.basename(os.path.normpath(os.path.abspath(path)))
    return show_path(base[:-4] if base.lower().endswith(".zip") else base)  # printable: it goes into logs


def open_source(path):
    if os.path.isdir(path):
        return _FolderSource(path)
    if not os.path.exists(path):
        raise DatasetError(f"{show_name(path, None)}: no such file or directory (expected a folder or ZIP of images, "
                           f"or 'digits')")
    if not os.path.isfile(path):
        raise DatasetError(f"{show_name(path, None)}: not a directory or a ZIP archive")
    return _ZipSource(path)


def _too_big(where, size, limit, why=""):
    return DatasetError(f"{where}: file is {size:,} bytes, above the limit of {limit:,} bytes{why}")


class _Source:
    """What a folder and a ZIP source share: ``read`` is ``open``, then :func:`read_all`."""

    def __init__(self, path):
        self.path = path
        self.shown = show_name(path, None)  # for messages

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, name, max_bytes=None, why=""):
        with self.open(name, max_bytes, why) as f:
            return read_all(f, self.where(name), max_bytes, why)  # a ZIP entry: zipfile checks its CRC


class _FolderSource(_Source):
    """Files of a directory tree, named by relative posix path.

    Every file is opened with :func:`mpdiff.storage.files.open_regular`: only regular files (after
    following symbolic links) are read; a FIFO, device, socket, directory or dangling link is one line.
    """

    def where(self, name):
        return os.path.join(self.shown, *show_name(name, None).split("/"))

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
                raise DatasetError(f"{show_name(directory, None)}: cannot list directory "
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


class _ZipSource(_Source):
    """Members of a ZIP archive (stored or deflated), named by posix path."""

    def __init__(self, path):
        super().__init__(path)
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
                    raise DatasetError(f"{self.shown}: damaged ZIP archive (two entries named '{show_name(name)}')")
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
        return f"{self.shown}/{show_name(name, None)}"

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
            return _ZipEntry(self.zip.open(info), where, info.file_size)  # zipfile stops at the declared size


def _zip_errors(where):
    """BadZipFile (bad CRC), zlib.error, EOFError, NotImplementedError, encrypted, ...: one line naming the entry."""
    return errors_as(DatasetError, f"{where}: damaged ZIP entry")


class _ZipEntry:
    """A ZIP entry's stream whose read and seek errors are one DatasetError line naming the entry
    (so that PIL, reading a header from it, reports a damaged archive as such)."""

    def __init__(self, stream, where, size):
        self.stream, self.where = stream, where
        self.size = size  # the uncompressed size the ZIP directory declares (zipfile reads no further)

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


def read_all(stream, where, max_bytes=None, why=""):
    """Every byte of `stream` (a file or ZIP entry a source opened), from its start, if there are at most
    `max_bytes` (default MAX_FILE_BYTES); one DatasetError line naming the file otherwise. A reader first
    looks at the header through the same stream (:func:`stream_size`, PIL's lazy open), then reads it whole."""
    max_bytes = MAX_FILE_BYTES if max_bytes is None else max_bytes
    try:
        stream.seek(0)
        data = stream.read(max_bytes + 1)
    except OSError as e:
        raise DatasetError(f"{where}: cannot read file ({e.strerror or first_line(e)})") from None
    if len(data) > max_bytes:  # it grew since it was opened
        raise _too_big(where, len(data), max_bytes, why)
    return data


def stream_size(stream):
    """The size in bytes of a stream a source opened, without reading it: a ZIP entry's declared size, a
    file's size (fstat), or the length of an in-memory stream."""
    size = getattr(stream, "size", None)
    if isinstance(size, int):
        return size
    try:
        return os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, ValueError):  # io.BytesIO: no file descriptor
        position = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(position)
        return end


def show_name(text, limit=200):
    """A name as it may appear in a one-line message (:func:`~mpdiff.storage.files.show_path`), cut to `limit`."""
    try:
        text = show_path(text)
    except UnicodeError:  # a lone surrogate from a JSON escape such as "\\ud800": not a file system name
        text = repr(text)[1:-1]
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
