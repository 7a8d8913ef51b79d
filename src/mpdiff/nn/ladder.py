"""The ablation ladder: configs A-G of paper Table 1 as flags on one network family (SPEC §4).

Config G is the EDM2 network (SPEC §3). A is EDM's re-implementation of ADM; B-F are the steps
between. Each config is one :class:`LadderFlags` record, written below as its delta from the
previous rung, in the order SPEC §4.3-4.9 lists them; the flag set is SPEC §4.10's.
:class:`~mpdiff.nn.unet.UNet`, :class:`~mpdiff.nn.unet.Block` and
:class:`~mpdiff.nn.precond.Preconditioner` read the flags, and :class:`Layers` turns those that
choose a layer's kind into modules, so A-F are the same code as G with different switches.

What a config changes in the recipe (batch, learning rate and its decay, EMA, loss scaling, P_mean
and P_std; SPEC §4.2) and its dropout and attention resolutions are not network flags: they arrive
as ordinary config fields.
"""

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mpdiff.errors import ConfigError
from mpdiff.nn.layers import Conv, GroupNorm, RMSGroupNorm, plain_cat, plain_sum
from mpdiff.nn.primitives import (
    FourierFeatures,
    MPConv,
    MPFourier,
    mp_cat,
    mp_silu,
    mp_sum,
)


@dataclass(frozen=True)
class LadderFlags:
    """The network features that tell configs A-G apart (SPEC §4.10)."""
    name: str                    # 'A' .. 'G'
    bias: bool                   # learned biases in every conv and linear layer (A, B)
    ones_channel: bool           # constant-one input channel (SPEC §2.15; C on)
    cond_shift: bool             # conditioning (1 + scale) h + shift; off: (1 + scale) h (SPEC §2.13)
    init: str                    # of layers without weight norm: 'he_uniform_zero' (A, B: U(+-1/sqrt(fan_in)),
    #                              last conv of each branch zero, class vectors N(0, 1)), 'he_uniform' (C:
    #                              every layer alike); 'unit_gauss' (D on: N(0, 1), normalised on use)
    noise_embedding: str         # 'positional' (A, B), 'fourier' (C-F), 'mp_fourier' (G: x sqrt(2))
    emb_mlp_layers: int          # linear layers on the noise features: 2 (A-E), 1 (F, G)
    norm: str                    # 'groupnorm' (mean-subtracting, learned scale and bias; A, B),
    #                              'rms_groupnorm' (Eq. 29; C-E), 'pixelnorm' (encoder entry only; F, G)
    attention: str               # 'dot_product' (group norm before qkv, FP32 logits; A, B), 'cosine' (C on)
    weight_norm: str             # 'none' (A-C), 'standard' (on use; D), 'forced' (and re-projected; E on)
    resample_on_main_path: bool  # resample at block entry for both branches (F, G); off: inside the
    #                              residual branch after its activation, and on the skip path (A-E)
    enc_1x1_first: bool          # encoder 1x1 width change at the start of the main path (F, G);
    #                              off: on the skip path, the first residual conv changes the width
    out_silu: bool               # activation before the output conv (A-E)
    mp_fixed_function: bool      # mp_silu, mp_sum, mp_cat and learned gains (G); off: silu, +, concat
    #                              (G's sqrt(2) Fourier scaling is noise_embedding='mp_fourier')
    loss_uncertainty: bool       # log-variance head u(sigma) of the loss (SPEC §1.2; B on)

    @property
    def clamps_activations(self) -> bool:
        """Whether blocks end with the +-clip_act clamp: G only, where SPEC §4.9 lists it among G's deltas
        (whether NVIDIA's A-F clamped is open, SPEC §13 item 7). So NetworkConfig(config='A') and
        ladder_preset's A are one network, and `clip_act` is G's limit."""
        return self.mp_fixed_function

    @property
    def class_vectors(self) -> bool:
        """A and B look up one N(0, 1) vector per class with the raw one-hot label (SPEC §4.3); from C
        on, the class embedding is a layer initialised like the others, fed one-hot * sqrt(label_dim)
        so that its output keeps unit magnitude (SPEC §4.5 item 4, §2.12)."""
        return self.init == "he_uniform_zero"


# A (SPEC §4.3): ADM inside the EDM framework. Pre-activation residual blocks with group norm,
# biases, (1 + scale) h + shift conditioning, a positional embedding with a 2-layer MLP and
# dot-product attention; zero-initialised final convs, so D(x) = c_skip x at init; plain EDM loss.
CONFIG_A = LadderFlags(name="A", bias=True, ones_channel=False, cond_shift=True, init="he_uniform_zero",
                       noise_embedding="positional", emb_mlp_layers=2, norm="groupnorm", attention="dot_product",
                       weight_norm="none", resample_on_main_path=False, enc_1x1_first=False, out_silu=True,
                       mp_fixed_function=False, loss_uncertainty=False)
