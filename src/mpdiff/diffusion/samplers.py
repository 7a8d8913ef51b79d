"""Samplers of the probability-flow ODE (SPEC §6.2-6.3): Euler (first order) and Heun (second order,
EDM Algorithm 1, the default), each optionally stochastic with EDM's churn (Algorithm 2).

Every sampler has the signature ``sampler(denoise, x, sigmas, labels=None, *, churn..., noise_fn,
callback, progress)``, where ``denoise(x, sigma, labels)`` is any denoiser: a network, or a guided
combination (:mod:`mpdiff.diffusion.guidance`). ``x`` starts at ``noise * sigmas[0]``; the state is kept
in float64 and the denoiser sees float32.
"""

import math
from typing import NamedTuple, Optional

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


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}

nfe = network_evaluations  # denoiser evaluations of one sample (a guided denoiser counts once, as in the paper)


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
        t_hat = t_cur * (1 + churn_gamma(S_churn, num_steps, t_cur, S_min, S_max))
        if t_hat != t_cur:
            eps = noise_fn(x.shape) if noise_fn is not None else torch.randn_like(x)
            x = x + (t_hat ** 2 - t_cur ** 2) ** 0.5 * S_noise * eps.to(x)
        denoised = _call(denoise, x, t_hat, labels)
        d = (x - denoised) / t_hat
        x_next = x + (t_next - t_hat) * d
        if second_order and i < num_steps - 1:
            d_next = (x_next - _call(denoise, x_next, t_next, labels)) / t_next
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
