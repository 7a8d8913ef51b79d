"""Power-function EMA and post-hoc EMA reconstruction (SPEC §5; EDM2 paper Appendix C).

Three layers, from pure to stateful:

* math (float64 numpy, broadcasting like numpy): sigma_rel <-> gamma, per-update beta, the closed-form
  inner product of two power profiles and the least-squares coefficients that combine stored
  snapshots into a new profile;
* trackers: :class:`PowerFunctionEMA` and :class:`TraditionalEMA` keep float32 averages of any
  ``torch.nn.Module``'s parameters and only apply the math;
* files: EMA snapshots are network files (one per training time and profile) in ``RUN_DIR/snapshots``;
  :func:`reconstruct` streams them into new network files in ``RUN_DIR/phema``.

Time is measured in training images (``nimg``) throughout, as in the official code.
"""

import dataclasses
import json
import math
import os
import re
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from .checkpoint import NETWORK_FORMAT, save_network, storage_dtype
from .errors import CheckpointError, ConfigError

SIGMA_REL_MAX = 12 ** -0.5  # gamma -> 0 (uniform profile); the open upper end of the valid range (Eq. 123)

SNAPSHOT_KIND = "ema-snapshot"
RECONSTRUCTION_KIND = "phema-reconstruction"
SNAPSHOT_DIR = "snapshots"
PHEMA_DIR = "phema"
_SNAPSHOT_NAME = re.compile(r"ema-(\d+)-(\d+\.\d+)\.safetensors")

# ------------------------------------------------------------------------------------------------
# Profile math (pure, float64).


def _check_sigma_rel(sigma_rel):
    sigma_rel = np.asarray(sigma_rel, dtype=np.float64)
    bad = ~((sigma_rel > 0) & (sigma_rel < SIGMA_REL_MAX))
    if np.any(bad):
        value = sigma_rel[bad].flat[0]
        raise ConfigError(f"sigma_rel {value:g} is outside the valid range (0, {SIGMA_REL_MAX:.4f}) "
                          f"of the power-function EMA")
    return sigma_rel


def sigma_rel_to_gamma(sigma_rel):
    """Exponent gamma of the power profile with relative std `sigma_rel` (Eq. 126, Alg. 2).

    gamma is the largest real root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2).
    """
    sigma_rel = _check_sigma_rel(sigma_rel)
    inv_sq = sigma_rel ** -2
    unique, inverse = np.unique(inv_sq, return_inverse=True)
    roots = np.array([np.roots([1.0, 7.0, 16.0 - v, 12.0 - v]).real.max() for v in unique], dtype=np.float64)
    return roots[inverse].reshape(sigma_rel.shape)


def gamma_to_sigma_rel(gamma):
    """Relative standard deviation of the power profile with exponent `gamma` (Eq. 123)."""
    gamma = np.asarray(gamma, dtype=np.float64)
    if np.any(~(gamma > -1)):
        raise ConfigError(f"power-function exponent gamma must be > -1, got {gamma[~(gamma > -1)].flat[0]:g}")
    return np.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3))


def power_function_beta(sigma_rel, t_next, t_delta):
    """Decay of one update from t_next - t_delta to t_next: beta = (1 - t_delta / t_next)^(gamma + 1) (Eq. 127).

    The first update (t_delta == t_next) gives beta = 0, i.e. the average starts at the live weights.
    """
    t_next = np.asarray(t_next, dtype=np.float64)
    t_delta = np.asarray(t_delta, dtype=np.float64)
    return (1 - t_delta / t_next) ** (sigma_rel_to_gamma(sigma_rel) + 1)


