"""The training loop (SPEC §1, §8): kimg-based cadences, gradient accumulation, power-function EMA,
snapshots for post-hoc EMA, atomic checkpoints with bit-exact resume, JSONL + TensorBoard logs.

A run directory holds:
  config.json                       resolved configuration (the resume contract)
  stats.jsonl, log.txt, tensorboard/ one row per status interval
  checkpoints/training-state-*.safetensors   weights, Adam, EMA, data position, counters
  snapshots/ema-*.safetensors       EMA snapshots (network files) for post-hoc EMA
  samples/grid-*.png                sample grids at a cadence and at the end
"""

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import save_network, storage_dtype
from .data import decode_images, encode_images, open_dataset
from .errors import CheckpointError, ConfigError, NumericalError
from .fileio import append_line, load_tensors, read_jsonl, save_tensors, write_json, write_text
from .images import save_grid
from .loss import edm2_loss, learning_rate, make_optimizer, sample_sigma, set_learning_rate, zero_nonfinite_grads
from .model import build_network
from .phema import PowerFunctionEMA, TraditionalEMA, sigma_rel_to_gamma
from .presets import get_preset

log = logging.getLogger("mpdiff.training")

CHECKPOINT_FORMAT = "mpdiff-training-state/1"


@dataclass
class RunOptions:
    """Everything about a run that is not a network or optimisation hyperparameter."""
    run_dir: str = "runs/digits"
    dataset: str = "digits"             # 'digits' or a folder / ZIP of images
    use_labels: bool = True             # class-conditional if the dataset has labels
    seed: int = 0
    batch_gpu: Optional[int] = None     # micro-batch limit (gradient accumulation); None = whole batch
    status_nimg: int = 16 * 1024        # stats row + progress update every N images
    snapshot_nimg: int = 16 * 1024      # EMA snapshots for post-hoc EMA every N images
    checkpoint_nimg: int = 64 * 1024    # training-state checkpoint every N images (and at the end)
    sample_nimg: Optional[int] = None   # sample grid every N images (always one at the end)
    snapshot_dtype: str = "float32"     # storage dtype of EMA snapshots
    keep_checkpoints: int = 2           # older verified checkpoints are pruned
    max_nonfinite_steps: int = 50       # stop after this many consecutive non-finite steps
    grid_steps: int = 32                # sampler steps for grids
    device: str = "cpu"
    progress: bool = True
    tensorboard: bool = True
    slice_nimg: Optional[int] = None    # stop this invocation after N more images (job slicing)

    # Fields that may differ between the invocations of one run.
    RUNTIME_FIELDS = ("run_dir", "progress", "tensorboard", "device", "slice_nimg", "sample_nimg", "status_nimg",
                      "grid_steps")

    def to_dict(self):
        return dataclasses.asdict(self)


def resolve_config(preset_name="digits", options=None, network_overrides=None, training_overrides=None):
    """Combine a preset with overrides and the dataset's shape into the run's resolved config."""
    options = options or RunOptions()
    preset = get_preset(preset_name)
    network = preset.network.replace(**(network_overrides or {}))
    training = preset.training.replace(**(training_overrides or {}))
    dataset = open_dataset(options.dataset, use_labels=options.use_labels)
    network = network.replace(img_resolution=dataset.resolution, img_channels=dataset.channels,
                              label_dim=dataset.num_classes if options.use_labels else 0)
    _validate(network, training, options, dataset)
    config = {"preset": preset_name, "network": network.to_dict(), "training": training.to_dict(),
              "run": options.to_dict(), "dataset": {"spec": options.dataset, "name": dataset.name,
                                                    "size": len(dataset), "resolution": dataset.resolution,
                                                    "channels": dataset.channels,
                                                    "num_classes": dataset.num_classes}}
    return config, network, training, dataset


