"""The training loop (SPEC §1, §8): steps at image-count cadences, with stats rows, EMA snapshots
for post-hoc EMA, sample grids and atomic checkpoints; a killed run resumes bit for bit.

The pieces it drives live next to it: :mod:`~mpdiff.train.state` (what is trained),
:mod:`~mpdiff.train.step` (one optimizer step), :mod:`~mpdiff.train.checkpoint` (state <-> file),
:mod:`~mpdiff.train.report` (messages and stats) and :mod:`~mpdiff.train.run` (configuration).
"""

import os
import time
import warnings

import torch

from mpdiff.data.labels import one_hot
from mpdiff.data.sources import describe_other_images, other_images
from mpdiff.diffusion.generate import generate
from mpdiff.ema.snapshots import save_ema_snapshots
from mpdiff.errors import DatasetError, NumericalError
from mpdiff.metrics.estimate import duration_text
from mpdiff.nn.build import build_network
from mpdiff.nn.fast import accelerate
from mpdiff.storage.images import class_grid, save_grid
from mpdiff.storage.layout import RunLayout, parse_checkpoint_name, parse_snapshot_name
from mpdiff.storage.network_files import save_network
from mpdiff.threads import threads_note
from mpdiff.train import checkpoint
from mpdiff.train.dynamics import run_dynamics
from mpdiff.train.feed import StepPlan, images_of, make_feed
from mpdiff.train.precision import apply_precision_policy
from mpdiff.train.report import IntervalStats, RunReport
from mpdiff.train.run import RunPlan, planned_run
from mpdiff.train.state import TrainState
from mpdiff.train.step import TrainStep

GRID_CLASSES = 10               # class-conditional grids show up to this many classes ...
GRID_PER_CLASS = 10             # ... with up to this many samples each, in one sampler batch
GRID_UNCONDITIONAL = 64         # (either way at most one training batch of images)
WARMUP_STEPS = 3                # steps measured (after the first) for the time estimate
SLOW_FACTOR = 3                 # a stats interval this many times slower than the estimate's speed is warned of
# torch's warnings that every process of a torchrun launch would print alike: only the first one does.
TORCH_WARNINGS_ONCE = ("Grad strides do not match bucket view strides", "`broadcast_buffers` is deprecated")


