"""How a network runs, as opposed to what it is: activation precision and torch.compile (issue 18).

Neither is part of a network file or of a run's resume contract: they change speed and float
rounding, not the model. The network's weights, the preconditioning, the embedding, the norms inside
normalisations, attention logits and the loss stay float32 under every precision
(:meth:`mpdiff.nn.precond.Preconditioner.compute_dtype`).
"""

import contextlib
import itertools
import types

import torch

from mpdiff.config import check_precision
from mpdiff.nn.fast import FastMPConv, accelerate
from mpdiff.nn.precond import Preconditioner


def _preconditioners(net):
    return [m for m in net.modules() if isinstance(m, Preconditioner)] if net is not None else []


def set_precision(net, precision):
    """Set the activation precision of every preconditioned network inside `net` (None: its default)."""
    check_precision(precision)
    for m in _preconditioners(net):
        m.precision = precision
    return net


@contextlib.contextmanager
def precision_of(precision, *nets):
    """Run `nets` at `precision` inside the block, then restore what they had (None changes nothing)."""
    if precision is None:
        yield
        return
    check_precision(precision)
    saved = [(m, m.precision) for net in nets for m in _preconditioners(net)]
    try:
        for m, _ in saved:
            m.precision = precision
        yield
    finally:
        for m, previous in saved:
            m.precision = previous


# bfloat16 keeps 8 significant bits, and the error it adds to a sample grows as the noise level falls
# (faint grey left in MNIST's black backgrounds: FID +2.2 with every evaluation in bf16; +0.5 with float32
# at sigma <= 1, +0.15 at sigma <= 3; docs/SAMPLING.md "bf16 at low noise levels"). Sampling therefore
# evaluates a bf16 network in float32 at sigma <= BF16_FLOAT32_BELOW. float16 (11 bits) is left as it is.
BF16_FLOAT32_BELOW = 3.0


def low_noise_float32(model, net, device="cpu"):
    """`model` (net, or net compiled) as a denoiser `(x, sigma, labels)` that runs in float32 where every
    sigma of the call is at most BF16_FLOAT32_BELOW, when `net` computes in bfloat16; else `model`."""
    if model is None or not any(m.compute_dtype(device) == torch.bfloat16 for m in _preconditioners(net)):
        return model

    def denoise(x, sigma, labels):
        return model(x, sigma, labels, force_fp32=bool(sigma.max() <= BF16_FLOAT32_BELOW))
    return denoise


def compiled(net, enabled=True, backend="inductor", frozen=False):
    """`net`'s fast twin (:func:`mpdiff.nn.fast.accelerate`, in place) compiled with torch.compile (or
    `net` itself when not `enabled`). The first calls of each input
    shape compile (seconds to minutes); later ones run the generated kernels. `frozen`: for evaluation
    without autograd only (sampling), with the weights compiled in as constants (:class:`FrozenCompiled`)."""
    if not enabled or net is None:
        return net
    if frozen:
        return FrozenCompiled(net, backend)
    return CompiledTraining(net, backend)


class CompiledTraining:
    """`net` (a network, or its DistributedDataParallel wrapper) through torch.compile, for training steps
    and any other call. In training mode the forced weight normalisation runs eagerly before each call,
    on every forced layer at once, and the graph leaves it out (:class:`mpdiff.nn.fast.FastMPConv`):
    with the in-place write inside, inductor's training graphs computed wrong gradients. Each layer of
    the U-Net runs once per forward, so re-projecting all of them first is what the eager forward does
    layer by layer. Attributes not defined here are those of the compiled module."""

    def __init__(self, net, backend="inductor"):
        self.net = net
        self.module = accelerate(getattr(net, "module", net))  # under DDP, the network itself
        self.program = torch.compile(net, backend=backend)
        self.forced = [m for m in self.module.modules() if isinstance(m, FastMPConv) and m.forced]
        for layer in self.forced:
            layer.projected_by_caller = True  # inside the compiled graph only (FastMPConv)

    def __call__(self, *args, **kwargs):
        if self.module.training:
            for layer in self.forced:
                layer.force_weight_norm()
        return self.program(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.program, name)


def _run(net, *args, **kwargs):
    return net(*args, **kwargs)


class FrozenCompiled:
    """`net` compiled for evaluation without autograd, its weights folded into the program as constants
    (inductor's freezing). The forced weight normalisation, the gains folded into it and the precision
    casts then run once, at compile time, and inductor can pack each convolution's weight in the layout
    its kernel reads and fuse the next elementwise step into it. On the 2-core CPU this is what makes
    compiled sampling faster than eager (docs/PERFORMANCE.md); without freezing it was slower.

    A frozen program keeps the weights it was compiled with: torch.compile's guards check which tensors
    the parameters are, not what they hold. So every call compares the storage and version counter of each
    parameter and buffer of `net` with those it was compiled from; when one differs (load_state_dict, an
    optimiser step, a .data swap) it compiles again, under a code object of its own (torch.compile caches
    by code object, so the stale program can never answer again and is freed with its code).

    Calls must be in eval mode with autograd off; anything else raises, since freezing would not apply.
    """

    def __init__(self, net, backend="inductor"):
        self.net = accelerate(net)
        self.backend = backend
        self.compiles = 0  # programs built so far (one per weight change)
        self._stamp = None
        self._program = None

    def _weights_stamp(self):
        return tuple((t.data_ptr(), t._version, t.dtype, t.device)
                     for t in itertools.chain(self.net.parameters(), self.net.buffers()))

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled() or self.net.training:
            raise RuntimeError("a FrozenCompiled network runs in eval mode under torch.no_grad() only; "
                               "use compiled(net) for training")
        stamp = self._weights_stamp()
        if stamp != self._stamp:
            self.compiles += 1
            code = _run.__code__.replace(co_name=f"_run_frozen_{id(self):x}_{self.compiles}")
            self._program = torch.compile(types.FunctionType(code, _run.__globals__), backend=self.backend)
            self._stamp = stamp
        from torch._inductor import config as inductor_config

        with inductor_config.patch(freezing=True):
            return self._program(self.net, *args, **kwargs)
