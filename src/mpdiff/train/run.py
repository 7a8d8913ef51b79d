"""Setting up a run: a preset plus overrides, resolved against the dataset, checked, and compared
with what the run directory already holds (the resume contract).

:func:`planned_run` does all of it once and gives the loop one object, a :class:`RunPlan`: the
complete configuration (micro-batch settled), the dataset, the encoder, the processes and the device,
and the summary the run prints. Nothing in it is resolved again later.
"""

import contextlib
import dataclasses
import os
from typing import Optional, Tuple

import torch

from mpdiff.config import (STORAGE_DTYPES, Cadence, NetworkConfig, RunOptions, TrainingConfig, check_device,
                           check_precision, require)
from mpdiff.data.datasets import open_dataset
from mpdiff.data.labels import shown_class_names
from mpdiff.data.pixels import PixelEncoder
from mpdiff.describe import network_line, skip_scaling_summary
from mpdiff.distributed import Distributed
from mpdiff.errors import ConfigError
from mpdiff.presets import DEFAULT_PRESET, LADDER_DERIVED, get_preset, ladder_derived, ladder_preset
from mpdiff.storage.files import printable, read_json, write_json
from mpdiff.storage.layout import CHECKPOINT_DIR, SAMPLES_DIR, SNAPSHOT_DIR, TENSORBOARD_DIR, RunLayout
from mpdiff.storage.lock import run_directory_lock
from mpdiff.threads import choose_threads, threads_note
from mpdiff.train.advice import run_warnings

MAX_DATA_WORKERS = 64  # reader processes: more only forks until the machine stalls

# Cadence fields that may change between the invocations of one run (they change no result).
RUNTIME_CADENCE_FIELDS = ("status_nimg", "sample_nimg")


@dataclasses.dataclass(frozen=True)
class ResolvedRun:
    """A run's complete configuration, as written to RUN_DIR/config.json."""
    preset: str
    network: NetworkConfig
    training: TrainingConfig
    cadence: Cadence
    run: RunOptions
    dataset: dict               # what was found: spec, name, size, resolution, channels, num_classes
    # The encoder between the data and the network (PixelEncoder / LatentEncoder.describe()): recorded in
    # config.json, outside the resume contract (the dataset's channel count, in it, decides the encoder).
    encoder: dict = dataclasses.field(default_factory=lambda: PixelEncoder().describe())
    # The training fields the ablation config derived from the run's recipe (presets.ladder_derived), not
    # given on the command line: an extended run keeps the values it started with (:func:`keep_derived`).
    derived: Tuple[str, ...] = ()

    def to_dict(self):
        return {"preset": self.preset, "network": self.network.to_dict(), "training": self.training.to_dict(),
                "cadence": self.cadence.to_dict(), "run": self.run.to_dict(), "dataset": dict(self.dataset),
                "encoder": dict(self.encoder)}

    def contract(self):
        return contract_of(self.to_dict())


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """One invocation of a run, resolved once (:func:`planned_run`); what :class:`~mpdiff.train.loop.Trainer`
    consumes."""
    config: ResolvedRun          # complete: the micro-batch is settled
    dataset: object              # the opened dataset (streamed or in memory)
    encoder: object              # between data and network: PixelEncoder, or LatentEncoder on `device`
    dist: Distributed            # this process's place in the run (one process: rank 0 of 1)
    device: torch.device
    summary: Tuple[str, ...]     # what the run understood, printed at its start

    @classmethod
    def single(cls, resolved, dataset, micro_note: Optional[str] = None, dist=None):
        """The plan of an already resolved run, by default of one process (no torchrun); no lock, no contract
        check."""
        dist = dist or Distributed.single()
        device = torch.device(dist.device(resolved.run.device))
        return cls(resolved, dataset, encoder_of(resolved, device), dist, device,
                   tuple(summary_lines(resolved, dataset, micro_note)))

    def write_config(self):
        """config.json: written by the first process once the run's objects are built."""
        if self.dist.rank == 0:
            write_run_config(self.config)


