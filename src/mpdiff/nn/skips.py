"""Scaled long skip connections: ScaleLong's constant (CS) and learnable (LS) scaling (SPEC §9).

A backbone with long skips (the U-Net of any ablation config, the UViT) owns one
:class:`SkipScaling` module, ``backbone.skip_scaling``, and passes every skip tensor through it,
with the skip's index, just before the skip joins the decoder. Index 0 is the outermost skip (the
paper's i = 1), counting inwards. The modes:

* ``none``: the skip is unchanged (the plain U-Net, and EDM2's config G as released).
* ``cs``: the skip is multiplied by a constant kappa_i (SPEC §9.2). With the default rule
  ``skip``, kappa_i = kappa^(i-1) for the i-th skip from the outermost, so the outermost skip stays
  unscaled; rule ``level`` uses kappa^level (the resolution level of the skip, 0 = finest; SPEC §9.6's
  per-level variant); rule ``all`` scales every skip by kappa (the 1/sqrt(2) baseline of Imagen,
  SR3 and NCSN++ is ``all`` with kappa = 2^-1/2).
* ``cs-mp``: the magnitude-preserving equivalent for config G's MP concatenation (SPEC §9.6): the
  skip is left unscaled and the concatenation's balance t becomes t_i with t_i / (1 - t_i) =
  kappa_i t / (1 - t). That is the skip-to-main amplitude ratio of ``cs`` followed by the plain MP
  concatenation, while the concatenated tensor keeps unit magnitude.
* ``ls``: the skip is multiplied by a learned gate zeta(skip) in (0, 1) (SPEC §9.3), one gate shared
  by all skips. Skips of a convolutional U-Net differ in width, so there it is one gate per distinct
  width, shared by every skip of that width.
* ``ls-nonshared``: one gate per skip.

A gate squeezes the skip to one number per feature position, passes it through a bottleneck of
width 1/:data:`GATE_REDUCTION` with a ReLU, and a sigmoid gives the coefficients (:class:`SkipGate`).
Which axis is squeezed and which layers are used is the backbone's choice (``make_gate``).
"""

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from mpdiff.config import KAPPA_RULES, SKIP_MODES as MODES, require  # the choices, owned by the configuration

GATE_REDUCTION = 16  # the bottleneck ratio r of ScaleLong's calibration module


def check_skip_options(mode: str, kappa: float, rule: str, num_skips: int, mp_concat: bool, backbone: str):
    """Raise ConfigError unless `mode` / `kappa` / `rule` apply to a backbone with `num_skips` long skips
    whose concatenation is magnitude-preserving (`mp_concat`) or not."""
    require(mode in MODES, f"{{skip_scaling}} {str(mode)[:20]!r} is not one of {', '.join(MODES)} (SPEC §9)",
            "skip_scaling")
    require(rule in KAPPA_RULES, f"{{kappa_rule}} {str(rule)[:20]!r} is not one of {', '.join(KAPPA_RULES)}",
            "kappa_rule")
    if mode == "none":
        return
    require(num_skips > 0, f"{{skip_scaling}} {mode}: this {backbone} has no long skip connections to scale",
            "skip_scaling")
    require(mode not in ("cs", "cs-mp") or (isinstance(kappa, (int, float)) and 0 < kappa <= 1),
            f"{{kappa}} must be in (0, 1] for constant skip scaling, got {kappa}", "kappa")
    require(mode != "cs-mp" or mp_concat, f"{{skip_scaling}} cs-mp rebalances a magnitude-preserving concatenation, "
            f"and this {backbone} joins its skips without one (only U-Net config G has it); use cs, ls or "
            f"ls-nonshared", "skip_scaling")


def skip_coefficients(num_skips: int, kappa: float, rule: str = "skip",
                      levels: Optional[Sequence[int]] = None) -> tuple:
    """kappa_i of every skip, outermost first: kappa^i (rule 'skip', i = 0 for the outermost),
    kappa^levels[i] ('level') or kappa ('all')."""
    if rule == "skip":
        return tuple(kappa ** i for i in range(num_skips))
    if rule == "level":
        return tuple(kappa ** level for level in levels)
    return (kappa,) * num_skips


