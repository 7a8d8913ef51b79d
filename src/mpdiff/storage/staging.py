"""Folders mpdiff stages next to a destination: proven ours by a token, written by one process at a time.

* **Ours is proven, never guessed from a name.** A folder mpdiff makes carries a token
  (:func:`new_token`): a random id, the folder's name and its inode number. A folder is ours only if it
  carries a token naming it as it is now (:func:`carries_token`): a copy (another inode) or a folder renamed
  by hand (another name) is someone's folder, which no sweep removes and nothing replaces. Where the token
  is kept is the folder's business: a ``.NAME.partial-XXXXXXXX`` folder keeps it in the file
  :data:`TOKEN_FILE`, a sample folder in its manifest and then in its ``dataset.json``.
* **One writer per destination.** :func:`destination_lock` holds the lock file ``.NAME.mpdiff-lock``
  beside NAME (the flock of :func:`mpdiff.storage.lock.file_lock`), removed when released; a second
  writer is refused in one line naming the first.
* :func:`folder_written_whole`: a folder filled in a hidden sibling and put in place when complete,
  under the destination's lock.
"""

import contextlib
import os
import secrets
import shutil
import stat
import tempfile

from mpdiff.errors import MpdiffError
from mpdiff.storage.files import JSON_MAX_BYTES, put_folder_in_place, read_json, show_path, write_json
from mpdiff.storage.lock import file_lock

TOKEN_FILE = ".mpdiff-staging"      # in a .NAME.partial-XXXXXXXX folder: the token that proves it ours
LOCK_SUFFIX = ".mpdiff-lock"        # .NAME.mpdiff-lock beside NAME: its writer's lock, while it writes
_PARTIAL = ".partial-"              # a folder NAME is written into the hidden sibling .NAME.partial-XXXXXXXX
_TOKEN_MAX_BYTES = 4096


class DestinationBusy(MpdiffError):
    """Another process is writing this destination."""


def new_token(folder, name=None):
    """The token of a folder just made: {"id": random, "name": its name (or `name`), "inode": ...}."""
    return {"id": secrets.token_hex(8), "name": name or os.path.basename(os.path.abspath(folder)),
            "inode": os.lstat(folder).st_ino}


def carries_token(folder, token, name_key="name"):
    """Whether `folder` is a real directory (not a link) whose name and inode are those `token` records
    (under `name_key`): the folder that token was made for, neither copied nor renamed."""
    if not isinstance(token, dict) or not isinstance(token.get("id"), str):
        return False
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and token.get(name_key) == os.path.basename(os.path.abspath(folder))
            and token.get("inode") == info.st_ino)


def read_token(path, key=None):
    """The JSON object in file `path` (or its member `key`), or None where there is none we could have
    written: a missing file, a FIFO or other non-regular file, or anything that is not such an object."""
    try:
        doc = read_json(path, what="token file", max_bytes=_TOKEN_MAX_BYTES if key is None else JSON_MAX_BYTES)
    except MpdiffError:
        return None
    doc = doc.get(key) if key is not None and isinstance(doc, dict) else doc
    return doc if isinstance(doc, dict) else None


def sweep_ours(parent, prefix, token_of, name_key="name"):
    """Remove each folder in `parent` whose name starts with `prefix` and that carries the token
    `token_of(path)` returns (leftovers of a killed write); anything else is left alone."""
    for entry in os.scandir(parent):
        if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False) \
                and carries_token(entry.path, token_of(entry.path), name_key):
            shutil.rmtree(entry.path, ignore_errors=True)


def destination_lock(dest, command):
    """Hold the lock of destination `dest` (a folder or file name) while `command` writes it."""
    dest = os.fspath(dest)
    parent, name = os.path.split(os.path.abspath(dest))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise MpdiffError(f"{show_path(dest)}: cannot write here ({e.strerror or e})") from None
    return file_lock(os.path.join(parent, f".{name}{LOCK_SUFFIX}"), command,
                     lambda holder: DestinationBusy(f"{show_path(dest)}: being written by {holder}; wait for it "
                                                    f"to finish or stop it, or choose another destination"),
                     remove=True)


@contextlib.contextmanager
def folder_written_whole(dest, replace_existing=False, command="write"):
    """Yield a hidden sibling ``.NAME.partial-XXXXXXXX`` of folder `dest` to fill; on a clean exit it takes
    `dest`'s place at once, so that a kill leaves the previous state and never a half-written folder.

    The destination's lock is held throughout (a second writer is refused). A `dest` that is a symlink is
    resolved (the folder it points to is filled; the link stays). The new folder replaces nothing but an
    empty one, unless `replace_existing`: then a non-empty `dest` is swapped with it atomically (Linux
    renameat2) and the old content removed. Leftovers of an earlier, killed write of the same folder are
    removed first, those that carry their token (:data:`TOKEN_FILE`) and only they.
    """
    dest = os.path.normpath(os.fspath(dest))
    if os.path.islink(dest):
        dest = os.path.realpath(dest)
    parent, name = os.path.dirname(os.path.abspath(dest)), os.path.basename(dest)
    with destination_lock(dest, command):
        prefix = f".{name}{_PARTIAL}"
        try:
            sweep_ours(parent, prefix, lambda path: read_token(os.path.join(path, TOKEN_FILE)))
            if not replace_existing and os.path.isdir(dest) and os.listdir(dest):
                raise MpdiffError(f"{show_path(dest)}: is not empty (written meanwhile?); a complete new folder "
                                  f"goes only where there is none (choose another, or remove this one)")
            partial = tempfile.mkdtemp(prefix=prefix, dir=parent)
        except OSError as e:
            raise MpdiffError(f"{show_path(dest)}: cannot write here ({e.strerror or e})") from None
        try:
            write_json(os.path.join(partial, TOKEN_FILE), new_token(partial))
            yield partial
            os.remove(os.path.join(partial, TOKEN_FILE))
            put_folder_in_place(partial, dest, replace_existing)
        except OSError as e:
            shutil.rmtree(partial, ignore_errors=True)
            raise MpdiffError(f"{show_path(dest)}: cannot write here ({e.strerror or e})") from None
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
