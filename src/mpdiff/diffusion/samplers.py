"""Samplers of the probability-flow ODE (SPEC §6.2-6.3) with one signature.

* ``euler`` (first order) and ``heun`` (second order, EDM Algorithm 1, the default), each optionally
  stochastic with EDM's churn (Algorithm 2);
* ``dpmpp-2m`` and ``dpmpp-3m``: DPM-Solver++ multistep solvers (Lu et al. 2022, arXiv 2211.01095) in
  data prediction, one evaluation per step, second and third order;
* ``dpmpp-2m-sde``: the stochastic DPM-Solver++(2M) (the same paper's SDE solver), fresh noise each step;
* ``unipc``: UniPC with B(h) = e^h - 1 ("bh2"; Zhao et al. 2023, arXiv 2302.04867): the 2M predictor
  and a corrector that reuses the next step's evaluation, third order at one evaluation per step.

Every sampler has the signature ``sampler(denoise, x, sigmas, labels=None, *, churn..., noise_fn,
callback, progress)``, where ``denoise(x, sigma, labels)`` is any denoiser: a network, or a guided
combination (:mod:`mpdiff.diffusion.guidance`). ``x`` starts at ``noise * sigmas[0]``; the state is kept
in float64 and the denoiser sees float32. A denoiser with a ``for_step(sigma)`` method (a guided one with
a guidance interval) is asked for the denoiser of each step, by the level the step starts from, and
that one makes all of the step's evaluations. The last step, to sigma = 0, is x = D(x; sigma_{N-1})
in every sampler.
"""

import math
from typing import NamedTuple, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from mpdiff.config import network_evaluations


class Step(NamedTuple):
    """What a per-step callback receives after step `index` (0-based) went from `sigma` to `sigma_next`."""
    index: int
    sigma: float          # the level the step started from (after churn, if any)
    sigma_next: float
    x: torch.Tensor       # the state at sigma_next (float64)
    denoised: torch.Tensor  # the denoiser's estimate at `sigma` (float64): a preview of the final image


def sample_euler(denoise, x, sigmas, labels=None, **options):
    """First-order steps: x <- x + (t_next - t) (x - D(x; t)) / t. NFE = N for N steps."""
    return _integrate(denoise, x, sigmas, labels, second_order=False, **options)


def sample_heun(denoise, x, sigmas, labels=None, **options):
    """EDM Algorithm 1: Euler step, then the trapezoidal correction at t_next, except on the last step
    to sigma = 0. NFE = 2N - 1 for N steps."""
    return _integrate(denoise, x, sigmas, labels, second_order=True, **options)


def sample_dpmpp_2m(denoise, x, sigmas, labels=None, **options):
    """DPM-Solver++(2M): with lambda = -log sigma and h = lambda_{i+1} - lambda_i,
    x <- (sigma_{i+1}/sigma_i) x + (1 - e^-h) [(1 + 1/(2r)) D_i - D_{i-1}/(2r)], r = h_{i-1}/h; the
    first step is first order (DPM-Solver++1, i.e. DDIM). NFE = N for N steps."""
    return _multistep(denoise, x, sigmas, labels, "2m", **options)


def sample_dpmpp_3m(denoise, x, sigmas, labels=None, **options):
    """DPM-Solver++(3M): the data prediction D(lambda) interpolated through the last three evaluations
    and integrated exactly against e^-(lambda_{i+1} - lambda); first and second order on the first two
    steps. NFE = N for N steps."""
    return _multistep(denoise, x, sigmas, labels, "3m", **options)


def sample_dpmpp_2m_sde(denoise, x, sigmas, labels=None, **options):
    """SDE-DPM-Solver++(2M): x <- (sigma_{i+1}/sigma_i) e^-h x + (1 - e^-2h) [D_i + (D_i - D_{i-1})/(2r)]
    + sigma_{i+1} sqrt(1 - e^-2h) S_noise z, z from `noise_fn` (each seed's own stream). NFE = N."""
    return _multistep(denoise, x, sigmas, labels, "2m-sde", **options)


def sample_unipc(denoise, x, sigmas, labels=None, **options):
    """UniPC-bh2 with the 2M predictor (UniP-2) and the corrector UniC through the new evaluation (third
    order); the corrected state is not evaluated again: the next step starts from the evaluation at
    the predicted state. NFE = N for N steps."""
    return _multistep(denoise, x, sigmas, labels, "unipc", **options)


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp-2m": sample_dpmpp_2m, "dpmpp-3m": sample_dpmpp_3m,
            "dpmpp-2m-sde": sample_dpmpp_2m_sde, "unipc": sample_unipc}

