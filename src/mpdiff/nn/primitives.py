"""Magnitude-preserving (MP) layers and functions of config G (SPEC §2).

The design rule behind every object here: if its inputs are standardized (unit RMS, elements
uncorrelated), so is its output. Two serve earlier ablation configs too (SPEC §4): the plain
:class:`FourierFeatures` (C-F) that :class:`MPFourier` rescales, and :class:`MPConv` without its
forced step (D). Equation numbers refer to Karras et al., "Analyzing and Improving
the Training Dynamics of Diffusion Models" (arXiv 2312.02696 v2).
"""

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

# RMS of silu(z) for z ~ N(0, 1): the paper rounds sqrt(0.3558) = 0.59647 to 0.596 (Eq. 81).
SILU_RMS = 0.596

# Guards every division by a norm; added to the RMS, not to the L2 norm (SPEC §2.1).
NORM_EPS = 1e-4


def normalize(x: torch.Tensor, dim=None, eps: float = NORM_EPS) -> torch.Tensor:
    """Rescale each slice of `x` to unit RMS: x / (eps + ||x|| / sqrt(K)) (Eq. 47, as in code).

    A slice is what `dim` reduces over; K is its number of elements. `dim=None` means every axis
    but the first, i.e. one slice per weight row or per sample; `dim=1` is the pixel norm (Eq. 30).
    The norm is accumulated in float32 whatever the input dtype.
    """
    dims = list(range(1, x.ndim)) if dim is None else dim
    length = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    inv_sqrt_k = math.sqrt(length.numel() / x.numel())  # one norm per slice of K elements
    rms_plus_eps = torch.add(eps, length, alpha=inv_sqrt_k)
    return x / rms_plus_eps.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled back to unit RMS for standard-normal input (Eq. 81)."""
    return F.silu(x) / SILU_RMS


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Blend (1 - t) a + t b, divided by the length of the blend weights (Eq. 88).

    `t` is the share of `b`: 0.3 for residual and attention branches, 0.5 for the class embedding.
    """
    blend = a.lerp(b, t)
    return blend / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat_weights(num_a: int, num_b: int, t: float = 0.5):
    """The two factors :func:`mp_cat` applies to inputs of `num_a` and `num_b` channels (Eq. 103)."""
    overall = math.sqrt((num_a + num_b) / ((1 - t) ** 2 + t ** 2))
    return overall * (1 - t) / math.sqrt(num_a), overall * t / math.sqrt(num_b)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenate along `dim` so that `a` and `b` weigh (1 - t) : t whatever their widths (Eq. 103).

    In the U-Net `a` is the decoder's main path and `b` the long skip.
    """
    scale_a, scale_b = mp_cat_weights(a.shape[dim], b.shape[dim], t)
    return torch.cat((scale_a * a, scale_b * b), dim=dim)


def clip_activations(x: torch.Tensor, limit: Optional[float] = 256) -> torch.Tensor:
    """Clamp `x` to [-limit, limit] (an FP16 overflow guard); `limit=None` returns `x` itself."""
    return x if limit is None else x.clamp(-limit, limit)


def resample(x: torch.Tensor, mode: str = "keep", filter: Sequence[float] = (1, 1)) -> torch.Tensor:
    """Depthwise 2x resampling with a separable FIR filter (SPEC §2.7).

    'down' convolves with stride 2 and 'up' transposes that (taps x4 so a constant stays constant);
    'keep' returns `x` itself. With the default [1, 1] taps these are 2x2 average pooling and
    nearest-neighbour up-sampling (the fast network computes them so: :mod:`mpdiff.nn.fast`).
    """
    if mode == "keep":
        return x
    if mode not in ("down", "up"):
        raise ValueError(f"unknown resample mode {mode!r}; expected 'keep', 'down' or 'up'")
    taps = torch.as_tensor(filter, dtype=torch.float32)
    if taps.ndim != 1 or taps.numel() % 2:
        raise ValueError("resample filter must be 1-D with an even number of taps")
    taps = taps / taps.sum()
    kernel_2d = torch.outer(taps, taps).to(dtype=x.dtype, device=x.device)
    groups = x.shape[1]
    padding = (taps.numel() - 1) // 2
    if mode == "down":
        return F.conv2d(x, kernel_2d.expand(groups, 1, *kernel_2d.shape),
                        groups=groups, stride=2, padding=padding)
    upsample_kernel = kernel_2d * 4  # each input pixel feeds 4 outputs
    return F.conv_transpose2d(x, upsample_kernel.expand(groups, 1, *kernel_2d.shape),
                              groups=groups, stride=2, padding=padding)


class FourierFeatures(nn.Module):
    """Fixed random Fourier features of a scalar per sample: cos(f a + phi) (config C; SPEC §4.5).

    `num_channels` features with frequencies f ~ 2 pi bandwidth N(0, 1) and phases phi ~ 2 pi U(0, 1),
    drawn once (randn, then rand) and kept as buffers: they are saved with the network and must be
    copied into EMA copies. Their RMS is 1/sqrt(2); :class:`MPFourier` restores 1.
    """

    amplitude = 1.0

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        freqs = torch.randn(num_channels)
        self.register_buffer("freqs", 2 * math.pi * freqs * bandwidth)
        phases = torch.rand(num_channels)
        self.register_buffer("phases", 2 * math.pi * phases)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        angle = torch.outer(a.to(torch.float32), self.freqs.to(torch.float32))
        angle = angle + self.phases.to(torch.float32)
        return (angle.cos() * self.amplitude).to(a.dtype)


class MPFourier(FourierFeatures):
    """Magnitude-preserving Fourier features sqrt(2) cos(f a + phi) (Eq. 75; config G).

    sqrt(2) restores unit RMS, since E[cos^2] = 1/2 for a uniformly random phase.
    """

    amplitude = math.sqrt(2)


class MPConv(nn.Module):
    """Bias-free 2-D convolution, or linear layer, with forced weight normalization (SPEC §2.2).

    Args:
        in_channels: input channels (features, for a linear layer).
        out_channels: output channels.
        kernel: kernel size, e.g. (3, 3); an empty kernel () makes a fully-connected layer.
        forced: re-project the stored weight in training mode (forced WN, configs E-G); False leaves
            only the weight normalization on use (config D, SPEC §4.6).

    The weight W is drawn from N(0, 1). With `forced`, a training-mode call first re-projects every row
    of W in place to norm sqrt(fan_in) (Eq. 66; no autograd). It then always uses
    normalize(W) * gain / sqrt(fan_in), computed with autograd (Eq. 46-47): that standard WN projects
    the gradient onto the tangent plane of the sphere (Eq. 59), and the scaling gives unit-RMS
    outputs for unit-RMS inputs. `gain` is 1 or a learned scalar (Eq. 104).

    The forced step uses the same eps as :func:`normalize`, as NVIDIA's code does: a row of RMS r
    lands at norm sqrt(fan_in) r / (r + 1e-4). An exact rescale would move the Adam trajectory by
    ~1e-4 relative (docs/NUMERICS.md), so the reference behaviour stays.

    Eval mode never writes W (EMA weights are re-normalized on use). Every call computes the effective
    weight afresh; the fast network's layers reuse it while sampling (:mod:`mpdiff.nn.fast`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], forced: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.forced = forced
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    @property
    def fan_in(self) -> int:
        return self.weight[0].numel()

    def effective_weight(self, gain: Union[float, torch.Tensor] = 1, dtype=torch.float32) -> torch.Tensor:
        """normalize(W) * gain / sqrt(fan_in) as `dtype`; differentiable in W and `gain`."""
        unit_rows = normalize(self.weight.to(torch.float32))  # standard WN (Eq. 47)
        scaled = unit_rows * (gain / math.sqrt(self.fan_in))  # MP scaling (Eq. 46)
        return scaled.to(dtype)

    @torch.no_grad()
    def force_weight_norm(self):
        """Project every row of the stored weight back to norm ~sqrt(fan_in), in place (Eq. 66)."""
        self.weight.copy_(normalize(self.weight.to(torch.float32)))

    def forward(self, x: torch.Tensor, gain: Union[float, torch.Tensor] = 1) -> torch.Tensor:
        if self.training and self.forced:
            self.force_weight_norm()
        return self.apply_weight(x, self.effective_weight(gain, x.dtype))

    @staticmethod
    def apply_weight(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x times the effective weight `w`: a matrix product, or a stride-1 convolution with "same" padding."""
        if w.ndim == 2:  # fully connected
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    def extra_repr(self) -> str:
        forced = "" if self.forced else ", forced=False"
        return f"{self.in_channels}, {self.out_channels}, kernel={list(self.weight.shape[2:])}{forced}"


def cosine_attention(qkv: torch.Tensor, num_heads: int, impl: str = "matmul") -> torch.Tensor:
    """Multi-head cosine self-attention over pixels: fused [N, 3C, H, W] in, [N, C, H, W] out (SPEC §2.9).

    The channels of `qkv` are ordered (head, channel, {q, k, v}) as in the released networks. q, k
    and v get unit RMS per head and pixel (Eq. 30-34), so every logit is sqrt(C_head) times a cosine
    and cannot grow with the weights. `impl='sdpa'` computes the same formula with torch's fused
    scaled_dot_product_attention instead of two explicit matrix products.
    """
    if impl not in ("matmul", "sdpa"):
        raise ValueError(f"unknown attention kernel {impl!r}; expected 'matmul' or 'sdpa'")
    batch, fused, height, width = qkv.shape
    channels = fused // 3
    per_head = qkv.reshape(batch, num_heads, channels // num_heads, 3, height * width)
    query, key, value = normalize(per_head, dim=2).unbind(3)  # each [N, heads, C_head, HW]
    if impl == "sdpa":
        # SDPA wants [..., tokens, features]; transpose in and back out.
        mixed = F.scaled_dot_product_attention(query.transpose(2, 3), key.transpose(2, 3),
                                               value.transpose(2, 3)).transpose(2, 3)
    else:
        scores = query.transpose(2, 3) @ (key / math.sqrt(query.shape[2]))  # [N, heads, HW_q, HW_k]
        mixed = value @ scores.softmax(dim=3).transpose(2, 3)  # [N, heads, C_head, HW_q]
    return mixed.reshape(batch, channels, height, width)
