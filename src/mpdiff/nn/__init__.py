"""Networks: magnitude-preserving primitives, the config-G U-Net and EDM preconditioning.

* :mod:`~mpdiff.nn.primitives` — normalize, mp_silu, mp_sum, mp_cat, MPFourier, MPConv, attention.
* :mod:`~mpdiff.nn.layout` — the U-Net topology as data (block specs and long skips).
* :mod:`~mpdiff.nn.unet` — ``Block`` and ``UNet``, which instantiate a layout.
* :mod:`~mpdiff.nn.precond` — ``Precond``: D(x; sigma, c) around a backbone, plus u(sigma).
* :mod:`~mpdiff.nn.build`, :mod:`~mpdiff.nn.compat`, :mod:`~mpdiff.nn.flops` — construction from
  configs, NVIDIA's released weights, parameter and flop counts.
"""

from mpdiff.nn.layout import BlockSpec, LongSkip, UNetLayout, unet_layout
from mpdiff.nn.precond import Precond, Preconditioner, edm_coefficients
from mpdiff.nn.unet import Block, UNet

__all__ = ["Block", "BlockSpec", "LongSkip", "Precond", "Preconditioner", "UNet", "UNetLayout",
           "edm_coefficients", "unet_layout"]
