"""Presets: network and training hyperparameters, defined once (SPEC §1.3-1.4, §3.1, §3.6).

Names follow NVIDIA's release (`edm2-img512-s`, ...). The command line, the tests and
`mpdiff info` all read :data:`PRESETS`.
"""

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Optional, Tuple

from .errors import ConfigError

MIB = 2 ** 20  # images; "Mi" in the paper and CLI


def _type_ok(value, annotation):
    """Does a JSON-decoded value (lists already made tuples) fit a field annotation?"""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        return len(kinds) == len(value) and all(map(_type_ok, value, kinds))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation in (int, float):  # JSON has one number type; a float field takes 1 as 1.0
        ok = (int,) if annotation is int else (int, float)
        return isinstance(value, ok) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _from_dict(cls, d, source, what):
    """Build a config dataclass from a JSON object, refusing unknown fields and values of the wrong type."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: the {what} config must be a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown {what} option(s) {', '.join(repr(str(k))[:40] for k in unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    for name, value in kwargs.items():
        if not _type_ok(value, fields[name].type):
            expected = str(fields[name].type).replace("typing.", "")
            raise ConfigError(f"{source}: {what} option {name} = {str(value)[:40]!r} has the wrong type "
                              f"(expected {expected})")
    return cls(**kwargs)


@dataclass(frozen=True)
class NetworkConfig:
    """Every constructor argument of :class:`mpdiff.networks.Precond`, with the paper's defaults."""
    img_resolution: int = 64
    img_channels: int = 4
    label_dim: int = 1000
    model_channels: int = 192               # C0
    channel_mult: Tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_noise: Optional[int] = None
    channel_mult_emb: Optional[int] = None
    num_blocks: int = 3
    attn_resolutions: Tuple[int, ...] = (16, 8)
    label_balance: float = 0.5
    concat_balance: float = 0.5
    channels_per_head: int = 64
    dropout: float = 0.0
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: Optional[float] = 256
    resample_filter: Tuple[int, ...] = (1, 1)
    logvar_channels: int = 128
    sigma_data: float = 0.5
    use_fp16: bool = True
    attn_impl: str = "matmul"

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d, source="config"):
        return _from_dict(cls, d, source, "network")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation hyperparameters (SPEC §1.2-1.4). Durations are in images."""
    batch: int = 2048
    lr: float = 0.0100                      # alpha_ref
    decay: Optional[float] = 70000          # t_ref in iterations; None = constant LR
    rampup_img: int = 10_000_000            # linear LR warm-up length in images
    duration: int = 2048 * MIB              # total training images
    P_mean: float = -0.4
    P_std: float = 1.0
    betas: Tuple[float, float] = (0.9, 0.99)
    loss_scaling: float = 1.0
    ema_sigma_rels: Tuple[float, ...] = (0.050, 0.100)
    ema_halflife_img: Optional[int] = None  # also track a traditional EMA with this half-life (images)

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d, source="config"):
        return _from_dict(cls, d, source, "training")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    network: NetworkConfig
    training: TrainingConfig
    dataset: str = ""                       # what data the preset was made for

    def to_dict(self):
        return {"name": self.name, "description": self.description, "dataset": self.dataset,
                "network": self.network.to_dict(), "training": self.training.to_dict()}

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)


def _edm2_presets():
    presets = {}
    img512 = NetworkConfig(img_resolution=64, img_channels=4, label_dim=1000)
    img512_train = TrainingConfig(decay=70000, P_mean=-0.4, P_std=1.0)
    # size: (C0, dropout, alpha_ref, duration in Mi images)   [SPEC §3.6]
    for size, (channels, dropout, lr, mi) in {
        "xs": (128, 0.00, 0.0120, 2048), "s": (192, 0.00, 0.0100, 2048), "m": (256, 0.10, 0.0090, 2048),
        "l": (320, 0.10, 0.0080, 1792), "xl": (384, 0.10, 0.0070, 1280), "xxl": (448, 0.10, 0.0065, 896),
    }.items():
        presets[f"edm2-img512-{size}"] = Preset(
            name=f"edm2-img512-{size}",
            description=f"EDM2 {size.upper()}, ImageNet-512 latents (64x64x4), 1000 classes",
            network=img512.replace(model_channels=channels, dropout=dropout),
            training=img512_train.replace(lr=lr, duration=mi * MIB),
            dataset="ImageNet-512 SD-VAE latents",
        )
    img64 = NetworkConfig(img_resolution=64, img_channels=3, label_dim=1000)
    img64_train = TrainingConfig(decay=35000, P_mean=-0.8, P_std=1.6)
    for size, (channels, dropout, lr, mi) in {
        "s": (192, 0.00, 0.0100, 1024), "m": (256, 0.10, 0.0090, 2048),
        "l": (320, 0.10, 0.0080, 1024), "xl": (384, 0.10, 0.0070, 640),
    }.items():
        presets[f"edm2-img64-{size}"] = Preset(
            name=f"edm2-img64-{size}",
            description=f"EDM2 {size.upper()}, ImageNet-64 pixels (64x64x3), 1000 classes",
            network=img64.replace(model_channels=channels, dropout=dropout),
            training=img64_train.replace(lr=lr, duration=mi * MIB),
            dataset="ImageNet-64 RGB",
        )
    return presets


def _small_presets():
    # The built-in dataset: UCI digits, 8x8 grayscale, 10 classes (see mpdiff.data).
    # Widths and schedule chosen so that the default run fits in minutes on 2 CPU cores;
    # see docs/TRAINING.md for the measurements behind them.
    digits = Preset(
        name="digits",
        description="Config-G U-Net for the built-in 8x8 digits (class-conditional, 10 classes)",
        network=NetworkConfig(img_resolution=8, img_channels=1, label_dim=10, model_channels=32,
                              channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(4,),
                              logvar_channels=128, use_fp16=False),
        training=TrainingConfig(batch=256, lr=0.0100, decay=1000, rampup_img=16 * 1024,
                                duration=192 * 1024, P_mean=-0.8, P_std=1.6),
        dataset="digits (built in)",
    )
    return {digits.name: digits}


PRESETS = {**_edm2_presets(), **_small_presets()}


def get_preset(name):
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
