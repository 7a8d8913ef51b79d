"""The EDM2 training objective: noise-level distribution, EDM weighting and the learned-uncertainty
loss, or the plain EDM loss for a network without uncertainty head (SPEC §1.2-1.3)."""

from dataclasses import dataclass

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


@dataclass(frozen=True)
class EDM2Loss:
    """The objective with its constants. It owns them, so that the network it is called with may be a
    wrapper (DDP, torch.compile) that does not carry the network's sigma_data."""
    sigma_data: float = _SIGMA_DATA   # the data's standard deviation: the network's (Precond.sigma_data)
    P_mean: float = _RECIPE.P_mean    # ln(sigma) ~ N(P_mean, P_std^2) (Eq. 16)
    P_std: float = _RECIPE.P_std

    def __call__(self, net, images, labels=None, sigma=None, noise=None):
        """Per-element training loss of the denoiser `net` (SPEC §1.2).

        With a log-variance head u(sigma) (configs B-G) it is the learned-uncertainty loss
        (lambda / e^u) * (D(y + n) - y)^2 + u  (Eq. 21); without one (config A, whose network returns
        u = None) the plain EDM loss  lambda * (D(y + n) - y)^2  (Eq. 15).

        `sigma` ([N]) and `noise` (unit variance, shaped like `images`; scaled by sigma here) replace
        the random draws so that a step can be replayed exactly. Returns a tensor shaped like
        `images`; the trainer reduces it as sum / batch (SPEC §1.2).
        """
        if sigma is None:
            sigma = sample_sigma(images.shape[0], self.P_mean, self.P_std, device=images.device)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if noise is None:
            noise = torch.randn_like(images)
        denoised, logvar = net(images + noise * sigma, sigma, labels, return_logvar=True)
        weight = edm_weight(sigma, self.sigma_data)
        if logvar is None:
            return weight * (denoised - images) ** 2
        return (weight / logvar.exp()) * (denoised - images) ** 2 + logvar


def edm2_loss(net, images, labels=None, sigma=None, noise=None, P_mean=_RECIPE.P_mean, P_std=_RECIPE.P_std):
    """:class:`EDM2Loss` with the sigma_data of `net`, a network (not a wrapper: DDP and compiled modules
    hide the network's attributes; build an EDM2Loss for them)."""
    if not hasattr(net, "sigma_data"):
        raise TypeError(f"edm2_loss needs the network itself, not a {type(net).__name__}: use "
                        f"EDM2Loss(sigma_data=network.sigma_data)(wrapper, ...)")
    return EDM2Loss(net.sigma_data, P_mean, P_std)(net, images, labels, sigma, noise)
