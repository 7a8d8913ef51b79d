"""Build networks from configs."""

import torch

from mpdiff.config import NetworkConfig
from mpdiff.errors import CheckpointError
from mpdiff.nn.precond import Precond


def build_network(config: NetworkConfig, device="cpu"):
    """Instantiate :class:`~mpdiff.nn.precond.Precond` from a :class:`NetworkConfig`.

    Weights are drawn on the CPU and then moved, so a seed gives the same initial network on every
    device; only the meta device is built in place (shapes without memory).
    """
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return Precond(**config.to_dict())
    return Precond(**config.to_dict()).to(device)


def build_meta_network(config: NetworkConfig):
    """The same network on the meta device: shapes and names only, no memory (for checks and counts)."""
    return build_network(config, device="meta")


def check_state_dict(expected, tensors, context):
    """Raise CheckpointError("<context> (...)") unless `tensors` has exactly the keys and shapes of
    `expected` (a state_dict, e.g. of a network built on the meta device)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{context} (missing {missing[:4]}, unexpected {unexpected[:4]})")
    for key, ref in expected.items():
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{context} (tensor {key} has shape {tuple(tensors[key].shape)}, "
                                  f"expected {tuple(ref.shape)})")
