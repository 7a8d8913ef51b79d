"""One writer per run directory.

`train`, `phema` and `ema-sweep` hold ``RUN_DIR/.mpdiff.lock`` while they write: an exclusive
``flock`` on that file, which the kernel releases when the holder exits, however it exits. A lock
left by a killed process is therefore free again and is simply taken over; a live holder is named
(its pid, command and start time, which it writes into the file). Readers such as ``generate``
take no lock: every file they read is written atomically.
"""

import contextlib
import fcntl
import json
import os
import socket
import stat
import time

from mpdiff.errors import MpdiffError
from mpdiff.storage.files import kind_of, show_path

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
    path = os.path.join(run_dir, LOCK_FILE)
    flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise MpdiffError(f"{show_path(path)}: cannot open the run directory's lock ({e.strerror or e})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MpdiffError(f"{show_path(path)}: expected the run directory's lock file, found {kind_of(info.st_mode)}")
        if info.st_nlink > 1:  # writing the holder would overwrite the other name's file
            raise MpdiffError(f"{show_path(path)}: the lock file has {info.st_nlink - 1} other hard link(s); "
                              f"remove it (it holds no data) and run again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryBusy(f"{show_path(run_dir)}: in use by {_describe_holder(fd)}; wait for it to "
                                   f"finish or stop it, or use another run directory") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _describe_holder(fd):
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"mpdiff {holder['command']} (pid {int(holder['pid'])} on {holder['host']}, since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "another mpdiff process"