def power_function_profile(tau, t, sigma_rel):
    """Density p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t], zero after t (Eq. 121)."""
    tau = np.asarray(tau, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    gamma = sigma_rel_to_gamma(sigma_rel)
    inside = (tau >= 0) & (tau <= t)
    ratio = np.where(inside, tau / t, 0.0)
    return np.where(inside, (gamma + 1) * ratio ** gamma / t, 0.0)


def power_function_response(t, sigma_rel, num_steps):
    """Discrete response of profile(s) (t, sigma_rel) on the integer grid 0 .. num_steps - 1 (for plots).

    Returns shape broadcast(t, sigma_rel).shape + (num_steps,); each row sums to 1 (SPEC §5.6).
    """
    t, sigma_rel = np.broadcast_arrays(np.asarray(t, dtype=np.float64), np.asarray(sigma_rel, dtype=np.float64))
    tau = np.arange(num_steps, dtype=np.float64)
    response = power_function_profile(tau, t[..., None], sigma_rel[..., None])
    return response / np.sum(response, axis=-1, keepdims=True)


def power_function_inner_product(t_a, sigma_rel_a, t_b, sigma_rel_b):
    """Closed-form <p_a, p_b> = integral of p_a(tau) p_b(tau) over tau for two power profiles (Eq. 151).

    For t_a <= t_b: (gamma_a + 1)(gamma_b + 1) (t_a / t_b)^gamma_b / ((gamma_a + gamma_b + 1) t_b), and
    symmetrically otherwise; the ratio of the times is exponentiated (never a time itself) so that large
    image counts and exponents cannot overflow.
    """
    gamma_a = sigma_rel_to_gamma(sigma_rel_a)
    gamma_b = sigma_rel_to_gamma(sigma_rel_b)
    t_a = np.asarray(t_a, dtype=np.float64)
    t_b = np.asarray(t_b, dtype=np.float64)
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)  # (t_b / t_a)^gamma_a when t_a is the later time
    numerator = (gamma_a + 1) * (gamma_b + 1) * ratio ** exponent
    denominator = (gamma_a + gamma_b + 1) * np.maximum(t_a, t_b)
    return numerator / denominator


def solve_posthoc_coefficients(in_t, in_sigma_rel, out_t, out_sigma_rel):
    """Least-squares coefficients combining input profiles into output profiles (Eq. 128-151, Alg. 3).

    Solves A X = B with A_ij = <p_i, p_j> over the inputs and B_ij = <p_i, q_j> against the outputs,
    densely and without regularisation, then normalises each output's column to sum to 1 (as the
    official code does). Returns a float64 array of shape [num_inputs, num_outputs].
    """
    in_t, in_sigma_rel = (np.ravel(a) for a in np.broadcast_arrays(np.asarray(in_t, np.float64),
                                                                    np.asarray(in_sigma_rel, np.float64)))
    out_t, out_sigma_rel = (np.ravel(a) for a in np.broadcast_arrays(np.asarray(out_t, np.float64),
                                                                      np.asarray(out_sigma_rel, np.float64)))
    column = lambda a: a.reshape(-1, 1)
    row = lambda a: a.reshape(1, -1)
    gram = power_function_inner_product(column(in_t), column(in_sigma_rel), row(in_t), row(in_sigma_rel))
    target = power_function_inner_product(column(in_t), column(in_sigma_rel), row(out_t), row(out_sigma_rel))
    coefficients = np.linalg.solve(gram, target)
    return coefficients / np.sum(coefficients, axis=0)


def reconstructed_profile(tau, in_t, in_sigma_rel, coefficients):
    """The response sum_i x_i p_i(tau) that a set of coefficients ([inputs] or [inputs, outputs]) produces."""
    tau = np.asarray(tau, dtype=np.float64)
    in_t, in_sigma_rel = (np.ravel(a) for a in np.broadcast_arrays(np.asarray(in_t, np.float64),
                                                                    np.asarray(in_sigma_rel, np.float64)))
    profiles = power_function_profile(tau[..., None], in_t, in_sigma_rel)  # [..., inputs]
    return profiles @ np.asarray(coefficients, dtype=np.float64)


