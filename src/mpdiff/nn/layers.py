"""The layers that configs A-F use and config G replaced (SPEC §4.3-4.8).

ADM's building blocks as EDM re-implemented them (config A): plain convolutions with biases and
He-uniform initialisation, group norm, the sinusoidal positional embedding, dot-product attention
with float32 logits, and the plain joins (SiLU, +, concatenation) that G's magnitude-preserving
functions replace. Config C's simplified group norm (Eq. 29) is here too. Which config uses what
is decided in :mod:`mpdiff.nn.ladder`.
"""

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# EDM's GroupNorm: 32 groups, but at least 4 channels per group (SPEC §4.3).
GROUPS = 32
MIN_CHANNELS_PER_GROUP = 4


def group_count(channels: int) -> int:
    """Number of groups a group norm over `channels` channels uses."""
    return max(1, min(GROUPS, channels // MIN_CHANNELS_PER_GROUP))


class Conv(nn.Module):
    """Convolution or linear layer without weight normalisation (configs A-C).

    Args:
        in_channels: input channels (features, for a linear layer).
        out_channels: output channels.
        kernel: kernel size, e.g. (3, 3); an empty kernel () makes a fully-connected layer.
        bias: add a learned per-channel bias (A, B).
        init: 'he_uniform' draws weight and bias from U(+-1/sqrt(fan_in)) (EDM's kaiming_uniform
            scaled by sqrt(1/3)); 'zero' zeroes both (A and B's last layer of each residual branch,
            attention and the network); 'unit_gauss' draws the weight from N(0, 1) and zeroes the
            bias (A and B's class vectors).

    Convolutions use stride 1 and "same" padding. Weight and bias are cast to the input's dtype.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], bias: bool = True,
                 init: str = "he_uniform"):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.init = init
        fan_in = in_channels * math.prod(kernel)
        shape = [out_channels, in_channels, *kernel]
        if init == "he_uniform":
            bound = 1 / math.sqrt(fan_in)
            weight = (torch.rand(shape) * 2 - 1) * bound
            offset = (torch.rand(out_channels) * 2 - 1) * bound
        elif init in ("zero", "unit_gauss"):
            weight = torch.randn(shape) if init == "unit_gauss" else torch.zeros(shape)
            offset = torch.zeros(out_channels)
        else:
            raise ValueError(f"unknown init {init!r}; expected 'he_uniform', 'zero' or 'unit_gauss'")
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(offset) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if w.ndim == 2:  # fully connected
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, padding=w.shape[-1] // 2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel={list(self.weight.shape[2:])}, "
                f"bias={self.bias is not None}, init={self.init}")


class GroupNorm(nn.Module):
    """ADM's group norm: standardise each group (mean 0, variance 1), then a learned per-channel
    scale and bias (configs A, B; eps 1e-5 as in EDM's code, SPEC §4.3)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups = group_count(channels)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, groups={self.num_groups}, eps={self.eps}"


class RMSGroupNorm(nn.Module):
    """Config C's group norm: a / sqrt(mean(a^2) + eps) per sample and group, with no mean
    subtraction and nothing learned (Eq. 29; configs C-E).

    The group count follows A's rule; SPEC §4.5 marks it (unconfirmed) and assumes it unchanged.
    """

    def __init__(self, channels: int, eps: float = 1e-4):
        super().__init__()
        self.num_groups = group_count(channels)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.reshape(x.shape[0], self.num_groups, -1)
        mean_square = grouped.to(torch.float32).square().mean(dim=2, keepdim=True)
        normalized = grouped / (mean_square + self.eps).sqrt().to(x.dtype)
        return normalized.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, eps={self.eps}"


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (ADM, configs A and B; SPEC §4.3).

    Output [cos(a f_j), sin(a f_j)] for j = 0 .. N/2 - 1 with f_j = (1 / max_period)^(j / (N/2)):
    N = `num_channels` features with fixed, geometrically spaced frequencies; nothing is stored.
    """

    def __init__(self, num_channels: int, max_period: float = 10000):
        super().__init__()
        self.num_channels = num_channels
        self.max_period = max_period

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=a.device) / half
        angle = torch.outer(a.to(torch.float32), (1 / self.max_period) ** exponents)
        return torch.cat([angle.cos(), angle.sin()], dim=1).to(a.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, max_period={self.max_period}"


def dot_product_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product self-attention over pixels (ADM, configs A and B; SPEC §4.3).

    Fused [N, 3C, H, W] in, [N, C, H, W] out, channels ordered (head, channel, {q, k, v}) as in
    :func:`~mpdiff.nn.primitives.cosine_attention`. The logits q.k / sqrt(C_head) and the softmax
    are computed in float32 whatever the input dtype ("partial" FP16, SPEC §1.5): unlike cosine
    attention, nothing bounds them.
    """
    batch, fused, height, width = qkv.shape
    channels = fused // 3
    per_head = qkv.reshape(batch, num_heads, channels // num_heads, 3, height * width)
    query, key, value = per_head.unbind(3)  # each [N, heads, C_head, HW]
    scaled_key = key.to(torch.float32) / math.sqrt(key.shape[2])
    logits = query.to(torch.float32).transpose(2, 3) @ scaled_key  # [N, heads, HW_q, HW_k]
    weights = logits.softmax(dim=3).to(value.dtype)
    mixed = value @ weights.transpose(2, 3)  # [N, heads, C_head, HW_q]
    return mixed.reshape(batch, channels, height, width)


def plain_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """a + b: the residual and embedding join of configs A-F, which mp_sum replaced (`t` unused)."""
    return a + b


def plain_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation: the long-skip join of configs A-F, which mp_cat replaced (`t` unused)."""
    return torch.cat([a, b], dim=dim)
