"""NVIDIA's released EDM2 networks (``*.pkl``), read without running anything in them.

What a release file holds (NVIDIA's training_loop.py and reconstruct_phema.py write it with
``pickle.dump``): a ``dnnlib.util.EasyDict`` (a dict) with ``ema``, the network in float16; ``encoder``,
how its output becomes pixels; ``loss_fn`` and ``dataset_kwargs``. The network and the encoder are
objects of NVIDIA's "persistent" classes: each is pickled as a call of
``torch_utils.persistence._reconstruct_persistent_obj`` with a dict giving the class name, the source
of the module that defines it, and the object's attributes (for a torch module: its parameters,
buffers and child modules; for all: the constructor's arguments, ``_init_args`` and ``_init_kwargs``).
NVIDIA's loader executes that source. Tensors are pickled by torch: each storage as
``torch.storage._load_from_bytes(bytes)`` (torch's legacy serialisation, parsed here by hand), each
tensor as ``torch._utils._rebuild_tensor_v2`` over it, parameters by ``_rebuild_parameter``.

:func:`read_edm2_pickle` unpickles with an explicit allow-list of the globals above (plus
``collections.OrderedDict``, torch's container modules and numpy's array and scalar rebuilds, which the
VAE encoder's constants need); each stands for a function or class of ours that records data and runs
nothing of the file. Any other global is refused, naming it, before it is imported. The embedded
sources are kept as text: they are never compiled, imported or executed (and a file whose source would
do more than define classes and functions is refused, see :mod:`mpdiff.storage.edm2_source`). From
the recorded network we take its tensors and its constructor's keywords and build our own network with
:func:`~mpdiff.nn.compat.load_edm2`; the file must fit the network memory budget.
"""

import collections
import io
import math
import os
import pickle
import struct
from typing import NamedTuple, Optional

import numpy as np
import torch

from mpdiff.budgets import memory_limit
from mpdiff.errors import CheckpointError, MpdiffError, first_line
from mpdiff.nn.build import MAX_NETWORK_BYTES_ENV
from mpdiff.nn.compat import load_edm2
from mpdiff.storage.edm2_source import code_run_on_import
from mpdiff.storage.files import open_regular, show_path

RELEASE_FORMAT = "edm2-release-pickle"
NETWORK_CLASS = "Precond"                       # the class of a release's 'ema'
ENCODER_CLASSES = ("StandardRGBEncoder", "StabilityVAEEncoder")
# Precond's positional parameters, for a network recorded with positional constructor arguments.
PRECOND_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels")
_MAX_DEPTH = 32                                 # module nesting of EDM2's networks: 4 (Precond.unet.enc.block.conv)


class Refused(pickle.UnpicklingError):
    """The file names a global outside the allow-list, or carries a source that would run code."""


def refused_global(module, name):
    return Refused(f"it would import and call {module}.{name}, which no EDM2 release pickle needs (they hold "
                   f"tensors, EasyDicts and NVIDIA's persistence call)")


# ---- what the allowed globals stand for -------------------------------------------------------------

class ReleaseDict(dict):
    """What ``dnnlib.util.EasyDict`` (a dict with attribute access) is read as: a plain dict."""

    def __setstate__(self, state):
        if state:
            raise pickle.UnpicklingError("an EasyDict with attributes")


class PersistentObject:
    """An object of one of NVIDIA's persistent classes as the file records it: its class name, the
    persistence format version and its attributes. The class's module source was checked as text and
    dropped; nothing of it ran."""

    __slots__ = ("class_name", "version", "state")

    def __init__(self, class_name, version, state):
        self.class_name, self.version, self.state = class_name, version, state

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a persistent object given attributes twice")

    def __repr__(self):
        return f"<persistent {self.class_name}>"