class Trainer:
    """One invocation of a run: builds the state from its :class:`~mpdiff.train.run.RunPlan`, resumes,
    trains, writes outputs."""

    def __init__(self, plan: RunPlan):
        resolved = self.resolved = plan.config
        self.plan, self.dist, self.device, self.dataset = plan, plan.dist, plan.device, plan.dataset
        self.run_options, self.cadence, self.training = resolved.run, resolved.cadence, resolved.training
        self.layout = RunLayout(resolved.run.run_dir)
        self.writer = self.dist.rank == 0  # only the first process writes (stats, snapshots, checkpoints, grids)
        apply_precision_policy(self.device)
        dataset = plan.dataset
        self.state = TrainState(resolved.network, resolved.training, resolved.run.seed, device=self.device)
        accelerate(self.state.net)  # the fast twin, in place: the same function, same weights (mpdiff.nn.fast)
        classes = resolved.network.label_dim
        labels = one_hot(torch.from_numpy(dataset.labels), classes) if classes else None
        ddp = None
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            if not self.writer:  # torch's warnings once, from the first process (as every message of the run)
                for message in TORCH_WARNINGS_ONCE:
                    warnings.filterwarnings("ignore", message=message)

            ddp = DistributedDataParallel(self.state.net, device_ids=[self.device.index] if self.device.type == "cuda"
                                          else None, broadcast_buffers=False)
        from mpdiff.nn.runtime import compiled, set_precision

        set_precision(self.state.net, resolved.run.precision)
        images = images_of(dataset)
        self.feed = make_feed(dataset, workers=resolved.run.data_workers)
        self.encoder = plan.encoder  # pixels, or latents (SPEC §7.1): by the data's channels
        self.grid_note = None  # said once when grids cannot be drawn (latents without --vae)
        self.step_fn = TrainStep(images, labels, resolved.training, resolved.run.seed,
                                 micro_batch=resolved.run.batch_gpu,
                                 max_nonfinite_steps=resolved.run.max_nonfinite_steps, device=self.device,
                                 feed=self.feed, dist=self.dist, ddp=ddp, encoder=self.encoder)
        if resolved.run.compile:  # the step's forward and backward go through the compiled module
            self.step_fn.model = compiled(ddp if ddp is not None else self.state.net)
        self.report = RunReport(self.layout, progress=resolved.run.progress and self.writer,
                                tensorboard=resolved.run.tensorboard) if self.writer else _QuietReport()
        self.dynamics = None  # training-dynamics diagnostics in the stats rows (train/dynamics.py)
        if resolved.run.dynamics and self.writer:
            self.dynamics = run_dynamics(self.state, self.step_fn.images, self.step_fn.labels, resolved.training,
                                         resolved.cadence, resolved.run.seed, micro_batch=resolved.run.batch_gpu,
                                         device=self.device, encoder=self.encoder)
        self.last_good = None  # the newest checkpoint known to hold this run's state
        self.expected_ips, self.slow_warned = None, False  # the speed measured at the start; said once when far below
        self._settled = None  # (step, reading) of the newest read of the step tally

    @property
    def nimg(self):
        return self.state.nimg

    def say(self, message):
        self.report.say(message)

    def resume(self):
        path = checkpoint.resume(self.layout, self.state, self.resolved.contract(), self.say,
                                 duration=self.training.duration)
        self.last_good = path  # verified by loading it; a skipped (damaged) newer one is never "good"
        if path is not None:
            self.say(f"resumed from {path} at {self.state.nimg} images")
        return path

    def earlier_snapshots(self):
        """[nimg] of the EMA snapshot files already in the run directory (one per file)."""
        if not self.writer or not os.path.isdir(self.layout.snapshot_dir):
            return []
        return [parsed.nimg for parsed in map(parse_snapshot_name, os.listdir(self.layout.snapshot_dir)) if parsed]

    def train_step(self):
        """One step; returns its learning rate."""
        try:
            return self.step_fn(self.state)
        except DatasetError as e:  # a bad file met mid-run: keep the state so far, then stop with its line
            saved = self.last_good is not None and parse_checkpoint_name(self.last_good) == self.state.nimg
            path = self.last_good if saved else self.save_checkpoint() if self.writer and self.state.nimg else None
            raise DatasetError(f"{e}; stopped at {self.state.nimg:,} images"
                               + (f", state saved in {path}" if path else "")) from None

    def settle(self):
        """Read the steps' device tally (counters, guard, interval means): at the status cadence and
        before anything is written. A tripped non-finite guard stops the run here."""
        if self._settled is not None and self._settled[0] == self.state.step:
            return self._settled[1]  # nothing has run since the last read
        try:
            reading = self.step_fn.settle(self.state)
            self._settled = (self.state.step, reading)
            return reading
        except NumericalError as e:
            raise NumericalError(f"{e}. Last good checkpoint: {self.last_good or 'none'}") from None

    def save_checkpoint(self):
        self.settle()  # never save a state that a tripped guard has disowned
        if not self.writer:
            return None
        self.last_good = checkpoint.save_checkpoint(self.layout, self.state, self.resolved.contract(),
                                                    keep=self.run_options.keep_checkpoints)
        return self.last_good

    def save_snapshots(self):
        self.settle()
        if not self.writer:
            return
        dtype = self.run_options.snapshot_dtype
        save_ema_snapshots(self.state.ema, self.layout.snapshot_dir, self.resolved.network, step=self.state.step,
                           batch_size=self.training.batch, dtype=dtype)
        if self.state.traditional_ema is not None:  # latest only; not a post-hoc EMA input
            save_network(self.layout.traditional_ema, self.state.traditional_ema.averaged_state_dict(),
                         self.resolved.network, dtype=dtype, kind="traditional-ema", nimg=self.state.nimg,
                         halflife_img=self.training.ema_halflife_img)

    def sample_grid(self, final=False):
        """Sample a grid with the longest tracked EMA profile; one column per class when conditional.
        Latents are decoded with the run's VAE; without one (no --vae) there is no grid: None."""
        if not self.encoder.can_decode:
            if self.grid_note is None:
                self.grid_note = "no sample grids: this latent run has no VAE to decode them (--vae DIR)"
                self.say(self.grid_note)
            return None
        net = build_network(self.resolved.network, device=self.device)
        self.state.ema.copy_to(net, self.state.ema.sigma_rels[-1])
        classes = self.resolved.network.label_dim
        batch = self.training.batch
        if classes:
            shown = min(classes, GRID_CLASSES)
            seeds = list(range(shown * max(1, min(GRID_PER_CLASS, batch // shown))))
            class_ids = [seed % shown for seed in seeds]
        else:
            seeds, class_ids = list(range(min(GRID_UNCONDITIONAL, batch))), None
        x, drawn = generate(net, seeds, class_idx=class_ids, num_steps=self.run_options.grid_steps, progress=False,
                            device=self.device)
        path = self.layout.grid(None if final else self.state.nimg)
        save_grid(path, *class_grid(self.encoder.decode(x).numpy(), drawn))
        return path

    def _estimate(self, seconds, stop_at):
        """Say how long the rest of this invocation's steps will take, from the measured warm-up steps
        (the first step is left out: it pays one-time costs)."""
        steps_left = (stop_at - self.state.nimg) // self.training.batch
        if steps_left > 0:
            per_step = sorted(seconds)[len(seconds) // 2]
            self.say(f"estimate  {duration_text(per_step * steps_left)} for the remaining {steps_left:,} steps "
                     f"({per_step:.3g} s per step, measured; snapshots, checkpoints and grids come on top)")
        self.expected_ips = self.training.batch / max(sorted(seconds)[len(seconds) // 2], 1e-9)

    def status(self, row, stop_at, first):
        """The stats row just written, as one line for the terminal and log.txt (with or without a progress
        bar): images, loss, speed and the time left at that speed; and, once, a warning when the speed has
        fallen far below the one measured at the start (other processes on the cores, usually)."""
        ips = row["img_per_sec"]
        left = (stop_at - row["nimg"]) / ips if ips > 0 else float("inf")
        self.say(f"status    {row['nimg']:,} of {self.training.duration:,} images, loss {row['loss']:.4g}, "
                 f"{ips:,.3g} img/s" + (f", about {duration_text(left)} left" if row["nimg"] < stop_at and left < 1e8
                                        else ""))
        expected = self.expected_ips
        if not first and expected and ips < expected / SLOW_FACTOR and not self.slow_warned:
            self.slow_warned = True
            why = (f"other processes are probably using the CPU cores ({threads_note()}; mpdiff train --threads N "
                   f"chooses)" if getattr(self, "device", None) is None or self.device.type == "cpu"
                   else f"other work is probably using {self.device}")
            self.say(f"warning   training now runs at {ips:,.3g} img/s, {expected / ips:.0f}x slower than the "
                     f"{expected:,.3g} img/s measured at its start: {why}")

    def run(self):
        cadence, duration = self.cadence, self.training.duration
        if self.writer:
            os.makedirs(self.layout.run_dir, exist_ok=True)
            self.layout.remove_stale_temporaries()
        self.dist.barrier()
        if self.resume() is None:
            params = sum(p.numel() for p in self.state.net.parameters())
            self.say(f"new run in {self.layout.run_dir}: {params:,} parameters, "
                     f"dataset {self.dataset.name} ({len(self.dataset)} images)")
            earlier = self.earlier_snapshots()
            if earlier:  # an attempt killed before its first checkpoint: nothing to resume, but files to overwrite
                self.say(f"note      no checkpoint to resume from, so this run starts at 0 images; the "
                         f"{len(earlier)} EMA snapshot file(s) of an earlier attempt in {self.layout.snapshot_dir} "
                         f"(up to {max(earlier):,} images), its stats rows and grids will be overwritten as the run "
                         f"passes their image counts (move them away now to keep them)")
        for line in self.plan.summary:
            self.say(line)
        ignored = self.dataset.ignored_files
        kinds = other_images(ignored)  # images of a kind the reader does not decode (GIF, TIFF, ...), by name
        if kinds:  # never a silent skip
            self.say(f"dataset {self.dataset.name}: ignored images of kinds mpdiff does not read: "
                     f"{describe_other_images(kinds)}; convert them to PNG to train on them")
        ignored = [name for name in ignored if not any(name in names for names in kinds.values())]
        if ignored:
            shown = ", ".join(ignored[:5]) + (", ..." if len(ignored) > 5 else "")
            self.say(f"dataset {self.dataset.name}: ignored {len(ignored)} file(s) that are not images: {shown}")
        if self.dynamics is not None and self.dynamics.every != cadence.status_nimg:
            self.say(f"dynamics  in one stats row of every {self.dynamics.every // cadence.status_nimg} "
                     f"(every {self.dynamics.every:,} images), to keep stats.jsonl readable in one piece")
        slice_nimg = self.run_options.slice_nimg
        stop_at = duration if slice_nimg is None else min(duration, self.state.nimg + slice_nimg)
        self.report.open(self.state.nimg, duration)
        self.feed.start(StepPlan(self.step_fn.indices_at, self.state.nimg, stop_at, self.training.batch))
        interval = IntervalStats(self.state.nimg)
        warmup = []  # seconds of the first steps of this invocation, for the time estimate
        rows = 0  # written by this invocation
        cuda = self.device.type == "cuda"
        try:
            while self.state.nimg < stop_at:
                started = time.time()
                watched = self.dynamics is not None and self.dynamics.due(self.state.nimg + self.training.batch,
                                                                          stop_at)
                if watched:  # this step ends on a row with dynamics: copy the weights before Adam moves them
                    self.dynamics.watch(self.state.optimizer)
                lr = self.train_step()
                if len(warmup) < WARMUP_STEPS + 1:
                    if cuda:  # the estimate needs the steps' real time, not their launch time
                        torch.cuda.synchronize(self.device)
                    warmup.append(time.time() - started)
                    if len(warmup) == WARMUP_STEPS + 1:
                        self._estimate(warmup[1:], stop_at)
                self.state.counters["elapsed_sec"] += time.time() - started
                nimg = self.state.nimg
                self.report.tick(nimg)
                if nimg % cadence.status_nimg == 0 or nimg >= stop_at:
                    dynamics = self.dynamics.measure() if watched else None  # first: its cost counts in img/s
                    reading = self.settle()  # the one read of the steps' numbers since the last row
                    row = interval.row(self.state, lr, reading)
                    self.report.row(row if dynamics is None else {**row, "dynamics": dynamics})
                    self.status(row, stop_at, first=rows == 0)
                    rows += 1
                    self.step_fn.tally.new_interval()
                    interval = IntervalStats(nimg)
                if nimg % cadence.snapshot_nimg == 0 or nimg >= duration:
                    self.save_snapshots()
                if cadence.sample_nimg and nimg % cadence.sample_nimg == 0 and nimg < duration and self.writer:
                    self.settle()
                    self.sample_grid()
                if nimg % cadence.checkpoint_nimg == 0 or nimg >= stop_at:
                    self.save_checkpoint()
        finally:
            self.feed.close()
            self.report.close()
        if self.state.nimg >= duration:
            bad = self.state.counters["consecutive_nonfinite"]
            if bad:  # a run whose last steps all failed has not learned; never call it complete
                raise NumericalError(f"the last {bad} training steps produced non-finite losses or gradients; "
                                     f"the run ended without a usable network")
            grid = self.sample_grid(final=True) if self.run_options.final_grid and self.writer else None
            end = (f"; samples: {grid}" if grid is not None else " (no final grid: no --vae to decode latents)"
                   if self.run_options.final_grid else " (no final grid: --no-final-grid)")
            self.say(f"training complete at {self.state.nimg} images{end}")
        return self.state.nimg


class _QuietReport:
    """The report of a process other than the first: RunReport's methods, saying and writing nothing."""

    def __getattr__(self, name):
        if name in ("say", "open", "tick", "row", "close"):
            return lambda *args: None
        raise AttributeError(name)


def train(preset="digits", run=None, network=None, training=None, cadence=None):
    """Train (or resume) a run from a preset and overrides (dicts of config fields). Returns the Trainer.

    Under torchrun (WORLD_SIZE > 1) every process runs this; they form one run (:mod:`mpdiff.distributed`):
    the first process holds the run directory's lock and writes, the others only train."""
    with planned_run(preset, run, network, training, cadence) as plan:
        trainer = Trainer(plan)  # options refused here write nothing
        plan.write_config()
        trainer.run()
    return trainer
