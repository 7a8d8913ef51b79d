"""Acceptance test for issue 6: SIGKILL a tiny training run 20 times, restart it each time, and end with
the same weights as an uninterrupted run.

Each invocation runs in a subprocess (the runner below) that we kill with SIGKILL, so nothing in the
process gets a chance to clean up. Every kill happens at a chosen point, never after a chosen sleep: the
runner announces the point on stdout and waits there, and the test kills it on seeing the announcement.
The points (drawn from a seeded generator, so the plan is the same on every machine):

* inside a write: half of a checkpoint, snapshot or stats file written into its temporary; a checkpoint
  complete but not yet renamed; renamed but not yet verified; an old checkpoint about to be pruned;
* between steps: right after the n-th training step of an invocation, before its stats row, snapshots
  and checkpoint;
* around the resume: after start-up (imports, dataset, network) but before the resume, and right after it.

After every kill: every ``*.safetensors`` under checkpoints/ and snapshots/ loads, config.json parses, and
stats.jsonl reads. After every restart: the stale temporaries are gone and log.txt says it resumed from
the newest checkpoint. At the end the last training state and every EMA snapshot equal, tensor for tensor
and bit for bit, those of a run that was never interrupted.
"""

import glob
import json
import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from mpdiff.storage.files import read_jsonl
from mpdiff.storage.tensors import load_tensors

KILLS = 20
BATCH = 64
STEPS = 96                      # training steps of the run (duration = STEPS * BATCH images); the kills
                                # cost at most ~80 steps of progress however fast the machine is
SEED = 20240611                 # the kill plan's generator

RUNNER = textwrap.dedent('''
    """Tiny training run for test_kill.py. KILL_HOOK="<moment>:<n>" pauses at the n-th such moment."""
    import contextlib, os, sys, time
    print("START", flush=True)
    import torch
    torch.set_num_threads(1)  # the same arithmetic in every invocation, and no thread spinning under load
    import mpdiff.storage.files as fileio
    import mpdiff.train.loop as training

    moment, _, nth = os.environ.get("KILL_HOOK", "").partition(":")
    seen = {}

    def pause(what, path):
        seen[what] = seen.get(what, 0) + 1
        if what == moment and seen[what] == int(nth):
            print(f"PAUSED {what} {path}", flush=True)
            time.sleep(120)  # the test sends SIGKILL now

    def write_moment(path):
        if "training-state" in path:
            return "ckpt-write"
        if os.sep + "snapshots" + os.sep in path:
            return "snap-write"
        return "stats-write" if path.endswith("stats.jsonl") else "other-write"

    class HalfThenPause:
        """Write the first half, flush it to the temporary file, pause, then write the rest."""
        def __init__(self, f, path):
            self.f, self.path = f, path
        def write(self, data):
            half = len(data) // 2
            self.f.write(data[:half])
            self.f.flush()
            pause(write_moment(self.path), self.path)
            return self.f.write(data[half:])
        def __getattr__(self, name):
            return getattr(self.f, name)

    real_atomic_write, real_replace, real_remove = fileio.atomic_write, os.replace, os.remove

    @contextlib.contextmanager
    def atomic_write(path, mode="wb"):
        with real_atomic_write(path, mode) as f:
            yield HalfThenPause(f, os.fspath(path))

    def replace(src, dst, **kw):
        if "training-state" in os.fspath(dst):
            pause("ckpt-rename", dst)       # temporary complete and fsync'ed, not yet renamed
        real_replace(src, dst, **kw)
        if "training-state" in os.fspath(dst):
            pause("ckpt-verify", dst)       # renamed, not yet read back, older ones not yet pruned

    def remove(path, **kw):
        if "training-state" in os.fspath(path):
            pause("ckpt-prune", path)
        real_remove(path, **kw)

    fileio.atomic_write, os.replace, os.remove = atomic_write, replace, remove
    real_resume = training.Trainer.resume

    def resume(self):
        pause("pre-resume", self.layout.run_dir)
        path = real_resume(self)
        print(f"RESUMED {path}", flush=True)
        pause("post-resume", self.layout.run_dir)
        return path

    training.Trainer.resume = resume
    real_step = training.Trainer.train_step

    def train_step(self):
        result = real_step(self)
        pause("step", self.nimg)            # after the step, before its stats, snapshots and checkpoint
        return result

    training.Trainer.train_step = train_step
    from mpdiff.config import RunOptions
    training.train("digits", RunOptions(run_dir=sys.argv[1], progress=False, tensorboard=False, grid_steps=2),
                   network=dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=()),
                   training=dict(batch=@BATCH@, duration=@DURATION@, decay=10, rampup_img=1024),
                   cadence=dict(status_nimg=@BATCH@, snapshot_nimg=2 * @BATCH@, checkpoint_nimg=@BATCH@))
    print("DONE", flush=True)
''').replace("@BATCH@", str(BATCH)).replace("@DURATION@", str(STEPS * BATCH))


class Child:
    """One invocation of the runner, with its stdout lines arriving on a queue."""

    def __init__(self, runner, run_dir, hook=""):
        env = dict(os.environ, KILL_HOOK=hook, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, runner, run_dir], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.lines = queue.Queue()
        self.output = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, prefix, timeout=120):
        """The first line starting with `prefix`, or None if the process ended without one."""
        deadline = time.time() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.time()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} line after {timeout}s; output:\n{''.join(self.output)}")
            if line is None:
                return None
            if line.startswith(prefix):
                return line

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout=300):
        rc = self.proc.wait(timeout=timeout)
        assert rc == 0, f"runner failed (rc {rc}):\n{''.join(self.output)}"


