"""The options the `mpdiff` commands share, built from the configuration, and how their text is parsed.

Every option that sets a config field (:mod:`mpdiff.config`) takes its flag, help text, default and
choices from there: `train` has one option per field of the network, recipe, cadence and run that
has a flag; `generate` and `metrics` one per sampler field, and the guidance options. Image counts
(512Ki, 10M) and comma lists are parsed here, with errors that name the flag.
"""

import dataclasses
import re
from fractions import Fraction
from typing import Optional

import click

from mpdiff.config import (
    ATTN_IMPLS,
    PRECISION_NAMES,
    SAMPLER_NAMES,
    SAMPLING,
    STORAGE_DTYPES,
    Cadence,
    NetworkConfig,
    RunOptions,
    SamplingConfig,
    TrainingConfig,
    flag_for,
)
from mpdiff.errors import ConfigError

_UNITS = {"": 1, "k": 1000, "m": 1000 ** 2, "g": 1000 ** 3, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30}


def parse_nimg(text, option="value"):
    """'512Ki' -> 524288, '10M' -> 10_000_000, '4096' -> 4096 (images)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?)?\s*", str(text))
    if not match:
        raise ConfigError(f"{option}: cannot parse {text!r}; expected an image count like 4096, 512Ki, 8Mi or 10M")
    value = Fraction(match.group(1)) * _UNITS[(match.group(2) or "").lower()]  # exact: '4.1M' is 4100000
    if value.denominator != 1 or not 0 < value < 2 ** 63:
        raise ConfigError(f"{option}: {text!r} must be a positive whole number of images below 2^63")
    return int(value)


def parse_list(text, option, kind=float, allow_none=False):
    """'0.05,0.1' -> [0.05, 0.1] (`kind` int: whole numbers); with allow_none, 'none' -> [] (e.g. no attention)."""
    if allow_none and str(text).strip().lower() == "none":
        return []
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        what = ("numbers" if kind is float else "whole numbers") + (" or 'none'" if allow_none else "")
        raise ConfigError(f"{option}: cannot parse {text!r}; expected comma-separated {what}") from None
    if not values:
        raise ConfigError(f"{option}: no values given")
    return values


def parse_floats(text, option):
    return parse_list(text, option, float)


def parse_ints(text, option, allow_none=False):
    return parse_list(text, option, int, allow_none)


def parse_range(text, option):
    """'A:B:N' -> N evenly spaced values from A to B; a comma list is accepted too."""
    if ":" not in str(text):
        return parse_floats(text, option)
    import numpy as np
    try:
        lo, hi, n = str(text).split(":")
        lo, hi, n = float(lo), float(hi), int(n)
    except ValueError:
        raise ConfigError(f"{option}: cannot parse {text!r}; expected A:B:N, e.g. 0.02:0.25:12") from None
    if not 1 <= n <= 10_000:
        raise ConfigError(f"{option}: N must be from 1 to 10000")
    return [round(float(v), 6) for v in np.linspace(lo, hi, n)]


# Fields whose flag click checks against the configuration's list of choices. The other fields with
# a fixed set of values (--config, --skip-scaling, --kappa-rule, ...) are checked by the library, whose
# messages list the choices too.
_CHOICES = {"attn_impl": ATTN_IMPLS, "precision": PRECISION_NAMES, "sampler": SAMPLER_NAMES,
            "snapshot_dtype": STORAGE_DTYPES}
_CLICK_TYPES = {int: int, float: float, Optional[int]: int, Optional[float]: float, Optional[str]: str, str: str}


def _click_type(field):
    if field.name in _CHOICES:
        return click.Choice(_CHOICES[field.name])
    return None if field.metadata.get("parse") else _CLICK_TYPES.get(field.type)


# ------------------------------------------------------------------------------------------ train

# The train command's options are the config fields that have a flag; their help and defaults are
# read from there. Preset-dependent fields default to None = "from the preset".
TRAIN_SECTIONS = (("network", NetworkConfig), ("training", TrainingConfig), ("cadence", Cadence),
                  ("run", RunOptions))


def train_fields():
    """[(section, dataclass field)] of every config field that has a command-line flag, in flag order."""
    return [(section, f) for section, cls in TRAIN_SECTIONS for f in dataclasses.fields(cls)
            if f.metadata.get("flag")]


def _click_option(section, field):
    flag, help_text = field.metadata["flag"], field.metadata["help"]
    if section == "run":  # not preset-dependent: the dataclass default is the command's default
        default, shown = field.default, True
        if field.name == "run_dir":
            help_text, shown = "Run directory [default: runs/<preset>].", False
        if field.name == "dataset":  # the preset's built-in data (mnist for --preset mnist), else digits
            default, shown = None, False
            help_text += " [default: the preset's data: mnist for --preset mnist, digits otherwise]"
        return click.option(flag, field.name, default=default, type=_click_type(field), show_default=shown,
                            help=help_text)
    return click.option(flag, field.name, default=None, type=_click_type(field), help=help_text + " [preset]")


def train_options(func):
    """The train command's config options."""
    for section, field in reversed(train_fields()):
        func = _click_option(section, field)(func)
    return func


