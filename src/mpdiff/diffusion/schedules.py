"""Noise-level schedules for sampling (SPEC §6.1)."""

import torch

from mpdiff.config import EDM2_STEPS, SAMPLING


def edm_sigmas(num_steps=EDM2_STEPS, sigma_min=SAMPLING.sigma_min, sigma_max=SAMPLING.sigma_max,
               rho=SAMPLING.rho, device="cpu"):
    """t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then t_N = 0."""
    if num_steps < 1:
        raise ValueError("num_steps must be at least 1")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    if num_steps == 1:
        t = torch.full([1], float(sigma_max), dtype=torch.float64, device=device)
    else:
        t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])
