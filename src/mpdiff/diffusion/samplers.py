"""Samplers of the probability-flow ODE (SPEC §6.2-6.3). Each has the signature
``sampler(denoise, x, sigmas, labels=None, progress=False, ...)`` where ``denoise(x, sigma, labels)``
is any denoiser: a network, or a guided combination (:mod:`mpdiff.diffusion.guidance`)."""

import math

import torch
from tqdm.auto import tqdm


def sample_heun(denoise, x, sigmas, labels=None, progress=False, S_churn=0.0, S_min=0.0,
                S_max=float("inf"), S_noise=1.0, noise_fn=None, callback=None):
    """EDM Algorithm 1 (deterministic by default), starting from x = noise * sigmas[0].

    NFE = 2N - 1 for N steps (no correction on the last step to sigma = 0). With S_churn > 0,
    noise is added before each step (EDM Algorithm 2); `noise_fn(shape)` supplies it so per-image
    generators stay independent of batching. `callback(i, x)` is called after step i (0-based).
    """
    num_steps = len(sigmas) - 1
    x = x.to(torch.float64)
    for i in tqdm(range(num_steps), disable=not progress, desc="sampling", leave=False):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        t_hat = t_cur * (1 + _churn(S_churn, num_steps, t_cur, S_min, S_max))
        if t_hat != t_cur:  # raise the noise level from t_cur to t_hat with fresh noise
            eps = noise_fn(x.shape) if noise_fn is not None else torch.randn_like(x)
            x = x + (t_hat ** 2 - t_cur ** 2) ** 0.5 * S_noise * eps.to(x)
        d = (x - _call(denoise, x, t_hat, labels)) / t_hat
        x_next = x + (t_next - t_hat) * d
        if i < num_steps - 1:
            d_next = (x_next - _call(denoise, x_next, t_next, labels)) / t_next
            x_next = x + (t_next - t_hat) * (d + d_next) / 2
        x = x_next
        if callback is not None:
            callback(i, x)
    return x


def _churn(S_churn, num_steps, sigma, S_min, S_max):
    """EDM's gamma_i: the relative noise increase of a step, capped at sqrt(2) - 1; 0 outside [S_min, S_max]."""
    inside = S_min <= sigma <= S_max
    return min(S_churn / num_steps, math.sqrt(2) - 1) if S_churn > 0 and inside else 0.0


def _call(denoise, x, sigma, labels):
    sigma_t = torch.full([x.shape[0]], sigma, dtype=torch.float32, device=x.device)
    return denoise(x.to(torch.float32), sigma_t, labels).to(torch.float64)
