"""What a run tells its user: messages (log.txt and the terminal), stats rows (stats.jsonl and
TensorBoard) and the progress bar."""

import json
import logging
import os
import resource
import sys
import time

import torch
from tqdm.auto import tqdm

from mpdiff.storage import files
from mpdiff.storage.files import DamagedLine, append_line, check_regular, jsonl_lines, printable

log = logging.getLogger("mpdiff.train")

TENSORBOARD_SCALARS = ("loss", "grad_norm", "grad_norm_max", "lr", "img_per_sec", "cpu_mem_gb", "gpu_mem_gb")


class RunReport:
    """Messages, stats rows and the progress bar of one invocation of a run."""

    def __init__(self, layout, progress=True, tensorboard=True):
        self.layout = layout
        self.progress = progress
        self.use_tensorboard = tensorboard
        self.writer = None
        self.bar = None

    def say(self, message):
        """One line to log.txt and to the terminal (stderr without progress bars)."""
        message = printable(message)  # names from the disk may hold undecodable bytes
        append_line(self.layout.log, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}")
        if self.progress:
            tqdm.write(message)
        else:
            print(message, file=sys.stderr, flush=True)
        log.info(message)

    def open(self, nimg, duration):
        """Start at image count `nimg`: drop stats rows written after it (they will be written again)."""
        for note in truncate_stats(self.layout.stats, nimg):
            self.say(note)
        if self.use_tensorboard:
            self.writer = _tensorboard(self.layout.tensorboard, purge_step=nimg)
        self.bar = tqdm(total=duration, initial=nimg, unit="img", unit_scale=True, disable=not self.progress,
                        desc="training", dynamic_ncols=True)  # moves from the first step

    def tick(self, nimg):
        self.bar.update(nimg - self.bar.n)

    def row(self, row):
        """Append one stats row and show it."""
        append_line(self.layout.stats, json.dumps(row))
        if self.writer is not None:
            for key in TENSORBOARD_SCALARS:
                self.writer.add_scalar(f"train/{key}", row[key], row["nimg"])
            for kind, values in row.get("dynamics", {}).items():  # dynamics/act/<block>, dynamics/weight/<layer>, ...
                if isinstance(values, dict):
                    for name, value in values.items():
                        self.writer.add_scalar(f"dynamics/{kind}/{name}", value, row["nimg"])
            self.writer.flush()
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", ips=f"{row['img_per_sec']:.0f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


class IntervalStats:
    """The time and images between two stats rows; the loss and gradient norms come from the step tally
    (:class:`mpdiff.train.step.DeviceTally`), read when the row is written."""

    def __init__(self, nimg):
        self.start, self.nimg = time.time(), nimg

    def row(self, state, lr, reading):
        seconds = max(time.time() - self.start, 1e-9)
        row = {"nimg": state.nimg, "kimg": state.nimg / 1000, "step": state.step,
               "loss": reading.loss, "lr": lr,
               "grad_norm": reading.grad_norm, "grad_norm_max": reading.grad_norm_max,
               "img_per_sec": (state.nimg - self.nimg) / seconds,
               "cpu_mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
               "gpu_mem_gb": (torch.cuda.max_memory_allocated() / 2 ** 30) if torch.cuda.is_available() else 0.0,
               "time": time.time()}
        row.update({k: v for k, v in state.counters.items() if k != "elapsed_sec"})
        return row


def truncate_stats(path, nimg):
    """Drop the stats rows written after image count `nimg` (the checkpoint a run resumed from: they
    will be written again). Damaged lines are kept verbatim, except a torn last line (a crash
    mid-append). Streams the file, however long. Returns one message per damaged line, for the log.
    """
    if not os.path.lexists(path):
        return []
    check_regular(path, what="JSON-lines file")  # before the writer: a FIFO is named as what it is
    notes = []
    with files.atomic_write(path) as out:  # (through the module: the kill test pauses inside its writes)
        torn = None  # a torn line, held back until we know whether it is the last (then dropped)
        for number, raw, row in jsonl_lines(path):
            if torn is not None:
                notes.append(f"{path}: line {torn[0]} is damaged ({torn[2]}); kept as it is")
                out.write(torn[1])
                torn = None
            if isinstance(row, DamagedLine):
                if row.reason.endswith("(torn)"):
                    torn = (number, raw + b"\n", row.reason)
                    continue
                notes.append(f"{path}: line {number} is damaged ({row.reason}); kept as it is")
                out.write(raw + b"\n")          # byte for byte
            elif not isinstance(row.get("nimg"), int) or isinstance(row.get("nimg"), bool):
                notes.append(f"{path}: line {number} has no integer nimg; kept as it is")
                out.write(raw + b"\n")
            elif row["nimg"] <= nimg:
                out.write(raw + b"\n")
        if torn is not None:
            notes.append(f"{path}: line {torn[0]} was torn by a crash; dropped")
    return notes


def _tensorboard(log_dir, purge_step):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency; stay usable without it
        log.warning("tensorboard not installed; skipping TensorBoard events")
        return None
    return SummaryWriter(log_dir, purge_step=purge_step or None)
