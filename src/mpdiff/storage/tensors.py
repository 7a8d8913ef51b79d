"""Tensor files: safetensors (no code runs on load) with JSON metadata, the only way mpdiff reads torch
pickles (``weights_only``, refusing anything but tensors), and the header of NumPy's .npy files."""

import contextlib
import json
import math
import os
import pickle
import re
import warnings
import zipfile

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from mpdiff.budgets import memory_limit
from mpdiff.errors import CheckpointError, first_line, printable
from mpdiff.storage.files import check_regular, errors_as, open_regular, parse_json, show_path, write_bytes


def save_tensors(path, tensors, metadata=None):
    """Write a dict of tensors as safetensors, atomically. `metadata` values are JSON-encoded."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_bytes(path, save(tensors, metadata=meta))


@contextlib.contextmanager
def open_safetensors(path, what="tensor file"):
    """safetensors' ``safe_open`` on a file opened through the one reader (regular files only).

    safetensors opens files by name, which would block on a FIFO and refuses names that are not
    UTF-8; on Linux it is given ``/proc/self/fd/N`` of the file we opened instead, which is neither.
    """
    with open_regular(path, what=what, error=CheckpointError) as f:
        by_fd = f"/proc/self/fd/{f.fileno()}"
        with safe_open(by_fd if os.path.exists(by_fd) else os.fspath(path), framework="pt") as opened:
            yield opened


def read_metadata(path):
    """Metadata of a safetensors file written by :func:`save_tensors` (JSON-decoded)."""
    path = os.fspath(path)
    with errors_as(CheckpointError, f"{show_path(path)}: not a readable safetensors file"), open_safetensors(path) as f:
        meta = f.metadata() or {}
    try:
        return {k: parse_json(v) for k, v in meta.items()}
    except ValueError as e:  # storage.files.JsonProblem: not JSON, a key twice, nested too deeply
        raise CheckpointError(f"{show_path(path)}: metadata: {e}") from None


def load_tensors(path, device="cpu", dtypes=None):
    """Return (tensors, metadata) from a safetensors file; damaged files raise CheckpointError.

    Every tensor must be of a dtype mpdiff writes (:data:`ACCEPTED_DTYPES`: never float8 or complex, which
    the code that uses them cannot handle), and of one of `dtypes` (floating torch dtypes) when given: any
    other makes the file damaged, found from its header before any tensor is read.
    """
    path = os.fspath(path)
    meta = read_metadata(path)
    with errors_as(CheckpointError, f"{show_path(path)}: damaged tensor data"), open_safetensors(path) as f:
        check_dtypes(path, f, dtypes)
        tensors = {name: f.get_tensor(name).to(device) for name in f.offset_keys()}
    return tensors, meta


def check_dtypes(path, opened, dtypes=None):
    """CheckpointError unless every tensor of the safetensors file `opened` (:func:`open_safetensors`) has one
    of `dtypes` (default :data:`ACCEPTED_DTYPES`); reads the header only."""
    codes = {safetensors_code(dtype) for dtype in dtypes or ACCEPTED_DTYPES}
    for name in opened.offset_keys():
        code = opened.get_slice(name).get_dtype()
        if code not in codes:
            expected = " or ".join(sorted(codes)) if len(codes) <= 2 else "a dtype mpdiff writes"
            raise CheckpointError(f"{show_path(path)}: tensor {printable(name)[:80]} has dtype "
                                  f"{printable(str(code))[:16]}, not {expected}")


def first_nonfinite(tensors):
    """Name of the first floating tensor holding NaN or infinity, or None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def safe_torch_load(path):
    """Load a torch file without executing code (weights_only); refuse anything else clearly.

    torch's restricted unpickler only builds tensors, containers and numbers; a pickle that names any
    other callable (``os.system``, a class) is refused before anything it names is imported or called.
    """
    path = os.fspath(path)
    check_regular(path, what="torch file", error=CheckpointError)
    try:
        if os.path.getsize(path) == 0:
            raise CheckpointError(f"{show_path(path)}: empty file")
        _check_unpacked_size(path)
        with warnings.catch_warnings():  # torch warns about pickle protocols; the error below says enough
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        _check_plain_tensors(path, loaded)
        return loaded
    except FileNotFoundError:
        raise CheckpointError(f"{show_path(path)}: file not found") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{show_path(path)}: refused to load: {_unpickling_reason(e)}, and unpickling it could run "
                              f"code; only plain state_dicts of tensors are accepted (convert the file with "
                              f"trusted code first, see docs/COMPATIBILITY.md)") from None
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{show_path(path)}: not a readable torch weights file ({first_line(e)})") from None