@contextlib.contextmanager
def planned_run(preset=DEFAULT_PRESET, run=None, network=None, training=None, cadence=None):
    """Resolve a run once, into the :class:`RunPlan` the block trains with.

    In order: the preset with its overrides against the dataset (:func:`resolve_run`); the processes of a
    torchrun launch; the run directory's lock (first process, held until the block ends); the micro-batch
    (:func:`settle_micro_batch`, then the smallest that any process chose); the resume contract
    (:func:`check_existing_run`); the encoder and the summary. Nothing is written here."""
    resolved, dataset = resolve_run(preset, run, network, training, cadence)
    dist = Distributed.from_env(resolved.run.device)
    layout = RunLayout(resolved.run.run_dir)
    try:
        with dist.peers_watched(f"the last checkpoint in {printable(layout.checkpoint_dir)}"), \
                run_directory_lock(resolved.run.run_dir, "train") if dist.rank == 0 else contextlib.nullcontext():
            layout.check_folders(*training_folders(resolved.run))  # before anything is built
            resolved = keep_derived(resolved)
            resolved = settle_threads(resolved)
            resolved, micro_note = settle_micro_batch(resolved)
            if dist.active:  # every process takes the smallest micro-batch any of them chose
                resolved = with_micro(resolved, dist.all_min(resolved.run.batch_gpu or resolved.training.batch))
            check_existing_run(resolved)
            yield RunPlan.single(resolved, dataset, micro_note, dist)
    finally:
        dist.close()


def training_folders(run):
    """The run directory's folders that training lists or writes into (RunOptions `run`)."""
    return (CHECKPOINT_DIR, SNAPSHOT_DIR, SAMPLES_DIR) + ((TENSORBOARD_DIR,) if run.tensorboard else ())


def contract_of(config):
    """The part of a config.json that must not change between the invocations of one run.

    The duration may grow: the learning rate, the data order and every random draw depend on the image
    count only, so a finished run extended to a longer duration continues exactly where it stopped.
    """
    run = {k: v for k, v in config["run"].items() if k not in RunOptions.RUNTIME_FIELDS}
    cadence = {k: v for k, v in config["cadence"].items() if k not in RUNTIME_CADENCE_FIELDS}
    training = {k: v for k, v in config["training"].items() if k != "duration"}
    network = NetworkConfig.completed(config["network"])  # a run made before a field existed resumes
    return {"preset": config["preset"], "network": network, "training": training,
            "cadence": cadence, "run": run, "dataset": config["dataset"]}


def resolve_run(preset=DEFAULT_PRESET, run=None, network=None, training=None, cadence=None):
    """Combine a preset with overrides (dicts of config fields) and the dataset's shape.

    Returns (ResolvedRun, dataset). Raises ConfigError naming the offending field.
    """
    run = run or RunOptions()
    chosen = get_preset(preset)
    if run.dataset is None:  # the preset's own data (mnist for --preset mnist)
        run = run.replace(dataset=chosen.data)
    config = (network or {}).get("config")
    if config is not None:  # the ablation ladder's deltas first; explicit options then win (SPEC §4.2)
        chosen = ladder_preset(chosen, config)
    if run.run_dir is None:
        run = run.replace(run_dir=os.path.join("runs", preset))
    network_config = chosen.network.replace(**(network or {}))
    training_config = chosen.training.replace(**(training or {}))
    derived = ()
    if config is not None:  # what the config derives from the recipe, from the run's own (e.g. its --duration)
        training_config = ladder_derived(config, training_config, given=tuple(training or {}))
        derived = tuple(f for f in LADDER_DERIVED.get(config, ()) if f not in (training or {}))
    cadence_config = chosen.cadence.replace(**(cadence or {}))
    dataset = open_dataset(run.dataset, use_labels=run.use_labels, progress=None if run.progress else False)
    encoder = _encoder_of(dataset, run)
    if run.vae is not None:  # an absolute path: config.json records it for mpdiff generate, run from anywhere
        run = run.replace(vae=os.path.abspath(run.vae))
    network_config = network_config.replace(img_resolution=dataset.resolution,
                                            img_channels=encoder.channels(dataset.channels),
                                            label_dim=dataset.num_classes if run.use_labels else 0)
    asked = (network or {}).get("attn_resolutions")  # asked for explicitly: an error; from the preset: a warning
    levels = [dataset.resolution >> level for level in range(len(network_config.channel_mult))]
    if asked and network_config.backbone == "unet" and not set(asked) <= set(levels):
        raise ConfigError(f"{{attn_resolutions}} {','.join(str(r) for r in asked if r not in levels)}: no level of "
                          f"this network has that resolution (its levels: {', '.join(map(str, levels))})",
                          fields=("attn_resolutions",))
    validate_run(network_config, training_config, cadence_config, run, resolution=dataset.resolution)
    from mpdiff.nn.build import build_meta_network

    build_meta_network(network_config)  # what only the constructors check (skip scaling, UViT shape), before any write
    _check_apart(run.run_dir, run.dataset)
    found = {"spec": run.dataset, "name": dataset.name, "size": len(dataset), "resolution": dataset.resolution,
             "channels": dataset.channels, "num_classes": dataset.num_classes}
    return ResolvedRun(preset, network_config, training_config, cadence_config, run, found, encoder.describe(),
                       derived), dataset


