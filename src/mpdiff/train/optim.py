"""The optimiser side of training: Adam, the inverse-square-root learning rate (SPEC §1.4), and
the non-finite-gradient guard (SPEC §1.5)."""

import math

import torch

from mpdiff.config import TrainingConfig

_RECIPE = TrainingConfig()  # defaults below are read from the one definition of the recipe


def learning_rate(nimg, batch, lr=_RECIPE.lr, decay=_RECIPE.decay, rampup_img=_RECIPE.rampup_img):
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


def make_optimizer(params, betas=_RECIPE.betas, eps=1e-8):
    """Adam (not AdamW) without weight decay, one parameter group; the LR is set every step."""
    return torch.optim.Adam(params, lr=0.0, betas=tuple(betas), eps=eps)


def set_learning_rate(optimizer, value):
    for group in optimizer.param_groups:
        group["lr"] = value


