"""One writer per run directory.

`train`, `phema` and `ema-sweep` hold ``RUN_DIR/.mpdiff.lock`` while they write: an exclusive
``flock`` on that file, which the kernel releases when the holder exits, however it exits. A lock
left by a killed process is therefore free again and is simply taken over; a live holder is named
(its pid, command and start time, which it writes into the file). `phema` and `ema-sweep` whose
``--out`` lies outside the run directory write nothing into it: they hold a shared flock instead
(:func:`run_directory_read_lock`), which needs no write permission and keeps a writer out while they
read. Readers such as ``generate`` take no lock on a run directory: every file they read is written
atomically. The exclusive lock itself is :func:`file_lock`, which
:func:`mpdiff.storage.staging.destination_lock` also holds beside a destination that
``generate`` or ``dataset convert`` writes.
"""

import contextlib
import fcntl
import json
import os
import socket
import stat
import time

from mpdiff.errors import MpdiffError
from mpdiff.storage.files import kind_of, parse_json, show_path
from mpdiff.storage.layout import run_dir_of

LOCK_FILE = ".mpdiff.lock"


class RunDirectoryBusy(MpdiffError):
    """Another process is writing this run directory."""


@contextlib.contextmanager
def run_directory_lock(run_dir, command):
    """Hold the run directory's lock for the duration of the block; `command` names the holder."""
    run_dir = os.fspath(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise MpdiffError(f"{show_path(run_dir)}: cannot write here ({e.strerror or e})") from None
    with file_lock(os.path.join(run_dir, LOCK_FILE), command,
                   lambda holder: RunDirectoryBusy(f"{show_path(run_dir)}: in use by {holder}; wait for it to finish "
                                                   f"or stop it, or use another run directory")):
        yield


def run_directory_use(run_dir, command, out_dir=None):
    """The lock a command that reads a run directory takes (phema, ema-sweep): the run directory's lock
    (:func:`run_directory_lock`) when its output `out_dir` (None: its default inside the run directory) lies
    inside it, a shared one (:func:`run_directory_read_lock`) when it writes elsewhere, and none for a
    directory that does not exist (the command then says what is missing)."""
    directory = run_dir_of(run_dir)
    if not os.path.isdir(directory):
        return contextlib.nullcontext()
    if out_dir is None or is_inside(out_dir, directory):
        return run_directory_lock(directory, command)
    return run_directory_read_lock(directory, command)


def is_inside(path, directory):
    """Whether `path` (existing or not; symlinks resolved as far as they exist) is `directory` or inside it."""
    path, directory = os.path.realpath(os.fspath(path)), os.path.realpath(os.fspath(directory))
    return os.path.commonpath([path, directory]) == directory


@contextlib.contextmanager
def run_directory_read_lock(run_dir, command):
    """A shared flock on the run directory's lock file for the duration of the block: any number of readers
    at once, never beside a writer (whose exclusive lock it waits for nowhere: a live writer is refused, as
    a reader refuses it in turn). It writes nothing and needs no write permission: the lock file is opened
    read-only, and created (empty) only where the directory may be written. In a directory without a lock
    file that cannot be written, no process of this user can be writing either, and no lock is taken."""
    path = os.path.join(os.fspath(run_dir), LOCK_FILE)
    flags = os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, os.O_RDONLY | flags)
    except FileNotFoundError:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | flags, 0o644)
        except OSError:  # a read-only directory (or file system): nobody writes here
            yield
            return
    except OSError as e:
        raise MpdiffError(f"{show_path(path)}: cannot open the run directory's lock ({e.strerror or e})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MpdiffError(f"{show_path(path)}: expected mpdiff's lock file, found {kind_of(info.st_mode)}")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryBusy(f"{show_path(run_dir)}: in use by {_describe_holder(fd)}; wait for it to finish "
                                   f"or stop it, then run mpdiff {command} again") from None
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def file_lock(path, command, busy, remove=False):
    """Hold an exclusive flock on the lock file `path` (created if absent) for the duration of the block.

    A live holder is refused with the exception `busy(description of the holder)`. Only a regular file
    with no other hard links that is empty or holds an mpdiff holder record is written: anything else at
    `path` is someone's file and is refused untouched. With `remove`, the file is removed when released
    (a lock beside a destination must not stay behind); whoever opened it meanwhile finds it gone and
    takes a new one, so the lock is never held twice.
    """
    while True:
        fd = _locked(path, busy)
        try:
            if not remove or _same_file(path, fd):
                holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
                try:
                    yield
                finally:
                    if remove:
                        with contextlib.suppress(OSError):
                            os.unlink(path)
                return
        finally:
            os.close(fd)  # releases the flock


def _locked(path, busy):
    """An open descriptor of the lock file `path`, flocked; refused as described in :func:`file_lock`."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise MpdiffError(f"{show_path(path)}: cannot open the lock file ({e.strerror or e})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MpdiffError(f"{show_path(path)}: expected mpdiff's lock file, found {kind_of(info.st_mode)}")
        if info.st_nlink > 1:  # writing the holder would overwrite the other name's file
            raise MpdiffError(f"{show_path(path)}: the lock file has {info.st_nlink - 1} other hard link(s); "
                              f"remove it (it holds no data) and run again")
        if info.st_size and _holder(fd) is None:
            raise MpdiffError(f"{show_path(path)}: exists and is not an mpdiff lock file; move it away and run again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy(_describe_holder(fd)) from None
        return fd
    except BaseException:
        os.close(fd)
        raise


def _same_file(path, fd):
    """Whether `path` still names the file open as `fd` (a holder that removed it has released it)."""
    try:
        return os.lstat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def _holder(fd):
    """The holder record in a lock file, or None if it holds something else."""
    try:
        holder = parse_json(os.pread(fd, 4096, 0))
        return holder if isinstance(holder, dict) and {"pid", "command"} <= set(holder) else None
    except (OSError, ValueError):  # storage.files.JsonProblem is a ValueError
        return None


def _describe_holder(fd):
    """Who holds the lock that `fd`'s flock was refused: readers (shared locks, which write no record), or
    the writer its record names."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted: only readers hold it
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "mpdiff phema or ema-sweep reading its snapshots"
    try:
        holder = _holder(fd)
        return f"mpdiff {holder['command']} (pid {int(holder['pid'])} on {holder['host']}, since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "another mpdiff process"
