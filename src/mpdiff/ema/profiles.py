"""Power-function EMA math, pure and in float64 (SPEC §5.1-5.5; paper Appendix C).

sigma_rel <-> gamma, the per-update decay beta, the closed-form inner product of two power
profiles, the least-squares coefficients that combine snapshots into a new profile, and the
relation between a traditional EMA's half-life and sigma_rel. Time is measured in training images.
"""

import math

import numpy as np

from mpdiff.config import check_sigma_rels
from mpdiff.errors import ConfigError

# ------------------------------------------------------------------------------------------------
# Profile math (pure, float64).


def sigma_rel_to_gamma(sigma_rel):
    """Exponent gamma of the power profile with relative std `sigma_rel` (Eq. 126, Alg. 2).

    gamma is the largest real root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2).
    """
    sigma_rel = check_sigma_rels(sigma_rel)
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
# nearly all the mass sits on theta(0) and sigma_rel -> 0 again; sigma_rel peaks at 0.3601 for
# x = 1.1265 (h = 0.6153 t): no traditional EMA is wider.

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
