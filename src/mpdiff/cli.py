"""The `mpdiff` command line: thin wrappers that parse options and call the library."""

import json
import os
import re
import traceback
from fractions import Fraction

import click

from .errors import ConfigError, MpdiffError

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


class _Group(click.Group):
    def invoke(self, ctx):
        debug = ctx.params.get("debug") or os.environ.get("MPDIFF_DEBUG")
        try:
            return super().invoke(ctx)
        except MpdiffError as e:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
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

@cli.command()
@click.option("--preset", default="digits", show_default=True, help="Preset name (see `mpdiff info`).")
@click.option("--data", "dataset", default="digits", show_default=True,
              help="'digits' (built in) or a folder / ZIP of images with optional dataset.json.")
@click.option("--run-dir", default=None, help="Run directory [default: runs/<preset>].")
@click.option("--cond/--uncond", default=True, show_default=True, help="Use class labels if the data has them.")
@click.option("--batch", type=int, default=None, help="Total batch size [preset].")
@click.option("--batch-gpu", type=int, default=None, help="Micro-batch limit (gradient accumulation).")
@click.option("--duration", default=None, help="Training length in images, e.g. 512Ki or 2Mi [preset].")
@click.option("--lr", type=float, default=None, help="Reference learning rate alpha_ref [preset].")
@click.option("--decay", type=float, default=None, help="t_ref in iterations; 0 = constant LR [preset].")
@click.option("--rampup", default=None, help="LR warm-up length in images [preset].")
@click.option("--channels", type=int, default=None, help="Base channel count C0 [preset].")
@click.option("--dropout", type=float, default=None, help="Dropout probability [preset].")
@click.option("--p-mean", type=float, default=None, help="P_mean of the noise distribution [preset].")
@click.option("--p-std", type=float, default=None, help="P_std of the noise distribution [preset].")
@click.option("--ema", default=None, help="Tracked EMA sigma_rel values, e.g. 0.05,0.10 [preset].")
@click.option("--ema-halflife", default=None,
              help="Also track a traditional EMA with this half-life in images (saved as RUN_DIR/ema-traditional.safetensors).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--status", default="16Ki", show_default=True, help="Stats/progress interval in images.")