def _parsed(field, value):
    """A flag's text as the field's value (image counts and lists parsed; `--decay 0` = constant LR)."""
    parse, flag = field.metadata.get("parse"), flag_for(field.name)
    if parse == "nimg":
        if field.name == "rampup_img" and str(value) == "0":
            return 0
        return parse_nimg(value, flag)
    if parse == "floats":
        return tuple(parse_floats(value, flag))
    if parse == "ints":
        return tuple(parse_ints(value, flag, allow_none=field.name == "attn_resolutions"))
    if field.name == "decay":
        return value or None
    return value


def train_overrides(values):
    """{section: {field: value}} of the train options given (every run option; None = its default)."""
    overrides = {section: {} for section, _ in TRAIN_SECTIONS}
    for section, field in train_fields():
        value = values[field.name]
        if value is not None or section == "run":
            overrides[section][field.name] = value if value is None else _parsed(field, value)
    return overrides


# ------------------------------------------------------------------------------ sampling, guidance

# Sampler options are the SamplingConfig fields with a flag, as for `train`; the commands that sample
# (generate, metrics) share them and the guidance options.
def sampling_options(func):
    fields = [f for f in dataclasses.fields(SamplingConfig) if f.metadata.get("flag") and f.name != "batch_size"]
    for field in reversed(fields):
        default = getattr(SAMPLING, field.name)
        shown = f" [{default}]" if field.name != "num_steps" else ""  # its help says the sampler's defaults
        func = click.option(field.metadata["flag"], field.name, default=None, type=_click_type(field),
                            help=f"{field.metadata['help']}{shown}")(func)
        if field.name == "num_steps":  # the budget as network evaluations, beside the steps
            func = click.option("--nfe", "nfe", type=int, default=None,
                                help="NFE budget per image: the most --steps of the sampler within it (heun: "
                                     "(NFE + 1) / 2 steps, the others NFE steps) [--steps].")(func)
    return func


def guidance_options(func):
    for option in reversed([
        click.option("--guide", default=None, help="Guide network (run directory or file): an unconditional one for "
                                                   "classifier-free guidance, a smaller or less-trained one for "
                                                   "autoguidance."),
        click.option("--guidance", type=float, default=None, help="Guidance strength w: D = w D_net + (1 - w) D_guide; "
                                                                  "1 = unguided [1, or the preset's]."),
        click.option("--guide-sigma-rel", type=float, default=None,
                     help="EMA length of the guide, when --guide is a run directory [--sigma-rel, or the preset's]."),
        click.option("--guidance-preset", default=None,
                     help="A released guided configuration (`mpdiff info --guidance` lists them): sets w and both "
                          "EMA lengths unless given."),
        click.option("--net-dir", "net_dir", default=None, metavar="DIR",
                     help="A folder of NVIDIA's released .pkl files: the --guidance-preset's network and guide are "
                          "taken from it by their release names (instead of a network and --guide)."),
    ]):
        func = option(func)
    return func


def sampling_from(values, batch_size=None):
    """The SamplingConfig of a command's sampler options (None = the default), checked; `--nfe N` sets
    the steps from an NFE budget."""
    changes = {f.name: _parsed(f, values[f.name]) for f in dataclasses.fields(SamplingConfig)
               if f.name in values and values[f.name] is not None}
    if batch_size is not None:
        changes["batch_size"] = batch_size
    sampling = SAMPLING.replace(**changes)
    if values.get("nfe") is not None:
        if "num_steps" in changes:
            raise ConfigError("give one of --steps and --nfe (which sets the steps)")
        sampling = sampling.with_nfe(values["nfe"])
    return sampling.check()


VAE_HELP = ("Latent networks (4 channels, e.g. an edm2-img512 run or NVIDIA's released img512 networks): a local "
            "folder with the Stable Diffusion VAE in diffusers format (stabilityai/sd-vae-ft-mse) to decode them "
            "into images [default: the one the run recorded]. Needs diffusers: pip install \"mpdiff[latent]\".")

METRICS_HELP = ("Comma-separated: fid (Inception-v3), fd_dinov2 (DINOv2 ViT-L/14), fd_digits (8x8 digits only), "
                "fd_mnist (32x32 MNIST only).")


def threads_option(func):
    """--threads N on the heavy commands (train, generate, metrics, ema-sweep, ref); the default is chosen for
    the machine's free CPUs (mpdiff.threads.choose_threads)."""
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="CPU threads for torch [OMP_NUM_THREADS if set, else the CPUs this process may use "
                             "less the load of other processes].")(func)


def apply_threads(threads):
    """Torch's CPU threads for a heavy command (--threads, else OMP_NUM_THREADS, else the free CPUs), said on
    stderr when the load of other processes left some CPUs unused."""
    from mpdiff.threads import choose_threads

    choice = choose_threads(threads)
    if choice.limited:
        click.echo(f"threads   {choice.note()}", err=True)