def _validate(network, training, options, dataset):
    levels = len(network.channel_mult)
    if dataset.resolution % (1 << (levels - 1)) != 0:
        raise ConfigError(f"dataset resolution {dataset.resolution} cannot be halved {levels - 1} times "
                          f"(channel_mult has {levels} levels)")
    if training.batch <= 0:
        raise ConfigError(f"--batch must be positive, got {training.batch}")
    batch_gpu = training.batch if options.batch_gpu is None else options.batch_gpu
    if batch_gpu <= 0 or training.batch % batch_gpu != 0:
        raise ConfigError(f"--batch-gpu {batch_gpu} must divide --batch {training.batch}")
    if training.duration <= 0 or training.duration % training.batch != 0:
        raise ConfigError(f"--duration {training.duration} images must be a positive multiple of --batch {training.batch}")
    for name in ("status_nimg", "snapshot_nimg", "checkpoint_nimg", "sample_nimg", "slice_nimg"):
        value = getattr(options, name)
        if value is not None and (value <= 0 or value % training.batch != 0):
            raise ConfigError(f"--{name.replace('_nimg', '').replace('_', '-')} {value} images must be a "
                              f"positive multiple of --batch {training.batch}")
    if options.max_nonfinite_steps < 1:
        raise ConfigError("--max-nonfinite-steps must be at least 1")
    if options.keep_checkpoints < 1:
        raise ConfigError("--keep-checkpoints must be at least 1")
    storage_dtype(options.snapshot_dtype)
    if not training.lr > 0:
        raise ConfigError(f"--lr must be positive, got {training.lr}")
    if training.decay is not None and not training.decay > 0:
        raise ConfigError(f"--decay must be positive (0 on the command line: constant learning rate), "
                          f"got {training.decay}")
    if training.rampup_img < 0:
        raise ConfigError(f"--rampup must be at least 0 images, got {training.rampup_img}")
    if not training.P_std > 0:
        raise ConfigError(f"--p-std must be positive, got {training.P_std}")
    if not 0 <= network.dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), got {network.dropout}")
    if network.model_channels < 1:
        raise ConfigError(f"--channels must be positive, got {network.model_channels}")
    if training.ema_halflife_img is not None and not training.ema_halflife_img > 0:
        raise ConfigError(f"--ema-halflife must be a positive number of images, got {training.ema_halflife_img}")
    sigma_rel_to_gamma(training.ema_sigma_rels)  # ConfigError for EMA lengths outside (0, 0.2887)