class ContainerModule:
    """A torch container module (ModuleDict, ModuleList, Sequential) as recorded: its attributes."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"a container module built from a {type(state).__name__}")
        self.__dict__["state"] = state


class _Call:
    """An allowed global function: called with the arguments the file gives; never modifiable by it."""

    __slots__ = ("function", "name")

    def __init__(self, function, name):
        self.function, self.name = function, name

    def __call__(self, *args):
        return self.function(*args)

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"it would change {self.name}")


# ---- tensors ----------------------------------------------------------------------------------------

STORAGE_TYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                 "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                 "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                 "BoolStorage": torch.bool}
_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001   # torch's legacy serialisation header


class StorageType:
    """What a pickled storage class (torch.FloatStorage, ...) stands for: the dtype of its elements."""

    def __init__(self, dtype):
        self.dtype = dtype


class _DataUnpickler(pickle.Unpickler):
    """Plain data only (numbers, strings, containers); with `storages`, also the persistent ids of torch's
    legacy format, which name a storage type ('torch', 'HalfStorage', ...)."""

    def __init__(self, file, storages=None):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module, name):
        if self.storages is not None and module == "torch" and name in STORAGE_TYPES:
            return StorageType(STORAGE_TYPES[name])
        raise refused_global(module, name)

    def persistent_load(self, pid):
        if self.storages is None or not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                                         and isinstance(pid[1], StorageType) and isinstance(pid[2], str)
                                         and type(pid[4]) is int and pid[4] >= 0 and pid[5] is None):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:60]}")
        self.storages.setdefault(pid[2], (pid[1].dtype, pid[4]))
        return pid[2]


def storage_from_bytes(data):
    """A flat tensor of the storage that torch's ``Storage.__reduce__`` wrote (legacy format): four small
    pickles (magic number, format version, system info, the storage as a persistent id), the list of
    storage keys, then per key its element count (8 bytes, little-endian) and its raw bytes."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"tensor data is a {type(data).__name__}, not bytes")
    if data[:4] == b"PK\x03\x04":
        raise pickle.UnpicklingError("tensor data in torch's zip format, which release pickles do not use")
    f, storages = io.BytesIO(data), {}
    magic, version, info = (_DataUnpickler(f).load() for _ in range(3))
    if magic != _LEGACY_MAGIC or version != _LEGACY_PROTOCOL or not isinstance(info, dict):
        raise pickle.UnpicklingError("tensor data is not in torch's storage format")
    if info.get("little_endian") is not True:
        raise pickle.UnpicklingError("big-endian tensor data, which this reader does not handle")
    key = _DataUnpickler(f, storages).load()
    keys = _DataUnpickler(f).load()
    if keys != [key] or len(storages) != 1:
        raise pickle.UnpicklingError("tensor data holds other than one storage")
    dtype, numel = storages[key]
    itemsize = torch.empty((), dtype=dtype).element_size()
    header = f.read(8)
    if len(header) != 8 or struct.unpack("<q", header)[0] != numel:
        raise pickle.UnpicklingError(f"storage {key!r} does not hold the {numel} elements it declares")
    raw = f.read(numel * itemsize + 1)
    if len(raw) != numel * itemsize:
        raise pickle.UnpicklingError(f"storage {key!r} has {len(raw)} bytes, expected {numel * itemsize}")
    return torch.frombuffer(bytearray(raw), dtype=dtype) if numel else torch.empty(0, dtype=dtype)


def rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """A tensor of `size` and `stride` on the flat `storage` from `offset` (torch._utils._rebuild_tensor_v2)."""
    if not isinstance(storage, torch.Tensor) or storage.ndim != 1:
        raise pickle.UnpicklingError("a tensor's storage is not a storage")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)) or len(size) != len(stride) \
            or not all(type(v) is int and v >= 0 for v in (offset, *size, *stride)):
        raise pickle.UnpicklingError(f"bad tensor layout: offset {offset!r}, size {size!r}, stride {stride!r}")
    if math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel():
        raise pickle.UnpicklingError(f"a tensor of size {list(size)} at offset {offset} overruns its storage")
    return storage.as_strided(tuple(size), tuple(stride), offset)


def rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    """A parameter's data (torch._utils._rebuild_parameter and _rebuild_parameter_with_state)."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter holds no tensor")
    return data


# ---- numpy values (the VAE encoder's scale and bias) ---------------------------------------------------

class NumpyDtype:
    """numpy.dtype(name, align, copy), then its state (byte order): numeric dtypes only."""

    def __init__(self, name, align=False, copy=False):
        if not isinstance(name, str) or name[:1] not in "fiub" or not name[1:].isdigit():
            raise pickle.UnpicklingError(f"numpy dtype {str(name)[:20]!r} is not a number type")
        self.dtype = np.dtype(name)

    def __setstate__(self, state):
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"
        if order not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"numpy byte order {str(order)[:5]!r}")
        self.dtype = self.dtype.newbyteorder(order) if order in "<>" else self.dtype


class NumpyArray:
    """numpy's _reconstruct(ndarray, ...), then its state (version, shape, dtype, fortran, raw bytes)."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[4], bytes)):
            raise pickle.UnpicklingError("a numpy array that is not numbers")
        self.__dict__["value"] = _numpy_frombuffer(state[4], state[2], state[1], "F" if state[3] else "C")


