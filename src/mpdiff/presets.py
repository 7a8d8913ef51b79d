"""Presets: the paper's model sizes and the built-in dataset's recipe, as data (SPEC §3.6).

Names follow NVIDIA's release (`edm2-img512-s`, ...). The command line, `mpdiff info`, the tests
and the docs all read :data:`PRESETS`; the dataclasses they are made of live in :mod:`mpdiff.config`.
"""

import dataclasses

from mpdiff.config import KIB, LADDER_CONFIGS, MIB, Cadence, NetworkConfig, Preset, TrainingConfig
from mpdiff.errors import ConfigError

# The paper's runs: a stats row every 128 Ki images, EMA snapshots every 8 Mi (4096 steps at batch
# 2048), checkpoints every 128 Mi (SPEC §5.4).
PAPER_CADENCE = Cadence(status_nimg=128 * KIB, snapshot_nimg=8 * MIB, checkpoint_nimg=128 * MIB)

# size: (C0, dropout, alpha_ref, duration in Mi images)   [SPEC §3.6, paper Table 6]
# XXS and, for ImageNet-64, XS exist only in the code release: they are the guide networks of the
# released guided and autoguided models.
IMG512_SIZES = {
    "xxs": (64, 0.00, 0.0170, 2048),
    "xs": (128, 0.00, 0.0120, 2048),
    "s": (192, 0.00, 0.0100, 2048),
    "m": (256, 0.10, 0.0090, 2048),
    "l": (320, 0.10, 0.0080, 1792),
    "xl": (384, 0.10, 0.0070, 1280),
    "xxl": (448, 0.10, 0.0065, 896),
}
IMG64_SIZES = {
    "xs": (128, 0.00, 0.0120, 1024),
    "s": (192, 0.00, 0.0100, 1024),
    "m": (256, 0.10, 0.0090, 2048),
    "l": (320, 0.10, 0.0080, 1024),
    "xl": (384, 0.10, 0.0070, 640),
}


def _edm2_family(prefix, sizes, network, training, what, dataset):
    presets = {}
    for size, (channels, dropout, lr, mi) in sizes.items():
        name = f"{prefix}-{size}"
        presets[name] = Preset(
            name=name,
            description=f"EDM2 {size.upper()}, {what}",
            network=network.replace(model_channels=channels, dropout=dropout),
            training=training.replace(lr=lr, duration=mi * MIB),
            cadence=PAPER_CADENCE,
            dataset=dataset,
        )
    return presets


# ScaleLong's constant skip scaling on the U-Nets (SPEC §9.6), used when --skip-scaling cs or cs-mp is
# asked for: kappa^(i-1) on the i-th skip. The EDM2 U-Net has 16 skips at S (4 levels x 4), where
# ScaleLong's kappa 0.5 would leave the innermost skip at 0.5^15 = 3e-5; kappa 0.9 leaves it at 0.21.
# The small U-Nets have 8-12 skips: kappa 0.8 leaves their innermost at 0.17 (digits) and 0.09 (cpu32),
# close to the UViT's 0.5^5 = 0.03 at 6 skips. The per-level variant (--kappa-rule level, kappa^level)
# is the alternative SPEC §9.6 offers; no preset uses it by default.
UNET_KAPPA = {"edm2": 0.9, "small": 0.8}


def _edm2_presets():
    img512 = _edm2_family(
        "edm2-img512", IMG512_SIZES,
        NetworkConfig(img_resolution=64, img_channels=4, label_dim=1000, kappa=UNET_KAPPA["edm2"]),
        TrainingConfig(decay=70000, P_mean=-0.4, P_std=1.0),
        "ImageNet-512 latents (64x64x4), 1000 classes", "ImageNet-512 SD-VAE latents")
    img64 = _edm2_family(
        "edm2-img64", IMG64_SIZES,
        NetworkConfig(img_resolution=64, img_channels=3, label_dim=1000, kappa=UNET_KAPPA["edm2"]),
        TrainingConfig(decay=35000, P_mean=-0.8, P_std=1.6),
        "ImageNet-64 pixels (64x64x3), 1000 classes", "ImageNet-64 RGB")
    return {**img512, **img64}


# The built-in dataset: UCI digits, 8x8 grayscale, 10 classes (mpdiff.data.digits). Widths and
# schedule chosen so that the default run fits in minutes on 2 CPU cores; docs/TRAINING.md has the
# measurements behind them.
DIGITS = Preset(
    name="digits",
    description="Config-G U-Net for the built-in 8x8 digits (class-conditional, 10 classes)",
    network=NetworkConfig(img_resolution=8, img_channels=1, label_dim=10, model_channels=32, channel_mult=(1, 2, 2),
                          num_blocks=2, attn_resolutions=(4,), use_fp16=False, kappa=UNET_KAPPA["small"]),
    training=TrainingConfig(batch=256, lr=0.0100, decay=1000, rampup_img=16 * KIB,
                            duration=192 * KIB, P_mean=-0.8, P_std=1.6),
    cadence=Cadence(status_nimg=16 * KIB, snapshot_nimg=16 * KIB, checkpoint_nimg=64 * KIB),
    dataset="digits (built in)",
)

