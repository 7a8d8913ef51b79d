"""The one way mpdiff reads a file and the one way it writes one.

Reading (:func:`open_regular`, :func:`read_bytes`, :func:`check_regular`): only regular files, never
a FIFO (which would block forever), a device or a directory, and never more than a stated size.

Writing (:func:`atomic_write`): the bytes land in a temporary file ``.NAME.XXXXXXXX.tmp`` in the
destination's directory, are flushed and fsync'ed, and only then renamed over the destination (rename
is atomic on POSIX), so a crash at any moment leaves either the old file or the new one. A destination
that is a symlink is resolved deliberately: the file it points to is replaced and the link stays. A
destination that exists and is not a regular file (a device such as /dev/null, a FIFO, a directory) is
refused rather than replaced.

Appends (:func:`append_line`) cost O(1): one ``O_APPEND`` write of a whole line. A crash can leave a
torn last line, which readers report and :func:`read_jsonl` returns as damaged rather than dropping
what follows.
"""

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import stat
import tempfile

from mpdiff.errors import MpdiffError, first_line, printable

JSON_MAX_BYTES = 64 * 2 ** 20           # config.json, manifests and friends: far above any real one
JSONL_LINE_MAX_BYTES = 2 ** 20          # one row of stats.jsonl (the file itself is read line by line)
JSON_MAX_DEPTH = 100                    # levels of nested arrays and objects: far more than any file we write
_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def show_path(path):
    """A path as it may appear in a one-line message: undecodable bytes and control characters escaped."""
    text = os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path)
    return printable(text)


def kind_of(mode):
    """'a regular file', 'a FIFO', 'a directory', ... for a st_mode."""
    return next((name for test, name in _KINDS if test(mode)), "an unknown kind of file")


def open_regular(path, max_bytes=None, what="file", error=MpdiffError):
    """Open `path` for binary reading if it is a regular file of at most `max_bytes` bytes.

    Opened with O_NONBLOCK, so that a FIFO in its place is detected instead of blocking forever;
    everything else is refused with `error` naming the file and what it is.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{show_path(path)}: file not found") from None
    except OSError as e:
        with contextlib.suppress(OSError):  # say what it is when that is why it cannot be opened (a socket)
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise error(f"{show_path(path)}: expected a regular {what}, found {kind_of(mode)}") from None
        raise error(f"{show_path(path)}: cannot read ({e.strerror or e})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{show_path(path)}: expected a regular {what}, found {kind_of(info.st_mode)}")
        if max_bytes is not None and info.st_size > max_bytes:
            raise error(f"{show_path(path)}: {info.st_size:,} bytes, more than a {what} may have "
                        f"({max_bytes:,} bytes)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path, max_bytes, what="file", error=MpdiffError):
    """The whole content of a regular file of at most `max_bytes` bytes (see :func:`open_regular`)."""
    with open_regular(path, max_bytes, what, error) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew while we read it
        raise error(f"{show_path(path)}: more than a {what} may have ({max_bytes:,} bytes)")
    return data


def check_regular(path, max_bytes=None, what="file", error=MpdiffError):
    """Refuse anything but a regular file at `path`, for readers that open by name (safetensors, torch)."""
    open_regular(path, max_bytes, what, error).close()


@contextlib.contextmanager
def errors_as(error, message):
    """Any exception in the block but an `error` becomes one `error` line, "<message> (<its first line>)": how
    readers of formats whose libraries raise assorted types (safetensors, zipfile) report damage."""
    try:
        yield
    except error:
        raise
    except Exception as e:
        raise error(f"{message} ({first_line(e)})") from None


class DuplicateKey(ValueError):
    """A JSON object names a key twice (json.loads would silently keep the last value); args[0] is the key."""


def unique_keys(pairs):
    """json's object_pairs_hook: an object whose key appears twice is refused (json would keep the last)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(key)
        obj[key] = value
    return obj


