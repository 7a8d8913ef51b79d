"""mpdiff: magnitude-preserving diffusion models (EDM2) — train, sample, post-hoc EMA."""

__version__ = "0.1.0"

from .errors import MpdiffError  # noqa: F401
from .networks import Block, Precond, UNet  # noqa: F401
from .presets import PRESETS, NetworkConfig, Preset, TrainingConfig, get_preset  # noqa: F401
from .model import build_network  # noqa: F401
