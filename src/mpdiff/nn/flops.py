"""Parameter and flop counts of a network, as reported by `mpdiff info` (paper Table 6, Sec. 7.6).

Convention (the one behind the paper's Gflops): a multiply-add of a convolution or matrix
product counts as ONE operation, and every elementwise op counts once per output element,
with a few fixed multiples for compound ops (lerp 2, clamp 2, silu 3, softmax 3, ...). Vector
norms count once per input element; views, copies, concatenations and tensor creation are free.

The count runs the eval-mode forward of :class:`mpdiff.nn.precond.Precond` on the ``meta`` device
under a dispatch-level op counter, so no weight or activation memory is allocated and even
the XXL network is counted in about a second. What is counted: one network evaluation
D(x; sigma, c) with class labels, including the weight normalization that every
:class:`MPConv` applies on each call (normalize + gain scaling, Eq. 46-47; configs D-G), the
biases and group norms of the earlier ablation configs (A-E), but not the log-variance head
u(sigma), which only training uses. Every config A-G counts within 0.4% of paper Table 1.
"""

import contextlib
import dataclasses
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mpdiff.config import NetworkConfig, Preset
from mpdiff.nn.build import build_meta_network
from mpdiff.nn.fast import accelerate, is_fast, literal
from mpdiff.presets import get_preset

# Ops that move, view, copy or create data: no arithmetic.
_FREE_OPS = frozenset("""
    _reshape_alias _to_copy _unsafe_view alias arange as_strided cat chunk clone constant_pad_nd
    contiguous copy copy_ detach dropout embedding empty empty_like empty_strided expand eye
    fill fill_ flatten flip full full_like gather index_select lift_fresh lift_fresh_copy
    native_dropout new_empty new_empty_strided new_full new_ones new_zeros ones ones_like pad
    permute repeat reshape scalar_tensor select slice split split_with_sizes squeeze stack t
    tile to transpose unbind unflatten unsqueeze upsample_nearest2d view zeros zeros_like
""".split())

# Elementwise ops: flops = multiple x output elements. Reductions like mean/sum count their
# output elements only, as in the reference tool.
_ELEMENTWISE_OPS = {
    **dict.fromkeys("""
        abs add addcmul affine_grid_generator ceil clamp_max clamp_min cos div eq exp exp2 floor
        floor_divide ge gt le log log2 lt maximum mean minimum mul ne neg outer pow reciprocal
        relu round rsqrt rsub sign sin sqrt square sub sum where
    """.split(), 1),
    "lerp": 2, "leaky_relu": 2, "clamp": 2,
    "silu": 3, "sigmoid": 3, "_softmax": 3, "_safe_softmax": 3, "softmax": 3,
    "native_group_norm": 4, "native_layer_norm": 4, "upsample_bilinear2d": 4,
    "gelu": 14,  # tanh/erf approximation cost, as in the reference tool
}

# Fused attention kernels (used when attn_impl='sdpa'), counted as the explicit formula
# softmax(q k^T / sqrt(d)) v: two matmuls, one division and one softmax.
_SDPA_OPS = frozenset("""
    _scaled_dot_product_attention_math _scaled_dot_product_cudnn_attention
    _scaled_dot_product_efficient_attention _scaled_dot_product_flash_attention
    _scaled_dot_product_flash_attention_for_cpu scaled_dot_product_attention
""".split())


def _numel(x):
    return x.numel() if torch.is_tensor(x) else 0


def _first_tensor(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)):
        return next((o for o in out if torch.is_tensor(o)), None)
    return None


def _sdpa_flops(q, k, v):
    """Flops of softmax(q k^T / sqrt(d)) v for q [..., Lq, d], k [..., Lk, d], v [..., Lk, dv]."""
    logits = q.numel() // q.shape[-1] * k.shape[-2]  # elements of q k^T
    return logits * q.shape[-1] + logits * (1 + 3) + logits * v.shape[-1]