def _seed_for(*parts):
    """A 63-bit seed from a hash of the parts (stable across processes and platforms)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed, dataset_size, epoch):
    return torch.randperm(dataset_size, generator=torch.Generator().manual_seed(_seed_for(seed, "epoch", epoch)))


def batch_indices(seed, dataset_size, start, count):
    """Dataset indices for global sample positions start..start+count-1: each epoch is a
    permutation seeded by (seed, epoch), so the data order depends only on the image count."""
    out = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, dataset_size)
        take = min(count - len(out), dataset_size - offset)
        out += _epoch_permutation(seed, dataset_size, epoch)[offset:offset + take].tolist()
        pos += take
    return out


class Trainer:
    """One run: builds everything from the resolved config, resumes, trains, writes outputs."""

    def __init__(self, config, network_config, training_config, dataset, options):
        self.config = config
        self.net_config = network_config
        self.tc = training_config
        self.dataset = dataset
        self.opt_ = options
        self.run_dir = options.run_dir
        self.device = torch.device(options.device)
        torch.manual_seed(_seed_for(options.seed, "init"))
        self.net = build_network(network_config, device=self.device).train()
        self.optimizer = make_optimizer(self.net.parameters(), betas=training_config.betas)
        self.ema = PowerFunctionEMA(self.net, training_config.ema_sigma_rels)
        self.traditional_ema = None  # the classic alternative (config A), opt-in
        if training_config.ema_halflife_img:
            self.traditional_ema = TraditionalEMA(self.net, training_config.ema_halflife_img)
        self.nimg = 0
        self.step = 0
        self.counters = {"nonfinite_loss_steps": 0, "nonfinite_grad_steps": 0, "nonfinite_grad_values": 0,
                         "consecutive_nonfinite": 0, "elapsed_sec": 0.0}
        self.images = torch.from_numpy(dataset.images)
        self.labels = None
        if network_config.label_dim:
            self.labels = torch.nn.functional.one_hot(torch.from_numpy(dataset.labels),
                                                      network_config.label_dim).to(torch.float32)

    # ---------------------------------------------------------------- paths
    def path(self, *parts):
        return os.path.join(self.run_dir, *parts)

    def checkpoint_path(self, nimg):
        return self.path("checkpoints", f"training-state-{nimg:012d}.safetensors")

    # ---------------------------------------------------------------- checkpoints
    def state_tensors(self):
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        opt_state = self.optimizer.state_dict()
        for idx, entry in opt_state["state"].items():
            for key, value in entry.items():
                tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value)
        for i, average in enumerate(self.ema.state_dict()["averages"]):
            for name, value in average.items():
                tensors[f"ema.{i}.{name}"] = value
        if self.traditional_ema is not None:
            for name, value in self.traditional_ema.state_dict()["averages"][0].items():
                tensors[f"tema.{name}"] = value
        meta = {"format": CHECKPOINT_FORMAT, "nimg": self.nimg, "step": self.step, "counters": self.counters,
                "config": _contract(self.config), "optim_param_groups": opt_state["param_groups"],
                "ema_sigma_rels": list(self.ema.sigma_rels), "ema_nimg": self.ema.nimg}
        return tensors, meta

    def save_checkpoint(self):
        for p in self.net.parameters():
            if not torch.isfinite(p).all():
                raise NumericalError(f"network weights became non-finite at {self.nimg} images; "
                                     f"not overwriting the last good checkpoint")
        tensors, meta = self.state_tensors()
        path = self.checkpoint_path(self.nimg)
        save_tensors(path, tensors, meta)
        load_tensors(path)  # verify the new file reads back before pruning older ones
        older = sorted(glob.glob(self.path("checkpoints", "training-state-*.safetensors")))
        older = [p for p in older if p != path]
        for stale in older[:max(0, len(older) - (self.opt_.keep_checkpoints - 1))]:
            os.remove(stale)
        return path

    def load_checkpoint(self, path):
        tensors, meta = load_tensors(path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not an mpdiff training checkpoint")
        if meta.get("config") != _contract(self.config):
            raise ConfigError(f"{path}: checkpoint was written with a different configuration; "
                              f"use a new --run-dir or the original options")
        try:
            self._restore(tensors, meta, path)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise CheckpointError(f"{path}: incomplete training state ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None

    def _restore(self, tensors, meta, path):
        net_sd = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        try:
            self.net.load_state_dict(net_sd)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not match the network ({str(e).splitlines()[0]})") from None
        opt_state = {"state": {}, "param_groups": meta["optim_param_groups"]}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                opt_state["state"].setdefault(int(idx), {})[name] = value
        self.optimizer.load_state_dict(opt_state)
        averages = [{} for _ in meta["ema_sigma_rels"]]
        for key, value in tensors.items():
            if key.startswith("ema."):
                _, idx, name = key.split(".", 2)
                averages[int(idx)][name] = value
        self.ema.load_state_dict({"sigma_rels": meta["ema_sigma_rels"], "nimg": meta["ema_nimg"],
                                  "averages": averages}, source=path)
        if self.traditional_ema is not None:
            average = {k[5:]: v for k, v in tensors.items() if k.startswith("tema.")}
            self.traditional_ema.load_state_dict({"halflife_img": self.tc.ema_halflife_img, "rampup_ratio":
                                                  self.traditional_ema.rampup_ratio, "nimg": meta["nimg"],
                                                  "averages": [average]}, source=path)
        self.nimg, self.step = int(meta["nimg"]), int(meta["step"])
        self.counters.update(meta["counters"])

    def resume(self):
        """Load the newest readable checkpoint; damaged ones are reported and skipped."""
        paths = sorted(glob.glob(self.path("checkpoints", "training-state-*.safetensors")), reverse=True)
        for path in paths:
            try:
                self.load_checkpoint(path)
            except CheckpointError as e:
                self.say(f"skipping damaged checkpoint: {e}")
                continue
            self.say(f"resumed from {path} at {self.nimg} images")
            return path
        if paths:  # never restart from scratch over a run whose checkpoints all failed to load
            raise CheckpointError(f"{self.path('checkpoints')}: none of the {len(paths)} checkpoints is usable "
                                  f"(reasons in log.txt); move them away to start the run over")
        return None

    # ---------------------------------------------------------------- logging
    def say(self, message):
        append_line(self.path("log.txt"), f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}")
        if self.opt_.progress:
            tqdm.write(message)
        else:
            print(message, file=sys.stderr, flush=True)
        log.info(message)

    # ---------------------------------------------------------------- training step
    def train_step(self):
        tc, batch = self.tc, self.tc.batch
        batch_gpu = self.opt_.batch_gpu or batch
        step_seed = _seed_for(self.opt_.seed, "step", self.nimg)
        torch.manual_seed(step_seed)  # dropout and anything else drawing from the global RNG
        gen = torch.Generator().manual_seed(step_seed)
        indices = torch.tensor(batch_indices(self.opt_.seed, len(self.dataset), self.nimg, batch))
        sigma = sample_sigma(batch, tc.P_mean, tc.P_std, generator=gen)
        noise = torch.randn([batch, *self.images.shape[1:]], generator=gen)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        for start in range(0, batch, batch_gpu):
            idx = indices[start:start + batch_gpu]
            images = encode_images(self.images[idx]).to(self.device)
            labels = None if self.labels is None else self.labels[idx].to(self.device)
            loss = edm2_loss(self.net, images, labels, sigma=sigma[start:start + batch_gpu].to(self.device),
                             noise=noise[start:start + batch_gpu].to(self.device))
            loss_sum = loss.sum()
            (loss_sum * (tc.loss_scaling / batch)).backward()
            total_loss += float(loss_sum.detach())
        lr = learning_rate(self.nimg, batch, tc.lr, tc.decay, tc.rampup_img)
        set_learning_rate(self.optimizer, lr)
        bad_grads = zero_nonfinite_grads(self.net.parameters())
        loss_finite = np.isfinite(total_loss)
        if bad_grads:
            self.counters["nonfinite_grad_steps"] += 1
            self.counters["nonfinite_grad_values"] += bad_grads
        if not loss_finite:
            self.counters["nonfinite_loss_steps"] += 1
        if bad_grads or not loss_finite:
            self.counters["consecutive_nonfinite"] += 1
            if self.counters["consecutive_nonfinite"] >= self.opt_.max_nonfinite_steps:
                last = sorted(glob.glob(self.path("checkpoints", "training-state-*.safetensors")))
                raise NumericalError(
                    f"training produced non-finite losses or gradients for {self.counters['consecutive_nonfinite']} "
                    f"consecutive steps (at {self.nimg} images); stopped. Last good checkpoint: "
                    f"{last[-1] if last else 'none'}")
        else:
            self.counters["consecutive_nonfinite"] = 0
        self.optimizer.step()
        self.nimg += batch
        self.step += 1
        self.ema.update(self.nimg, batch)
        if self.traditional_ema is not None:
            self.traditional_ema.update(self.nimg, batch)
        return total_loss / batch, lr

    # ---------------------------------------------------------------- outputs
    def save_snapshots(self):
        self.ema.save_snapshots(self.path("snapshots"), self.net_config, step=self.step, batch_size=self.tc.batch,
                                dtype=self.opt_.snapshot_dtype)
        if self.traditional_ema is not None:  # latest only; not a post-hoc EMA input
            save_network(self.path("ema-traditional.safetensors"), self.traditional_ema.averaged_state_dict(),
                         self.net_config, dtype=self.opt_.snapshot_dtype, kind="traditional-ema",
                         nimg=self.nimg, halflife_img=self.tc.ema_halflife_img)

    def sample_grid(self, name=None, sigma_rel=None):
        from .sampling import generate
        sigma_rel = self.ema.sigma_rels[-1] if sigma_rel is None else sigma_rel
        net = build_network(self.net_config, device=self.device)
        self.ema.copy_to(net, sigma_rel)
        classes = max(1, self.net_config.label_dim)
        if classes > 1:  # rows of one sample per class (up to 10 classes x 10 rows), one batch
            shown = min(classes, 10)
            seeds = list(range(shown * 10))
            class_ids = [s % shown for s in seeds]
        else:
            seeds, class_ids = list(range(64)), None
        x, _ = generate(net, seeds, class_idx=class_ids, num_steps=self.opt_.grid_steps, progress=False,
                        device=self.device)
        grid = decode_images(x)
        path = self.path("samples", name or f"grid-{self.nimg // 1000:07d}.png")
        save_grid(path, grid.numpy(), columns=min(classes, 10) if classes > 1 else None)
        return path

    # ---------------------------------------------------------------- main loop
    def run(self):
        opts, tc = self.opt_, self.tc
        os.makedirs(self.run_dir, exist_ok=True)
        _remove_stale_temporaries(self.run_dir)
        resumed = self.resume()
        if resumed is None:
            self.say(f"new run in {self.run_dir}: {sum(p.numel() for p in self.net.parameters()):,} parameters, "
                     f"dataset {self.dataset.name} ({len(self.dataset)} images)")
        _truncate_stats(self.path("stats.jsonl"), self.nimg)
        writer = _tensorboard(self.path("tensorboard"), purge_step=self.nimg) if opts.tensorboard else None
        stop_at = tc.duration if opts.slice_nimg is None else min(tc.duration, self.nimg + opts.slice_nimg)
        bar = tqdm(total=tc.duration // 1000, initial=self.nimg // 1000, unit="kimg", disable=not opts.progress,
                   desc="training", dynamic_ncols=True)
        interval = {"loss": 0.0, "steps": 0, "start": time.time(), "nimg": self.nimg}
        try:
            while self.nimg < stop_at:
                t0 = time.time()
                loss, lr = self.train_step()
                self.counters["elapsed_sec"] += time.time() - t0
                interval["loss"] += loss
                interval["steps"] += 1
                bar.update(self.nimg // 1000 - bar.n)
                if self.nimg % opts.status_nimg == 0 or self.nimg >= stop_at:
                    row = self._status_row(interval, lr)
                    append_line(self.path("stats.jsonl"), json.dumps(row))
                    if writer is not None:
                        for key in ("loss", "lr", "img_per_sec", "cpu_mem_gb", "gpu_mem_gb"):
                            writer.add_scalar(f"train/{key}", row[key], self.nimg)
                        writer.flush()
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", ips=f"{row['img_per_sec']:.0f}")
                    interval = {"loss": 0.0, "steps": 0, "start": time.time(), "nimg": self.nimg}
                if self.nimg % opts.snapshot_nimg == 0 or self.nimg >= tc.duration:
                    self.save_snapshots()
                if opts.sample_nimg and self.nimg % opts.sample_nimg == 0 and self.nimg < tc.duration:
                    self.sample_grid()
                if self.nimg % opts.checkpoint_nimg == 0 or self.nimg >= stop_at:
                    self.save_checkpoint()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if self.nimg >= tc.duration:
            grid = self.sample_grid(name="grid-final.png")
            self.say(f"training complete at {self.nimg} images; samples: {grid}")
        return self.nimg

    def _status_row(self, interval, lr):
        seconds = max(time.time() - interval["start"], 1e-9)
        row = {"nimg": self.nimg, "kimg": self.nimg / 1000, "step": self.step,
               "loss": interval["loss"] / max(interval["steps"], 1), "lr": lr,
               "img_per_sec": (self.nimg - interval["nimg"]) / seconds,
               "cpu_mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
               "gpu_mem_gb": (torch.cuda.max_memory_allocated() / 2 ** 30) if torch.cuda.is_available() else 0.0,
               "time": time.time()}
        row.update({k: v for k, v in self.counters.items() if k != "elapsed_sec"})
        return row


def _contract(config):
    """The part of the config that must not change between invocations of one run."""
    run = {k: v for k, v in config["run"].items() if k not in RunOptions.RUNTIME_FIELDS}
    return {"preset": config["preset"], "network": config["network"], "training": config["training"], "run": run,
            "dataset": config["dataset"]}


def _remove_stale_temporaries(run_dir):
    for tmp in glob.glob(os.path.join(run_dir, "**", ".*.tmp"), recursive=True):
        try:
            os.remove(tmp)
        except OSError:
            pass


def _truncate_stats(path, nimg):
    """Drop stats rows written after the checkpoint we resumed from (they will be re-written)."""
    if not os.path.exists(path):
        return
    rows = [r for r in read_jsonl(path) if r.get("nimg", 0) <= nimg]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _tensorboard(log_dir, purge_step):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency; stay usable without it
        log.warning("tensorboard not installed; skipping TensorBoard events")
        return None
    return SummaryWriter(log_dir, purge_step=purge_step or None)


def train(preset="digits", options=None, network_overrides=None, training_overrides=None):
    """Train (or resume) a run. Returns the run directory."""
    options = options or RunOptions()
    config, network_config, training_config, dataset = resolve_config(preset, options, network_overrides,
                                                                      training_overrides)
    config_path = os.path.join(options.run_dir, "config.json")
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                existing = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{config_path}: unreadable ({e}); move it away or use a new --run-dir") from None
        try:
            existing_contract = _contract(existing)
        except (KeyError, TypeError, AttributeError):
            raise ConfigError(f"{config_path}: not an mpdiff run config; move it away or use a new --run-dir") from None
        if existing_contract != _contract(config):
            changed = sorted(k for k in _contract(config) if _contract(existing).get(k) != _contract(config)[k])
            raise ConfigError(f"{options.run_dir} holds a run with different options ({', '.join(changed)} differ); "
                              f"re-run the original command to resume, or choose a new --run-dir")
    trainer = Trainer(config, network_config, training_config, dataset, options)  # options refused here write nothing
    if not os.path.exists(config_path):
        write_json(config_path, config)
    trainer.run()
    return trainer
