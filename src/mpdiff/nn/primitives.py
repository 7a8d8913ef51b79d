"""Magnitude-preserving (MP) layers and functions of config G (SPEC §2).

The design rule behind every object here: if its inputs are standardized (unit RMS, elements
uncorrelated), so is its output. Two serve earlier ablation configs too (SPEC §4): the plain
:class:`FourierFeatures` (C-F) that :class:`MPFourier` rescales, and :class:`MPConv` without its
forced step (D). Equation numbers refer to Karras et al., "Analyzing and Improving
the Training Dynamics of Diffusion Models" (arXiv 2312.02696 v2).
"""

import contextlib
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

# RMS of silu(z) for z ~ N(0, 1): the paper rounds sqrt(0.3558) = 0.59647 to 0.596 (Eq. 81).
SILU_RMS = 0.596

# Guards every division by a norm; added to the RMS, not to the L2 norm (SPEC §2.1).
NORM_EPS = 1e-4


_LITERAL = [False]  # set inside literal_formulas()
_FORCED_BEFORE_THE_CALL = [False]  # set inside forced_before_the_call()


@contextlib.contextmanager
def literal_formulas():
    """Inside the block, compute every formula as written, with the ops NVIDIA's network uses: torch's
    vector norm for activation norms, the depthwise convolution for [1, 1] resampling, and config G's
    constants applied where they stand rather than folded into conv gains. The function is the same
    (to float32 rounding) either way. Flop counting uses it, so that counts stay those of the reference
    tool and the paper; tests use it as the reference path."""
    previous = _LITERAL[0]
    _LITERAL[0] = True
    try:
        yield
    finally:
        _LITERAL[0] = previous


@contextlib.contextmanager
def forced_before_the_call():
    """Inside the block, a compiled training graph leaves out MPConv's forced weight normalisation: the
    caller has already re-projected every forced weight, eagerly (:func:`forced_layers`). Inductor
    computes wrong gradients for a training graph that writes a parameter in place (measured with torch
    2.13 on the CPU: gradients off by up to 3x on the first step and by a few percent after it, while the
    same graph without the write, or run by aot_eager, agrees with float64 to 1e-5); mpdiff.nn.runtime's
    compiled training uses this. Eager calls and eval mode are unaffected."""
    previous = _FORCED_BEFORE_THE_CALL[0]
    _FORCED_BEFORE_THE_CALL[0] = True
    try:
        yield
    finally:
        _FORCED_BEFORE_THE_CALL[0] = previous


def forced_layers(net: nn.Module) -> list:
    """The MPConv layers of `net` with forced weight normalisation, whose stored weight training mode
    re-projects (Eq. 66): what a caller of :func:`forced_before_the_call` re-projects itself."""
    return [m for m in net.modules() if isinstance(m, MPConv) and m.forced]


def computing_literally() -> bool:
    """Whether :func:`literal_formulas` is in force."""
    return _LITERAL[0]


def normalize(x: torch.Tensor, dim=None, eps: float = NORM_EPS) -> torch.Tensor:
    """Rescale each slice of `x` to unit RMS: x / (eps + ||x|| / sqrt(K)) (Eq. 47, as in code).

    A slice is what `dim` reduces over; K is its number of elements. `dim=None` means every axis
    but the first, i.e. one slice per weight row or per sample; `dim=1` is the pixel norm (Eq. 30).
    The norm is accumulated in float32 whatever the input dtype.
    """
    if dim is None:  # weight rows: the reduced axes are the innermost, where torch's norm is fast
        length = torch.linalg.vector_norm(x, dim=list(range(1, x.ndim)), keepdim=True, dtype=torch.float32)
    else:
        length = norm_across(x, dim)
    inv_sqrt_k = math.sqrt(length.numel() / x.numel())  # one norm per slice of K elements
    rms_plus_eps = torch.add(eps, length, alpha=inv_sqrt_k)
    return x / rms_plus_eps.to(x.dtype)