# Recipes for a user's own small dataset on a CPU (docs/CUSTOM_DATA.md has the measured runs behind
# them). Resolution, channels and classes come from the dataset; the presets fix the width, depth,
# attention and schedule. Compared with the paper's ImageNet recipe: far narrower and shallower
# networks, batch 64 instead of 2048 (many more steps per image seen), and a learning-rate decay that
# starts after 1,000 steps instead of 35,000-70,000 (the runs are a few thousand steps long).
CPU32 = Preset(
    name="cpu32",
    description="Config-G U-Net for small 32x32 datasets on a CPU (gray or RGB; ~19 min on 1 core)",
    network=NetworkConfig(img_resolution=32, img_channels=1, label_dim=0, model_channels=16, channel_mult=(1, 2, 2, 2),
                          num_blocks=2, attn_resolutions=(8,), use_fp16=False, kappa=UNET_KAPPA["small"]),
    training=TrainingConfig(batch=64, lr=0.0100, decay=1000, rampup_img=8 * KIB, duration=64 * KIB,
                            P_mean=-0.8, P_std=1.6),
    cadence=Cadence(status_nimg=4 * KIB, snapshot_nimg=4 * KIB, checkpoint_nimg=16 * KIB),
    dataset="your own 32x32 images (mpdiff dataset convert)",
)
CPU64 = Preset(
    name="cpu64",
    description="Config-G U-Net for small 64x64 datasets on a CPU (gray or RGB; ~45 min on 1 core)",
    network=NetworkConfig(img_resolution=64, img_channels=3, label_dim=0, model_channels=16, channel_mult=(1, 2, 2, 2),
                          num_blocks=1, attn_resolutions=(8,), use_fp16=False, kappa=UNET_KAPPA["small"]),
    training=TrainingConfig(batch=32, lr=0.0100, decay=1000, rampup_img=4 * KIB, duration=64 * KIB,
                            P_mean=-0.8, P_std=1.6),
    cadence=Cadence(status_nimg=2 * KIB, snapshot_nimg=4 * KIB, checkpoint_nimg=8 * KIB),
    dataset="your own 64x64 images (mpdiff dataset convert)",
)

# The built-in MNIST (--data mnist: 4,000 training digits at 32x32, 10 classes): cpu32's network and
# schedule, class-conditional, shortened to 48 Ki images so that the run fits in 15 minutes on this
# project's 2-core CPU: measured 8.2 minutes on 2026-12-02, 84.8% class accuracy (docs/EVALUATION.md).
MNIST = Preset(
    name="mnist",
    description="Config-G U-Net for the built-in 32x32 MNIST (class-conditional; ~8 min on a 2-core CPU)",
    network=CPU32.network.replace(label_dim=10),
    training=CPU32.training.replace(duration=48 * KIB),
    cadence=CPU32.cadence,
    dataset="mnist (built in)",
    data="mnist",
)

# UViT backbones (SPEC §9.4). ScaleLong's CIFAR-10 network: 32x32x3, patch 2, width 512, 12 blocks
# around the middle one (6 long skips), 8 heads, MLP ratio 4, unconditional; its recipe is AdamW at
# 2e-4 (weight decay 0.03, which mpdiff's Adam does not have), betas (0.99, 0.999), 2,500 warm-up
# steps, 500k steps of batch 128, kappa 0.5. Trained here inside EDM's preconditioning and loss, with
# P_mean/P_std as EDM's CIFAR-10 recipe (-1.2/1.2).
UVIT_CIFAR10 = Preset(
    name="uvit-cifar10",
    description="UViT of ScaleLong's CIFAR-10 experiments (32x32x3, patch 2, width 512, depth 12, 8 heads)",
    network=NetworkConfig(img_resolution=32, img_channels=3, label_dim=0, backbone="uvit", model_channels=512,
                          depth=12, patch_size=2, channels_per_head=64, mlp_ratio=4.0, kappa=0.5, use_fp16=False),
    training=TrainingConfig(batch=128, lr=2e-4, decay=None, rampup_img=2500 * 128, duration=500_000 * 128,
                            betas=(0.99, 0.999), P_mean=-1.2, P_std=1.2),
    cadence=Cadence(status_nimg=128 * KIB, snapshot_nimg=4 * MIB, checkpoint_nimg=16 * MIB),
    dataset="CIFAR-10 (32x32x3; mpdiff dataset convert)",
)
# A small UViT for the built-in digits: 2x2 patches (16 tokens + noise + class), width 96, 3 heads,
# 4 long skips; about the U-Net's training cost per image on a CPU (patch 1 costs twice as much).
# Same batch, schedule and cadence as the digits U-Net, so that the two compare at equal images. The
# learning rate comes from a 32 Ki-image sweep (docs/SCALELONG.md): 1e-3, 3e-3, 6e-3 and 1e-2 gave FD
# 309, 230, 214 and 191; 6e-3 rather than the edge of the sweep, where a stability comparison would
# be confounded by the rate itself.
DIGITS_UVIT = Preset(
    name="digits-uvit",
    description="UViT for the built-in 8x8 digits (patch 2, width 96, depth 8; class-conditional)",
    network=NetworkConfig(img_resolution=8, img_channels=1, label_dim=10, backbone="uvit", model_channels=96,
                          depth=8, patch_size=2, channels_per_head=32, mlp_ratio=4.0, kappa=0.5, use_fp16=False),
    training=DIGITS.training.replace(lr=6e-3, decay=None),
    cadence=DIGITS.cadence,
    dataset="digits (built in)",
)