def _check_unpacked_size(path):
    """A torch zip file's members, uncompressed, must fit the network memory budget: a small file can hold
    a deflated storage of gigabytes, which torch.load would allocate before any check of ours."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
    packed = [m.filename for m in members if m.compress_type != zipfile.ZIP_STORED and m.file_size > 2 ** 20]
    if packed:  # torch.save stores its members uncompressed; a deflated storage is a memory bomb, not weights
        raise CheckpointError(f"{show_path(path)}: member {packed[0][:60]} is compressed; torch writes weights "
                              f"uncompressed, so this is not a file torch.save made")
    unpacked = sum(m.file_size for m in members)
    limit, origin = memory_limit("MPDIFF_MAX_NETWORK_BYTES", error=CheckpointError)
    if limit is not None and unpacked > limit:
        raise CheckpointError(f"{show_path(path)}: unpacks to {unpacked:,} bytes, more than the network budget "
                              f"of {limit:,} bytes ({origin})")


def _check_plain_tensors(path, loaded, where="", depth=0):
    """Every tensor in a loaded torch file must be an ordinary dense tensor in memory: a sparse, meta or
    quantised one would fail later with a traceback, far from the file."""
    if depth > 32:
        raise CheckpointError(f"{show_path(path)}: nested more than 32 levels deep")
    items = loaded.items() if isinstance(loaded, dict) else enumerate(loaded) if isinstance(loaded, (list, tuple)) \
        else ()
    for key, value in items:
        name = f"{where}.{key}" if where else str(key)
        if torch.is_tensor(value):
            if value.layout != torch.strided or value.is_meta or value.is_quantized:
                raise CheckpointError(f"{show_path(path)}: tensor {name[:80]} is {value.layout}"
                                      f"{' on the meta device' if value.is_meta else ''}; only dense tensors "
                                      f"are accepted")
            if value.dtype not in ACCEPTED_DTYPES:  # float8, complex: nothing that uses weights handles them
                raise CheckpointError(f"{show_path(path)}: tensor {name[:80]} is {value.dtype}; only float and "
                                      f"integer tensors are accepted")
        else:
            _check_plain_tensors(path, value, name, depth + 1)


def _unpickling_reason(e):
    """The part of torch's weights_only error that says what was refused (its first line is boilerplate)."""
    text = str(e)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return f"it would import and call {match.group(1)}"
    if "Unsupported operand" in text:
        return "it is a general Python pickle, not a torch weights file"
    return "it holds objects other than tensors"


# safetensors' names of the floating dtypes, and their torch dtypes.
FLOAT_CODES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_INTEGER_CODES = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                  "BOOL": torch.bool}
# The dtypes a tensor file we read may hold: what networks, snapshots and checkpoints are written with, and the
# integer buffers a network may have. float8 and complex tensors are refused as the file's damage.
ACCEPTED_DTYPES = tuple(FLOAT_CODES.values()) + tuple(_INTEGER_CODES.values())


def safetensors_code(dtype):
    """safetensors' name of a torch dtype of :data:`ACCEPTED_DTYPES`: 'F32' for torch.float32."""
    return next(code for code, known in {**FLOAT_CODES, **_INTEGER_CODES}.items() if known == dtype)


# Bytes per element of the safetensors dtypes that torch tensors can have.
_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                         "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_MAX_HEADER_BYTES = 100 * 2 ** 20       # safetensors' own limit on the JSON header


def tensor_layout(path):
    """(data_start, tensors, metadata) of a safetensors file, reading only its header.

    For streaming reads by byte range (post-hoc EMA): the safetensors library opens and checks
    files but does not expose where each tensor's bytes lie, so this reads the header itself.

    The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data_offsets
    relative to the data section; "__metadata__" -> str -> str) and the data section. Checked as safetensors
    checks on opening: the tensors must tile the data section exactly, so a truncated file is refused.
    (safetensors' safe_open checks the same, but on a cold page cache it faults in far more than the
    header: 5 ms per 10 MB snapshot against 0.2 ms, so listing cost most of a full read of the files.)
    Raises ValueError, KeyError, TypeError or OSError.
    """
    with open_regular(path, what="tensor file", error=CheckpointError) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("file is shorter than the safetensors header length")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"header length {header_len} does not fit in the file ({size} bytes)")
        tensors = parse_json(f.read(header_len))  # a ValueError (JsonProblem) when it is not JSON we accept
    if not isinstance(tensors, dict):
        raise ValueError("header is not a JSON object")
    metadata = tensors.pop("__metadata__", None) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("header metadata is not a string -> string map")
    data_end = 0
    for name, entry in sorted(tensors.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, end = (int(o) for o in entry["data_offsets"])
        if entry["dtype"] not in _SAFETENSORS_ITEMSIZE:
            raise ValueError(f"tensor {name} has unknown dtype {entry['dtype']!r}")
        if begin != data_end or end - begin != math.prod(entry["shape"]) * _SAFETENSORS_ITEMSIZE[entry["dtype"]]:
            raise ValueError(f"tensor {name} has inconsistent data offsets {entry['data_offsets']}")
        data_end = end
    if 8 + header_len + data_end != size:
        raise ValueError(f"file has {size} bytes but its header describes {8 + header_len + data_end} "
                         f"(truncated or extended)")
    return 8 + header_len, tensors, metadata


NPY_MAX_HEADER_BYTES = 10000  # NumPy's own default limit on an .npy header


def npy_header(stream):
    """(shape, dtype) from an .npy header, leaving `stream` at the data: format versions 1.0 and 2.0 only,
    which NumPy writes for arrays of numbers (3.0 only adds UTF-8 field names). Raises ValueError."""
    version = np.lib.format.read_magic(stream)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(stream, max_header_size=NPY_MAX_HEADER_BYTES)
    return shape, dtype