def norm_across(x: torch.Tensor, dim) -> torch.Tensor:
    """The float32 L2 norm of `x` over the axis `dim` (kept), for activations.

    Where that axis is the innermost in memory (channels on channels-last activations, the channels of a
    head in attention), torch.linalg.vector_norm reads `x` once. Across any other axis it is 5-25x slower
    than the square root of a float32 sum of squares (measured on a 2-core CPU, bf16 and float32:
    docs/PERFORMANCE.md), which is used there. Both accumulate in float32 and differ by float32 rounding
    (under 4e-7 relative). The sums are raised to at least 1e-30, so an all-zero slice gets the zero
    gradient vector_norm gives it rather than 0 * inf; the value, always added to eps, is unchanged.
    """
    if _LITERAL[0] or x.stride(dim) == 1:
        return torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    squares = x.to(torch.float32).square()
    return squares.sum(dim=dim, keepdim=True).clamp_min(1e-30).sqrt()


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled back to unit RMS for standard-normal input (Eq. 81)."""
    return F.silu(x) / SILU_RMS


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Blend (1 - t) a + t b, divided by the length of the blend weights (Eq. 88).

    `t` is the share of `b`: 0.3 for residual and attention branches, 0.5 for the class embedding.
    """
    blend = a.lerp(b, t)
    return blend / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_sum_factors(t: float = 0.5):
    """The factors (of a, of b) that :func:`mp_sum` applies: ((1 - t), t) / sqrt((1 - t)^2 + t^2)."""
    length = math.sqrt((1 - t) ** 2 + t ** 2)
    return (1 - t) / length, t / length