@click.option("--snapshot", default="16Ki", show_default=True, help="EMA snapshot interval in images.")
@click.option("--checkpoint", default="64Ki", show_default=True, help="Checkpoint interval in images.")
@click.option("--sample", default=None, help="Sample-grid interval in images (always one at the end).")
@click.option("--slice", "slice_", default=None, help="Stop this invocation after N more images.")
@click.option("--snapshot-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True)
@click.option("--max-nonfinite-steps", type=int, default=50, show_default=True,
              help="Stop after this many consecutive steps with non-finite loss or gradients.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--attn", type=click.Choice(["matmul", "sdpa"]), default=None, help="Attention kernel [preset].")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--tensorboard/--no-tensorboard", default=True, show_default=True)
def train(preset, dataset, run_dir, cond, batch, batch_gpu, duration, lr, decay, rampup, channels, dropout,
          p_mean, p_std, ema, ema_halflife, seed, status, snapshot, checkpoint, sample, slice_, snapshot_dtype,
          max_nonfinite_steps, device, attn, progress, tensorboard):
    """Train a model (resumes automatically when the run directory has checkpoints)."""
    from .training import RunOptions, train as run_training

    net_over, train_over = {}, {}
    if channels is not None:
        net_over["model_channels"] = channels
    if dropout is not None:
        net_over["dropout"] = dropout
    if attn is not None:
        net_over["attn_impl"] = attn
    for key, value in [("batch", batch), ("lr", lr), ("P_mean", p_mean), ("P_std", p_std)]:
        if value is not None:
            train_over[key] = value
    if decay is not None:
        train_over["decay"] = decay or None
    if duration is not None:
        train_over["duration"] = parse_nimg(duration, "--duration")
    if rampup is not None:
        train_over["rampup_img"] = 0 if str(rampup) == "0" else parse_nimg(rampup, "--rampup")
    if ema is not None:
        train_over["ema_sigma_rels"] = tuple(parse_floats(ema, "--ema"))
    if ema_halflife is not None:
        train_over["ema_halflife_img"] = parse_nimg(ema_halflife, "--ema-halflife")
    options = RunOptions(
        run_dir=run_dir or os.path.join("runs", preset), dataset=dataset, use_labels=cond, seed=seed,
        batch_gpu=batch_gpu, status_nimg=parse_nimg(status, "--status"),
        snapshot_nimg=parse_nimg(snapshot, "--snapshot"), checkpoint_nimg=parse_nimg(checkpoint, "--checkpoint"),
        sample_nimg=None if sample is None else parse_nimg(sample, "--sample"),
        slice_nimg=None if slice_ is None else parse_nimg(slice_, "--slice"), snapshot_dtype=snapshot_dtype,
        max_nonfinite_steps=max_nonfinite_steps, device=device, progress=progress, tensorboard=tensorboard)
    trainer = run_training(preset, options, net_over, train_over)
    if trainer.nimg >= trainer.tc.duration:
        click.echo(f"done: {options.run_dir} (samples: {os.path.join(options.run_dir, 'samples', 'grid-final.png')})")
    else:
        click.echo(f"stopped at {trainer.nimg} images (slice); run the same command again to continue")


# --------------------------------------------------------------------------------------- generate

@cli.command()
@click.argument("source")
@click.option("--seeds", default="0-99", show_default=True, help="Seeds, e.g. 0-999 or 1,5,7-9.")
@click.option("--out", "out_dir", required=True, help="Output folder (one PNG per seed + dataset.json).")
@click.option("--class", "class_idx", type=int, default=None, help="Fixed class [default: random per seed].")
@click.option("--steps", type=int, default=32, show_default=True, help="Heun steps (NFE = 2*steps - 1).")
@click.option("--batch", type=int, default=256, show_default=True, help="Images per sampler batch.")
@click.option("--sigma-rel", type=float, default=None, help="EMA profile to use from a run directory.")
@click.option("--guide", default=None, help="Guide network for CFG/autoguidance.")
@click.option("--guidance", type=float, default=1.0, show_default=True)
@click.option("--grid", default=None, help="Grid image path [default: OUT-grid.png, next to the folder].")
@click.option("--device", default="cpu", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def generate(source, seeds, out_dir, class_idx, steps, batch, sigma_rel, guide, guidance, grid, device, progress):
    """Sample images from a run directory or a network file."""
    from .generation import default_grid_path, generate_to_folder, resolve_network
    from .sampling import parse_seeds

    seed_list = parse_seeds(seeds)
    if steps < 1 or batch < 1:
        raise ConfigError("--steps and --batch must be at least 1")
    net, described = resolve_network(source, sigma_rel, device=device)
    if class_idx is not None and not 0 <= class_idx < max(net.label_dim, 1):
        raise ConfigError(f"--class {class_idx} is out of range for a network with {net.label_dim} classes")
    guide_net = resolve_network(guide, sigma_rel, device=device)[0] if guide else None
    click.echo(f"network: {described}", err=True)
    generate_to_folder(net, seed_list, out_dir, class_idx=class_idx, grid_path=grid, num_steps=steps,
                       batch_size=batch, guide=guide_net, guidance=guidance, progress=progress, device=device)
    click.echo(f"wrote {len(seed_list)} images and dataset.json to {out_dir}; grid: {grid or default_grid_path(out_dir)}")


# ------------------------------------------------------------------------------------------- eval

@cli.command("eval")
@click.argument("images")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(images, as_json):
    """Evaluate generated digits (a folder written by `mpdiff generate`)."""
    from .metrics import evaluate_digits, format_report, load_image_folder_for_eval

    pixels, labels = load_image_folder_for_eval(images)
    result = evaluate_digits(pixels, labels)
    click.echo(json.dumps(result, indent=2) if as_json else format_report(result))


# ------------------------------------------------------------------------------------------- info

@cli.command()
@click.argument("preset", required=False)
@click.option("--json", "as_json", is_flag=True)
def info(preset, as_json):
    """Parameter count and Gflops per network evaluation of a preset (lists presets without one)."""
    from .presets import PRESETS

    if preset is None:
        for name, p in PRESETS.items():
            click.echo(f"{name:20s} {p.description}")
        return
    from .flops import describe_preset
    desc = describe_preset(preset)
    if as_json:
        click.echo(json.dumps({k: v for k, v in desc.items() if k != "gflops_by_op"}, indent=2))
        return
    click.echo(f"{desc['name']}: {desc['description']}")
    click.echo(f"  parameters  {desc['params']:,} ({desc['mparams']:.2f} M)")
    click.echo(f"  compute     {desc['gflops']:.4g} Gflops per network evaluation")
    t = desc["training"]
    click.echo(f"  training    batch {t['batch']}, lr {t['lr']}, decay {t['decay']}, duration {t['duration']:,} images, "
               f"P_mean {t['P_mean']}, P_std {t['P_std']}, dropout {desc['network']['dropout']}")


# ------------------------------------------------------------------------------------ post-hoc EMA

@cli.command()
@click.argument("run_dir")
@click.option("--sigma-rel", required=True, help="Target EMA lengths, e.g. 0.05,0.1 or A:B:N.")
@click.option("--at", "at_kimg", type=float, default=None, help="Training time in kimg [default: last snapshot].")
@click.option("--out", "out_dir", default=None, help="Output folder [default: RUN_DIR/phema].")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def phema(run_dir, sigma_rel, at_kimg, out_dir, dtype, progress):
    """Post-hoc EMA: reconstruct networks of any EMA length from the run's snapshots."""
    from .phema import reconstruct

    paths = reconstruct(run_dir, parse_range(sigma_rel, "--sigma-rel"), at_nimg=_kimg_to_nimg(at_kimg),
                        out_dir=out_dir, dtype=dtype, progress=progress)
    for path in paths:
        click.echo(path)


def _kimg_to_nimg(kimg):
    return None if kimg is None else int(round(kimg * 1000))


@cli.command("ema-sweep")
@click.argument("run_dir")
@click.option("--sigma-rel", default="0.02:0.25:10", show_default=True, help="A:B:N or a comma list.")
@click.option("--seeds", default="0-499", show_default=True, help="Samples per EMA length.")
@click.option("--steps", type=int, default=32, show_default=True)
@click.option("--at", "at_kimg", type=float, default=None, help="Training time in kimg [default: last snapshot].")
@click.option("--out", "out_dir", default=None, help="Output folder [default: RUN_DIR/ema-sweep].")
@click.option("--progress/--no-progress", default=True, show_default=True)
def ema_sweep(run_dir, sigma_rel, seeds, steps, at_kimg, out_dir, progress):
    """Reconstruct a range of EMA lengths, evaluate each, write a table and a plot."""
    from .sampling import parse_seeds
    from .sweep import ema_sweep as run_sweep

    result = run_sweep(run_dir, parse_range(sigma_rel, "--sigma-rel"), parse_seeds(seeds), num_steps=steps,
                       at_nimg=_kimg_to_nimg(at_kimg), out_dir=out_dir, progress=progress)
    click.echo(result["table"])
    click.echo(f"plot: {result['plot']}")


@cli.command("plot-ema-profile")
@click.argument("run_dir")
@click.option("--sigma-rel", type=float, required=True)
@click.option("--at", "at_kimg", type=float, default=None)
@click.option("--out", "out_path", default=None, help="PNG path [default: RUN_DIR/phema/profile-<nimg>-<sigma_rel>.png].")
def plot_ema_profile(run_dir, sigma_rel, at_kimg, out_path):
    """Plot a target EMA profile and its reconstruction from the snapshots."""
    from .ema_plots import plot_ema_profile as plot

    path, error = plot(run_dir, sigma_rel, at_nimg=_kimg_to_nimg(at_kimg), out_path=out_path)
    click.echo(f"{path} (max abs profile error {error:.3g})")


def main(argv=None):
    cli.main(args=argv, prog_name="mpdiff")


if __name__ == "__main__":
    main()