PRESETS = {**_edm2_presets(), DIGITS.name: DIGITS, CPU32.name: CPU32, CPU64.name: CPU64, MNIST.name: MNIST,
           DIGITS_UVIT.name: DIGITS_UVIT, UVIT_CIFAR10.name: UVIT_CIFAR10}
DEFAULT_PRESET = DIGITS.name


# ---- the ablation ladder (SPEC §4.2): each config's recipe, relative to a preset made for config G

# alpha_ref of A-C over that of D-G in the paper (1e-4 and 2e-4 against 1e-2): before weight
# normalisation (D) the weights are ~sqrt(fan_in) smaller, so the same relative step needs a smaller
# learning rate. Applied as a ratio, so the ladder keeps the preset's own alpha_ref for D-G.
LADDER_LR_RATIO = {"A": 0.01, "B": 0.02, "C": 0.02}
LADDER_DROPOUT = 0.10                 # A-F; G keeps the preset's (0 for S, 0.10 for M and larger)
LADDER_HALFLIFE_SHARE = 50 / 2147.5   # A's traditional EMA: half-life 50 M of 2147.5 M images


def ladder_preset(preset, config):
    """`preset` (made for config G) with config `config`'s deltas of SPEC §4.2 applied.

    Network: the config's flags (mpdiff.nn.ladder), dropout 10% and no activation clamp (the code's
    +-256 clamp belongs to G, SPEC §4.9) for A-F, and for A attention also at
    the next finer level (ImageNet-512: 32, 16, 8). Recipe: alpha_ref scaled by LADDER_LR_RATIO for
    A-C; a constant learning rate for A-D (inverse-square-root decay arrives with E); Adam beta2 0.999,
    P_mean/P_std -1.2/1.2 and a traditional EMA (half-life 2.3% of the training, :func:`ladder_derived`)
    for A; loss scaling 100 for A-C. The batch is the preset's for every config (the paper doubles it for A),
    so that all rungs train on the same images in the same number of steps. Options given on the command line are
    applied after these.
    """
    if config not in LADDER_CONFIGS:
        raise ConfigError(f"unknown {{config}} {config!r}; choose one of {', '.join(LADDER_CONFIGS)} (SPEC §4)",
                          fields=("config",))
    network = preset.network.replace(config=config)
    training = preset.training
    if config == "G":
        return _renamed(preset, network, training, config)
    network = network.replace(dropout=LADDER_DROPOUT, clip_act=None)  # the +-256 clamp arrives with G
    if config == "A" and network.attn_resolutions:
        finer = 2 * max(network.attn_resolutions)
        network = network.replace(attn_resolutions=(finer, *sorted(network.attn_resolutions, reverse=True)))
    changes = {}
    if config in LADDER_LR_RATIO:
        changes.update(lr=training.lr * LADDER_LR_RATIO[config], loss_scaling=100.0)
    if config in ("A", "B", "C", "D"):
        changes.update(decay=None)
    if config == "A":
        changes.update(betas=(0.9, 0.999), P_mean=-1.2, P_std=1.2)
    return _renamed(preset, network, ladder_derived(config, training.replace(**changes)), config)


def ladder_derived(config, training, given=()):
    """`training` with the values config `config` derives from the recipe computed from `training` itself:
    A's traditional-EMA half-life, 2.3% of `training.duration`. A run calls this again once the command
    line's options are in (:func:`mpdiff.train.run.resolve_run`), so that the share is of the run's own
    length, not the preset's; fields in `given` (set explicitly) are left alone."""
    changes = {}
    if config == "A" and "ema_halflife_img" not in given:
        changes["ema_halflife_img"] = max(1, round(training.duration * LADDER_HALFLIFE_SHARE))
    return training.replace(**changes) if changes else training


# The recipe fields ladder_derived computes, per config (a run that is extended keeps the values it
# started with: its resume contract holds them).
LADDER_DERIVED = {"A": ("ema_halflife_img",)}


def _renamed(preset, network, training, config):
    return dataclasses.replace(preset, description=f"{preset.description}, ablation config {config}",
                               network=network, training=training)


def get_preset(name):
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