def validate_run(network, training, cadence, run, resolution=None):
    """Check one run's configuration; raises ConfigError naming the offending field as {field}."""
    levels = len(network.channel_mult)
    if resolution is not None and network.backbone == "uvit":
        require(network.patch_size >= 1 and resolution % network.patch_size == 0, f"{{patch_size}} "
                f"{network.patch_size} does not divide the dataset resolution {resolution}", "patch_size")
    elif resolution is not None:
        require(resolution % (1 << (levels - 1)) == 0, f"dataset resolution {resolution} cannot be halved "
                f"{levels - 1} times (channel_mult has {levels} levels)")
    network.check()
    check_precision(run.precision)
    batch = training.batch
    require(batch > 0, f"{{batch}} must be positive, got {batch}", "batch")
    batch_gpu = batch if run.batch_gpu is None else run.batch_gpu
    require(batch_gpu > 0 and batch % batch_gpu == 0, f"{{batch_gpu}} {batch_gpu} must divide {{batch}} {batch}",
            "batch_gpu", "batch")
    for name, value in {"duration": training.duration, **cadence.to_dict(), "slice_nimg": run.slice_nimg}.items():
        require(value is None or (value > 0 and value % batch == 0),
                f"{{{name}}} {value} images must be a positive multiple of {{batch}} {batch}", name, "batch")
    require(run.max_nonfinite_steps >= 1, "{max_nonfinite_steps} must be at least 1", "max_nonfinite_steps")
    require(isinstance(run.data_workers, int) and 0 <= run.data_workers <= MAX_DATA_WORKERS,
            f"{{data_workers}} must be between 0 and {MAX_DATA_WORKERS} processes, got {run.data_workers}",
            "data_workers")
    require(run.keep_checkpoints >= 1, "{keep_checkpoints} must be at least 1", "keep_checkpoints")
    require(run.snapshot_dtype in STORAGE_DTYPES,
            f"{{snapshot_dtype}} {run.snapshot_dtype!r} is not one of {', '.join(STORAGE_DTYPES)}", "snapshot_dtype")
    training.check()
    check_device(run.device, field="device")


def _encoder_of(dataset, run):
    """The encoder of the dataset's channel count (SPEC §7.4: 8 -> latents, 1 or 3 -> pixels; else an
    error); a --vae folder (latents only) is checked now, not at the first sample grid."""
    from mpdiff.data.latents import check_vae_dir, encoder_for, import_diffusers

    encoder = encoder_for(dataset.channels, run.vae)
    if run.vae is not None:
        import_diffusers("decoding the sample grids of a latent run (--vae)")
        check_vae_dir(run.vae)
    return encoder


def encoder_of(resolved, device="cpu"):
    """The encoder object of a resolved run, decoding (latents) with its --vae folder on `device`."""
    from mpdiff.data.latents import encoder_for

    return encoder_for(resolved.dataset["channels"], resolved.run.vae, device=device)


def _check_apart(run_dir, dataset):
    """A run directory must not be, contain or sit inside a dataset folder: grids and checkpoints would
    land among the images (and be read as images by the next run)."""
    if not os.path.isdir(dataset):
        return
    run_real, data_real = os.path.realpath(run_dir), os.path.realpath(dataset)
    require(os.path.commonpath([run_real, data_real]) not in (run_real, data_real), f"{{run_dir}} {run_dir} and the "
            f"dataset folder {dataset} overlap; keep the run directory outside the dataset", "run_dir")