def _numpy_array(kind, shape, typecode):
    if kind != "numpy.ndarray":
        raise pickle.UnpicklingError("numpy's _reconstruct of something other than an array")
    return NumpyArray()


def _numpy_frombuffer(buffer, dtype, shape, order="C"):
    """numpy's _frombuffer (how protocol 5 writes an array in-band); an array's state too (:class:`NumpyArray`)."""
    if not isinstance(buffer, (bytes, bytearray)) or not isinstance(dtype, NumpyDtype) or order not in ("C", "F") \
            or not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape) \
            or len(buffer) != math.prod(shape) * dtype.dtype.itemsize:
        raise pickle.UnpicklingError("a numpy array that is not numbers")
    return np.frombuffer(bytes(buffer), dtype.dtype).reshape(shape, order=order)


def _numpy_scalar(dtype, data):
    if not isinstance(dtype, NumpyDtype) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise pickle.UnpicklingError("a numpy scalar that is not a number")
    return np.frombuffer(data, dtype.dtype)[0]


def _latin1(text, encoding="latin1"):
    """_codecs.encode(text, 'latin1'): how pickle protocols 0-2 write bytes."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode of other than latin-1 text")
    return text.encode("latin1")


# ---- the unpickler ---------------------------------------------------------------------------------------

_PYTHON2_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class ReleaseUnpickler(pickle.Unpickler):
    """Builds the recording stand-ins of the allowed globals, and nothing else."""

    def __init__(self, file):
        super().__init__(file)
        self.sources = {}  # module source -> None when it only defines things, else why not
        functions = {("torch_utils.persistence", "_reconstruct_persistent_obj"): self.persistent_object,
                     ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
                     ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
                     ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
                     ("torch.storage", "_load_from_bytes"): storage_from_bytes,
                     ("numpy.core.multiarray", "_reconstruct"): _numpy_array,
                     ("numpy._core.multiarray", "_reconstruct"): _numpy_array,
                     ("numpy.core.multiarray", "scalar"): _numpy_scalar,
                     ("numpy._core.multiarray", "scalar"): _numpy_scalar,
                     ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
                     ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
                     ("numpy", "dtype"): NumpyDtype,
                     ("_codecs", "encode"): _latin1}
        self.allowed = {key: _Call(f, ".".join(key)) for key, f in functions.items()}
        self.allowed.update({("dnnlib.util", "EasyDict"): ReleaseDict,
                             ("collections", "OrderedDict"): collections.OrderedDict,
                             ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
                             ("numpy", "ndarray"): "numpy.ndarray"})
        for name in ("ModuleDict", "ModuleList", "Sequential"):
            self.allowed[("torch.nn.modules.container", name)] = ContainerModule

    def find_class(self, module, name):
        module = _PYTHON2_NAMES.get(module, module)  # what pickle protocols 0-2 call them
        try:
            return self.allowed[(module, name)]
        except (KeyError, TypeError):
            raise refused_global(module, name) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent id, which release pickles do not")

    def persistent_object(self, meta):
        """torch_utils.persistence._reconstruct_persistent_obj(meta), recorded: the source is checked as text."""
        if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str) \
                or not isinstance(meta.get("module_src"), str) \
                or not isinstance(meta.get("state", {}), (dict, type(None))):
            raise pickle.UnpicklingError("a persistent object without class name, source and state")
        source, name = meta["module_src"], meta["class_name"]
        if source not in self.sources:
            self.sources[source] = code_run_on_import(source)
        if self.sources[source] is not None:
            raise Refused(f"the embedded source of its class {name[:40]} would run code when imported "
                          f"({self.sources[source]}); mpdiff never runs it, and a release's source only defines "
                          f"classes and functions")
        return PersistentObject(name, meta.get("version"), dict(meta.get("state") or {}))


# ---- from the recorded objects to our network ------------------------------------------------------------

ENCODER_POSITIONAL = ("vae_name", "raw_mean", "raw_std", "final_mean", "final_std", "batch_size")
_ZIP_MAGIC = b"PK\x03\x04"


class NotRelease(ValueError):
    """The file unpickles, but not into what a release holds."""


def _plain(value, what, depth=0):
    """A recorded value as JSON data: None, booleans, numbers, text, lists and dicts keyed by text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (NumpyArray, np.ndarray)):
        return (value.value if isinstance(value, NumpyArray) else value).tolist()
    if depth < 8 and isinstance(value, (list, tuple)):
        return [_plain(v, what, depth + 1) for v in value]
    if depth < 8 and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, what, depth + 1) for k, v in value.items()}
    raise NotRelease(f"{what} holds a {type(value).__name__}")


