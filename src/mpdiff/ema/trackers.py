"""EMA trackers: running averages of a module's parameters (SPEC §5.2-5.4).

They hold state only: :meth:`state_dict`/:meth:`load_state_dict` for checkpoints, and
:meth:`averaged_state_dict` for whoever writes snapshots (:mod:`mpdiff.ema.snapshots`). The
coefficients come from the pure math in :mod:`mpdiff.ema.profiles`.
"""

import numpy as np
import torch

from mpdiff.config import TrainingConfig
from mpdiff.ema.profiles import power_function_beta, sigma_rel_to_gamma
from mpdiff.errors import CheckpointError, ConfigError


class _ParameterAverages:
    """Float32 running averages of a module's parameters (name -> tensor), one dict per profile."""

    def __init__(self, module, num_profiles):
        self.module = module
        self.nimg = 0
        self.averages = [self._copy_parameters() for _ in range(num_profiles)]

    def _copy_parameters(self):
        return {name: param.detach().to(torch.float32, copy=True) for name, param in self.module.named_parameters()}

    @torch.no_grad()
    def _apply(self, betas):
        for average, beta in zip(self.averages, betas):
            for name, param in self.module.named_parameters():
                if beta == 0:
                    average[name].copy_(param.detach())
                else:
                    average[name].lerp_(param.detach().to(torch.float32), 1 - beta)

    def update(self, nimg, delta_nimg):
        """Fold in the live weights. nimg = images seen after this step, delta_nimg = images since the last update."""
        if not delta_nimg > 0 or nimg < delta_nimg:
            raise ValueError(f"EMA update needs 0 < delta_nimg <= nimg, got nimg={nimg}, delta_nimg={delta_nimg}")
        self._apply([float(beta) for beta in self.betas(nimg, delta_nimg)])
        self.nimg = int(nimg)

    def averaged_state_dict(self, index=0):
        """A full state_dict for the module: averaged parameters (float32) + the live module's buffers."""
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

    def copy_to(self, module, index=0):
        """Load an average into `module` (same architecture as the tracked one)."""
        module.load_state_dict(self.averaged_state_dict(index))
        return module

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

    def __init__(self, module, sigma_rels=TrainingConfig().ema_sigma_rels):  # the live module; each profile's std
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        sigma_rel_to_gamma(self.sigma_rels)  # validate
        super().__init__(module, len(self.sigma_rels))

    def betas(self, nimg, delta_nimg):
        return power_function_beta(self.sigma_rels, nimg, delta_nimg)

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
        """A full state_dict of one profile (index or sigma_rel; :meth:`copy_to` takes either too)."""
        return super().averaged_state_dict(self.profile_index(index_or_sigma_rel))

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


class TraditionalEMA(_ParameterAverages):
    """Traditional (exponential) EMA with an optional half-life ramp-up (SPEC §5.2, config A)."""

    def __init__(self, module, halflife_img, rampup_ratio=0.09):
        """`halflife_img`: in training images; it is at most `rampup_ratio` * nimg (None: no ramp-up)."""
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

    def betas(self, nimg, delta_nimg):
        return [0.5 ** (delta_nimg / max(self.current_halflife(nimg), 1e-8))]  # Eq. 120, SPEC §5.2

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
