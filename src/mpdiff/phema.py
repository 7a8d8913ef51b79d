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

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import re
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import NETWORK_FORMAT, save_network, storage_dtype
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write
from .threads import torch_threads

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


# Bytes per element of the safetensors dtypes that torch tensors can have.
_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                         "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_MAX_HEADER_BYTES = 100 * 2 ** 20       # safetensors' own limit on the JSON header


def _read_safetensors_header(path):
    """(data_start, tensors, metadata) of a safetensors file, reading only its header.

    The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data_offsets
    relative to the data section; "__metadata__" -> str -> str) and the data section. Checked as safetensors
    checks on opening: the tensors must tile the data section exactly, so a truncated file is refused.
    (safetensors' safe_open checks the same, but on a cold page cache it faults in far more than the
    header: 5 ms per 10 MB snapshot against 0.2 ms, so listing cost most of a full read of the files.)
    Raises ValueError, KeyError, TypeError or OSError.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("file is shorter than the safetensors header length")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"header length {header_len} does not fit in the file ({size} bytes)")
        tensors = json.loads(f.read(header_len).decode("utf-8"))
    if not isinstance(tensors, dict):
        raise ValueError("header is not a JSON object")
    metadata = tensors.pop("__metadata__", None) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("header metadata is not a string -> string map")
    data_end = 0
    for name, entry in sorted(tensors.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, end = (int(o) for o in entry["data_offsets"])
        if entry["dtype"] not in _SAFETENSORS_ITEMSIZE:
            raise ValueError(f"tensor {name} has unknown dtype {entry['dtype']!r}")
        if begin != data_end or end - begin != math.prod(entry["shape"]) * _SAFETENSORS_ITEMSIZE[entry["dtype"]]:
            raise ValueError(f"tensor {name} has inconsistent data offsets {entry['data_offsets']}")
        data_end = end
    if 8 + header_len + data_end != size:
        raise ValueError(f"file has {size} bytes but its header describes {8 + header_len + data_end} "
                         f"(truncated or extended)")
    return 8 + header_len, tensors, metadata


def _read_snapshot_record(path):
    try:
        _, tensors, raw_meta = _read_safetensors_header(path)
        signature = tuple(sorted((key, tuple(int(d) for d in entry["shape"])) for key, entry in tensors.items()))
    except Exception as e:  # any way a header can be garbled
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


# Streaming: a pass reads every input byte once, one element range of one tensor from all inputs together,
# mixes all its targets from that [inputs x range] block with one matmul (float64 accumulation, so the
# result does not depend on how targets are grouped, and large alternating coefficients lose nothing) and
# appends each target's range to its output file. Every output byte is thus written once and never held
# whole in memory; that is what keeps many targets cheap. A reader thread fetches the next range while the
# current one is mixed; the files are finished (fsync, rename) several at once.

_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_OPEN_INPUTS = 256                  # files kept open at once; any further inputs are reopened for each read
_MIN_READ_BYTES = 64 * 2 ** 10          # per input and range: tiny networks would otherwise do tiny reads
_MAX_READ_BYTES = 16 * 2 ** 20          # per input and range
_MIX_BLOCK_BYTES = 2 ** 20              # float64 [inputs x columns] block per matmul: stays in the CPU cache
_FINISHERS = 8                          # output files fsync'ed at once (their fsyncs overlap)


@dataclasses.dataclass(frozen=True)
class _TensorSpan:
    dtype: torch.dtype
    shape: tuple
    begin: int                          # byte offsets relative to the start of the data section
    end: int

    @property
    def numel(self):
        return math.prod(self.shape)


def _float_tensor_spans(path):
    """(data_start, {name: _TensorSpan}) for the floating tensors of a snapshot file, from its header."""
    try:
        data_start, tensors, _ = _read_safetensors_header(path)
        spans = {name: _TensorSpan(_FLOAT_DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"]),
                                   *(int(o) for o in entry["data_offsets"]))
                 for name, entry in tensors.items() if entry["dtype"] in _FLOAT_DTYPES}
    except Exception as e:  # the file changed or broke after it was listed
        raise CheckpointError(f"{path}: damaged snapshot ({_first_line(e)})") from None
    return data_start, spans


class _InputReader:
    """Reads element ranges of the floating tensors of many snapshot files with pread.

    The first `max_open` files stay open (hundreds of snapshots would exhaust file descriptors); the
    others are reopened for every read. Safe to use from two threads.
    """

    def __init__(self,
        paths,                              # Snapshot files, in input order.
        max_open,                           # How many of them stay open between reads.
    ):
        self.paths = list(paths)
        self.fds = {}
        self.data_starts, self.spans = [], []
        try:
            for index, path in enumerate(self.paths):
                data_start, spans = _float_tensor_spans(path)
                if not self.spans or spans == self.spans[0]:
                    spans = self.spans[0] if self.spans else spans      # the usual case: share one dict
                elif {k: (v.dtype, v.shape) for k, v in spans.items()} != \
                        {k: (v.dtype, v.shape) for k, v in self.spans[0].items()}:
                    raise CheckpointError(f"{path}: floating tensors differ in name, shape or dtype "
                                          f"from {self.paths[0]}")
                self.data_starts.append(data_start)
                self.spans.append(spans)
                if index < max_open:
                    self.fds[index] = self._open(index)
        except BaseException:
            self.close()
            raise

    def _open(self, index):
        try:
            return os.open(self.paths[index], os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{self.paths[index]}: cannot open snapshot ({e.strerror or e})") from None

    def _offset(self, index, name, first_element):
        span = self.spans[index][name]
        return self.data_starts[index] + span.begin + first_element * span.dtype.itemsize

    def read(self, index, name, first_element, buffer):
        """Fill `buffer` (writable, contiguous) with tensor `name` of input `index` from `first_element` on."""
        fd = self.fds.get(index)
        own = fd is None
        fd = self._open(index) if own else fd
        try:
            view, offset, done = memoryview(buffer), self._offset(index, name, first_element), 0
            while done < len(view):
                count = os.preadv(fd, [view[done:]], offset + done)
                if count == 0:
                    raise OSError(f"file ends inside tensor {name}")
                done += count
        except OSError as e:  # the file changed or broke after it was listed
            raise CheckpointError(f"{self.paths[index]}: damaged snapshot ({e.strerror or e})") from None
        finally:
            if own:
                os.close(fd)

    def prefetch(self, name, first_element, count):
        """Ask the OS to read the same range of every open input in the background (one deep I/O queue)."""
        if hasattr(os, "posix_fadvise"):
            for index, fd in self.fds.items():
                nbytes = count * self.spans[index][name].dtype.itemsize
                with contextlib.suppress(OSError):  # only a hint; read() reports real problems
                    os.posix_fadvise(fd, self._offset(index, name, first_element), nbytes, os.POSIX_FADV_WILLNEED)

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def _mix(weights, stack, out):
    """out[T, n] (float32) = weights[T, N] (float64) @ stack[N, n], in cache-sized float64 blocks."""
    block = max(256, _MIX_BLOCK_BYTES // (8 * stack.shape[0]))
    for start in range(0, stack.shape[1], block):
        out[:, start:start + block] = weights @ stack[:, start:start + block].to(torch.float64)


def _all_equal(stack):
    """Whether every row of [N, n] equals the first; trained weights are rejected on their first element."""
    rows = range(1, stack.shape[0])
    return all(torch.equal(stack[0, :1], stack[i, :1]) for i in rows) and \
        all(torch.equal(stack[0], stack[i]) for i in rows)


def _ranges(count, step):
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def _file_order(spans):
    return sorted(spans, key=lambda name: spans[name].begin)


def _stream_pass(reader, weights, range_elements, on_bytes, emit):
    """One pass over all inputs; calls emit(block) with each float32 [T, range] block of the outputs.

    Ranges come tensor by tensor in the inputs' file order (so reads are sequential), each tensor's in
    order. For each: read the range of every input into one [N, range] block, then mix all targets at
    once, or copy it if it is bit-identical in every input (buffers, frozen weights: exact even for
    inf; the float64 mix would give the same finite values). Two input blocks, one being mixed and one
    being filled by a background thread, and one output block. `on_bytes(n)` feeds the progress bar.
    """
    num_inputs = len(reader.paths)
    spans = reader.spans[0]
    plan = [(name, a, b) for name in _file_order(spans) for a, b in _ranges(spans[name].numel, range_elements)]
    itemsize = max((span.dtype.itemsize for span in spans.values()), default=1)
    blocks = [torch.empty(num_inputs, range_elements * itemsize, dtype=torch.uint8) for _ in range(2)]
    mixed = torch.empty(weights.shape[0], range_elements, dtype=torch.float32)

    def gather(name, a, b, block):
        nbytes = (b - a) * spans[name].dtype.itemsize
        reader.prefetch(name, a, b - a)
        rows = block.numpy()
        for index in range(num_inputs):
            reader.read(index, name, a, rows[index, :nbytes])
        return block[:, :nbytes].view(spans[name].dtype)           # [N, b - a]

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as background:
        pending = background.submit(gather, *plan[0], blocks[0]) if plan else None
        for step, (name, a, b) in enumerate(plan):
            stack = pending.result()
            if step + 1 < len(plan):
                pending = background.submit(gather, *plan[step + 1], blocks[(step + 1) % 2])
            on_bytes(stack.numel() * stack.element_size())
            out = mixed[:, :b - a]
            if _all_equal(stack):
                out[:] = stack[0]                                   # identical in every input: copied exactly
            else:
                _mix(weights, stack, out)
            emit(out)


_STORAGE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # safetensors names of storage dtypes


def _raw_tensors(path, keep):
    """{name: (safetensors dtype, shape, bytes)} of the tensors of a snapshot file for which keep(dtype) holds."""
    try:
        data_start, tensors, _ = _read_safetensors_header(path)
        raw = {}
        with open(path, "rb") as f:
            for name, entry in tensors.items():
                if keep(entry["dtype"]):
                    begin, end = (int(o) for o in entry["data_offsets"])
                    f.seek(data_start + begin)
                    data = f.read(end - begin)
                    if len(data) != end - begin:
                        raise ValueError(f"file ends inside tensor {name}")
                    raw[name] = (entry["dtype"], [int(d) for d in entry["shape"]], data)
    except Exception as e:  # the file changed or broke after it was listed
        raise CheckpointError(f"{path}: damaged snapshot ({_first_line(e)})") from None
    return raw


def _network_header(shapes, raw, network, dtype, **metadata):
    """Start (length prefix + JSON header) of the network file :func:`save_network` would write.

    Float tensors `shapes` (name -> shape, stored as `dtype`) come first, in this order, then the `raw`
    tensors (name -> (safetensors dtype, shape, bytes)). Same metadata, JSON-encoded value by value;
    header padded to 8 bytes like safetensors' own. Knowing the whole layout up front lets each output be
    written while it is computed, without holding it in memory or serialising a copy of it.
    """
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * storage_dtype(dtype).itemsize
        header[name] = {"dtype": _STORAGE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    for name, (code, shape, data) in raw.items():
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    meta = dict(metadata, format=NETWORK_FORMAT, network=dict(network), dtype=dtype)  # as save_network
    encoded = json.dumps({"__metadata__": {k: json.dumps(v) for k, v in meta.items()}, **header},
                         separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def _write_pass(reader, weights, paths, headers, raw, range_elements, dtype, on_bytes):
    """One pass: stream the outputs of len(paths) targets into their files, each started with its header and
    ended with the `raw` tensors. Each file is written atomically; an error before the pass is complete
    leaves none of its outputs."""
    target = storage_dtype(dtype)
    outputs = [atomic_write(path) for path in paths]
    with contextlib.ExitStack() as open_files:  # on an error every temporary output is removed
        files = [open_files.enter_context(output) for output in outputs]
        for f, header in zip(files, headers):
            f.write(header)

        def emit(block):
            block = block.to(target)
            for row, f in enumerate(files):
                f.write(block[row].view(torch.uint8).numpy())

        _stream_pass(reader, weights, range_elements, on_bytes, emit)
        for f in files:
            for _, _, data in raw.values():
                f.write(data)
        open_files.pop_all()  # complete: finished below, several at once so that their fsyncs overlap
    with concurrent.futures.ThreadPoolExecutor(max_workers=_FINISHERS) as finishing:
        finished = [finishing.submit(output.__exit__, None, None, None) for output in outputs]
    for future in finished:  # all have run (each removes its own temporary on failure); report the first error
        future.result()


def reconstruct(run_dir, sigma_rels, at_nimg=None, out_dir=None, batch_outputs=64, dtype="float32", progress=True):
    """Post-hoc EMA: write network files for new profiles `sigma_rels` at time `at_nimg`; returns their paths.

    * Inputs are all snapshots with 0 < nimg <= at_nimg. `at_nimg` (images) defaults to the last snapshot
      time; any integer time up to it is allowed, and then only the snapshots at or before it are used
      (the profile ends at at_nimg, so later snapshots carry weights it must not see).
    * Targets are processed in passes of up to `batch_outputs`. A pass reads every input byte once, one
      tensor range from all inputs at a time, mixes all its targets with one float64 matmul per range and
      appends the results to the pass's output files, which are open for the whole pass. Memory is about
      one snapshot, however many targets.
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
    groups = _ranges(len(targets), int(batch_outputs))

    reader = _InputReader([r.path for r in inputs], max_open=_MAX_OPEN_INPUTS)
    try:
        spans = reader.spans[0]
        latest = _raw_tensors(inputs[-1].path, keep=lambda code: code not in _FLOAT_DTYPES)  # integers: latest input
        shapes = {name: spans[name].shape for name in _file_order(spans)}
        snapshot_bytes = sum(span.end - span.begin for span in spans.values())
        # Elements per range: two input blocks [N, range] and the output block [T, range] hold about one snapshot.
        itemsize = max((span.dtype.itemsize for span in spans.values()), default=1)
        per_element = 2 * len(inputs) * itemsize + 4 * len(groups[0])
        range_elements = max(1, min(max(snapshot_bytes // per_element, _MIN_READ_BYTES // itemsize),
                                    _MAX_READ_BYTES // itemsize))

        paths = []
        with tqdm(total=len(groups) * len(inputs) * snapshot_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                  desc="phema", disable=not progress) as bar, torch_threads(1):
            for first, last in groups:
                weights = torch.from_numpy(np.ascontiguousarray(coefficients[:, first:last].T))  # [T, N] float64
                group_paths = [os.path.join(out_dir, phema_name(at_nimg, targets[j])) for j in range(first, last)]
                headers = [_network_header(shapes, latest, inputs[0].network, dtype, nimg=at_nimg,
                                           sigma_rel=targets[j], kind=RECONSTRUCTION_KIND,
                                           coefficients=[float(c) for c in coefficients[:, j]],
                                           inputs=[os.path.basename(r.path) for r in inputs])
                           for j in range(first, last)]
                _write_pass(reader, weights, group_paths, headers, latest, range_elements, dtype, bar.update)
                paths += group_paths
    finally:
        reader.close()
    return paths