def _arguments(obj, positional, what):
    """The recorded constructor arguments of a persistent object as keywords ({} when it recorded none)."""
    args, kwargs = obj.state.get("_init_args") or (), obj.state.get("_init_kwargs") or {}
    if not isinstance(args, (tuple, list)) or len(args) > len(positional) or not isinstance(kwargs, dict) \
            or set(positional[:len(args)]) & set(kwargs):
        raise NotRelease(f"the constructor arguments of its {what} are not {obj.class_name}'s")
    return _plain(dict(zip(positional, args), **kwargs), f"the constructor arguments of its {what}")


def _module_tensors(module, prefix="", out=None, depth=0):
    """{dotted name: tensor} of a recorded torch module's parameters and persistent buffers, as state_dict."""
    out = {} if out is None else out
    state = getattr(module, "state", None)
    where = prefix[:-1] or "the network"
    if depth > _MAX_DEPTH:
        raise NotRelease("its network nests modules more deeply than EDM2's")
    tables = [state.get(k, {}) if isinstance(state, dict) else None for k in ("_parameters", "_buffers", "_modules")]
    skip = state.get("_non_persistent_buffers_set", set()) if isinstance(state, dict) else None
    if not all(isinstance(t, dict) for t in tables) or not isinstance(skip, (set, frozenset)):
        raise NotRelease(f"{where[:80]} is not a torch module")
    parameters, buffers, children = tables
    for name, tensor in [*parameters.items(), *((k, v) for k, v in buffers.items() if k not in skip)]:
        if tensor is not None:
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise NotRelease(f"{prefix}{str(name)[:40]} of the network is not a tensor")
            out[prefix + name] = tensor
    for name, child in children.items():
        if child is not None:
            if not isinstance(name, str) or not isinstance(child, (PersistentObject, ContainerModule)):
                raise NotRelease(f"{prefix}{str(name)[:40]} of the network is not a module")
            _module_tensors(child, f"{prefix}{name}.", out, depth + 1)
    return out


def _encoder(obj):
    """What the file says about its encoder: its class, its constructor's keywords and, for the VAE
    encoder, the VAE's name and the per-channel scale and bias it applies to the VAE's latents."""
    if obj is None:
        return None
    name = obj.class_name if isinstance(obj, PersistentObject) else type(obj).__name__
    if name not in ENCODER_CLASSES or not isinstance(obj, PersistentObject):
        raise NotRelease(f"its encoder is a {name[:40]}, not one of EDM2's ({', '.join(ENCODER_CLASSES)})")
    described = {"class_name": name, "init_kwargs": _arguments(obj, ENCODER_POSITIONAL, "encoder")}
    if name == "StabilityVAEEncoder":
        state = obj.state
        for key in ("scale", "bias"):
            values = _plain(state.get(key), f"its encoder's {key}")
            values = values if isinstance(values, list) else [values]
            if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise NotRelease(f"its encoder's {key} is not a list of numbers")
            described[key] = [float(v) for v in values]
        if not isinstance(state.get("vae_name"), str):
            raise NotRelease("its encoder names no VAE")
        described["vae_name"] = state["vae_name"]
    return described


def _lenient(value, what):
    """Information the network does not need (the loss, the dataset): JSON data, or None if it is not."""
    try:
        if isinstance(value, PersistentObject):
            return {"class_name": value.class_name, "init_kwargs": _arguments(value, (), what)}
        return _plain(value, what)
    except NotRelease:
        return None


