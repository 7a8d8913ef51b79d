"""The config-G U-Net F(x; c_noise, c) (paper Fig. 21; SPEC §3).

:class:`Block` is the one residual block kind (encoder or decoder flavor); :class:`UNet` builds the
block list that :func:`mpdiff.nn.layout.unet_layout` describes and runs it, joining each long skip
listed in ``UNet.skips``. Module names equal those of NVIDIA's released networks, so their weights
load directly (:func:`mpdiff.nn.compat.load_edm2`).
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mpdiff.nn.layout import STEM, BlockSpec, UNetLayout, unet_layout
from mpdiff.nn.primitives import (
    MPConv,
    MPFourier,
    clip_activations,
    cosine_attention,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    resample,
)


class Block(nn.Module):
    """Residual block with multiplicative conditioning and optional self-attention (SPEC §3.3).

    Main path: resampling, then in the encoder flavor a 1x1 conv (only if the width changes) and a
    pixel norm (Eq. 30-31). Residual branch: 3x3 conv, scale by 1 + emb_linear(emb), MP-SiLU,
    dropout, 3x3 conv; added with mp_sum. The decoder flavor applies its 1x1 conv to the main path
    just before that sum. Then optional cosine self-attention, added the same way, and clamping.

    Args:
        in_channels: input width (for decoder blocks, including the concatenated skip).
        out_channels: output width.
        emb_channels: width of the shared conditioning vector.
        flavor: 'enc' or 'dec', see above.
        resample_mode: 'keep', 'down' or 'up' (2x), applied first.
        resample_filter: FIR taps of the resampling filter.
        attention: append self-attention with out_channels // channels_per_head heads.
        channels_per_head: attention head width.
        dropout: dropout probability in the residual branch, training mode only (SPEC §2.14).
        res_balance: mp_sum share t of the residual branch (Eq. 88).
        attn_balance: mp_sum share t of the attention branch.
        clip_act: clamp outputs to +-clip_act (FP16 guard); None disables.
        attn_impl: 'matmul' (explicit formula) or 'sdpa' (torch's fused kernel).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[float] = (1, 1),
                 attention: bool = False, channels_per_head: int = 64, dropout: float = 0.0,
                 res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: Optional[float] = 256,
                 attn_impl: str = "matmul"):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', not {flavor!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.resample_filter = tuple(resample_filter)
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.attn_impl = attn_impl
        self.num_heads = 0
        if attention:
            self.num_heads = out_channels // channels_per_head

        # Creation order is the random-init order and the file order: keep it.
        width = out_channels
        self.emb_gain = nn.Parameter(torch.zeros([]))  # zero: no conditioning at init (Eq. 104)
        branch_in = width if flavor == "enc" else in_channels  # enc has already run conv_skip
        self.conv_res0 = MPConv(branch_in, width, kernel=(3, 3))
        self.emb_linear = MPConv(emb_channels, width, kernel=())
        self.conv_res1 = MPConv(width, width, kernel=(3, 3))
        self.conv_skip = None if in_channels == width else MPConv(in_channels, width, kernel=(1, 1))
        self.attn_qkv = MPConv(width, 3 * width, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(width, width, kernel=(1, 1)) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, mode=self.resample_mode, filter=self.resample_filter)
        if self.flavor == "enc":
            x = self._encoder_entry(x)
        update = self._residual(x, emb)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, update, t=self.res_balance)
        if self.num_heads:
            x = self._attend(x)
        return clip_activations(x, self.clip_act)

    def _encoder_entry(self, x):
        """Match the width with a 1x1 conv if needed, then pixel norm (Eq. 30-31)."""
        if self.conv_skip is not None:
            x = self.conv_skip(x)
        return normalize(x, dim=1)

    def _residual(self, x, emb):
        """The residual branch; conditioning multiplies, it never shifts (SPEC §2.13)."""
        h = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1  # [N, C]
        h = mp_silu(h * scale[:, :, None, None].to(h.dtype))
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        return self.conv_res1(h)

    def _attend(self, x):
        """Add cosine self-attention over all pixels (SPEC §2.9)."""
        mixed = cosine_attention(self.attn_qkv(x), self.num_heads, impl=self.attn_impl)
        return mp_sum(x, self.attn_proj(mixed), t=self.attn_balance)


