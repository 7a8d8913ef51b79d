"""The EDM2 training objective: noise-level distribution, EDM weighting and the learned-uncertainty
loss, or the plain EDM loss for a network without uncertainty head (SPEC §1.2-1.3)."""

import torch

from mpdiff.config import NetworkConfig, TrainingConfig

_RECIPE = TrainingConfig()
_SIGMA_DATA = NetworkConfig().sigma_data


def edm_weight(sigma, sigma_data=_SIGMA_DATA):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2  (Eq. 15)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def sample_sigma(batch, P_mean=_RECIPE.P_mean, P_std=_RECIPE.P_std, device="cpu", generator=None):
    """ln(sigma) ~ N(P_mean, P_std^2), one per sample (Eq. 16)."""
    return (torch.randn([batch], device=device, generator=generator) * P_std + P_mean).exp()


def edm2_loss(net, images, labels=None, sigma=None, noise=None, P_mean=_RECIPE.P_mean, P_std=_RECIPE.P_std):
    """Per-element training loss of a denoiser (SPEC §1.2).

    With a log-variance head u(sigma) (configs B-G) it is the learned-uncertainty loss
    (lambda / e^u) * (D(y + n) - y)^2 + u  (Eq. 21); without one (config A, whose network returns
    u = None) the plain EDM loss  lambda * (D(y + n) - y)^2  (Eq. 15).

    `sigma` ([N]) and `noise` (unit variance, shaped like `images`; scaled by sigma here) replace
    the random draws so that a step can be replayed exactly. Returns a tensor shaped like
    `images`; the trainer reduces it as sum / batch (SPEC §1.2).
    """
    n = images.shape[0]
    if sigma is None:
        sigma = sample_sigma(n, P_mean, P_std, device=images.device)
    sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    if noise is None:
        noise = torch.randn_like(images)
    sigma_data = getattr(net, "sigma_data", _SIGMA_DATA)
    denoised, logvar = net(images + noise * sigma, sigma, labels, return_logvar=True)
    if logvar is None:
        return edm_weight(sigma, sigma_data) * (denoised - images) ** 2
    return (edm_weight(sigma, sigma_data) / logvar.exp()) * (denoised - images) ** 2 + logvar