nfe = network_evaluations  # denoiser evaluations of one sample (a guided denoiser counts once, as in the paper)


def step_denoiser(denoise, sigma):
    """The denoiser of a step starting at level `sigma`: ``denoise.for_step(sigma)`` when it has one
    (a guidance interval), else `denoise`."""
    for_step = getattr(denoise, "for_step", None)
    return denoise if for_step is None else for_step(sigma)


def _integrate(denoise, x, sigmas, labels, second_order, S_churn=0.0, S_min=0.0, S_max=None, S_noise=1.0,
               noise_fn=None, callback=None, progress=False):
    """The shared loop. With S_churn > 0, before each step whose level lies in [S_min, S_max] the level
    is raised from t to t_hat = t (1 + gamma) by adding fresh noise of std sqrt(t_hat^2 - t^2) S_noise
    (EDM Algorithm 2); `noise_fn(shape)` supplies that noise so per-image generators keep images
    independent of their batch. S_max None means no upper bound."""
    num_steps = len(sigmas) - 1
    x = x.to(torch.float64)
    for i in tqdm(range(num_steps), disable=not progress, desc="sampling", leave=False):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        step = step_denoiser(denoise, t_cur)
        t_hat = t_cur * (1 + churn_gamma(S_churn, num_steps, t_cur, S_min, S_max))
        if t_hat != t_cur:
            eps = noise_fn(x.shape) if noise_fn is not None else torch.randn_like(x)
            x = x + (t_hat ** 2 - t_cur ** 2) ** 0.5 * S_noise * eps.to(x)
        denoised = _call(step, x, t_hat, labels)
        d = (x - denoised) / t_hat
        x_next = x + (t_next - t_hat) * d
        if second_order and i < num_steps - 1:
            d_next = (x_next - _call(step, x_next, t_next, labels)) / t_next
            x_next = x + (t_next - t_hat) * (d + d_next) / 2
        x = x_next
        if callback is not None:
            callback(Step(i, t_hat, t_next, x, denoised))
    return x


def churn_gamma(S_churn, num_steps, sigma, S_min=0.0, S_max: Optional[float] = None):
    """EDM's gamma_i: the relative noise increase of a step, min(S_churn / N, sqrt(2) - 1) inside
    [S_min, S_max], else 0."""
    inside = S_min <= sigma and (S_max is None or sigma <= S_max)
    return min(S_churn / num_steps, math.sqrt(2) - 1) if S_churn > 0 and inside else 0.0


def _call(denoise, x, sigma, labels):
    sigma_t = torch.full([x.shape[0]], sigma, dtype=torch.float32, device=x.device)
    return denoise(x.to(torch.float32), sigma_t, labels).to(torch.float64)


# ---- exponential integrators in lambda = -log sigma ------------------------------------------------------
#
# The ODE dx/dsigma = (x - D)/sigma is, in lambda = -log sigma, dx/dlambda = D - x, whose solution over a
# step h = lambda_{i+1} - lambda_i is exactly
#     x_{i+1} = e^-h x_i + integral_0^h e^-(h-u) D(lambda_i + u) du.
# With D expanded around lambda_i, D(lambda_i + u) = sum_k D^(k) u^k / k!, the integral is
# sum_k psi_k(h) D^(k), psi_k(h) = integral_0^h e^-(h-u) u^k / k! du. A multistep solver replaces the
# derivatives by differences of the evaluations it has: sum_m c_m (D_m - D_i), D_m at lambda_i + r_m h,
# with sum_m c_m (r_m h)^k / k! = psi_k(h) for k = 1..K (exact for D a polynomial of degree K, hence a
# local error O(h^(K+2)) and a global order K + 1).


def psi(k, h):
    """psi_k(h) = integral_0^h e^-(h-u) u^k / k! du: psi_0 = 1 - e^-h, psi_k = h^k/k! - psi_{k-1}; by its
    series sum_n (-h)^n h^(k+1) / (n+k+1)! for h < 1, where the recursion would cancel."""
    if h < 1:
        term, total = h ** (k + 1) / math.factorial(k + 1), 0.0
        for n in range(40):
            total += term
            term *= -h / (n + k + 2)
        return total
    value = -math.expm1(-h)
    for j in range(1, k + 1):
        value = h ** j / math.factorial(j) - value
    return value


