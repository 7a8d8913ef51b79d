"""EDM2 training objective, learning-rate schedule and optimizer (SPEC §1.2-1.4)."""

import math

import torch


def edm_weight(sigma, sigma_data=0.5):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2  (Eq. 15)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def sample_sigma(batch, P_mean=-0.4, P_std=1.0, device="cpu", generator=None):
    """ln(sigma) ~ N(P_mean, P_std^2), one per sample (Eq. 16)."""
    return (torch.randn([batch], device=device, generator=generator) * P_std + P_mean).exp()


def edm2_loss(net, images, labels=None, sigma=None, noise=None, P_mean=-0.4, P_std=1.0):
    """Per-element learned-uncertainty loss  (lambda / e^u) * (D(y + n) - y)^2 + u  (Eq. 21).

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
    sigma_data = getattr(net, "sigma_data", 0.5)
    denoised, logvar = net(images + noise * sigma, sigma, labels, return_logvar=True)
    return (edm_weight(sigma, sigma_data) / logvar.exp()) * (denoised - images) ** 2 + logvar


def learning_rate(nimg, batch, lr=0.0100, decay=70000, rampup_img=10_000_000):
    """alpha(t) = alpha_ref / sqrt(max(t / t_ref, 1)) with linear warm-up (Eq. 67).

    `nimg` = images seen *before* the step (so the first step has lr = 0); `decay` = t_ref in
    iterations of `batch` images (None or 0 = constant); `rampup_img` = warm-up length in images.
    """
    value = lr
    if decay:
        value /= math.sqrt(max(nimg / (decay * batch), 1))
    if rampup_img:
        value *= min(nimg / rampup_img, 1)
    return value


def make_optimizer(params, betas=(0.9, 0.99), eps=1e-8):
    """Adam (not AdamW) without weight decay, one parameter group; the LR is set every step."""
    return torch.optim.Adam(params, lr=0.0, betas=tuple(betas), eps=eps)


def set_learning_rate(optimizer, value):
    for group in optimizer.param_groups:
        group["lr"] = value


def zero_nonfinite_grads(params):
    """Replace NaN/Inf gradient entries by 0 (SPEC §1.5); returns how many entries were bad."""
    bad = 0
    for p in params:
        if p.grad is not None:
            finite = torch.isfinite(p.grad)
            if not bool(finite.all()):
                bad += int((~finite).sum())
                torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
    return bad
