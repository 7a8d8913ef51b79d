"""Build networks from configs."""

import torch

from mpdiff.budgets import memory_limit
from mpdiff.config import NetworkConfig
from mpdiff.errors import CheckpointError
from mpdiff.nn.precond import Precond


def build_network(config: NetworkConfig, device="cpu"):
    """Instantiate :class:`~mpdiff.nn.precond.Precond` from a :class:`NetworkConfig` (of any ablation
    config A-G; ConfigError for another).

    Weights are drawn on the CPU and then moved, so a seed gives the same initial network on every
    device; only the meta device is built in place (shapes without memory). The config's values are
    checked first (:meth:`NetworkConfig.check`), whether they came from flags or from a file.
    """
    config.check()
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return Precond(**config.to_dict())
    return Precond(**config.to_dict()).to(device)


def build_meta_network(config: NetworkConfig):
    """The same network on the meta device: shapes and names only, no memory (for checks and counts)."""
    return build_network(config, device="meta")


def check_state_dict(expected, tensors, context):
    """Raise CheckpointError("<context> (...)") unless `tensors` has exactly the keys, shapes and kinds
    (floating or not) of `expected` (a state_dict, e.g. of a network built on the meta device), and
    every floating tensor is finite: weights with NaN or infinity would generate black or noise images."""
    missing = sorted(set(expected) - set(tensors), key=str)
    unexpected = sorted(set(tensors) - set(expected), key=str)
    if missing or unexpected:
        raise CheckpointError(f"{context} (missing {[str(k)[:60] for k in missing[:4]]}, "
                              f"unexpected {[str(k)[:60] for k in unexpected[:4]]})")
    for key, ref in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(f"{context} (tensor {key} has shape {tuple(got.shape)}, expected {tuple(ref.shape)})")
        if got.is_floating_point() != ref.is_floating_point():
            raise CheckpointError(f"{context} (tensor {key} is stored as {str(got.dtype).replace('torch.', '')}, "
                                  f"expected a floating-point tensor)" if ref.is_floating_point() else
                                  f"{context} (tensor {key} is floating-point, expected {ref.dtype})")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise CheckpointError(f"{context} (tensor {key} holds non-finite values)")


MAX_NETWORK_BYTES_ENV = "MPDIFF_MAX_NETWORK_BYTES"


def check_network_memory(expected, context):
    """Refuse, before anything is allocated, a network (a meta-device state_dict) larger than the memory
    budget: a small file can describe a huge network (e.g. expanded, stride-0 tensors in a .pt)."""
    need = sum(t.numel() * 4 for t in expected.values())  # float32 weights
    limit, origin = memory_limit(MAX_NETWORK_BYTES_ENV, error=CheckpointError)
    if limit is not None and need > limit:
        raise CheckpointError(f"{context}: the network it describes needs {need / 2 ** 30:.1f} GiB ({need:,} bytes), "
                              f"more than the limit of {limit / 2 ** 30:.1f} GiB ({origin})")
