"""Network files: safetensors weights + JSON config in the file's metadata (no pickle anywhere).

A network file holds the state_dict of a :class:`~mpdiff.nn.precond.Precond` (parameters and
buffers) and, in its metadata, ``format = "mpdiff-network/1"``, ``network`` (the
:class:`~mpdiff.config.NetworkConfig` as a dict) and free-form fields such as ``nimg`` or
``sigma_rel``. EMA snapshots and post-hoc reconstructions are network files too.
"""

import os

import torch

from mpdiff.config import STORAGE_DTYPES, NetworkConfig
from mpdiff.errors import CheckpointError, ConfigError, first_line
from mpdiff.storage.edm2_pickle import is_release_pickle, read_edm2_pickle
from mpdiff.storage.tensors import load_tensors, read_metadata, save_tensors

NETWORK_FORMAT = "mpdiff-network/1"

_DTYPES = {name: getattr(torch, name) for name in STORAGE_DTYPES}


def storage_dtype(name):
    try:
        return _DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown storage dtype {name!r}; expected one of {', '.join(_DTYPES)}") from None


def save_network(path, state_dict, config, dtype="float32", **metadata):
    """Write `state_dict` (floating tensors cast to `dtype`) with its NetworkConfig, atomically."""
    target = storage_dtype(dtype)
    tensors = {k: (v.to(target) if v.is_floating_point() else v) for k, v in state_dict.items()}
    config_dict = config.to_dict() if isinstance(config, NetworkConfig) else dict(config)
    save_tensors(path, tensors, dict(metadata, format=NETWORK_FORMAT, network=config_dict, dtype=dtype))


def read_network_metadata(path):
    meta = read_metadata(path)
    if meta.get("format") != NETWORK_FORMAT:
        raise CheckpointError(f"{path}: not an mpdiff network file (format {meta.get('format')!r}, "
                              f"expected {NETWORK_FORMAT!r})")
    return meta


def load_network(path, device="cpu", eval_mode=True):
    """Build the network described in a network file and load its weights (float32).

    Returns (net, metadata). Mismatched or damaged files raise CheckpointError naming the file.
    One of NVIDIA's release pickles (``*.pkl``) is read by :func:`~mpdiff.storage.edm2_pickle.read_edm2_pickle`,
    which runs nothing of it; its metadata is :meth:`~mpdiff.storage.edm2_pickle.Edm2Release.metadata`.
    """
    from mpdiff.nn.build import build_meta_network, build_network, check_network_memory, check_state_dict

    path = os.fspath(path)
    if is_release_pickle(path):
        release = read_edm2_pickle(path, device=device)
        net = release.net.eval().requires_grad_(False) if eval_mode else release.net.train()
        return net, release.metadata()
    meta = read_network_metadata(path)
    if not isinstance(meta.get("network"), dict):
        raise CheckpointError(f"{path}: metadata has no network config (a JSON object under 'network')")
    config = NetworkConfig.from_dict(meta["network"], source=path)
    try:  # the same checks as the flags that set these values
        config.check()
    except ConfigError as e:
        raise CheckpointError(f"{path}: network config: {e}") from None
    tensors, _ = load_tensors(path)
    try:  # the config comes from the file: building it must fail as a clear error, never a traceback
        net = build_meta_network(config)
    except (TypeError, ValueError, RuntimeError, ArithmeticError, IndexError, KeyError) as e:
        reason = first_line(e, 160)
        raise CheckpointError(f"{path}: its network config cannot be built ({type(e).__name__}: {reason})") from None
    check_network_memory(net.state_dict(), path)
    check_state_dict(net.state_dict(), tensors, f"{path}: weights do not match its network config")
    net = build_network(config, device="cpu")
    net.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()})
    net = net.to(device)
    if eval_mode:
        net.eval().requires_grad_(False)
    return net, meta