def mp_balance(coefficient: float, t: float) -> float:
    """The MP-concatenation balance t_i with t_i / (1 - t_i) = coefficient * t / (1 - t): the skip's
    weight relative to the main path's multiplied by `coefficient` (SPEC §9.6)."""
    odds = coefficient * t / (1 - t)
    return odds / (1 + odds)


class SkipGate(nn.Module):
    """ScaleLong's calibration module zeta (SPEC §9.3): squeeze, bottleneck, ReLU, expand, sigmoid.

    `squeeze_dims` are averaged away (the features of a token, or the pixels of a channel); the
    remaining `width` numbers per sample go through first (width -> hidden) and second (hidden ->
    width), and the sigmoid's output multiplies the skip, broadcast over the squeezed dims. The two
    layers are made by `make_layer(in, out)` so that a backbone can use its own layer kind.
    """

    def __init__(self, width: int, squeeze_dims: Sequence[int], make_layer: Callable[[int, int], nn.Module],
                 reduction: int = GATE_REDUCTION):
        super().__init__()
        self.width = width
        self.hidden = max(1, width // reduction)
        self.squeeze_dims = tuple(squeeze_dims)
        self.first = make_layer(width, self.hidden)
        self.second = make_layer(self.hidden, width)

    def coefficients(self, skip: torch.Tensor) -> torch.Tensor:
        """The gate's values, shaped to broadcast against `skip` (1 along the squeezed dims)."""
        squeezed = skip.mean(dim=self.squeeze_dims, dtype=torch.float32)
        gate = torch.sigmoid(self.second(torch.relu(self.first(squeezed))))
        shape = [1 if d in self._dims(skip) else size for d, size in enumerate(skip.shape)]
        shape[0] = skip.shape[0]
        return gate.reshape(shape)

    def forward(self, skip: torch.Tensor) -> torch.Tensor:
        return skip * self.coefficients(skip).to(skip.dtype)

    def _dims(self, skip):
        return {d % skip.ndim for d in self.squeeze_dims}

    def extra_repr(self) -> str:
        return f"{self.width} -> {self.hidden} -> {self.width}, squeeze dims {self.squeeze_dims}"


class SkipScaling(nn.Module):
    """The long-skip scaling of one backbone: called as scaling(skip, index) on every skip.

    Args:
        mode: one of :data:`MODES`.
        coefficients: kappa_i per skip, outermost first (:func:`skip_coefficients`); used by cs / cs-mp.
        gate_keys: per skip, the name of its gate (ls modes): skips with the same key share one gate.
        make_gate: builds the gate of a key, from the index of the first skip that uses it.

    Holds no parameters except the gates, so modes none / cs / cs-mp leave a network's state_dict as
    it is. Forward hooks see (skip, index) and the skip as the decoder receives it (the diagnostics
    of :mod:`mpdiff.train.dynamics` read skip magnitudes there).
    """

    def __init__(self, mode: str = "none", coefficients: Sequence[float] = (),
                 gate_keys: Sequence[str] = (), make_gate: Optional[Callable[[int], nn.Module]] = None):
        super().__init__()
        self.mode = mode
        self.coefficients = tuple(float(c) for c in coefficients)
        self.gate_keys = tuple(gate_keys)
        self.gates = None
        if mode in ("ls", "ls-nonshared"):
            self.gates = nn.ModuleDict()
            for index, key in enumerate(self.gate_keys):
                if key not in self.gates:
                    self.gates[key] = make_gate(index)

    def gate(self, index: int) -> Optional[nn.Module]:
        """The gate of skip `index` (ls modes), else None."""
        return None if self.gates is None else self.gates[self.gate_keys[index]]

    def forward(self, skip: torch.Tensor, index: int) -> torch.Tensor:
        if self.mode == "cs":
            return skip * self.coefficients[index]
        if self.gates is not None:
            return self.gate(index)(skip)
        return skip

    def balance(self, index: int, t: float) -> float:
        """The concatenation balance of skip `index`: `t`, or in cs-mp mode its rebalanced t_i."""
        if self.mode == "cs-mp":
            return mp_balance(self.coefficients[index], t)
        return t

    def extra_repr(self) -> str:
        if self.mode in ("cs", "cs-mp"):
            return f"{self.mode}, kappa_i={', '.join(f'{c:.4g}' for c in self.coefficients)}"
        return self.mode