def profile_reconstruction_error(in_t, in_sigma_rel, out_t, out_sigma_rel, num_points=20001):
    """How well the inputs reproduce the target profile (out_t, out_sigma_rel), on a fine grid.

    Returns (max_abs_error, relative_l2_error). Densities are measured per unit of *relative* time tau/out_t
    (so a profile peaks at gamma + 1); relative_l2_error = ||p* - p|| / ||p||.
    """
    out_t = float(out_t)
    coefficients = solve_posthoc_coefficients(in_t, in_sigma_rel, out_t, out_sigma_rel)[:, 0]
    tau = np.linspace(0.0, out_t, num_points)
    target = power_function_profile(tau, out_t, out_sigma_rel) * out_t
    approx = reconstructed_profile(tau, in_t, in_sigma_rel, coefficients) * out_t
    diff = approx - target
    max_abs = float(np.max(np.abs(diff)))
    rel_l2 = float(np.sqrt(np.trapezoid(diff ** 2, tau) / np.trapezoid(target ** 2, tau)))
    return max_abs, rel_l2


# ------------------------------------------------------------------------------------------------
# Traditional EMA half-life <-> sigma_rel.
#
# A traditional EMA with half-life h, run from time 0 to t and initialised to theta(0), weighs the
# weights of age u = t - tau by (ln2/h) 2^(-u/h) for u < t and puts the leftover mass 2^(-t/h) on
# theta(0). The age is thus min(E, t) with E ~ Exponential(k), k = ln2/h. With x = k t:
#   E[min(E, t)]   = (1 - e^-x) / k
#   E[min(E, t)^2] = 2 (1 - e^-x (1 + x)) / k^2
#   sigma_rel^2 = Var / t^2 = [2 (1 - e^-x (1 + x)) - (1 - e^-x)^2] / x^2
# For h << t (x large) this tends to 1/x^2, i.e. sigma_rel ~ h / (t ln 2) (SPEC §5.2). For h >> t
# nearly all the mass sits on theta(0) and sigma_rel -> 0 again; sigma_rel peaks at x = _X_PEAK.

_X_PEAK = 1.1265006424561081        # argmax of the expression above (h = 0.6153 t)
_SERIES_X = 0.25                     # below this, use the Taylor series (cancellation in the closed form)
_SERIES = (1 / 3, -1 / 3, 11 / 60, -13 / 180, 19 / 840, -1 / 168, 247 / 181440, -251 / 907200,
           1013 / 19958400, -509 / 59875200, 1361 / 1037836800, -1363 / 7264857600,
           16369 / 653837184000, -2047 / 653837184000)  # coefficients of x^1 .. x^14


def _truncated_exponential_var(x):
    """sigma_rel^2 of a traditional EMA as a function of x = t ln2 / h (see above)."""
    x = np.asarray(x, dtype=np.float64)
    xs = np.maximum(x, _SERIES_X)
    one_minus_exp = -np.expm1(-xs)
    closed = (2 * (one_minus_exp - xs * np.exp(-xs)) - one_minus_exp ** 2) / xs ** 2
    series = sum(c * x ** (n + 1) for n, c in enumerate(_SERIES))
    return np.where(x < _SERIES_X, series, closed)


SIGMA_REL_TRADITIONAL_MAX = float(np.sqrt(_truncated_exponential_var(_X_PEAK)))  # 0.3601


