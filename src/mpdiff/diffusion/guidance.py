"""Guidance: mixing a main and a guide denoiser (SPEC §6.4-6.5), and the released guided settings.

    D(x; sigma, c) = w D_main(x; sigma, c) + (1 - w) D_guide(x; sigma, c)

* classifier-free guidance as EDM2 does it: the guide is a separately trained *unconditional* network
  (label_dim 0; it ignores the class), the XS size for every main size, at the main network's EMA length;
* autoguidance (Karras et al. 2024): the guide is a smaller and/or less-trained version of the main
  network with the same conditioning, at an EMA length of its own.

w = 1 is the unguided model (the guide is not evaluated). A guided evaluation counts as one NFE.

The guidance interval (Kynkäänniemi et al. 2024, arXiv 2404.07724) guides only the sampler steps that
start from a noise level sigma_i with lo < sigma_i <= hi; the other steps evaluate the main network
alone. The paper gives intervals for EDM2-S and EDM2-XXL with CFG (the ``-guid-interval-`` presets).
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from mpdiff.config import require
from mpdiff.errors import ConfigError


def guided(net, guide=None, guidance=1.0, interval=None):
    """The denoiser D = w D_net + (1 - w) D_guide (computed as lerp(D_guide, D_net, w)). With no guide
    or w = 1, the network itself (the guide is never evaluated). With an `interval` (lo, hi), a
    :class:`GuidedDenoiser` that guides only at lo < sigma <= hi."""
    if guide is None or guidance == 1:
        return lambda x, sigma, labels: net(x, sigma, labels)
    if interval is None:
        return lambda x, sigma, labels: guide(x, sigma, labels).lerp(net(x, sigma, labels), guidance)
    return GuidedDenoiser(net, guide, guidance, interval)


class GuidedDenoiser:
    """w D_net + (1 - w) D_guide for noise levels lo < sigma <= hi, D_net alone elsewhere (the guide is
    not evaluated there). Samplers ask :meth:`for_step` with the level a step starts from, so that all
    evaluations of a step (Heun's correction too) are guided or none, as the paper does; called directly,
    each row is guided by its own sigma."""

    def __init__(self, net, guide, guidance, interval):
        self.net, self.guide, self.guidance = net, guide, guidance
        self.lo, self.hi = (float(v) for v in interval)

    def for_step(self, sigma):
        """The denoiser of a step starting at level `sigma`: guided inside the interval, the network outside."""
        if self.lo < float(sigma) <= self.hi:
            return lambda x, s, labels: self.guide(x, s, labels).lerp(self.net(x, s, labels), self.guidance)
        return lambda x, s, labels: self.net(x, s, labels)

    def __call__(self, x, sigma, labels):
        flat = sigma.reshape(-1)
        inside = (flat > self.lo) & (flat <= self.hi)
        if not bool(inside.any()):
            return self.net(x, sigma, labels)
        mixed = self.guide(x, sigma, labels).lerp(self.net(x, sigma, labels), self.guidance)
        if bool(inside.all()):
            return mixed
        return torch.where(inside.reshape(-1, *[1] * (x.ndim - 1)), mixed, self.net(x, sigma, labels))


class Counted:
    """A network (or any denoiser) that counts its calls: a sampler's evaluations per image, counted
    rather than computed (each call evaluates every image of the batch once)."""

    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def check_guide(net, guide, kind=None):
    """Refuse a guide that cannot guide `net`: another image shape, or (for `kind`) the wrong
    conditioning. CFG needs an unconditional guide; autoguidance one with the main network's classes.
    Returns 'cfg' or 'autoguidance' (what the pair is)."""
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    guide_shape = (guide.img_channels, guide.img_resolution, guide.img_resolution)
    require(shape == guide_shape, f"{{guide}} makes {'x'.join(map(str, guide_shape))} images, the network "
            f"{'x'.join(map(str, shape))}", "guide")
    require(guide.label_dim in (0, net.label_dim), f"{{guide}} has {guide.label_dim} classes, the network "
            f"{net.label_dim}; a guide is unconditional (classifier-free guidance) or has the same classes "
            f"(autoguidance)", "guide")
    found = "cfg" if guide.label_dim == 0 and net.label_dim else "autoguidance"
    need = "an unconditional guide" if kind == "cfg" else f"a guide with the network's {net.label_dim} classes"
    require(kind in (None, found), f"{{guide}}: this guidance preset is {kind}, which needs {need}; the guide has "
            f"{guide.label_dim} classes", "guide")
    return found


@dataclass(frozen=True)
class GuidedNet:
    """One network of a released guided configuration: its size preset, whether it is class-conditional,
    how long it was trained (thousands of images) and the EMA length of its post-hoc reconstruction."""
    preset: str
    conditional: bool
    kimg: int
    sigma_rel: float

    @property
    def release_file(self):
        """The name of NVIDIA's released pickle of this network, e.g. edm2-img512-xs-uncond-2147483-0.045.pkl
        (size, '-uncond' for the unconditional ones, kimg in 7 digits, EMA length in 3 decimals)."""
        return f"{self.preset}{'' if self.conditional else '-uncond'}-{self.kimg:07d}-{self.sigma_rel:.3f}.pkl"


@dataclass(frozen=True)
class GuidancePreset:
    name: str
    kind: str            # 'cfg' or 'autoguidance'
    net: GuidedNet
    guide: GuidedNet
    guidance: float
    metric: str          # what the EMA lengths and w were chosen for: 'fid' or 'fd_dinov2'
    result: float        # the published value of that metric (ImageNet, 50,000 samples)
    interval: Optional[Tuple[float, float]] = None  # guidance at lo < sigma <= hi only (None: every step)

    def describe(self):
        def one(n):
            return (f"{n.preset}{'' if n.conditional else ' uncond'} at {n.kimg:,} kimg, EMA {n.sigma_rel:.3f}")
        where = "" if self.interval is None else f" for sigma in ({self.interval[0]:g}, {self.interval[1]:g}]"
        return (f"{self.name}: {self.kind}, w {self.guidance:g}{where}; network {one(self.net)}; guide "
                f"{one(self.guide)}; published {self.metric} {self.result:g}")


def _cfg(name, size, kimg, sigma_rel, guidance, metric, result, interval=None):
    img = name.split("-")[1]  # img512 / img64
    return GuidancePreset(name, "cfg", GuidedNet(f"edm2-{img}-{size}", True, kimg, sigma_rel),
                          GuidedNet(f"edm2-{img}-xs", False, 2147483, sigma_rel), guidance, metric, result,
                          interval)


def _autog(name, size, cond, kimg, sigma_rel, guide_size, guide_kimg, guide_sigma_rel, guidance, metric, result):
    img = name.split("-")[1]
    return GuidancePreset(name, "autoguidance", GuidedNet(f"edm2-{img}-{size}", cond, kimg, sigma_rel),
                          GuidedNet(f"edm2-{img}-{guide_size}", cond, guide_kimg, guide_sigma_rel), guidance,
                          metric, result)


# The guided and autoguided configurations of the EDM2 release (SPEC §3.7, §6.5): the CFG guide is the
# XS unconditional network trained as long as the XS run (2147483 kimg) at the main network's EMA length.
GUIDANCE_PRESETS = {p.name: p for p in [
    _cfg("edm2-img512-xs-guid-fid", "xs", 2147483, 0.045, 1.40, "fid", 2.91),
    _cfg("edm2-img512-xs-guid-dino", "xs", 2147483, 0.150, 1.70, "fd_dinov2", 79.94),
    _cfg("edm2-img512-s-guid-fid", "s", 2147483, 0.025, 1.40, "fid", 2.23),
    _cfg("edm2-img512-s-guid-dino", "s", 2147483, 0.085, 1.90, "fd_dinov2", 52.32),
    _cfg("edm2-img512-m-guid-fid", "m", 2147483, 0.030, 1.20, "fid", 2.01),
    _cfg("edm2-img512-m-guid-dino", "m", 2147483, 0.015, 2.00, "fd_dinov2", 41.98),
    _cfg("edm2-img512-l-guid-fid", "l", 1879048, 0.015, 1.20, "fid", 1.88),
    _cfg("edm2-img512-l-guid-dino", "l", 1879048, 0.035, 1.70, "fd_dinov2", 38.20),
    _cfg("edm2-img512-xl-guid-fid", "xl", 1342177, 0.020, 1.20, "fid", 1.85),
    _cfg("edm2-img512-xl-guid-dino", "xl", 1342177, 0.030, 1.70, "fd_dinov2", 35.67),
    _cfg("edm2-img512-xxl-guid-fid", "xxl", 939524, 0.015, 1.20, "fid", 1.81),
    _cfg("edm2-img512-xxl-guid-dino", "xxl", 939524, 0.015, 1.70, "fd_dinov2", 33.09),
    _autog("edm2-img512-s-autog-fid", "s", True, 2147483, 0.070, "xs", 134217, 0.125, 2.10, "fid", 1.34),
    _autog("edm2-img512-s-autog-dino", "s", True, 2147483, 0.120, "xs", 134217, 0.165, 2.45, "fd_dinov2", 36.67),
    _autog("edm2-img512-xxl-autog-fid", "xxl", True, 939524, 0.075, "m", 268435, 0.155, 2.05, "fid", 1.25),
    _autog("edm2-img512-xxl-autog-dino", "xxl", True, 939524, 0.130, "m", 268435, 0.205, 2.30, "fd_dinov2", 24.18),
    _autog("edm2-img512-s-uncond-autog-fid", "s", False, 2147483, 0.070, "xs", 134217, 0.110, 2.85, "fid", 3.86),
    _autog("edm2-img512-s-uncond-autog-dino", "s", False, 2147483, 0.090, "xs", 134217, 0.125, 2.90, "fd_dinov2",
           90.39),
    _autog("edm2-img64-s-autog-fid", "s", True, 1073741, 0.045, "xs", 134217, 0.110, 1.70, "fid", 1.01),
    _autog("edm2-img64-s-autog-dino", "s", True, 1073741, 0.105, "xs", 134217, 0.175, 2.20, "fd_dinov2", 31.85),
    # The guidance interval (Kynkäänniemi et al. 2024, Table 1): the released S and XXL networks and their
    # XS guides as above ("as-is"; the paper changes w and the interval only, so the EMA lengths are those
    # of the CFG presets: our reading), sampled with EDM2's 32 Heun steps. The paper sets lo and hi to
    # levels sigma_j, sigma_i of that schedule and prints them to 2 decimals: S-FID (0.28, 2.90] is
    # (sigma_22, sigma_15] = (0.28304, 2.90153], XXL-FID (0.19, 1.61] is (sigma_23, sigma_17] = (0.18860,
    # 1.60857], DINOv2 (0.60, 5.00] is (sigma_20, sigma_13] = (0.59770, 4.99911]. As printed, S-FID's ends
    # both lie below their levels and would move its interval by one step; stored here to 4 digits,
    # rounded up, they select the paper's steps: 15-21 (S-FID), 17-22 (XXL-FID: the paper's "6 of the
    # 32 steps"), 13-19 (DINOv2). At other step counts they are noise levels like any others.
    _cfg("edm2-img512-s-guid-interval-fid", "s", 2147483, 0.025, 2.10, "fid", 1.68, (0.2831, 2.902)),
    _cfg("edm2-img512-s-guid-interval-dino", "s", 2147483, 0.085, 3.20, "fd_dinov2", 46.25, (0.5978, 5.000)),
    _cfg("edm2-img512-xxl-guid-interval-fid", "xxl", 939524, 0.015, 2.00, "fid", 1.40, (0.1887, 1.609)),
    _cfg("edm2-img512-xxl-guid-interval-dino", "xxl", 939524, 0.015, 2.90, "fd_dinov2", 29.16, (0.5978, 5.000)),
]}


def with_preset_interval(sampling, choice):
    """`sampling` (a SamplingConfig) with the guidance interval of `choice`'s preset when it has one, the
    sampling gives none and the generation is guided."""
    preset = choice.preset
    if sampling.guidance_interval is None and preset is not None and preset.interval is not None \
            and choice.guidance != 1:
        return sampling.replace(guidance_interval=preset.interval)
    return sampling


def get_guidance_preset(name) -> GuidancePreset:
    try:
        return GUIDANCE_PRESETS[name]
    except KeyError:
        raise ConfigError(f"{{guidance_preset}} {name!r} is unknown; choose one of: "
                          f"{', '.join(GUIDANCE_PRESETS)}", fields=("guidance_preset",)) from None


@dataclass(frozen=True)
class GuidanceChoice:
    """The resolved guidance of one generation: strength and the two EMA lengths (None = the tracked
    default of a run directory)."""
    guidance: float = 1.0
    sigma_rel: Optional[float] = None
    guide_sigma_rel: Optional[float] = None
    preset: Optional[GuidancePreset] = None


def resolve_guidance(preset=None, guidance=None, sigma_rel=None, guide_sigma_rel=None):
    """Explicit values win over the preset's; the guide's EMA length defaults to the network's (EDM2's
    CFG uses the same sigma_rel for both)."""
    p = get_guidance_preset(preset) if preset else None
    guidance = guidance if guidance is not None else (p.guidance if p else 1.0)
    sigma_rel = sigma_rel if sigma_rel is not None else (p.net.sigma_rel if p else None)
    guide_sigma_rel = guide_sigma_rel if guide_sigma_rel is not None else (p.guide.sigma_rel if p else sigma_rel)
    return GuidanceChoice(float(guidance), sigma_rel, guide_sigma_rel, p)


def check_guidance(choice, has_guide):
    """Refuse a resolved guidance that cannot be sampled: a strength that is not a finite number, or
    one other than 1 without a guide network."""
    require(math.isfinite(choice.guidance), f"{{guidance}} must be a finite number, got {choice.guidance}", "guidance")
    require(choice.guidance == 1 or has_guide, f"{{guidance}} {choice.guidance:g} needs a {{guide}} network",
            "guidance", "guide")
    return choice