def op_flops(name, args, out):
    """Flops of one aten op (`name` without namespace or overload), or None if unknown."""
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]  # in-place variant costs the same
    if name in _FREE_OPS:
        return 0
    result = _first_tensor(out)
    if name in _ELEMENTWISE_OPS:
        return _ELEMENTWISE_OPS[name] * _numel(result)
    if name == "convolution":
        # out elements x (in_channels / groups x kh x kw), i.e. weight.shape[1:]. For transposed
        # convolutions weight.shape[1] is out_channels / groups; the reference tool uses the same
        # product (it only matters for the 2x up-sampling filter, a negligible share). A bias
        # (configs A, B) adds once per output element.
        weight, bias = args[1], args[2]
        bias_adds = result.numel() if bias is not None else 0
        return result.numel() * (weight.numel() // weight.shape[0]) + bias_adds
    if name in ("mm", "bmm", "matmul", "mv"):
        return result.numel() * args[0].shape[-1]
    if name in ("addmm", "baddbmm"):
        return result.numel() * (args[1].shape[-1] + 1)
    if name == "linalg_vector_norm" or name == "avg_pool2d":
        return _numel(args[0])  # once per input element
    if name in _SDPA_OPS:
        return _sdpa_flops(*args[:3])
    return None


class FlopCounter(TorchDispatchMode):
    """Accumulates flops per aten op; unknown ops are recorded, never ignored."""

    def __init__(self):
        super().__init__()
        self.flops = defaultdict(float)
        self.counts = defaultdict(int)
        self.unknown = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.namespace != "aten":
            name = f"{func.namespace}::{name}"
            self.unknown[name] += 1
            return out
        flops = op_flops(name, args, out)
        if flops is None:
            self.unknown[name] += 1
        else:
            self.counts[name] += 1
            self.flops[name] += flops
        return out


def count_params(net):
    """Number of trainable parameters (buffers such as Fourier frequencies excluded)."""
    return sum(p.numel() for p in net.parameters())


@contextlib.contextmanager
def _eval_mode(net):
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def count_flops(net, batch=1, label=True):
    """Flops of one eval-mode evaluation D(x; sigma, c) of `net`, per sample.

    `net` is a :class:`Precond` (on any device) or a :class:`NetworkConfig`. A real network's
    parameters are swapped for meta stand-ins for the count, so nothing is allocated and the
    weights are untouched. `batch` is the batch size of the counted call (weight normalization
    is shared by the batch, so larger batches cost slightly less per sample). `label=True`
    passes one-hot-shaped class labels, as the reference tool does; False passes none.

    Returns a dict: `flops` (per sample), `by_op` (aten op -> flops per sample), `op_count`
    (aten op -> calls), `unknown_ops` (aten op -> calls of ops the convention does not cover;
    their cost is missing from `flops`), `params` and `batch`.
    """
    if isinstance(net, NetworkConfig):
        net = build_meta_network(net)
    meta_state = {name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
                  for name, t in [*net.named_parameters(), *net.named_buffers()]}
    x = torch.zeros([batch, net.img_channels, net.img_resolution, net.img_resolution], device="meta")
    sigma = torch.ones([batch], device="meta")
    class_labels = torch.zeros([batch, net.label_dim], device="meta") if label and net.label_dim else None

    counter = FlopCounter()
    # Grad mode on: MPConv then recomputes its normalized weight on every call instead of
    # reusing its eval-mode cache, which is the per-call cost of a standalone evaluation.
    # The literal network: count the reference's ops (vector norms, the resampling convolution, mp_silu's
    # and mp_sum's constants where they stand), not the fast twin's (mpdiff.nn.fast).
    fast = is_fast(net)
    try:
        with _eval_mode(literal(net)), torch.enable_grad(), counter:
            torch.func.functional_call(net, meta_state, (x, sigma, class_labels))
    finally:
        if fast:
            accelerate(net)

    by_op = {name: flops / batch for name, flops in sorted(counter.flops.items(), key=lambda kv: -kv[1])}
    return {
        "flops": sum(by_op.values()),
        "by_op": by_op,
        "op_count": dict(counter.counts),
        "unknown_ops": dict(counter.unknown),
        "params": count_params(net),
        "batch": batch,
    }


def describe_preset(name_or_preset, **network_changes):
    """Summary of a preset for `mpdiff info`: size and cost computed from the model itself, optionally
    for the preset's network with `network_changes` (e.g. img_resolution, model_channels)."""
    preset = get_preset(name_or_preset) if isinstance(name_or_preset, str) else name_or_preset
    if not isinstance(preset, Preset):
        raise TypeError(f"expected a preset name or Preset, not {type(preset).__name__}")
    if network_changes:
        preset = dataclasses.replace(preset, network=preset.network.replace(**network_changes))
    result = count_flops(build_meta_network(preset.network))
    return {
        **preset.to_dict(),  # name, description, dataset, data, network, training, cadence
        "params": int(result["params"]),
        "mparams": round(result["params"] / 1e6, 2),
        "gflops": float(f"{result['flops'] / 1e9:.5g}"),  # per network evaluation, batch 1 (5 significant digits)
        "gflops_by_op": {op: round(flops / 1e9, 4) for op, flops in result["by_op"].items()
                         if round(flops / 1e9, 4)},
    }