def check_existing_run(resolved):
    """Refuse to resume a run directory whose config.json records different options."""
    layout = RunLayout(resolved.run.run_dir)
    if not os.path.lexists(layout.config):
        return
    try:
        existing = read_json(layout.config, what="run config", error=ConfigError)
    except ConfigError as e:
        raise ConfigError(f"{e}; move it away or use a new run directory") from None
    try:
        theirs = contract_of(existing)
    except (KeyError, TypeError, AttributeError):
        raise ConfigError(f"{layout.config}: not an mpdiff run config; move it away or use a new run directory") \
            from None
    ours = resolved.contract()
    trained = max([nimg for nimg, _ in layout.checkpoints()], default=0)
    require(trained <= resolved.training.duration, f"{{duration}} {resolved.training.duration} is shorter than the "
            f"{trained} images this run has trained; a run can be extended, not shortened", "duration")
    if theirs != ours:
        changed = _changed_fields(theirs, ours)
        raise ConfigError(f"{resolved.run.run_dir} holds a run with different options ({', '.join(changed)} differ); "
                          f"re-run the original command to resume, or choose a new {{run_dir}}",
                          fields=[c.strip("{}") for c in changed if c.startswith("{")] + ["run_dir"])


def _changed_fields(theirs, ours):
    """Names of the fields that differ, as {field} placeholders where they are config fields."""
    changed = []
    for section in ours:
        a, b = theirs.get(section), ours[section]
        if isinstance(a, dict) and isinstance(b, dict):
            changed += ["{" + k + "}" if section != "dataset" and k in b else f"{section} {printable(str(k)[:40])}"
                        for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
        elif a != b:
            changed.append(section)
    return changed


def keep_derived(resolved):
    """The run with the derived recipe values (:attr:`ResolvedRun.derived`) its config.json records: a run
    extended to a longer duration keeps A's half-life from its start (it is part of the resume contract)."""
    kept = {f: value for f in resolved.derived if (value := _recorded(resolved.run.run_dir, "training", f))}
    return dataclasses.replace(resolved, training=resolved.training.replace(**kept)) if kept else resolved


def settle_micro_batch(resolved):
    """(resolved, note): the run with its micro-batch fixed, and one line saying where it came from.

    --batch-gpu wins. Otherwise a run keeps the micro-batch it started with (config.json), so that it
    resumes bit for bit on any machine. A new CPU run takes the largest divisor of the batch whose
    measured activation memory fits the budget (train/measure.py); on a GPU, the whole batch.
    """
    run, batch = resolved.run, resolved.training.batch
    if run.batch_gpu is not None:
        return resolved, f"micro-batch {run.batch_gpu} (--batch-gpu)"
    if os.path.lexists(RunLayout(run.run_dir).config):
        chosen = _recorded(run.run_dir, "run", "batch_gpu")
        if chosen and batch % chosen == 0:
            return with_micro(resolved, chosen), f"micro-batch {chosen} (chosen when this run started)"
        return resolved, f"micro-batch {batch} (the whole batch)"
    if not str(run.device).startswith("cpu"):
        return resolved, f"micro-batch {batch} (the whole batch on {run.device}; --batch-gpu to limit memory)"
    from mpdiff.train.measure import PEAK_PER_SAVED, choose_micro_batch

    micro, per_image, budget = choose_micro_batch(resolved.network, batch)
    estimate = PEAK_PER_SAVED * per_image * micro
    why = (f"fits the {budget / 2**30:.3g} GiB budget" if micro == batch
           else f"the largest divisor of {batch} within the {budget / 2**30:.3g} GiB budget")
    note = (f"micro-batch {micro}: {per_image / 2**20:.3g} MiB of activations per image (measured), "
            f"about {estimate / 2**20:,.0f} MiB per micro-batch; {why}; --batch-gpu to choose")
    return with_micro(resolved, micro), note


def settle_threads(resolved):
    """The run with its CPU thread count fixed: `--threads` (set by the command), else the count this run
    started with (config.json), else what this process uses now (for `mpdiff train`, chosen for the load,
    mpdiff.threads). Float sums depend on the count, so a resumed run keeps it to continue bit for bit."""
    run = resolved.run
    if run.threads is not None:
        choose_threads(run.threads)
        return resolved
    recorded = _recorded(run.run_dir, "run", "threads")
    if recorded:
        choose_threads(recorded, why="kept from when this run started; --threads N to change")
    return dataclasses.replace(resolved, run=run.replace(threads=recorded or torch.get_num_threads()))


def _recorded(run_dir, section, name):
    """The positive whole number RUN_DIR/config.json records as `section`.`name`, else None (no file, or one
    that does not read: check_existing_run says what is wrong with it)."""
    layout = RunLayout(run_dir)
    if not os.path.lexists(layout.config):
        return None
    try:
        part = read_json(layout.config, what="run config", error=ConfigError).get(section)
    except (ConfigError, AttributeError):
        return None
    value = part.get(name) if isinstance(part, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def with_micro(resolved, micro):
    return dataclasses.replace(resolved, run=resolved.run.replace(batch_gpu=micro))


def write_run_config(resolved):
    """Write config.json for a new run, or rewrite it when an existing run was extended."""
    if _recorded(resolved.run.run_dir, "training", "duration") != resolved.training.duration:
        write_json(RunLayout(resolved.run.run_dir).config, resolved.to_dict())


def summary_lines(resolved, dataset, micro_note=None):
    """What the run understood, one line per topic, for the terminal and log.txt (issue 11)."""
    from mpdiff.nn.build import build_meta_network
    from mpdiff.nn.flops import count_flops

    net, training, run = resolved.network, resolved.training, resolved.run
    names = shown_class_names(getattr(dataset, "class_names", None))
    classes = (f"{net.label_dim} classes (labels from {dataset.label_source}{': ' + names if names else ''})"
               if net.label_dim
               else f"unconditional (labels: {dataset.label_source if run.use_labels else 'not used (--uncond)'})")
    levels = [net.img_resolution >> i for i in range(len(net.channel_mult))]
    meta = build_meta_network(net)
    counted = count_flops(meta)
    micro = run.batch_gpu or training.batch
    lines = [
        f"data      {dataset.name}: {len(dataset):,} images, {net.img_resolution}x{net.img_resolution}, "
        f"{net.img_channels} channel{'s' if net.img_channels > 1 else ''}, {classes}",
    ]
    if resolved.encoder.get("name") != PixelEncoder.name:  # latents: say how they are read and decoded
        lines.append(f"latents   {resolved.dataset['channels']} stored channels (VAE means, standard deviations) -> "
                     f"{net.img_channels}: mean + std * eps, standardised with raw_mean "
                     f"{resolved.encoder.get('raw_mean')}, raw_std {resolved.encoder.get('raw_std')}; grids "
                     + (f"decoded with the VAE in {run.vae}" if run.vae else "not drawn (no --vae)"))
    lines += [
        f"network   {network_line(net)}; {int(counted['params']):,} parameters, {counted['flops'] / 1e9:.4g} Gflops "
        f"per evaluation",
        f"training  batch {training.batch} (micro-batch {micro}), {training.duration // training.batch:,} steps, "
        f"{training.duration:,} images, lr {training.lr:.4g}"
        f"{'' if training.decay else ' constant'}, EMA {', '.join(f'{s:.3f}' for s in training.ema_sigma_rels)}"
        + (f" + traditional (half-life {training.ema_halflife_img:,} images, "
           f"{training.ema_halflife_img / training.duration:.1%} of the training)"
           if training.ema_halflife_img else ""),
    ]
    if net.skip_scaling != "none":
        lines.append(f"skips     {skip_scaling_summary(net, meta)}")
    if micro_note:
        lines.append(f"memory    {micro_note}")
    if str(run.device).startswith("cpu"):
        lines.append(f"threads   {threads_note()}")
    dropped = sorted(set(net.attn_resolutions) - set(levels), reverse=True)
    if dropped and net.backbone == "unet":  # never silently: the preset asked for attention where this resolution has no level
        lines.append(f"warning   attention at {', '.join(f'{r}x{r}' for r in dropped)} (from the preset) does not "
                     f"exist at resolution {net.img_resolution}: its levels are {', '.join(map(str, levels))}")
    return lines + [f"warning   {w}" for w in run_warnings(resolved)]