def mp_cat_weights(num_a: int, num_b: int, t: float = 0.5):
    """The two factors :func:`mp_cat` applies to inputs of `num_a` and `num_b` channels (Eq. 103)."""
    overall = math.sqrt((num_a + num_b) / ((1 - t) ** 2 + t ** 2))
    return overall * (1 - t) / math.sqrt(num_a), overall * t / math.sqrt(num_b)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenate along `dim` so that `a` and `b` weigh (1 - t) : t whatever their widths (Eq. 103).

    In the U-Net `a` is the decoder's main path and `b` the long skip.
    """
    scale_a, scale_b = mp_cat_weights(a.shape[dim], b.shape[dim], t)
    if torch.is_grad_enabled() or _LITERAL[0] or a.dtype != b.dtype or dim != 1 or torch.compiler.is_compiling():
        return torch.cat((scale_a * a, scale_b * b), dim=dim)
    # Without autograd, each part is scaled straight into its slice of the result: one pass, not two.
    # (Not when compiling: writing into a slice is a graph break there, and the compiler fuses anyway.)
    joined = torch.empty([a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:]], dtype=a.dtype, device=a.device,
                         memory_format=_layout_of(a))
    torch.mul(a, scale_a, out=joined[:, :a.shape[1]])
    torch.mul(b, scale_b, out=joined[:, a.shape[1]:])
    return joined


def clip_activations(x: torch.Tensor, limit: Optional[float] = 256) -> torch.Tensor:
    """Clamp `x` in place to [-limit, limit] (an FP16 overflow guard); `limit=None` is a no-op."""
    if limit is not None:
        x.clamp_(-limit, limit)
    return x


def resample(x: torch.Tensor, mode: str = "keep", filter: Sequence[float] = (1, 1)) -> torch.Tensor:
    """Depthwise 2x resampling with a separable FIR filter (SPEC §2.7).

    'down' convolves with stride 2 and 'up' transposes that (taps x4 so a constant stays constant);
    'keep' returns `x` itself. The default [1, 1] taps make these exactly 2x2 average pooling and
    nearest-neighbour up-sampling, and that is how they run: torch's depthwise (transposed) convolution
    took 6-18 ms where these take under 1 ms (docs/PERFORMANCE.md). Up-sampling is bit-identical to
    the convolution; down-sampling sums the same four values in another order (float32 rounding).
    """
    if mode == "keep":
        return x
    if mode not in ("down", "up"):
        raise ValueError(f"unknown resample mode {mode!r}; expected 'keep', 'down' or 'up'")
    if tuple(filter) == (1, 1) and not _LITERAL[0]:  # the box filter: 2x2 averaging and pixel repetition, without the convolution
        return F.avg_pool2d(x, 2) if mode == "down" else F.interpolate(x, scale_factor=2.0, mode="nearest")
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
    weight afresh, except inside :func:`mpdiff.nn.runtime.frozen_weights` (sampling), a scope in which
    the weights do not change: there each (gain, dtype) is computed once.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], forced: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.forced = forced
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self._fixed = None  # {(gain, dtype): effective weight} inside frozen_weights(), else None

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

    def _fixed_weight(self, gain, dtype):
        """The effective weight inside frozen_weights(): computed once per gain (a float, or a learned
        gain tensor, fixed too) and dtype, without autograd."""
        key = (id(gain) if torch.is_tensor(gain) else float(gain), dtype)
        if key not in self._fixed:
            with torch.no_grad():
                self._fixed[key] = self.effective_weight(gain, dtype)
        return self._fixed[key]

    def forward(self, x: torch.Tensor, gain: Union[float, torch.Tensor] = 1) -> torch.Tensor:
        if self.training and self.forced and not (_FORCED_BEFORE_THE_CALL[0] and torch.compiler.is_compiling()):
            self.force_weight_norm()
        if self._fixed is None or self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            # Uncached: outside frozen_weights; with autograd (a cached weight carries no gradient path);
            # compiled (the normalisation is part of the graph).
            w = self.effective_weight(gain, x.dtype)
        else:
            w = self._fixed_weight(gain, x.dtype)
        if w.ndim == 2:  # fully connected
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)  # "same" padding, stride 1

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
    batch, fused, height, width = qkv.shape
    channels = fused // 3
    if impl == "matmul" and not _LITERAL[0] and _pixel_major(qkv):
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():  # sampling: see the op's docstring
            return torch.ops.mpdiff.cosine_attention_pixel_major(qkv, num_heads)
        return _cosine_attention_pixel_major(qkv, num_heads)
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


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _pixel_major(x) else torch.contiguous_format


def _pixel_major(x: torch.Tensor) -> bool:
    """Whether `x` [N, C, H, W] is stored channels-last (pixel by pixel) rather than channel by channel."""
    return x.ndim == 4 and x.shape[2] * x.shape[3] > 1 and not x.is_contiguous() and \
        x.is_contiguous(memory_format=torch.channels_last)


def _cosine_attention_pixel_major(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """:func:`cosine_attention` for channels-last input, returning channels-last output; the same
    formula with fewer passes over memory. q, k and v are gathered once into the [head, pixel, channel]
    order the matrix products read, their norms then run over the innermost axis (one pass of torch's
    vector norm; see norm_across), and the logits' 1 / sqrt(C_head) rides on k's divisor instead of
    costing a pass of its own."""
    batch, fused, height, width = qkv.shape
    channels, pixels = fused // 3, height * width
    per_head = channels // num_heads
    by_pixel = qkv.permute(0, 2, 3, 1).reshape(batch, pixels, num_heads, per_head, 3)  # a view
    split = by_pixel.permute(4, 0, 2, 1, 3).contiguous()  # [q/k/v, N, heads, pixels, C_head]
    rms_plus_eps = torch.add(NORM_EPS, norm_across(split, 4), alpha=1 / math.sqrt(per_head))
    rms_plus_eps[1].mul_(math.sqrt(per_head))  # k's divisor carries the logits' 1 / sqrt(C_head)
    divisor = rms_plus_eps.to(split.dtype)
    unit = split.div_(divisor) if not torch.is_grad_enabled() else split / divisor
    query, key, value = unit.reshape(3, batch * num_heads, pixels, per_head).unbind(0)
    weights = torch.bmm(query, key.transpose(1, 2)).softmax(dim=2)  # [N heads, pixels_q, pixels_k]
    mixed = torch.bmm(weights, value).reshape(batch, num_heads, height, width, per_head)
    return mixed.permute(0, 2, 3, 1, 4).reshape(batch, height, width, channels).permute(0, 3, 1, 2)


@torch.library.custom_op("mpdiff::cosine_attention_pixel_major", mutates_args=())
def _cosine_attention_pixel_major_op(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """:func:`_cosine_attention_pixel_major` as an operator that torch.compile calls rather than traces, for
    gradient-free graphs (no backward is registered). Traced, the products and softmax became inductor's
    CPU flash-attention kernel and the norms a generated reduction, slower than these eager kernels in a
    bf16 sampling step on the 2-core CPU (docs/PERFORMANCE.md)."""
    return _cosine_attention_pixel_major(qkv, num_heads)


@_cosine_attention_pixel_major_op.register_fake
def _(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, fused, height, width = qkv.shape
    return qkv.new_empty([batch, height, width, fused // 3]).permute(0, 3, 1, 2)  # channels-last, as returned
