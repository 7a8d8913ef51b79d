"""mpdiff: magnitude-preserving diffusion models (EDM2) — train, sample, post-hoc EMA.

The names below are the public API; everything else is importable from its sub-package
(see docs/ARCHITECTURE.md for the map).
"""

__version__ = "0.1.0"

from mpdiff.config import NetworkConfig, Preset, TrainingConfig
from mpdiff.diffusion.generate import generate
from mpdiff.diffusion.loss import edm2_loss
from mpdiff.ema.trackers import PowerFunctionEMA, TraditionalEMA
from mpdiff.errors import MpdiffError
from mpdiff.nn.build import build_network
from mpdiff.nn.compat import load_edm2
from mpdiff.presets import PRESETS, get_preset
from mpdiff.storage.edm2_pickle import read_edm2_pickle
from mpdiff.storage.network_files import load_network, save_network

__all__ = [
    "NetworkConfig", "Preset", "TrainingConfig", "PRESETS", "get_preset",
    "build_network", "load_edm2", "load_network", "read_edm2_pickle", "save_network",
    "edm2_loss", "generate", "PowerFunctionEMA", "TraditionalEMA", "MpdiffError",
]