# B (§4.4): the learned uncertainty u(sigma). B's other changes are the recipe and the attention
# resolutions. That u's linear layer has a bias and A's init in B is SPEC's stated choice (unconfirmed).
CONFIG_B = replace(CONFIG_A, name="B", loss_uncertainty=True)
# C (§4.5): no biases and no conditioning shift, a ones channel, the simplified group norm (Eq. 29),
# uniform init without zero-initialised layers, Fourier features, cosine attention. That v is
# normalised along with q and k follows G (unconfirmed for C).
CONFIG_C = replace(CONFIG_B, name="C", bias=False, ones_channel=True, cond_shift=False, init="he_uniform",
                   noise_embedding="fourier", norm="rms_groupnorm", attention="cosine")
# D (§4.6): weight normalisation on use in every layer, N(0, 1) init. No learned gains before G
# (unconfirmed; inferred in SPEC from the figures).
CONFIG_D = replace(CONFIG_C, name="D", weight_norm="standard", init="unit_gauss")
# E (§4.7): forced weight normalisation (Eq. 66). Its other change, the LR decay, is the recipe.
CONFIG_E = replace(CONFIG_D, name="E", weight_norm="forced")
# F (§4.8): no group norms; pixel norm at encoder entry; resampling on the main path; encoder 1x1
# first; no output SiLU; a 1-layer embedding.
CONFIG_F = replace(CONFIG_E, name="F", norm="pixelnorm", resample_on_main_path=True, enc_1x1_first=True,
                   out_silu=False, emb_mlp_layers=1)
# G (§4.9): magnitude-preserving fixed-function layers and learned gains; this is SPEC §3.
CONFIG_G = replace(CONFIG_F, name="G", noise_embedding="mp_fourier", mp_fixed_function=True)

LADDER = {flags.name: flags for flags in (CONFIG_A, CONFIG_B, CONFIG_C, CONFIG_D, CONFIG_E, CONFIG_F, CONFIG_G)}


def ladder_flags(config: str) -> LadderFlags:
    """The flags of ablation config `config` ('A' .. 'G'); ConfigError for anything else."""
    try:
        return LADDER[config]
    except (KeyError, TypeError):
        raise ConfigError(f"{{config}} {str(config)[:20]!r} is not an ablation-ladder config; expected one of "
                          f"{', '.join(LADDER)} (SPEC §4)", fields=("config",)) from None


@dataclass(frozen=True)
class FixedFunctions:
    """The parameter-free operations a config uses: activation, weighted join, skip concatenation.

    Config G's keep magnitudes (Eq. 81, 88, 103); A-F's are SiLU, plain sum and plain concatenation,
    which take the same `t` and ignore it.
    """
    silu: Callable[[torch.Tensor], torch.Tensor]
    sum: Callable[..., torch.Tensor]  # (a, b, t=share of b)
    cat: Callable[..., torch.Tensor]  # (a, b, t=share of b)


MP_FUNCTIONS = FixedFunctions(silu=mp_silu, sum=mp_sum, cat=mp_cat)
PLAIN_FUNCTIONS = FixedFunctions(silu=F.silu, sum=plain_sum, cat=plain_cat)


class Layers:
    """Builds the layers whose kind a config's flags choose, for the U-Net and the uncertainty head."""

    def __init__(self, flags: LadderFlags):
        self.flags = flags
        self.functions = MP_FUNCTIONS if flags.mp_fixed_function else PLAIN_FUNCTIONS

    def conv(self, in_channels: int, out_channels: int, kernel=(3, 3), last: bool = False) -> nn.Module:
        """A convolution, or with kernel () a linear layer, called as layer(x).

        `last` marks the final layer of a residual branch, of an attention or of the network, which
        A and B initialise to zero. Weight-normalised layers (D on) are :class:`MPConv` (SPEC §2.2),
        drawn from N(0, 1) and re-projected in training from E on.
        """
        flags = self.flags
        if flags.weight_norm != "none":
            return MPConv(in_channels, out_channels, kernel, forced=flags.weight_norm == "forced")
        zero = last and flags.init == "he_uniform_zero"
        return Conv(in_channels, out_channels, kernel, bias=flags.bias, init="zero" if zero else "he_uniform")

    def class_embedding(self, label_dim: int, width: int) -> nn.Module:
        """The linear layer from the one-hot label to the embedding (see LadderFlags.class_vectors)."""
        if self.flags.class_vectors:
            return Conv(label_dim, width, (), bias=False, init="unit_gauss")
        return self.conv(label_dim, width, ())

    def gain(self) -> Optional[nn.Parameter]:
        """A learned scalar gain, zero at init (Eq. 104; G only), or None."""
        return nn.Parameter(torch.zeros([])) if self.flags.mp_fixed_function else None

    def group_norm(self, channels: int) -> Optional[nn.Module]:
        """The group norm of a residual branch, attention input or output block; None from F on."""
        if self.flags.norm == "groupnorm":
            return GroupNorm(channels)
        if self.flags.norm == "rms_groupnorm":
            return RMSGroupNorm(channels)
        return None

    def fourier(self, channels: int) -> FourierFeatures:
        """Random Fourier features: magnitude-preserving (x sqrt(2)) in G, plain before."""
        return MPFourier(channels) if self.flags.noise_embedding == "mp_fourier" else FourierFeatures(channels)