def read_json(path, what="JSON file", error=MpdiffError, max_bytes=JSON_MAX_BYTES):
    """A JSON document from a regular file: not UTF-8, not JSON, a key twice in one object, or nested too
    deep is one `error` line (:func:`parse_json`)."""
    data = read_bytes(path, max_bytes, what, error)
    try:
        return parse_json(data)
    except JsonProblem as e:
        raise error(f"{show_path(path)}: {e}") from None


class JsonProblem(ValueError):
    """Why bytes are not JSON we accept: the message, without the file's name; `short`, in two or three words."""

    def __init__(self, message, short):
        super().__init__(message)
        self.short = short


def parse_json(data):
    """The one parse of every JSON mpdiff reads (files, safetensors metadata, stats rows, lock records):
    UTF-8, valid JSON, no key twice in one object, at most JSON_MAX_DEPTH levels deep (so that nothing
    that walks it later recurses without bound). Raises :class:`JsonProblem`."""
    try:
        value = json.loads(data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data,
                           object_pairs_hook=unique_keys)
    except DuplicateKey as e:
        twice = f"key {printable(str(e))[:40]!r} appears twice"
        raise JsonProblem(f"{twice} in one object", twice) from None
    except UnicodeDecodeError as e:
        raise JsonProblem(f"not UTF-8 text (byte {e.start})", "not UTF-8") from None
    except json.JSONDecodeError as e:
        raise JsonProblem(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", "not valid JSON") from None
    except RecursionError:
        raise JsonProblem("JSON nested too deeply", "nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise JsonProblem(f"not usable JSON ({first_line(e, 80)})", "not valid JSON") from None
    if _nesting(value) > JSON_MAX_DEPTH:
        raise JsonProblem("JSON nested too deeply", "nested too deeply")
    return value


def _nesting(value):
    """Levels of arrays and objects in a parsed JSON value (0 for a number or a string), counted without
    recursion; stops counting past JSON_MAX_DEPTH."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > JSON_MAX_DEPTH:
                break
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)
                           if isinstance(child, (dict, list)))
    return deepest


def _current_umask():
    umask = os.umask(0)  # os.umask can only be read by setting it
    os.umask(umask)
    return umask


def _default_file_mode():
    """0o666 minus the umask: what open() would give a new file (mkstemp's temporaries are 0o600)."""
    return 0o666 & ~_current_umask()


UMASK = _current_umask()  # read once
_FILE_MODE = 0o666 & ~UMASK


def _why(e):
    """A short reason for an OSError, naming the common disk conditions plainly."""
    if e.errno == errno.ENOSPC:
        return "disk full"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if e.errno == errno.EFBIG:
        return "file too large for this file system or process limit"
    return e.strerror or str(e)


def _fsync_dir(path):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def destination_stat(path):
    """os.stat of a path about to be written, None when it does not exist yet; any other failure is
    MpdiffError "<path>: cannot write here (...)"."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MpdiffError(f"{show_path(path)}: cannot write here ({e.strerror or e})") from None


def write_destination(path):
    """The file a write to `path` replaces: symlinks resolved, and refused unless it is absent or regular."""
    path = os.fspath(path)
    if os.path.islink(path):
        path = os.path.realpath(path)  # replace the file the link points to; the link itself stays
    info = destination_stat(path)
    if info is None:
        return path
    if not stat.S_ISREG(info.st_mode):
        raise MpdiffError(f"{show_path(path)}: is {kind_of(info.st_mode)}; refusing to replace it with a file")
    return path


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file next to `path`; on clean exit fsync it and rename it to `path`."""
    path = write_destination(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    except OSError as e:
        raise MpdiffError(f"{show_path(path)}: cannot write here ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            with contextlib.suppress(OSError):  # some file systems have no modes; the data is what counts
                os.fchmod(f.fileno(), _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise MpdiffError(f"{show_path(path)}: write failed ({_why(e)}); the previous file, if any, is intact") \
                from None
        raise
    _fsync_dir(directory)


def put_folder_in_place(partial, dest, replace_existing=False):
    """Make the finished folder `partial` (a sibling of `dest`) become `dest`, atomically and durably.

    It gets a new folder's permissions (mkdtemp made it private). A non-empty `dest` is swapped with it
    (Linux renameat2) when `replace_existing`, and the old content removed; otherwise a rename, which
    replaces nothing but an empty folder. The parent directory is synced. Raises OSError.
    """
    os.chmod(partial, 0o777 & ~UMASK)
    if replace_existing and os.path.isdir(dest) and os.listdir(dest):
        exchange_entries(partial, dest)  # atomic: the old folder or the new one, never a mix
        shutil.rmtree(partial)           # now holds the previous content
    else:
        os.rename(partial, dest)         # atomic; replaces nothing but an empty folder
    _fsync_dir(os.path.dirname(os.path.abspath(dest)))


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _libc_renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


def can_exchange_entries():
    """Whether :func:`exchange_entries` works here (Linux with glibc >= 2.28)."""
    return _libc_renameat2() is not None


def exchange_entries(a, b):
    """Swap two directory entries atomically (Linux renameat2 with RENAME_EXCHANGE)."""
    if _libc_renameat2()(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def write_bytes(path, data):
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_line(path, line):
    """Append one line (JSONL stats, log.txt) with a single O_APPEND write, then fsync.

    O(1) however long the file is. A crash mid-write can leave a torn last line; the next append
    starts on a fresh line, and readers report the torn one (:func:`read_jsonl`).
    """
    path = write_destination(path)
    data = printable(line.rstrip("\n")).encode("utf-8") + b"\n"
    fd = _open_for_append(path)
    if os.fstat(fd).st_nlink > 1:
        # A hard link (a run directory copied with cp -al): appending would write into the other copy
        # too. The file is copied once into a file of its own, which replaces this name.
        os.close(fd)
        with open_regular(path, None, "log", MpdiffError) as old, atomic_write(path) as new:
            shutil.copyfileobj(old, new)
        fd = _open_for_append(path)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # after a torn line: never glue a new row onto it
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as e:
        raise MpdiffError(f"{show_path(path)}: append failed ({_why(e)})") from None
    finally:
        os.close(fd)


def _open_for_append(path):
    try:
        return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), _FILE_MODE)
    except OSError as e:
        raise MpdiffError(f"{show_path(path)}: append failed ({_why(e)})") from None


class DamagedLine:
    """A line of a JSON-lines file that is not a JSON object: kept verbatim, reported by line number."""

    def __init__(self, number, text, reason):
        self.number, self.text, self.reason = number, text, reason

    def __repr__(self):
        return f"DamagedLine({self.number}, {self.reason!r})"


def jsonl_lines(path, error=MpdiffError, max_line_bytes=JSONL_LINE_MAX_BYTES):
    """(line number, raw bytes, dict or DamagedLine) for every non-blank line of a JSON-lines file, read one
    line at a time: an append-only log may grow without bound, so only a line has a size limit."""
    with open_regular(path, None, "JSON-lines file", error) as f:
        for number, raw in enumerate(iter(lambda: f.readline(max_line_bytes + 1), b""), 1):
            if len(raw) > max_line_bytes:
                raise error(f"{show_path(path)}: line {number} is longer than {max_line_bytes:,} bytes; "
                            f"not a JSON-lines file mpdiff wrote")
            raw = raw.rstrip(b"\n")
            if not raw.strip():
                continue
            try:
                row = parse_json(raw)
                reason = None if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
            except JsonProblem as e:
                torn = e.short == "not valid JSON" and not raw.endswith(b"}")
                reason = e.short + (" (torn)" if torn else "")
            yield number, raw, row if reason is None else DamagedLine(number, raw, reason)


def read_jsonl(path, error=MpdiffError):
    """Every line of a JSON-lines file: a dict for each valid row, a :class:`DamagedLine` for any other.

    Nothing after a damaged line is lost; the caller decides what to report.
    """
    return [row for _, _, row in jsonl_lines(path, error)]


# Temporary files are ours when their name is what atomic_write makes: "." + name + "." + 8 characters of
# tempfile's alphabet + ".tmp".
_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")


def temporary_target(name):
    """The file name a temporary of :func:`atomic_write` was for, or None if `name` is not one."""
    match = _TEMPORARY.fullmatch(name)
    return match.group(1) if match else None
