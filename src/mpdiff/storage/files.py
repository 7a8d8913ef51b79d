"""Atomic file writes, and JSON / JSON-lines files.

Every file mpdiff writes goes through :func:`atomic_write`: the bytes land in a temporary file
in the same directory, are flushed and fsync'ed, and only then renamed over the destination
(rename is atomic on POSIX). A crash at any moment leaves either the old file or the new one.
"""

import contextlib
import errno
import json
import os
import tempfile

from mpdiff.errors import MpdiffError


def _default_file_mode():
    """0o666 minus the umask: what open() would give a new file (mkstemp's temporaries are 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()  # read once: os.umask can only be read by setting it


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
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file next to `path`; on clean exit fsync it and rename it to `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    except OSError as e:
        raise MpdiffError(f"{path}: cannot write here ({e.strerror or e})") from None
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
            raise MpdiffError(f"{path}: write failed ({_why(e)}); the previous file, if any, is intact") from None
        raise
    _fsync_dir(directory)


def write_bytes(path, data):
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_line(path, line):
    """Append one line (JSONL stats, log.txt) by rewriting the file atomically.

    The old content plus the new line go through :func:`atomic_write`, so a crash leaves either the
    old file or the new one, never a torn line. Stats and logs are small (one row per status
    interval), so the rewrite costs far less than a training step.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            old = f.read()
    except FileNotFoundError:
        old = b""
    except OSError as e:
        raise MpdiffError(f"{path}: append failed ({_why(e)})") from None
    if old and not old.endswith(b"\n"):
        old += b"\n"
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise MpdiffError(f"{path}: append failed (No such file or directory)")
    write_bytes(path, old + line.rstrip("\n").encode("utf-8") + b"\n")


def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # torn final line after a crash
    return rows
