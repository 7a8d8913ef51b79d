"""Networks: magnitude-preserving primitives, the U-Net of configs A-G and EDM preconditioning.

* :mod:`~mpdiff.nn.primitives` — normalize, mp_silu, mp_sum, mp_cat, MPFourier, MPConv, attention.
* :mod:`~mpdiff.nn.layers` — the layers of configs A-F that G replaced (plain conv, group norms, ...).
* :mod:`~mpdiff.nn.ladder` — the ablation configs A-G as flags (``LADDER``), and the layers they choose.
* :mod:`~mpdiff.nn.layout` — the U-Net topology as data (block specs and long skips).
* :mod:`~mpdiff.nn.unet` — ``Block`` and ``UNet``, which instantiate a layout.
* :mod:`~mpdiff.nn.precond` — ``Precond``: D(x; sigma, c) around a backbone, plus u(sigma).
* :mod:`~mpdiff.nn.build`, :mod:`~mpdiff.nn.compat`, :mod:`~mpdiff.nn.flops` — construction from
  configs, NVIDIA's released weights, parameter and flop counts.
"""

from mpdiff.nn.ladder import LADDER, LadderFlags, ladder_flags
from mpdiff.nn.layout import BlockSpec, LongSkip, UNetLayout, unet_layout
from mpdiff.nn.precond import Precond, Preconditioner, edm_coefficients
from mpdiff.nn.unet import Block, UNet

__all__ = ["LADDER", "Block", "BlockSpec", "LadderFlags", "LongSkip", "Precond", "Preconditioner", "UNet",
           "UNetLayout", "edm_coefficients", "ladder_flags", "unet_layout"]