def difference_weights(h, offsets):
    """The c_m of `offsets` r_m (earlier evaluations r < 0, the step's end r = 1) that integrate the
    interpolating polynomial of D exactly: sum_m c_m r_m^k = k! psi_k(h) / h^k, k = 1..K."""
    rows = np.array([[r ** k for r in offsets] for k in range(1, len(offsets) + 1)], dtype=np.float64)
    rhs = np.array([math.factorial(k) * psi(k, h) / h ** k for k in range(1, len(offsets) + 1)])
    return np.linalg.solve(rows, rhs).tolist()


def _multistep(denoise, x, sigmas, labels, method, S_churn=0.0, S_min=0.0, S_max=None, S_noise=1.0,
               noise_fn=None, callback=None, progress=False):
    """The multistep solvers' loop: one evaluation per step, at the state the step starts from (UniPC:
    at the predicted state, which the corrector then improves); earlier evaluations kept as
    (lambda, D). EDM's churn is the Euler and Heun samplers' (dpmpp-2m-sde is the stochastic one)."""
    if S_churn > 0:
        raise ValueError(f"S_churn is EDM's stochastic sampler, for euler and heun; {method!r} takes none")
    num_steps = len(sigmas) - 1
    x = x.to(torch.float64)
    history = []   # (lambda, D) of the earlier evaluations, the newest last (at most two)
    start = None   # UniPC: (x, lambda, h) of the step that led to x, to correct it once D(x) is known
    for i in tqdm(range(num_steps), disable=not progress, desc="sampling", leave=False):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _call(step_denoiser(denoise, t_cur), x, t_cur, labels)
        lam = -math.log(t_cur)
        if method == "unipc" and start is not None:
            x = _unipc_correct(*start, history, denoised)
        if t_next == 0:  # to sigma = 0: x + (0 - t)(x - D)/t = D, in every solver
            x_next = denoised
        else:
            h = -math.log(t_next) - lam
            x_next = _step(method, x, denoised, lam, h, t_cur, t_next, history, S_noise, noise_fn)
            start = (x, lam, h)
        history = (history + [(lam, denoised)])[-2:]
        x = x_next
        if callback is not None:
            callback(Step(i, t_cur, t_next, x, denoised))
    return x


def _step(method, x, denoised, lam, h, sigma, sigma_next, history, S_noise, noise_fn):
    """One (predictor) step from `sigma` = e^-lam to `sigma_next` = e^-(lam + h)."""
    ratio = sigma_next / sigma
    if method == "2m-sde":  # dx = 2 (D - x) dlambda + noise: decay at rate 2, noise std sigma_next sqrt(1 - e^-2h)
        rate = -math.expm1(-2 * h)
        x_next = ratio * math.exp(-h) * x + rate * denoised
        if history:
            r = (lam - history[-1][0]) / h
            x_next = x_next + rate / (2 * r) * (denoised - history[-1][1])
        eps = noise_fn(x.shape) if noise_fn is not None else torch.randn_like(x)
        return x_next + sigma_next * math.sqrt(rate) * S_noise * eps.to(x)
    x_next = ratio * x + psi(0, h) * denoised
    if not history:  # the first step: first order (DPM-Solver++1, i.e. DDIM)
        return x_next
    if method in ("2m", "unipc"):  # the paper's 2M: (1 - e^-h) / (2r) where psi_1(h) / h would be exact
        r = (lam - history[-1][0]) / h
        return x_next + psi(0, h) / (2 * r) * (denoised - history[-1][1])
    offsets = [(l - lam) / h for l, _ in history]  # 3m: the one or two earlier evaluations, weighted exactly
    for c, (_, d) in zip(difference_weights(h, offsets), history):
        x_next = x_next + c * (d - denoised)
    return x_next


def _unipc_correct(x, lam, h, history, denoised_next):
    """UniC: the step from (x, lam) again, with D interpolated through the evaluation at its end
    (`denoised_next`, r = 1) as well as its start and the one before; with no earlier one, the bh2
    rule B(h)/2 = (1 - e^-h)/2 for the single difference."""
    (lam_i, d_i), earlier = history[-1], history[-2:-1]
    x_next = math.exp(-h) * x + psi(0, h) * d_i
    if not earlier:
        return x_next + psi(0, h) / 2 * (denoised_next - d_i)
    offsets = [(earlier[0][0] - lam_i) / h, 1.0]
    c_prev, c_next = difference_weights(h, offsets)
    return x_next + c_prev * (earlier[0][1] - d_i) + c_next * (denoised_next - d_i)
