"""How a network runs, as opposed to what it is: activation precision and torch.compile (issue 18).

Neither is part of a network file or of a run's resume contract: they change speed and float
rounding, not the model. The network's weights, the preconditioning, the embedding, the norms inside
normalisations, attention logits and the loss stay float32 under every precision
(:meth:`mpdiff.nn.precond.Preconditioner.compute_dtype`).
"""

import contextlib

import torch

from mpdiff.config import check_precision


def _preconditioners(net):
    from mpdiff.nn.precond import Preconditioner

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


def compiled(net, enabled=True, backend="inductor"):
    """`net` compiled with torch.compile (or itself when not `enabled`). The first calls of each input
    shape compile (seconds to minutes); later ones run the generated kernels."""
    if not enabled:
        return net
    return torch.compile(net, backend=backend)