def halflife_to_sigma_rel(halflife, t):
    """sigma_rel of a traditional EMA with half-life `halflife` after training time `t` (same units).

    Exact for the truncated exponential profile with the leftover mass on theta(0) (the EMA starts at
    the initial weights); approaches halflife / (t ln 2) when halflife << t.
    """
    halflife = np.asarray(halflife, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    if np.any(~(halflife > 0)) or np.any(~(t > 0)):
        raise ConfigError("half-life and training time must be positive")
    return np.sqrt(_truncated_exponential_var(t * math.log(2) / halflife))


def sigma_rel_to_halflife(sigma_rel, t):
    """Half-life of the traditional EMA whose profile at time `t` has relative std `sigma_rel`.

    Inverse of :func:`halflife_to_sigma_rel` on its short-half-life branch (halflife <= 0.615 t), the
    only one where the average is mostly made of trained weights; sigma_rel must be below 0.3601, the
    widest a traditional EMA gets.
    """
    from scipy.optimize import brentq

    sigma_rel = np.asarray(sigma_rel, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    if np.any(~((sigma_rel > 0) & (sigma_rel < SIGMA_REL_TRADITIONAL_MAX))):
        raise ConfigError(f"sigma_rel must be in (0, {SIGMA_REL_TRADITIONAL_MAX:.4f}) for a traditional EMA")
    if np.any(~(t > 0)):
        raise ConfigError("training time must be positive")

    def solve_x(target_var):
        x_hi = _X_PEAK
        while _truncated_exponential_var(x_hi) > target_var:  # var ~ 1/x^2 on this branch
            x_hi *= 2
        return brentq(lambda x: _truncated_exponential_var(x) - target_var, _X_PEAK, x_hi, xtol=1e-300,
                      rtol=4 * np.finfo(float).eps, maxiter=500)

    x = np.vectorize(solve_x, otypes=[np.float64])(sigma_rel ** 2)
    return t * math.log(2) / x


# ------------------------------------------------------------------------------------------------
# Trackers.


class _ParameterAverages:
    """Float32 running averages of a module's parameters (name -> tensor), one dict per profile."""

    def __init__(self, module, num_profiles):
        self.module = module
        self.nimg = 0
        self.averages = [self._copy_parameters() for _ in range(num_profiles)]

    def _copy_parameters(self):
        return {name: param.detach().to(torch.float32, copy=True) for name, param in self.module.named_parameters()}

    @torch.no_grad()
    def reset(self):
        """Set every average to the live parameters."""
        for average in self.averages:
            for name, param in self.module.named_parameters():
                average[name].copy_(param.detach())

    @torch.no_grad()
    def _apply(self, betas):
        for average, beta in zip(self.averages, betas):
            for name, param in self.module.named_parameters():
                if beta == 0:
                    average[name].copy_(param.detach())
                else:
                    average[name].lerp_(param.detach().to(torch.float32), 1 - beta)

    @staticmethod
    def _check_times(nimg, delta_nimg):
        if not delta_nimg > 0 or nimg < delta_nimg:
            raise ValueError(f"EMA update needs 0 < delta_nimg <= nimg, got nimg={nimg}, delta_nimg={delta_nimg}")

    def _averaged_state_dict(self, index):
        average = self.averages[index]
        params = dict(self.module.named_parameters(remove_duplicate=False))
        ids = {id(p): name for name, p in self.module.named_parameters()}  # tied weights share one average
        state = {}
        for key, value in self.module.state_dict().items():
            if key in params:
                state[key] = average[ids[id(params[key])]].clone()
            else:
                state[key] = value.detach().clone()  # buffers come from the live module
        return state

    def _load_averages(self, averages, source):
        """Copy stored averages (list of name -> tensor) into place after checking them against the module."""
        targets = self.averages if len(averages) == len(self.averages) else [self._copy_parameters() for _ in averages]
        for target, stored in zip(targets, averages):
            if set(stored) != set(target):
                missing = sorted(set(target) - set(stored))[:3]
                unexpected = sorted(set(stored) - set(target))[:3]
                raise CheckpointError(f"{source}: EMA parameters do not match the module "
                                      f"(missing {missing}, unexpected {unexpected})")
            for name, tensor in stored.items():
                if tuple(tensor.shape) != tuple(target[name].shape):
                    raise CheckpointError(f"{source}: EMA tensor {name} has shape {tuple(tensor.shape)}, "
                                          f"expected {tuple(target[name].shape)}")
        with torch.no_grad():
            for target, stored in zip(targets, averages):
                for name, tensor in stored.items():
                    target[name].copy_(tensor)
        self.averages = targets


class PowerFunctionEMA(_ParameterAverages):
    """Power-function EMA of a module's parameters for several profiles at once (SPEC §5.3-5.4).

    Call :meth:`update` after every optimizer step (or every k steps: beta uses the images since the
    previous update, so the profile stays exact however the updates are spaced).
    """

    def __init__(self,
        module,                         # Live torch.nn.Module whose parameters are averaged.
        sigma_rels = (0.050, 0.100),    # Relative std of each tracked profile (SPEC §5.4 defaults).
    ):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        sigma_rel_to_gamma(self.sigma_rels)  # validate
        super().__init__(module, len(self.sigma_rels))

    def update(self, nimg, delta_nimg):
        """Fold in the live weights. nimg = images seen after this step, delta_nimg = images since the last update."""
        self._check_times(nimg, delta_nimg)
        betas = power_function_beta(self.sigma_rels, nimg, delta_nimg)
        self._apply([float(beta) for beta in betas])
        self.nimg = int(nimg)

    def profile_index(self, index_or_sigma_rel):
        """Index of a profile given its index (int) or its sigma_rel (float)."""
        if isinstance(index_or_sigma_rel, (int, np.integer)) and not isinstance(index_or_sigma_rel, bool):
            if not 0 <= index_or_sigma_rel < len(self.sigma_rels):
                raise ConfigError(f"EMA profile index {index_or_sigma_rel} out of range 0..{len(self.sigma_rels) - 1}")
            return int(index_or_sigma_rel)
        for index, sigma_rel in enumerate(self.sigma_rels):
            if abs(sigma_rel - float(index_or_sigma_rel)) < 1e-9:
                return index
        raise ConfigError(f"sigma_rel {index_or_sigma_rel} is not tracked (tracked: "
                          f"{', '.join(f'{s:.3f}' for s in self.sigma_rels)})")

    def averaged_state_dict(self, index_or_sigma_rel=0):
        """A full state_dict for the module: averaged parameters (float32) + the live module's buffers."""
        return self._averaged_state_dict(self.profile_index(index_or_sigma_rel))

    def copy_to(self, module, index_or_sigma_rel=0):
        """Load one profile's average into `module` (same architecture as the tracked one)."""
        module.load_state_dict(self.averaged_state_dict(index_or_sigma_rel))
        return module

    def state_dict(self):
        return {"sigma_rels": list(self.sigma_rels), "nimg": self.nimg, "averages": self.averages}

    def load_state_dict(self, state, source="EMA state"):
        sigma_rels = tuple(float(s) for s in state["sigma_rels"])
        sigma_rel_to_gamma(sigma_rels)
        if len(sigma_rels) != len(state["averages"]):
            raise CheckpointError(f"{source}: {len(sigma_rels)} sigma_rels but {len(state['averages'])} averages")
        self._load_averages(state["averages"], source)
        self.sigma_rels = sigma_rels
        self.nimg = int(state.get("nimg", 0))

    def save_snapshots(self, snapshot_dir, network_config, step, batch_size, dtype="float32"):
        """Write one snapshot per profile at the current time into `snapshot_dir`; returns the paths."""
        paths = []
        for index, sigma_rel in enumerate(self.sigma_rels):
            path = os.path.join(snapshot_dir, snapshot_name(self.nimg, sigma_rel))
            save_snapshot(path, self.averaged_state_dict(index), nimg=self.nimg, sigma_rel=sigma_rel, step=step,
                          batch_size=batch_size, network_config=network_config, dtype=dtype)
            paths.append(path)
        return paths


class TraditionalEMA(_ParameterAverages):
    """Traditional (exponential) EMA with an optional half-life ramp-up (SPEC §5.2, config A)."""

    def __init__(self,
        module,                         # Live torch.nn.Module whose parameters are averaged.
        halflife_img,                   # Half-life in training images.
        rampup_ratio = 0.09,            # Half-life is at most rampup_ratio * nimg; None disables the ramp-up.
    ):
        if not halflife_img > 0:
            raise ConfigError(f"EMA half-life must be positive, got {halflife_img}")
        self.halflife_img = float(halflife_img)
        self.rampup_ratio = rampup_ratio
        super().__init__(module, 1)

    def current_halflife(self, nimg):
        halflife = self.halflife_img
        if self.rampup_ratio is not None:
            halflife = min(halflife, self.rampup_ratio * nimg)
        return halflife

    def update(self, nimg, delta_nimg):
        """Fold in the live weights. nimg = images seen after this step, delta_nimg = images since the last update."""
        self._check_times(nimg, delta_nimg)
        beta = 0.5 ** (delta_nimg / max(self.current_halflife(nimg), 1e-8))  # Eq. 120, SPEC §5.2
        self._apply([float(beta)])
        self.nimg = int(nimg)

    def averaged_state_dict(self):
        """A full state_dict for the module: averaged parameters (float32) + the live module's buffers."""
        return self._averaged_state_dict(0)

    def copy_to(self, module):
        module.load_state_dict(self.averaged_state_dict())
        return module

    def state_dict(self):
        return {"halflife_img": self.halflife_img, "rampup_ratio": self.rampup_ratio, "nimg": self.nimg,
                "averages": self.averages}

    def load_state_dict(self, state, source="EMA state"):
        if len(state["averages"]) != 1:
            raise CheckpointError(f"{source}: a traditional EMA state has one average, got {len(state['averages'])}")
        self._load_averages(state["averages"], source)
        self.halflife_img = float(state["halflife_img"])
        self.rampup_ratio = state["rampup_ratio"]
        self.nimg = int(state.get("nimg", 0))


# ------------------------------------------------------------------------------------------------
# Snapshots: one network file per (training time, profile).


def snapshot_name(nimg, sigma_rel):
    return f"ema-{int(nimg):012d}-{float(sigma_rel):.3f}.safetensors"


def phema_name(nimg, sigma_rel):
    return f"phema-{int(nimg):012d}-{float(sigma_rel):.3f}.safetensors"


def save_snapshot(path, state_dict, nimg, sigma_rel, step, batch_size, network_config, dtype="float32"):
    """Write one EMA snapshot as a loadable network file (kind "ema-snapshot"); returns `path`.

    `network_config` is a NetworkConfig or, for modules that are not mpdiff networks, any JSON-able dict.
    """
    _check_sigma_rel(sigma_rel)
    save_network(path, state_dict, network_config, dtype=dtype, nimg=int(nimg), sigma_rel=float(sigma_rel),
                 step=int(step), batch_size=int(batch_size), kind=SNAPSHOT_KIND)
    return path


@dataclasses.dataclass(frozen=True)
class SnapshotRecord:
    path: str
    nimg: int
    sigma_rel: float
    dtype: str
    signature: tuple            # ((tensor name, shape), ...) sorted by name
    network: dict               # network config stored in the file
    step: Optional[int] = None
    batch_size: Optional[int] = None


def snapshot_dir_of(path):
    """RUN_DIR/snapshots when `path` is a run directory, else `path` itself."""
    path = os.fspath(path)
    candidate = os.path.join(path, SNAPSHOT_DIR)
    return candidate if os.path.isdir(candidate) else path


def run_dir_of(path):
    """The run directory for a run directory or its snapshots/ folder."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(os.path.join(path, SNAPSHOT_DIR)):
        return path
    if os.path.basename(path) == SNAPSHOT_DIR:
        return os.path.dirname(path)
    return path


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0][:160] if lines else type(error).__name__


def _read_snapshot_record(path):
    try:
        with safe_open(path, framework="pt") as f:
            raw_meta = f.metadata() or {}
            signature = tuple(sorted((key, tuple(f.get_slice(key).get_shape())) for key in f.keys()))
    except Exception as e:  # safetensors raises its own types for truncated or garbled headers
        raise CheckpointError(f"{path}: unreadable or damaged snapshot ({_first_line(e)})") from None
    try:
        meta = {k: json.loads(v) for k, v in raw_meta.items()}
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: snapshot metadata is not valid JSON") from None
    if meta.get("format") != NETWORK_FORMAT or meta.get("kind") != SNAPSHOT_KIND:
        raise CheckpointError(f"{path}: not an mpdiff EMA snapshot (format {meta.get('format')!r}, "
                              f"kind {meta.get('kind')!r})")
    nimg, sigma_rel = meta.get("nimg"), meta.get("sigma_rel")
    if not isinstance(nimg, int) or nimg < 0 or not isinstance(sigma_rel, (int, float)) \
            or not 0 < sigma_rel < SIGMA_REL_MAX or not isinstance(meta.get("network"), dict):
        raise CheckpointError(f"{path}: snapshot metadata needs integer nimg >= 0, sigma_rel in (0, 0.2887) and a "
                              f"network config; got nimg={nimg!r}, sigma_rel={sigma_rel!r}")
    match = _SNAPSHOT_NAME.fullmatch(os.path.basename(path))
    if match and (int(match.group(1)) != nimg or match.group(2) != f"{sigma_rel:.3f}"):
        raise CheckpointError(f"{path}: file name does not match its metadata (nimg={nimg}, sigma_rel={sigma_rel})")
    return SnapshotRecord(path=path, nimg=nimg, sigma_rel=float(sigma_rel), dtype=str(meta.get("dtype")),
                          signature=signature, network=meta["network"], step=meta.get("step"),
                          batch_size=meta.get("batch_size"))


def list_snapshots(path):
    """All EMA snapshots (``ema-*.safetensors``) of a run directory or snapshot directory, checked for consistency.

    Reads every file's header (not the tensors). Returns SnapshotRecords sorted by (nimg, sigma_rel);
    raises CheckpointError naming the file for: no snapshots, a damaged or foreign file, a repeated
    (nimg, sigma_rel), a different network config, different tensor names/shapes, or a different dtype.
    """
    directory = snapshot_dir_of(path)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such directory; expected a run directory with snapshots/ in it")
    names = sorted(name for name in os.listdir(directory)
                   if name.startswith("ema-") and name.endswith(".safetensors"))
    if not names:
        raise CheckpointError(f"{directory}: no EMA snapshots (ema-*.safetensors) found")
    records = sorted((_read_snapshot_record(os.path.join(directory, name)) for name in names),
                     key=lambda r: (r.nimg, r.sigma_rel))
    first = records[0]
    seen = {}
    for record in records:
        key = (record.nimg, round(record.sigma_rel, 9))
        if key in seen:
            raise CheckpointError(f"{record.path}: duplicates the snapshot nimg={record.nimg}, "
                                  f"sigma_rel={record.sigma_rel} of {seen[key]}")
        seen[key] = record.path
        if record.network != first.network:
            raise CheckpointError(f"{record.path}: network config differs from {first.path}")
        if record.signature != first.signature:
            ours, theirs = dict(record.signature), dict(first.signature)
            diff = sorted(set(ours) ^ set(theirs)) or sorted(k for k in ours if ours[k] != theirs[k])
            raise CheckpointError(f"{record.path}: tensor names/shapes differ from {first.path} (e.g. {diff[0]})")
        if record.dtype != first.dtype:
            raise CheckpointError(f"{record.path}: stored as {record.dtype} but {first.path} is {first.dtype}; "
                                  f"all snapshots must share one dtype")
    return records


# ------------------------------------------------------------------------------------------------
# Post-hoc reconstruction.


def _target_sigma_rels(sigma_rels):
    values = [sigma_rels] if np.isscalar(sigma_rels) else list(sigma_rels)
    if not values:
        raise ConfigError("no target sigma_rel given")
    values = sorted(set(float(v) for v in values))
    _check_sigma_rel(values)
    names = [f"{v:.3f}" for v in values]
    for a, b in zip(names, names[1:]):
        if a == b:
            raise ConfigError(f"target sigma_rels {values} collide in file names ({a}); use 3 decimals")
    return values


def select_inputs(records, at_nimg=None):
    """(at_nimg, inputs): the reconstruction time and the snapshots with 0 < nimg <= at_nimg."""
    last = records[-1].nimg
    if at_nimg is None:
        at_nimg = last
    if isinstance(at_nimg, bool) or not float(at_nimg).is_integer() or not 0 < at_nimg <= last:
        raise ConfigError(f"reconstruction time {at_nimg} images must be an integer in (0, {last}] "
                          f"(the last snapshot time)")
    at_nimg = int(at_nimg)
    inputs = [r for r in records if 0 < r.nimg <= at_nimg]
    if not inputs:
        raise ConfigError(f"no snapshot with 0 < nimg <= {at_nimg}; need at least one to reconstruct from")
    return at_nimg, inputs


def _prefetch(path):
    """Ask the OS to start reading a file in the background (overlaps I/O with accumulation)."""
    if hasattr(os, "posix_fadvise"):
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass


def reconstruct(run_dir, sigma_rels, at_nimg=None, out_dir=None, batch_outputs=8, dtype="float32", progress=True):
    """Post-hoc EMA: write network files for new profiles `sigma_rels` at time `at_nimg`; returns their paths.

    * Inputs are all snapshots with 0 < nimg <= at_nimg. `at_nimg` (images) defaults to the last snapshot
      time; any integer time up to it is allowed, and then only the snapshots at or before it are used
      (the profile ends at at_nimg, so later snapshots carry weights it must not see).
    * Targets are processed in groups of `batch_outputs`; each group reads every input once, one file
      at a time, and accumulates ``out_j += x_ij * theta_i`` in float32 (memory: the group's float32
      outputs + about one snapshot).
    * Floating tensors that are bit-identical in every input (buffers such as MPFourier frequencies,
      frozen parameters) are copied verbatim from the first input instead of averaged; all other
      floating tensors are averaged; integer tensors are taken from the latest input.
    * Outputs ``phema-{nimg:012d}-{sigma_rel:.3f}.safetensors`` go to `out_dir` (default RUN_DIR/phema)
      as network files with kind "phema-reconstruction", the coefficients and the input names.
    """
    targets = _target_sigma_rels(sigma_rels)
    storage_dtype(dtype)
    if int(batch_outputs) < 1:
        raise ConfigError(f"batch_outputs must be >= 1, got {batch_outputs}")
    records = list_snapshots(run_dir)
    at_nimg, inputs = select_inputs(records, at_nimg)
    coefficients = solve_posthoc_coefficients([r.nimg for r in inputs], [r.sigma_rel for r in inputs],
                                              at_nimg, targets)
    if not np.all(np.isfinite(coefficients)):
        raise ConfigError("post-hoc EMA coefficients are not finite (snapshot profiles too similar to solve)")
    out_dir = os.path.join(run_dir_of(run_dir), PHEMA_DIR) if out_dir is None else os.fspath(out_dir)
    network = inputs[0].network
    groups = [list(range(start, min(start + int(batch_outputs), len(targets))))
              for start in range(0, len(targets), int(batch_outputs))]

    paths = []
    with tqdm(total=len(groups) * len(inputs), unit="file", desc="phema", disable=not progress) as bar:
        for group in groups:
            weights = torch.from_numpy(coefficients[:, group]).to(torch.float32)  # [inputs, group]
            sums = {}           # key -> float32 [len(group), numel]: all outputs of the group, stacked
            shapes = {}
            verbatim = {}       # key -> tensor of the first input, while identical in every input so far
            latest = {}         # non-floating tensors of the latest input
            for i, record in enumerate(inputs):
                if i + 1 < len(inputs):
                    _prefetch(inputs[i + 1].path)
                column = weights[i].reshape(-1, 1)
                try:
                    with safe_open(record.path, framework="pt") as f:
                        for key in f.keys():
                            tensor = f.get_tensor(key)
                            if not tensor.is_floating_point():
                                latest[key] = tensor
                                continue
                            if i == 0:
                                verbatim[key] = tensor
                                shapes[key] = tensor.shape
                            elif key in verbatim and not torch.equal(verbatim[key], tensor):
                                del verbatim[key]
                            value = tensor.to(torch.float32).reshape(1, -1)
                            if i == 0:
                                sums[key] = column * value
                            else:
                                sums[key].addcmul_(column, value)  # out_j += x_ij * theta_i, one pass for the group
                except Exception as e:  # the file changed or broke after it was listed
                    raise CheckpointError(f"{record.path}: damaged snapshot ({_first_line(e)})") from None
                bar.update(1)
            for row, j in enumerate(group):
                state = {key: verbatim[key] if key in verbatim else total[row].reshape(shapes[key])
                         for key, total in sums.items()}
                state.update(latest)
                path = os.path.join(out_dir, phema_name(at_nimg, targets[j]))
                save_network(path, state, network, dtype=dtype, nimg=at_nimg, sigma_rel=targets[j],
                             kind=RECONSTRUCTION_KIND, coefficients=[float(c) for c in coefficients[:, j]],
                             inputs=[os.path.basename(r.path) for r in inputs])
                paths.append(path)
            del sums, verbatim, latest
    return paths