class Edm2Release(NamedTuple):
    """A release pickle as read: our network and what the file records beside it."""
    net: torch.nn.Module        # our Precond (float32, eval mode), built by load_edm2
    network_kwargs: dict        # the constructor keywords the file records for its network (Precond's)
    encoder: Optional[dict]     # see _encoder; None when the file has none (then its outputs are pixels)
    loss: Optional[dict]        # {'class_name', 'init_kwargs'} of its loss_fn, for information
    dataset_kwargs: Optional[dict]
    stored_dtype: str           # the network's floating tensors in the file: 'float16' for NVIDIA's releases

    def metadata(self):
        """The facts of the file, as JSON data (the metadata of a converted network file keeps them)."""
        return {"format": RELEASE_FORMAT, "network": self.net.config.to_dict(), "edm2_network": self.network_kwargs,
                "edm2_encoder": self.encoder, "edm2_loss": self.loss, "edm2_dataset_kwargs": self.dataset_kwargs,
                "stored_dtype": self.stored_dtype}


def is_release_pickle(path):
    """Whether `path` names a release pickle by its name (.pkl, .pickle), unless it is a torch.save
    archive (a zip, which :func:`~mpdiff.storage.tensors.safe_torch_load` reads)."""
    path = os.fspath(path)
    if not os.fsdecode(path).lower().endswith((".pkl", ".pickle")):
        return False
    try:
        with open_regular(path, what="network pickle", error=CheckpointError) as f:
            return f.read(4) != _ZIP_MAGIC
    except CheckpointError:
        return True  # the reader says what is wrong with it


def _unpickle(path, shown):
    limit, origin = memory_limit(MAX_NETWORK_BYTES_ENV, error=CheckpointError)
    with open_regular(path, what="network pickle", error=CheckpointError) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CheckpointError(f"{shown}: empty file")
        if limit is not None and size > limit:
            raise CheckpointError(f"{shown}: {size:,} bytes, more than a network file may have "
                                  f"({limit / 2 ** 30:.1f} GiB: {origin})")
        if f.peek(4)[:4] == _ZIP_MAGIC:
            raise CheckpointError(f"{shown}: a torch.save archive, not an EDM2 release pickle")
        unpickler = ReleaseUnpickler(f)
        try:
            return unpickler.load()
        except Refused as e:
            raise CheckpointError(f"{shown}: refused to load: {e}; nothing in it was run") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
                RuntimeError, RecursionError, MemoryError, OverflowError, struct.error, ImportError) as e:
            raise CheckpointError(f"{shown}: not a readable EDM2 release pickle ({type(e).__name__}: "
                                  f"{first_line(e, 120)})") from None
        finally:
            del unpickler  # its memo holds every byte read


def read_edm2_pickle(path, device="cpu"):
    """Read one of NVIDIA's released EDM2 networks (a ``.pkl``) without running anything in it.

    Returns an :class:`Edm2Release` whose ``net`` is our network with the file's weights (float32, eval
    mode, on `device`), built by :func:`~mpdiff.nn.compat.load_edm2` from the file's tensors and its
    recorded constructor keywords. Raises CheckpointError naming the file: for a global the release
    format does not need (``posix.system``, say), for an embedded source that would run code, for a
    file larger than the network memory budget (``$MPDIFF_MAX_NETWORK_BYTES``), or for anything that
    is not a release.
    """
    path = os.fspath(path)
    shown = show_path(path)
    root = _unpickle(path, shown)
    try:
        if not isinstance(root, dict) or not isinstance(root.get("ema"), PersistentObject):
            raise NotRelease(f"it holds a {type(root).__name__} without a network under 'ema'")
        ema = root["ema"]
        if ema.class_name != NETWORK_CLASS:
            raise NotRelease(f"its network is a {ema.class_name[:40]}, not EDM2's {NETWORK_CLASS}")
        tensors = _module_tensors(ema)
        kwargs = _arguments(ema, PRECOND_POSITIONAL, "network")
        encoder = _encoder(root.get("encoder"))
    except NotRelease as e:
        raise CheckpointError(f"{shown}: not an EDM2 release pickle ({e})") from None
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    try:
        net = load_edm2(tensors, device=device, **kwargs)
    except MpdiffError as e:
        raise CheckpointError(f"{shown}: {str(e).removeprefix('load_edm2: ')}") from None
    return Edm2Release(net, kwargs, encoder, _lenient(root.get("loss_fn"), "its loss"),
                       _lenient(root.get("dataset_kwargs"), "its dataset"), "/".join(dtypes) or "none")