class UNet(nn.Module):
    """The raw network F(x, noise_labels, class_labels) of config G (SPEC §3.2-3.5).

    Args:
        img_resolution, img_channels: input size (square; divisible by 2^(levels - 1)).
        label_dim: number of classes; 0 makes the network unconditional.
        model_channels: base width C0.
        channel_mult: width of each level in units of C0, finest level first.
        channel_mult_noise: Fourier features of the noise level, in units of C0 (None: channel_mult[0]).
        channel_mult_emb: conditioning width, in units of C0 (None: max(channel_mult)).
        num_blocks: encoder blocks per level; the decoder has one more.
        attn_resolutions: resolutions whose blocks end with self-attention.
        label_balance: mp_sum share t of the class embedding (Eq. 88).
        concat_balance: mp_cat share t of the long skips (Eq. 103).
        **block_options: the remaining :class:`Block` keywords (dropout, res_balance, ...).

    ``layout`` holds the block specs; ``skips`` lists the long skips, outermost first.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: Optional[int] = None,
                 channel_mult_emb: Optional[int] = None, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (16, 8), label_balance: float = 0.5,
                 concat_balance: float = 0.5, **block_options):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.layout: UNetLayout = unet_layout(img_resolution, img_channels, model_channels, channel_mult,
                                              num_blocks, attn_resolutions)
        fourier_width = model_channels * (channel_mult[0] if channel_mult_noise is None else channel_mult_noise)
        emb_width = model_channels * (max(channel_mult) if channel_mult_emb is None else channel_mult_emb)

        # Creation order is the random-init order and the file order: keep it.
        self.out_gain = nn.Parameter(torch.zeros([]))  # zero: F = 0 at init (Eq. 104)
        self.emb_fourier = MPFourier(fourier_width)
        self.emb_noise = MPConv(fourier_width, emb_width, kernel=())
        self.emb_label = MPConv(label_dim, emb_width, kernel=()) if label_dim else None
        self.enc = nn.ModuleDict()
        for spec in self.layout.encoder:
            self.enc[spec.name] = _instantiate(spec, emb_width, block_options)
        self.dec = nn.ModuleDict()
        for spec in self.layout.decoder:
            self.dec[spec.name] = _instantiate(spec, emb_width, block_options)
        self.out_conv = MPConv(self.layout.out_channels, img_channels, kernel=(3, 3))

    @property
    def skips(self):
        """The long skips (:class:`~mpdiff.nn.layout.LongSkip`), outermost first."""
        return self.layout.skips

    def embed(self, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The conditioning vector shared by all blocks (SPEC §3.2)."""
        features = self.emb_fourier(noise_labels)
        emb = self.emb_noise(features)
        if self.emb_label is not None:
            unit_onehot = class_labels * math.sqrt(class_labels.shape[1])  # unit-RMS input (SPEC §2.12)
            emb = mp_sum(emb, self.emb_label(unit_onehot), t=self.label_balance)
        return mp_silu(emb)

    def join_skip(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Concatenate a long skip to the decoder's main path (Eq. 103)."""
        return mp_cat(x, skip, t=self.concat_balance)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        emb = self.embed(noise_labels, class_labels)
        ones = x.new_ones([x.shape[0], 1, *x.shape[2:]])  # constant input channel (SPEC §2.15)
        x = torch.cat([x, ones], dim=1)

        waiting = {}  # encoder outputs until their decoder block takes them
        for spec in self.layout.encoder:
            module = self.enc[spec.name]
            x = module(x) if spec.kind == STEM else module(x, emb)
            waiting[spec.name] = x
        for spec in self.layout.decoder:
            if spec.skip_from is not None:
                x = self.join_skip(x, waiting.pop(spec.skip_from))
            x = self.dec[spec.name](x, emb)
        return self.out_conv(x, gain=self.out_gain)


def _instantiate(spec: BlockSpec, emb_channels: int, block_options: dict) -> nn.Module:
    """The module a spec describes: the bare input convolution or a Block."""
    if spec.kind == STEM:
        return MPConv(spec.in_channels, spec.out_channels, kernel=(3, 3))
    return Block(spec.in_channels, spec.out_channels, emb_channels, flavor=spec.kind,
                 resample_mode=spec.resample, attention=spec.attention, **block_options)
