"""The speed layer: a built network turned into its fast twin, which computes the same function.

:mod:`mpdiff.nn.primitives` and :mod:`mpdiff.nn.unet` are the network as the paper writes it.
:func:`accelerate` changes the class of its layers, in place, to the subclasses below, which compute
the same formulas with fewer passes over memory. Parameters, buffers, state-dict keys and module names
stay what they are, so a fast network saves, loads, averages and wraps in DDP like the literal one, and
:func:`literal` turns it back. Training (:class:`mpdiff.train.loop.Trainer`) and sampling
(:func:`mpdiff.diffusion.generate.generate_batches`) run the fast twin; flop counts and the reference
comparisons run the literal network. Each rewrite, with the tolerance it is tested to:

===========================================  ===============================================  ==============
rewrite                                      where                                            tests
===========================================  ===============================================  ==============
mp_silu's 1 / 0.596 and mp_sum's factors     the gain of the adjacent MPConv (config G)       test_speed.py
folded into a convolution's gain
activations channels-last on the CPU         :class:`FastUNet`                                test_speed.py
norms across a non-innermost axis as a       :func:`norm_across`                              test_speed.py
float32 sum of squares
[1, 1] resampling as pooling/repetition      :func:`fast_resample`                            test_speed.py
cosine attention read pixel by pixel         :func:`fast_cosine_attention`                    test_speed.py
without autograd: in-place steps, mp_cat     :class:`FastBlock`, :func:`fast_mp_cat`          test_speed.py
written into its result
the effective weight computed once per       :class:`FastMPConv`, :func:`frozen_weights`      test_primitives.py
batch while sampling
===========================================  ===============================================  ==============

The whole network agrees with the literal one to float32 rounding (rtol 2e-6 on D; docs/NUMERICS.md)
and so do its gradients (rtol 1e-4); torch.compile (:mod:`mpdiff.nn.runtime`) compiles the fast twin.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from mpdiff.nn.primitives import NORM_EPS, SILU_RMS, MPConv, cosine_attention, mp_cat_weights, resample
from mpdiff.nn.unet import Block, UNet, apply_layer, apply_norm


def accelerate(net):
    """Turn every U-Net, block and MPConv inside `net` into its fast twin, in place; returns `net`.
    Idempotent. Subclasses of ours that a user wrote are left as they are."""
    return _swap_classes(net, TWINS)


def literal(net):
    """Undo :func:`accelerate`: every fast twin inside `net` back to the literal class; returns `net`."""
    return _swap_classes(net, {fast: plain for plain, fast in TWINS.items()})


def is_fast(net) -> bool:
    """Whether any module inside `net` is a fast twin."""
    return any(type(m) in LITERAL_OF for m in net.modules())


def _swap_classes(net, mapping):
    if net is None:
        return net
    for module in net.modules():
        if type(module) in mapping:
            module.__class__ = mapping[type(module)]
    return net


# ---- activations -------------------------------------------------------------------------------------

def norm_across(x: torch.Tensor, dim) -> torch.Tensor:
    """The float32 L2 norm of `x` over the axis `dim` (kept), for activations.

    Where that axis is the innermost in memory (channels on channels-last activations, the channels of a
    head in attention), torch.linalg.vector_norm reads `x` once. Across any other axis it is 5-25x slower
    than the square root of a float32 sum of squares (measured on a 2-core CPU, bf16 and float32:
    docs/PERFORMANCE.md), which is used there. Both accumulate in float32 and differ by float32 rounding
    (under 4e-7 relative). The sums are raised to at least 1e-30, so an all-zero slice gets the zero
    gradient vector_norm gives it rather than 0 * inf; the value, always added to eps, is unchanged.
    """
    if x.stride(dim) == 1:
        return torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    squares = x.to(torch.float32).square()
    return squares.sum(dim=dim, keepdim=True).clamp_min(1e-30).sqrt()


def fast_normalize(x: torch.Tensor, dim: int, eps: float = NORM_EPS) -> torch.Tensor:
    """:func:`mpdiff.nn.primitives.normalize` of activations over `dim`, its norm by :func:`norm_across`."""
    length = norm_across(x, dim)
    rms_plus_eps = torch.add(eps, length, alpha=math.sqrt(length.numel() / x.numel()))
    return x / rms_plus_eps.to(x.dtype)


def fast_resample(x: torch.Tensor, mode: str = "keep", filter=(1, 1)) -> torch.Tensor:
    """:func:`mpdiff.nn.primitives.resample`; the [1, 1] filter runs as 2x2 averaging and pixel
    repetition, since torch's depthwise (transposed) convolution took 6-18 ms where these take under 1 ms
    (docs/PERFORMANCE.md). Up-sampling is bit-identical to the convolution; down-sampling sums the same
    four values in another order (float32 rounding)."""
    if mode in ("down", "up") and tuple(filter) == (1, 1):
        return F.avg_pool2d(x, 2) if mode == "down" else F.interpolate(x, scale_factor=2.0, mode="nearest")
    return resample(x, mode=mode, filter=filter)


def fast_mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """:func:`mpdiff.nn.primitives.mp_cat`; without autograd, each part is scaled straight into its slice
    of the result: one pass, not two. (Not when compiling: writing into a slice breaks the graph there,
    and the compiler fuses anyway.)"""
    scale_a, scale_b = mp_cat_weights(a.shape[dim], b.shape[dim], t)
    if torch.is_grad_enabled() or a.dtype != b.dtype or dim != 1 or torch.compiler.is_compiling():
        return torch.cat((scale_a * a, scale_b * b), dim=dim)
    joined = torch.empty([a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:]], dtype=a.dtype, device=a.device,
                         memory_format=torch.channels_last if pixel_major(a) else torch.contiguous_format)
    torch.mul(a, scale_a, out=joined[:, :a.shape[1]])
    torch.mul(b, scale_b, out=joined[:, a.shape[1]:])
    return joined


def pixel_major(x: torch.Tensor) -> bool:
    """Whether `x` [N, C, H, W] is stored channels-last (pixel by pixel) rather than channel by channel."""
    return x.ndim == 4 and x.shape[2] * x.shape[3] > 1 and not x.is_contiguous() and \
        x.is_contiguous(memory_format=torch.channels_last)


# ---- attention ---------------------------------------------------------------------------------------

def fast_cosine_attention(qkv: torch.Tensor, num_heads: int, impl: str = "matmul") -> torch.Tensor:
    """:func:`mpdiff.nn.primitives.cosine_attention`: channels-last input is read pixel by pixel
    (:func:`attention_pixel_major`); channel-major input normalises with :func:`norm_across`."""
    if impl == "matmul" and pixel_major(qkv):
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():  # sampling: see the op's docstring
            return torch.ops.mpdiff.cosine_attention_pixel_major(qkv, num_heads)
        return attention_pixel_major(qkv, num_heads)
    if impl != "matmul":
        return cosine_attention(qkv, num_heads, impl=impl)
    batch, fused, height, width = qkv.shape
    channels = fused // 3
    per_head = qkv.reshape(batch, num_heads, channels // num_heads, 3, height * width)
    query, key, value = fast_normalize(per_head, dim=2).unbind(3)  # each [N, heads, C_head, HW]
    scores = query.transpose(2, 3) @ (key / math.sqrt(query.shape[2]))  # [N, heads, HW_q, HW_k]
    mixed = value @ scores.softmax(dim=3).transpose(2, 3)  # [N, heads, C_head, HW_q]
    return mixed.reshape(batch, channels, height, width)


def attention_pixel_major(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Cosine attention of channels-last input, returning channels-last output; the same formula with
    fewer passes over memory. q, k and v are gathered once into the [head, pixel, channel] order the
    matrix products read, their norms then run over the innermost axis (one pass of torch's vector norm;
    see norm_across), and the logits' 1 / sqrt(C_head) rides on k's divisor instead of costing a pass of
    its own."""
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
def attention_pixel_major_op(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """:func:`attention_pixel_major` as an operator that torch.compile calls rather than traces, for
    gradient-free graphs (no backward is registered). Traced, the products and softmax became inductor's
    CPU flash-attention kernel and the norms a generated reduction, slower than these eager kernels in a
    bf16 sampling step on the 2-core CPU (docs/PERFORMANCE.md)."""
    return attention_pixel_major(qkv, num_heads)


@attention_pixel_major_op.register_fake
def _(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, fused, height, width = qkv.shape
    return qkv.new_empty([batch, height, width, fused // 3]).permute(0, 3, 1, 2)  # channels-last, as returned


# ---- layers ------------------------------------------------------------------------------------------

class FastMPConv(MPConv):
    """:class:`~mpdiff.nn.primitives.MPConv` whose effective weight is computed once per (gain, dtype)
    inside :func:`frozen_weights` (sampling; never with autograd on, in training mode or when compiling).

    `projected_by_caller` (set by :class:`mpdiff.nn.runtime.CompiledTraining`): a compiled training
    graph leaves the forced re-projection out, because the caller has done it, eagerly, just before.
    Inductor computes wrong gradients for a training graph that writes a parameter in place (measured
    with torch 2.13 on the CPU: gradients off by up to 3x on the first step and by a few percent after
    it, while the same graph without the write, or run by aot_eager, agrees with float64 to 1e-5).
    Eager calls always re-project in training mode."""

    projected_by_caller = False
    fixed = None  # {(gain, dtype): effective weight} inside frozen_weights(), else None

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        if self.training and self.forced and not (self.projected_by_caller and torch.compiler.is_compiling()):
            self.force_weight_norm()
        if self.fixed is None or self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.apply_weight(x, self.effective_weight(gain, x.dtype))
        key = (id(gain) if torch.is_tensor(gain) else float(gain), x.dtype)  # a gain tensor is fixed too
        if key not in self.fixed:
            with torch.no_grad():
                self.fixed[key] = self.effective_weight(gain, x.dtype)
        return self.apply_weight(x, self.fixed[key])


@contextlib.contextmanager
def frozen_weights(*nets):
    """Inside the block, every fast MPConv of the modules `nets` computes its effective weight
    normalize(W) * gain / sqrt(fan_in) once and reuses it, for sampling, where nothing changes the
    weights (a write to a weight inside the block is not seen; outside it nothing is cached). Calls in
    training mode or with autograd on are never served from it. Outputs are bit-identical to the
    uncached calls."""
    modules = [net for net in nets if isinstance(net, nn.Module)]  # a compiled program: not ours to cache
    layers = [m for net in modules for m in net.modules() if isinstance(m, FastMPConv)]
    saved = [m.fixed for m in layers]
    try:
        for m in layers:
            m.fixed = {} if m.fixed is None else m.fixed  # nested: the outer block's weights stay
        yield
    finally:
        for m, previous in zip(layers, saved):
            m.fixed = previous


def sum_factors(t: float):
    """The factors (of a, of b) that :func:`mpdiff.nn.primitives.mp_sum` applies: ((1 - t), t) / sqrt((1 - t)^2 + t^2)."""
    length = math.sqrt((1 - t) ** 2 + t ** 2)
    return (1 - t) / length, t / length


class FastBlock(Block):
    """:class:`~mpdiff.nn.unet.Block`, with fewer passes over the activations.

    Config G computes mp_silu's 1 / 0.596 and mp_sum's two factors by folding them into the gain of an
    adjacent MPConv (scaling its normalised weight, which costs nothing at inference: the weight is
    cached), so SiLU and each join are one pass over the activations instead of two. Without autograd,
    the conditioning scale, SiLU and the joins write into tensors the block itself made. The input is
    never written (the encoder's outputs wait as long skips)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.flags.resample_on_main_path:
            x = fast_resample(x, mode=self.resample_mode, filter=self.resample_filter)
        if self.flavor == "enc":
            x = self._encoder_entry(x)
        update = self._residual(x, emb)
        x = self._join(self._shortcut(x), update, self.res_balance)
        if self.num_heads:
            x = self._join(x, self._attention(x), self.attn_balance)
        return x if self.clip_act is None else x.clamp_(-self.clip_act, self.clip_act)

    @property
    def folds(self) -> bool:
        return self.flags.mp_fixed_function

    def _join(self, x, update, t):
        """mp_sum(x, update, t); with folding, `update` (a fresh conv output, not saved for backward) has
        its factor t / sqrt((1 - t)^2 + t^2) already (Eq. 88)."""
        if not self.folds:
            return self.functions.sum(x, update, t=t)
        return update.add_(x, alpha=sum_factors(t)[0])

    def _branch_end(self, conv, h, t, silu_before=False):
        """conv(h), scaled for the join that follows it; `silu_before`: h is SiLU's output still to be
        divided by 0.596."""
        if not self.folds:
            return conv(h)
        return conv(h, gain=sum_factors(t)[1] / (SILU_RMS if silu_before else 1))

    def _encoder_entry(self, x):
        if self.skip_at_entry and self.conv_skip is not None:
            x = self.conv_skip(x)
        if self.flags.norm == "pixelnorm":
            x = fast_normalize(x, dim=1)
        return x

    def _shortcut(self, x):
        if not self.flags.resample_on_main_path:
            x = fast_resample(x, mode=self.resample_mode, filter=self.resample_filter)
        if self.conv_skip is not None and not self.skip_at_entry:
            x = self.conv_skip(x)
        return x

    def _residual(self, x, emb):
        silu = F.silu if self.folds else self.functions.silu  # folding: 1 / 0.596 goes into the next conv
        h = silu(apply_norm(self.norm0, x))
        if not self.flags.resample_on_main_path:
            h = fast_resample(h, mode=self.resample_mode, filter=self.resample_filter)
        h = self.conv_res0(h, gain=1 / SILU_RMS) if self.folds else self.conv_res0(h)
        cond = apply_layer(self.emb_linear, emb, self.emb_gain)  # [N, C] or [N, 2C]
        shift = None
        if self.flags.cond_shift:
            cond, shift = cond.chunk(2, dim=1)
        scale = cond + 1
        h = apply_norm(self.norm1, h)  # a fresh tensor, so without autograd it is scaled in place
        scratch = not torch.is_grad_enabled()
        factor = scale[:, :, None, None].to(h.dtype)
        h = h.mul_(factor) if scratch else h * factor
        if shift is not None:
            h = h + shift[:, :, None, None].to(h.dtype)
        h = F.silu(h, inplace=True) if scratch and silu is F.silu else silu(h)
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        return self._branch_end(self.conv_res1, h, self.res_balance, silu_before=True)

    def _attention(self, x):
        if self.flags.attention == "cosine":
            mixed = fast_cosine_attention(self.attn_qkv(x), self.num_heads, impl=self.attn_impl)
            return self._branch_end(self.attn_proj, mixed, self.attn_balance)
        return super()._attention(x)


class FastUNet(UNet):
    """:class:`~mpdiff.nn.unet.UNet` with channels-last activations on the CPU and :func:`fast_mp_cat`.

    `pixel_major`: True or False to choose the activation layout, None (the default) for channels-last on
    the CPU only, where it was measured faster in every setting (docs/PERFORMANCE.md); GPU layouts are
    unmeasured. The function is the same either way, float rounding apart (docs/NUMERICS.md)."""

    pixel_major = None

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        x = super().network_input(x)
        return x.contiguous(memory_format=torch.channels_last) if self.pixel_major_on(x.device) else x

    def pixel_major_on(self, device) -> bool:
        if self.pixel_major is not None:
            return self.pixel_major
        return torch.device(device).type == "cpu"

    def join_skip(self, x: torch.Tensor, skip: torch.Tensor, index: int) -> torch.Tensor:
        if not self.flags.mp_fixed_function:
            return super().join_skip(x, skip, index)
        skip = self.skip_scaling(skip, index)
        return fast_mp_cat(x, skip, t=self.skip_scaling.balance(index, self.concat_balance))


TWINS = {MPConv: FastMPConv, Block: FastBlock, UNet: FastUNet}  # literal class -> its fast twin
LITERAL_OF = {fast: plain for plain, fast in TWINS.items()}
