"""The config-G EDM2 U-Net and its EDM preconditioning (paper Fig. 21, Sec. 2-3; SPEC §1.1, §3).

Module and parameter names follow NVIDIA's released networks, so their state_dicts load
directly (see :func:`mpdiff.compat.load_edm2`).
"""

import math

import torch
import torch.nn.functional as F

from .primitives import (
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


class Block(torch.nn.Module):
    """Encoder or decoder block with optional cosine self-attention (Fig. 21; SPEC §3.3)."""

    def __init__(self,
        in_channels,                    # Input channels.
        out_channels,                   # Output channels.
        emb_channels,                   # Embedding (conditioning) channels.
        flavor              = "enc",    # 'enc' (pixel norm, 1x1 conv first) or 'dec' (1x1 conv last).
        resample_mode       = "keep",   # 'keep', 'up' or 'down', applied to the main path first.
        resample_filter     = (1, 1),   # Resampling filter taps.
        attention           = False,    # Self-attention after the residual join?
        channels_per_head   = 64,       # Channels per attention head.
        dropout             = 0.0,      # Dropout probability inside the residual branch.
        res_balance         = 0.3,      # mp_sum share of the residual branch (Eq. 88).
        attn_balance        = 0.3,      # mp_sum share of the attention branch.
        clip_act            = 256,      # Clamp outputs to +-clip_act; None disables.
        attn_impl           = "matmul", # 'matmul' (reference formula) or 'sdpa' (fused kernel).
    ):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', not {flavor!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.resample_filter = tuple(resample_filter)
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.attn_impl = attn_impl
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))  # Eq. 104: conditioning off at init
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x, emb):
        # Main path: resample, then (encoder) 1x1 conv and pixel norm.
        x = resample(x, mode=self.resample_mode, filter=self.resample_filter)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)

        # Residual branch with multiplicative conditioning (no additive shift).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            y = cosine_attention(self.attn_qkv(x), self.num_heads, impl=self.attn_impl)
            x = mp_sum(x, self.attn_proj(y), t=self.attn_balance)

        return clip_activations(x, self.clip_act)


class UNet(torch.nn.Module):
    """The raw network F of config G (SPEC §3.4-3.5). Every encoder output is a long skip."""

    def __init__(self,
        img_resolution,                     # Image resolution (square, divisible by 2^(levels-1)).
        img_channels,                       # Image channels.
        label_dim,                          # Class-label dimension; 0 = unconditional.
        model_channels      = 192,          # Base width C0.
        channel_mult        = (1, 2, 3, 4), # Width multiplier per resolution level.
        channel_mult_noise  = None,         # Noise Fourier features = C0 * this; None = channel_mult[0].
        channel_mult_emb    = None,         # Embedding width = C0 * this; None = max(channel_mult).
        num_blocks          = 3,            # Encoder blocks per level (decoder: num_blocks + 1).
        attn_resolutions    = (16, 8),      # Resolutions with self-attention.
        label_balance       = 0.5,          # mp_sum share of the class embedding.
        concat_balance      = 0.5,          # mp_cat share of the skip connection.
        **block_kwargs,                     # Passed to Block (dropout, res_balance, clip_act, ...).
    ):
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))  # Eq. 104: F = 0 at init

        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, kernel=[])
        self.emb_label = MPConv(label_dim, emb_channels, kernel=[]) if label_dim else None

        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1  # + constant-one channel (SPEC §2.15)
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, width, kernel=[3, 3])
                cout = width
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, emb_channels, flavor="enc",
                                                      resample_mode="down", **block_kwargs)
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = Block(cout, width, emb_channels, flavor="enc",
                                                            attention=res in attn_resolutions, **block_kwargs)
                cout = width

        self.dec = torch.nn.ModuleDict()
        skip_widths = [_out_channels(m) for m in self.enc.values()]
        for level, width in reversed(list(enumerate(widths))):
            res = img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, emb_channels, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, emb_channels, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, emb_channels, flavor="dec",
                                                    resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skip_widths.pop()
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, width, emb_channels, flavor="dec",
                                                            attention=res in attn_resolutions, **block_kwargs)
                cout = width
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def embed(self, noise_labels, class_labels):
        """Shared conditioning vector (SPEC §3.2), computed in float32."""
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            onehot_scaled = class_labels * math.sqrt(class_labels.shape[1])  # unit-magnitude input
            emb = mp_sum(emb, self.emb_label(onehot_scaled), t=self.label_balance)
        return mp_silu(emb)

    def forward(self, x, noise_labels, class_labels):
        emb = self.embed(noise_labels, class_labels)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, module in self.enc.items():
            x = module(x) if name.endswith("_conv") else module(x, emb)
            skips.append(x)
        for name, module in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = module(x, emb)
        return self.out_conv(x, gain=self.out_gain)


def _out_channels(module):
    return module.out_channels


class Precond(torch.nn.Module):
    """EDM preconditioning D(x; sigma, c) around the U-Net, plus the log-variance head u(sigma).

    D = c_skip * x + c_out * F(c_in * x; c_noise, c)   (Eq. 4-8)
    """

    def __init__(self,
        img_resolution,             # Image resolution.
        img_channels,               # Image channels.
        label_dim       = 0,        # Class-label dimension; 0 = unconditional.
        use_fp16        = True,     # Run the U-Net in FP16 on CUDA.
        sigma_data      = 0.5,      # Expected standard deviation of the data.
        logvar_channels = 128,      # Fourier features of the uncertainty head u(sigma).
        **unet_kwargs,              # Passed to UNet.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        fp16 = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if fp16 else torch.float32

        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar  # u(sigma), Eq. 21
        return D_x
