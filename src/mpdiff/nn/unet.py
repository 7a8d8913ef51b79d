"""The U-Net F(x; c_noise, c) of every ablation config A-G (paper Figs. 16-22; SPEC §3, §4).

:class:`Block` is the one residual block kind (encoder or decoder flavor); :class:`UNet` builds the
block list that :func:`mpdiff.nn.layout.unet_layout` describes and runs it, joining each long skip
listed in ``UNet.skips``. Both read the flags of their config (:mod:`mpdiff.nn.ladder`); config G,
the default, is the EDM2 network, and its module names equal those of NVIDIA's released networks, so
their weights load directly (:func:`mpdiff.nn.compat.load_edm2`).
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mpdiff.nn.ladder import CONFIG_G, LadderFlags, Layers, ladder_flags
from mpdiff.nn.layers import PositionalEmbedding, dot_product_attention
from mpdiff.nn.layout import STEM, BlockSpec, UNetLayout, unet_layout
from mpdiff.nn.primitives import clip_activations, cosine_attention, normalize, resample
from mpdiff.nn.skips import SkipGate, SkipScaling, check_skip_options, skip_coefficients


class Block(nn.Module):
    """Residual block with conditioning and optional self-attention, as a config's flags shape it.

    Config G (SPEC §3.3). Main path: resampling, then in the encoder flavor a 1x1 conv (only if the
    width changes) and a pixel norm (Eq. 30-31). Residual branch: MP-SiLU, 3x3 conv, scale by
    1 + emb_linear(emb), MP-SiLU, dropout, 3x3 conv; joined with mp_sum. The decoder flavor applies
    its 1x1 conv to the main path just before that join. Then optional cosine self-attention, joined
    the same way, and clamping.

    Configs A-E (ADM's pre-activation block, SPEC §4.3): the residual branch opens with group norm
    and SiLU and resamples after them, while the main path resamples on its own; a second group norm
    precedes the conditioning, which also shifts in A and B; an encoder block's 1x1 conv sits on the
    main path as a decoder's does, so the first residual conv changes the width; attention in A and B
    is dot-product attention after a group norm. F removes the group norms and moves resampling and
    the encoder's 1x1 conv to the block entry (SPEC §4.8); G makes the joins magnitude-preserving.

    Args:
        in_channels: input width (for decoder blocks, including the concatenated skip).
        out_channels: output width.
        emb_channels: width of the shared conditioning vector.
        flavor: 'enc' or 'dec', see above.
        resample_mode: 'keep', 'down' or 'up' (2x).
        resample_filter: FIR taps of the resampling filter.
        attention: append self-attention with out_channels // channels_per_head heads.
        channels_per_head: attention head width.
        dropout: dropout probability in the residual branch, training mode only (SPEC §2.14).
        res_balance: mp_sum share t of the residual branch (Eq. 88; G only).
        attn_balance: mp_sum share t of the attention branch (G only).
        clip_act: clamp outputs to +-clip_act (FP16 guard); None disables. Config G only
            (:attr:`~mpdiff.nn.ladder.LadderFlags.clamps_activations`): A-F have no clamp.
        attn_impl: 'matmul' (explicit formula) or 'sdpa' (torch's fused kernel) for cosine attention.
        flags: the ablation config (:data:`mpdiff.nn.ladder.LADDER`); G by default.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[float] = (1, 1),
                 attention: bool = False, channels_per_head: int = 64, dropout: float = 0.0,
                 res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: Optional[float] = 256,
                 attn_impl: str = "matmul", flags: LadderFlags = CONFIG_G):
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
        self.clip_act = clip_act if flags.clamps_activations else None
        self.attn_impl = attn_impl
        self.flags = flags
        layers = Layers(flags)
        self.functions = layers.functions
        self.num_heads = 0
        if attention:
            self.num_heads = out_channels // channels_per_head
        # F, G: an encoder block changes its width with the 1x1 conv at entry (SPEC §4.8 (ii)).
        self.skip_at_entry = flavor == "enc" and flags.enc_1x1_first

        # Creation order is the random-init order and the file order: keep it (G's is NVIDIA's).
        width = out_channels
        branch_in = width if self.skip_at_entry else in_channels
        self.emb_gain = layers.gain()  # G: zero, no conditioning at init (Eq. 104)
        self.norm0 = layers.group_norm(branch_in)
        self.conv_res0 = layers.conv(branch_in, width)
        cond_width = 2 * width if flags.cond_shift else width  # A, B: scale and shift
        self.emb_linear = layers.conv(emb_channels, cond_width, kernel=())
        self.norm1 = layers.group_norm(width)
        self.conv_res1 = layers.conv(width, width, last=True)
        self.conv_skip = None if in_channels == width else layers.conv(in_channels, width, kernel=(1, 1))
        dot_product = bool(self.num_heads) and flags.attention == "dot_product"
        self.attn_norm = layers.group_norm(width) if dot_product else None
        self.attn_qkv = layers.conv(width, 3 * width, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = layers.conv(width, width, kernel=(1, 1), last=True) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.flags.resample_on_main_path:
            x = resample(x, mode=self.resample_mode, filter=self.resample_filter)
        if self.flavor == "enc":
            x = self._encoder_entry(x)
        update = self._residual(x, emb)
        x = self.functions.sum(self._shortcut(x), update, t=self.res_balance)
        if self.num_heads:
            x = self.functions.sum(x, self._attention(x), t=self.attn_balance)
        return clip_activations(x, self.clip_act)

    def _encoder_entry(self, x):
        """F, G: match the width with the 1x1 conv if needed, then pixel norm (Eq. 30-31)."""
        if self.skip_at_entry and self.conv_skip is not None:
            x = self.conv_skip(x)
        if self.flags.norm == "pixelnorm":
            x = normalize(x, dim=1)
        return x

    def _shortcut(self, x):
        """The main path from the residual branch's input to the join: A-E resample here, and every
        1x1 conv that did not run at entry runs here."""
        if not self.flags.resample_on_main_path:
            x = resample(x, mode=self.resample_mode, filter=self.resample_filter)
        if self.conv_skip is not None and not self.skip_at_entry:
            x = self.conv_skip(x)
        return x

    def _residual(self, x, emb):
        """The residual branch. Conditioning multiplies by 1 + scale (SPEC §2.13); A and B also shift."""
        h = self.functions.silu(apply_norm(self.norm0, x))
        if not self.flags.resample_on_main_path:
            h = resample(h, mode=self.resample_mode, filter=self.resample_filter)
        h = apply_norm(self.norm1, self.conv_res0(h))
        cond = apply_layer(self.emb_linear, emb, self.emb_gain)  # [N, C] or [N, 2C]
        if self.flags.cond_shift:
            scale, shift = cond.chunk(2, dim=1)
            h = h * (scale + 1)[:, :, None, None].to(h.dtype) + shift[:, :, None, None].to(h.dtype)
        else:
            h = h * (cond + 1)[:, :, None, None].to(h.dtype)
        h = self.functions.silu(h)
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        return self.conv_res1(h)

    def _attention(self, x):
        """Self-attention over all pixels: cosine (SPEC §2.9), or in A and B dot-product attention
        after a group norm (SPEC §4.3)."""
        if self.flags.attention == "cosine":
            return self.attn_proj(cosine_attention(self.attn_qkv(x), self.num_heads, impl=self.attn_impl))
        return self.attn_proj(dot_product_attention(self.attn_qkv(apply_norm(self.attn_norm, x)), self.num_heads))


class UNet(nn.Module):
    """The raw network F(x, noise_labels, class_labels) of an ablation config (SPEC §3.2-3.5, §4).

    Args:
        img_resolution, img_channels: input size (square; divisible by 2^(levels - 1)).
        label_dim: number of classes; 0 makes the network unconditional.
        model_channels: base width C0.
        channel_mult: width of each level in units of C0, finest level first.
        channel_mult_noise: noise-level features, in units of C0 (None: channel_mult[0]).
        channel_mult_emb: conditioning width, in units of C0 (None: max(channel_mult)).
        num_blocks: encoder blocks per level; the decoder has one more.
        attn_resolutions: resolutions whose blocks end with self-attention.
        label_balance: mp_sum share t of the class embedding (Eq. 88; G only).
        concat_balance: mp_cat share t of the long skips (Eq. 103; G only).
        config: ablation config 'A' .. 'G' (SPEC §4); G is the EDM2 network.
        skip_scaling, kappa, kappa_rule: long-skip scaling (ScaleLong, SPEC §9; :mod:`mpdiff.nn.skips`).
            'none' leaves every config, and NVIDIA's G weights, as they are. In 'ls' mode skips of one
            width share a gate; a gate pools its skip over pixels into one number per channel and
            returns one coefficient per channel (SPEC §9.6). Its two linear layers are ScaleLong's:
            plain, with biases and PyTorch's default init, in every config (the config's own layers
            would leave the narrow bottleneck without biases, where a unit can be dead for every input,
            and a shared MPConv would re-project its weight in place between the uses of one pass).
        **block_options: the remaining :class:`Block` keywords (dropout, res_balance, ...).

    ``layout`` holds the block specs; ``skips`` lists the long skips, outermost first; ``flags``
    the config's :class:`~mpdiff.nn.ladder.LadderFlags`; ``skip_scaling`` the :class:`SkipScaling`
    every skip passes through before it is concatenated.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: Optional[int] = None,
                 channel_mult_emb: Optional[int] = None, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (16, 8), label_balance: float = 0.5,
                 concat_balance: float = 0.5, config: str = "G", skip_scaling: str = "none",
                 kappa: float = 0.5, kappa_rule: str = "skip", **block_options):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.flags = ladder_flags(config)
        layers = Layers(self.flags)
        self.functions = layers.functions
        self.layout: UNetLayout = unet_layout(img_resolution, img_channels, model_channels, channel_mult,
                                              num_blocks, attn_resolutions, ones_channel=self.flags.ones_channel)
        noise_width = model_channels * (channel_mult[0] if channel_mult_noise is None else channel_mult_noise)
        emb_width = model_channels * (max(channel_mult) if channel_mult_emb is None else channel_mult_emb)
        positional = self.flags.noise_embedding == "positional"

        # Creation order is the random-init order and the file order: keep it (G's is NVIDIA's).
        self.out_gain = layers.gain()  # G: zero, F = 0 at init (Eq. 104)
        self.emb_positional = PositionalEmbedding(noise_width) if positional else None
        self.emb_fourier = None if positional else layers.fourier(noise_width)
        self.emb_noise = layers.conv(noise_width, emb_width, kernel=())
        two_layers = self.flags.emb_mlp_layers == 2  # A-E (SPEC §4.3); F removed the second
        self.emb_layer2 = layers.conv(emb_width, emb_width, kernel=()) if two_layers else None
        self.emb_label = layers.class_embedding(label_dim, emb_width) if label_dim else None
        self.enc = nn.ModuleDict()
        for spec in self.layout.encoder:
            self.enc[spec.name] = _instantiate(spec, emb_width, self.flags, block_options)
        self.dec = nn.ModuleDict()
        for spec in self.layout.decoder:
            self.dec[spec.name] = _instantiate(spec, emb_width, self.flags, block_options)
        self.out_norm = layers.group_norm(self.layout.out_channels)
        self.out_conv = layers.conv(self.layout.out_channels, img_channels, last=True)
        self.skip_scaling = self._skip_scaling(skip_scaling, kappa, kappa_rule)
        self._skip_index = {skip.target: skip.index for skip in self.skips}

    def _skip_scaling(self, mode, kappa, rule):
        """The SkipScaling of this U-Net (created last: its gates draw no weights before the others)."""
        skips = self.skips
        check_skip_options(mode, kappa, rule, len(skips), self.flags.mp_fixed_function,
                           f"U-Net (config {self.flags.name})")
        coefficients = skip_coefficients(len(skips), kappa, rule, [s.level for s in skips])
        shared = mode == "ls"
        keys = [f"width{s.channels}" if shared else f"skip{s.index}" for s in skips]

        def make_gate(index):
            return SkipGate(skips[index].channels, squeeze_dims=(2, 3), make_layer=nn.Linear)
        return SkipScaling(mode, coefficients, keys, make_gate)

    @property
    def skips(self):
        """The long skips (:class:`~mpdiff.nn.layout.LongSkip`), outermost first."""
        return self.layout.skips

    def embed(self, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The conditioning vector shared by all blocks (SPEC §3.2; A-E's two-layer MLP, §4.3)."""
        if self.emb_positional is not None:
            features = self.emb_positional(noise_labels)
        else:
            features = self.emb_fourier(noise_labels)
        emb = self.emb_noise(features)
        if self.emb_layer2 is not None:
            emb = self.emb_layer2(self.functions.silu(emb))
        if self.emb_label is not None:
            if not self.flags.class_vectors:
                class_labels = class_labels * math.sqrt(class_labels.shape[1])  # unit-RMS input (SPEC §2.12)
            emb = self.functions.sum(emb, self.emb_label(class_labels), t=self.label_balance)
        return self.functions.silu(emb)

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the first convolution reads: `x`, and in configs C-G a constant channel of ones (SPEC §2.15)."""
        if not self.flags.ones_channel:
            return x
        return torch.cat([x, x.new_ones([x.shape[0], 1, *x.shape[2:]])], dim=1)

    def join_skip(self, x: torch.Tensor, skip: torch.Tensor, index: int) -> torch.Tensor:
        """Scale long skip `index` (SPEC §9) and concatenate it to the decoder's main path (Eq. 103 in G)."""
        skip = self.skip_scaling(skip, index)
        return self.functions.cat(x, skip, t=self.skip_scaling.balance(index, self.concat_balance))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        emb = self.embed(noise_labels, class_labels)
        x = self.network_input(x)
        waiting = {}  # encoder outputs until their decoder block takes them
        for spec in self.layout.encoder:
            module = self.enc[spec.name]
            x = module(x) if spec.kind == STEM else module(x, emb)
            waiting[spec.name] = x
        for spec in self.layout.decoder:
            if spec.skip_from is not None:
                x = self.join_skip(x, waiting.pop(spec.skip_from), self._skip_index[spec.name])
            x = self.dec[spec.name](x, emb)
        x = apply_norm(self.out_norm, x)
        if self.flags.out_silu:
            x = self.functions.silu(x)
        return apply_layer(self.out_conv, x, self.out_gain).contiguous()


def _instantiate(spec: BlockSpec, emb_channels: int, flags: LadderFlags, block_options: dict) -> nn.Module:
    """The module a spec describes: the bare input convolution or a Block."""
    if spec.kind == STEM:
        return Layers(flags).conv(spec.in_channels, spec.out_channels)
    return Block(spec.in_channels, spec.out_channels, emb_channels, flavor=spec.kind,
                 resample_mode=spec.resample, attention=spec.attention, flags=flags, **block_options)


def apply_norm(norm: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """norm(x), or x itself in configs without that normalisation."""
    return x if norm is None else norm(x)


def apply_layer(layer: nn.Module, x: torch.Tensor, gain: Optional[torch.Tensor]) -> torch.Tensor:
    """layer(x), with its learned gain where the config has one (Eq. 104; G only)."""
    return layer(x) if gain is None else layer(x, gain=gain)
