"""Magnitude-preserving building blocks of the EDM2 network (paper Sec. 3, Appendix B; SPEC §2).

Each function maps standardized inputs (unit RMS, uncorrelated elements) to standardized
outputs. Equation numbers refer to Karras et al., "Analyzing and Improving the Training
Dynamics of Diffusion Models" (arXiv 2312.02696 v2).
"""

import math

import torch
import torch.nn.functional as F

# sqrt(E[silu(z)^2]) for z ~ N(0, 1), as used by the paper (Eq. 81; exact value 0.59647).
SILU_RMS = 0.596


def normalize(x, dim=None, eps=1e-4):
    """Scale slices of `x` to unit RMS: x / (eps + ||x|| / sqrt(K)) over `dim` (Eq. 47, code form).

    `dim=None` reduces over every axis but the first (one slice per output channel / sample).
    The norm is accumulated in float32 even for half inputs.
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    elements_per_slice = norm.numel() / x.numel()  # = 1 / K
    norm = torch.add(eps, norm, alpha=math.sqrt(elements_per_slice))
    return x / norm.to(x.dtype)


def pixel_norm(x, eps=1e-4):
    """Unit RMS over channels at every pixel (Eq. 30-31)."""
    return normalize(x, dim=1, eps=eps)


def mp_silu(x):
    """SiLU divided by its RMS on unit-normal input (Eq. 81)."""
    return F.silu(x) / SILU_RMS


def mp_sum(a, b, t=0.5):
    """lerp(a, b, t) rescaled to unit magnitude: t is the share of `b` (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat_weights(num_a, num_b, t=0.5):
    """Per-input scales of :func:`mp_cat` for channel counts `num_a`, `num_b` (Eq. 103)."""
    total_scale = math.sqrt((num_a + num_b) / ((1 - t) ** 2 + t ** 2))
    return total_scale * (1 - t) / math.sqrt(num_a), total_scale * t / math.sqrt(num_b)


def mp_cat(a, b, dim=1, t=0.5):
    """Concatenate so that `a` and `b` contribute (1-t) : t regardless of widths (Eq. 103)."""
    wa, wb = mp_cat_weights(a.shape[dim], b.shape[dim], t)
    return torch.cat([wa * a, wb * b], dim=dim)


def clip_activations(x, limit=256):
    """In-place clamp to [-limit, limit]; a guard against FP16 overflow, inactive in normal use."""
    if limit is None:
        return x
    return x.clamp_(-limit, limit)


def resample(x, mode="keep", filter=(1, 1)):
    """2x box-filter down-sampling or nearest-neighbour up-sampling, depthwise (SPEC §2.7).

    With the default [1, 1] filter, 'down' is exact 2x2 average pooling and 'up' is exact
    nearest-neighbour up-sampling.
    """
    if mode == "keep":
        return x
    taps = torch.as_tensor(filter, dtype=torch.float32)
    if taps.ndim != 1 or len(taps) % 2 != 0:
        raise ValueError("resample filter must be 1-D with an even number of taps")
    pad = (len(taps) - 1) // 2
    taps = taps / taps.sum()
    kernel = torch.outer(taps, taps).to(dtype=x.dtype, device=x.device)
    channels = x.shape[1]
    if mode == "down":
        weight = kernel.expand(channels, 1, *kernel.shape)
        return F.conv2d(x, weight, groups=channels, stride=2, padding=pad)
    if mode == "up":
        weight = (kernel * 4).expand(channels, 1, *kernel.shape)
        return F.conv_transpose2d(x, weight, groups=channels, stride=2, padding=pad)
    raise ValueError(f"unknown resample mode {mode!r}; expected 'keep', 'down' or 'up'")


class MPFourier(torch.nn.Module):
    """Random Fourier features of a scalar, sqrt(2)-scaled to unit RMS (Eq. 75).

    Frequencies and phases are buffers drawn once at construction; they are saved with the
    network and must be carried into EMA copies.
    """

    def __init__(self, num_channels, bandwidth=1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x):
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32))
        y = (y + self.phases.to(torch.float32)).cos() * math.sqrt(2)
        return y.to(x.dtype)


class MPConv(torch.nn.Module):
    """Convolution (kernel [k, k]) or linear layer (kernel []) with forced weight normalization.

    Training forward (Alg. 1, Eq. 66): the stored weight is first re-projected in place to
    per-output-channel norm sqrt(fan_in) (forced WN), then normalized again *with* autograd
    (standard WN, which projects the gradient onto the sphere's tangent plane, Eq. 59), and
    scaled by gain / sqrt(fan_in) so unit-RMS inputs give unit-RMS outputs (Eq. 46). No bias.

    Forced WN uses the same eps as :func:`normalize` (as NVIDIA's code does), so a row of RMS r
    ends at norm sqrt(fan_in) * r / (r + 1e-4), i.e. sqrt(fan_in) to ~1e-4 relative. Rescaling
    exactly instead changes the Adam trajectory by ~1e-4 relative (measured; see docs/NUMERICS.md),
    so we keep the reference behaviour.

    Eval forward skips the in-place step (EMA weights are re-normalized on use). When autograd
    is off, the effective weight is cached and reused until the weight or gain changes.
    """

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self._cache_key = None
        self._cache_weight = None

    @property
    def fan_in(self):
        return self.weight[0].numel()

    def effective_weight(self, gain=1, dtype=torch.float32):
        """normalize(W) * gain / sqrt(fan_in), cast to `dtype` (differentiable)."""
        w = normalize(self.weight.to(torch.float32))
        w = w * (gain / math.sqrt(self.fan_in))
        return w.to(dtype)

    def _cached_weight(self, gain, dtype):
        gain_key = (gain.data_ptr(), gain._version) if torch.is_tensor(gain) else float(gain)
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device, dtype, gain_key)
        if key != self._cache_key:
            self._cache_weight = self.effective_weight(gain, dtype)
            self._cache_key = key
        return self._cache_weight

    def forward(self, x, gain=1):
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(torch.float32)))  # forced WN
        if not self.training and not torch.is_grad_enabled():
            w = self._cached_weight(gain, x.dtype)
        else:
            self._cache_key = self._cache_weight = None
            w = self.effective_weight(gain, x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    def extra_repr(self):
        kernel = list(self.weight.shape[2:])
        return f"{self.in_channels}, {self.out_channels}, kernel={kernel}"


def cosine_attention(qkv, num_heads, impl="matmul"):
    """Multi-head self-attention on a fused qkv tensor [N, 3C, H, W] -> [N, C, H, W] (Eq. 30-34).

    Channel layout of `qkv` is (head, channel, {q,k,v}), as in the released networks. q, k and v
    are normalized to unit RMS per head and pixel, so logits = sqrt(C_head) * cos(angle).
    `impl='sdpa'` uses torch's fused scaled_dot_product_attention (same formula; tested equal).
    """
    n, c3, h, w = qkv.shape
    y = qkv.reshape(n, num_heads, c3 // (3 * num_heads), 3, h * w)
    q, k, v = normalize(y, dim=2).unbind(3)  # each [N, heads, C_head, HW]
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
        out = out.transpose(2, 3)
    else:
        logits = q.transpose(2, 3) @ (k / math.sqrt(q.shape[2]))  # [N, heads, HWq, HWk]
        weights = logits.softmax(dim=3)
        out = v @ weights.transpose(2, 3)  # [N, heads, C_head, HWq]
    return out.reshape(n, c3 // 3, h, w)