def kill_plan(rng):
    """20 kill points "<moment>:<n>": the runner pauses at the n-th such moment of its invocation."""
    moments = (["ckpt-write"] * 4 + ["ckpt-rename"] * 2 + ["ckpt-verify"] * 2 + ["ckpt-prune"] * 2
               + ["snap-write"] * 2 + ["stats-write"])
    writes = [f"{m}:{1 if m == 'stats-write' else rng.randint(1, 3)}" for m in moments]
    between = [f"step:{rng.randint(1, 4)}" for _ in range(5)] + ["pre-resume:1", "post-resume:1"]
    rest = writes[1:] + between
    rng.shuffle(rest)
    return [writes[0]] + rest  # the first kill is mid-checkpoint, so stats.jsonl exists for 'stats-write'


def checkpoints(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "checkpoints", "training-state-*.safetensors")))


def temporaries(run_dir):
    return set(glob.glob(os.path.join(run_dir, "**", ".*.tmp"), recursive=True))


def assert_nothing_torn(run_dir, config):
    """Every file a reader could pick up is whole: tensors load, config and stats parse."""
    for path in checkpoints(run_dir) + sorted(glob.glob(os.path.join(run_dir, "snapshots", "*.safetensors"))):
        load_tensors(path)  # raises CheckpointError on a torn file
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f) == config
    stats = os.path.join(run_dir, "stats.jsonl")
    if os.path.exists(stats):
        rows = read_jsonl(stats)
        assert [r["nimg"] for r in rows] == sorted({r["nimg"] for r in rows})


def log_lines(run_dir):
    path = os.path.join(run_dir, "log.txt")
    return open(path).read().splitlines() if os.path.exists(path) else []


@pytest.mark.slow
def test_twenty_sigkills_lose_nothing(tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    run_dir, ref_dir = str(tmp_path / "killed"), str(tmp_path / "reference")
    start = time.time()
    reference = Child(str(runner), ref_dir)  # the uninterrupted run, on the other core meanwhile

    rng = random.Random(SEED)
    survived, mid_write, resumes = 0, 0, []
    config = None
    children = [reference]
    try:
        for point in kill_plan(rng):
            newest = checkpoints(run_dir)[-1] if checkpoints(run_dir) else None
            stale = temporaries(run_dir)
            logged = len(log_lines(run_dir))
            child = Child(str(runner), run_dir, point)
            children.append(child)
            assert child.wait_for("PAUSED") is not None, f"{point} never reached:\n{''.join(child.output)}"
            child.kill()
            survived += 1

            # Nothing torn, whatever the moment.
            if os.path.exists(os.path.join(run_dir, "config.json")):
                config = config or json.load(open(os.path.join(run_dir, "config.json")))
                assert_nothing_torn(run_dir, config)
            mid_write += bool(temporaries(run_dir) - stale)
            # The invocation we just killed resumed from the newest checkpoint the previous kill left, if it got
            # that far, after removing the temporaries that kill left behind.
            started = [line for line in log_lines(run_dir)[logged:] if "resumed from" in line or "new run" in line]
            if started:
                if newest is None:
                    assert "new run" in started[0]
                else:
                    nimg = int(os.path.basename(newest)[len("training-state-"):-len(".safetensors")])
                    assert f"resumed from {newest} at {nimg} images" in started[0], started[0]
                    resumes.append(nimg)
                assert not stale & temporaries(run_dir), "temporaries of the previous kill survived a restart"

        final = Child(str(runner), run_dir)
        children.append(final)
        final.finish()
        reference.finish()
    finally:
        for child in children:  # a failed assertion must not leave runners behind
            if child.proc.poll() is None:
                child.kill()
    assert not temporaries(run_dir)
    assert "training complete" in log_lines(run_dir)[-1]
    elapsed = time.time() - start
    print(f"\nkills survived: {survived} (left a temporary file behind: {mid_write}; restarts that resumed "
          f"from a checkpoint: {len(resumes)}, at images {resumes}); {elapsed:.1f} s")
    assert survived == KILLS
    assert mid_write >= 5 and len(resumes) >= 10  # the plan really hit writes, and restarts really resumed

    # Bit-exact: the last training state and every EMA snapshot equal the uninterrupted run's.
    duration = STEPS * BATCH
    name = f"training-state-{duration:012d}.safetensors"
    got, got_meta = load_tensors(os.path.join(run_dir, "checkpoints", name))
    ref, ref_meta = load_tensors(os.path.join(ref_dir, "checkpoints", name))
    assert sorted(got) == sorted(ref) and any(k.startswith("optim.") for k in ref)
    for key in ref:
        assert ref[key].dtype == got[key].dtype and torch.equal(ref[key], got[key]), key
    assert (got_meta["nimg"], got_meta["step"]) == (ref_meta["nimg"], ref_meta["step"]) == (duration, STEPS)
    snapshots = sorted(os.listdir(os.path.join(ref_dir, "snapshots")))
    assert sorted(os.listdir(os.path.join(run_dir, "snapshots"))) == snapshots and len(snapshots) == 2 * (STEPS // 2)
    for snapshot in snapshots:
        a, _ = load_tensors(os.path.join(run_dir, "snapshots", snapshot))
        b, _ = load_tensors(os.path.join(ref_dir, "snapshots", snapshot))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b), snapshot
    # The stats of the killed run are the uninterrupted run's: rows written after the checkpoint a restart
    # resumed from were dropped and written again, none twice or missing.
    got_rows = read_jsonl(os.path.join(run_dir, "stats.jsonl"))
    ref_rows = read_jsonl(os.path.join(ref_dir, "stats.jsonl"))
    assert [(r["nimg"], r["loss"]) for r in got_rows] == [(r["nimg"], r["loss"]) for r in ref_rows]
    assert len(ref_rows) == STEPS
