"""Build networks from configs."""

from .networks import Precond
from .presets import NetworkConfig


def build_network(config: NetworkConfig, device="cpu"):
    """Instantiate :class:`Precond` from a :class:`NetworkConfig`."""
    kwargs = config.to_dict()
    return Precond(**kwargs).to(device)
