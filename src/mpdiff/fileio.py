"""Atomic file writes and safe tensor files.

Every file mpdiff writes goes through :func:`atomic_write`: the bytes land in a temporary file
in the same directory, are flushed and fsync'ed, and only then renamed over the destination
(rename is atomic on POSIX). A crash at any moment leaves either the old file or the new one.
Tensors are stored with safetensors (no code runs on load); configs and metadata as JSON.
"""

import contextlib
import errno
import json
import os
import tempfile

import torch
from safetensors.torch import load_file, safe_open, save

from .errors import CheckpointError, MpdiffError


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
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise MpdiffError(f"{path}: write failed ({why}); the previous file, if any, is intact") from None
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
    """Append one line (e.g. JSONL stats). Appends are not atomic renames, but a torn last line
    is the only possible damage, and readers (:func:`read_jsonl`) drop it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()


def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # torn final line after a crash
    return rows


def save_tensors(path, tensors, metadata=None):
    """Write a dict of tensors as safetensors, atomically. `metadata` values are JSON-encoded."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_bytes(path, save(tensors, metadata=meta))


def read_metadata(path):
    """Metadata of a safetensors file written by :func:`save_tensors` (JSON-decoded)."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({_short(e)})") from None
    try:
        return {k: json.loads(v) for k, v in meta.items()}
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: metadata is not valid JSON") from None


def load_tensors(path, device="cpu"):
    """Return (tensors, metadata) from a safetensors file; damaged files raise CheckpointError."""
    path = os.fspath(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(path, device=str(device))
    except Exception as e:
        raise CheckpointError(f"{path}: damaged tensor data ({_short(e)})") from None
    return tensors, meta


def safe_torch_load(path):
    """Load a torch file without executing code (weights_only); refuse anything else clearly."""
    path = os.fspath(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:
        raise CheckpointError(
            f"{path}: refused to load: it is not a plain tensor file and loading it could run code "
            f"({_short(e)}). Convert it to a state_dict with trusted code first (see docs/COMPATIBILITY.md)"
        ) from None


def _short(e):
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
