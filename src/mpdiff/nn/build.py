"""Build networks from configs."""

from mpdiff.config import NetworkConfig
from mpdiff.nn.precond import Precond


def build_network(config: NetworkConfig, device="cpu"):
    """Instantiate :class:`~mpdiff.nn.precond.Precond` from a :class:`NetworkConfig`."""
    return Precond(**config.to_dict()).to(device)
