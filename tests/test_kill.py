"""Acceptance test for issue 6: SIGKILL a tiny training run again and again, restart it each time, and end
with the same weights as an uninterrupted run.

Every invocation is a separate process that we kill with SIGKILL, so nothing in the process gets a chance
to clean up. The invocations are forked from one server process that has imported torch and mpdiff once
(the runner below), so that a kill costs a fork instead of a 7 s import; each child is still a process of
its own, with its own run-directory lock and files, and nothing it does reaches the server. Every kill
happens at a chosen point, never after a chosen sleep: the child announces the point on stdout and waits
there, and the test kills it on seeing the announcement. The points are a fixed list (:data:`KILL_PLAN`)
that hits every phase at least once:

* inside a write: half of a checkpoint, snapshot or stats file written into its temporary; a checkpoint
  complete but not yet renamed; renamed but not yet verified; an old checkpoint about to be pruned;
* between steps: right after the n-th training step of an invocation, before its stats row, snapshots
  and checkpoint;
* around the resume: after start-up (dataset, network) but before the resume, and right after it.

After every kill: every ``*.safetensors`` under checkpoints/ and snapshots/ loads, config.json parses, and
stats.jsonl reads. After every restart: the stale temporaries are gone and log.txt says it resumed from
the newest checkpoint. At the end the last training state and every EMA snapshot equal, tensor for tensor
and bit for bit, those of a run that was never interrupted (a fresh process of its own, not a fork).
"""

import contextlib
import glob
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import torch

from mpdiff.storage.files import read_jsonl
from mpdiff.storage.tensors import load_tensors

BATCH = 64
STEPS = 48                      # training steps of the run (duration = STEPS * BATCH images); the plan's
                                # kills cost at most 25 steps of progress, so each is reached before the end
# "<moment>:<n>": the invocation pauses at the n-th such moment and is killed there. The first kill is
# mid-checkpoint (so stats.jsonl exists for 'stats-write'); then every phase, most of them twice.
KILL_PLAN = ["ckpt-write:1", "step:2", "ckpt-rename:1", "stats-write:1", "pre-resume:1", "ckpt-verify:2",
             "snap-write:1", "post-resume:1", "ckpt-prune:2", "step:3", "ckpt-write:3", "snap-write:2",
             "ckpt-rename:2", "ckpt-verify:1", "pre-resume:1", "step:1", "post-resume:1", "ckpt-prune:1",
             "post-resume:1", "pre-resume:1"]
# The kills that leave a temporary file behind: inside a write, or with the temporary complete.
WRITES = sum(p.split(":")[0] in ("ckpt-write", "snap-write", "stats-write", "ckpt-rename") for p in KILL_PLAN)

RUNNER = textwrap.dedent('''
    """Tiny training runs for test_kill.py. With --serve: a fork server that reads "<run dir> <moment>:<n>"
    lines ("<run dir> -": no pause) from stdin and for each forks a child, which prints "PID <pid>", runs the
    training (pausing at the n-th such moment, after printing "PAUSED ..."), prints "DONE" and exits; the
    server reaps it and prints "EXIT <exit status>". With a run directory: one plain run, no pause."""
    import contextlib, os, sys, time, traceback
    import torch
    torch.set_num_threads(1)  # the same arithmetic in every invocation, and no thread spinning under load
    import mpdiff.storage.files as fileio
    import mpdiff.train.loop as training
    from mpdiff.config import RunOptions

    moment, nth, seen = None, 0, {}

    def pause(what, path):
        seen[what] = seen.get(what, 0) + 1
        if what == moment and seen[what] == nth:
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

    def run(run_dir):
        training.train("digits", RunOptions(run_dir=run_dir, progress=False, tensorboard=False, grid_steps=2),
                       network=dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=()),
                       training=dict(batch=@BATCH@, duration=@DURATION@, decay=10, rampup_img=1024),
                       cadence=dict(status_nimg=@BATCH@, snapshot_nimg=2 * @BATCH@, checkpoint_nimg=@BATCH@))
        print("DONE", flush=True)

    if sys.argv[1] != "--serve":
        run(sys.argv[1])
        sys.exit()
    print("READY", flush=True)
    for line in sys.stdin:
        run_dir, point = line.split()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the child: one invocation, a process of its own
            status = 0
            try:
                if point != "-":
                    moment, _, n = point.partition(":")
                    nth = int(n)
                print(f"PID {os.getpid()}", flush=True)
                run(run_dir)
            except BaseException:
                traceback.print_exc(file=sys.stdout)
                status = 1
            sys.stdout.flush()
            os._exit(status)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {os.waitstatus_to_exitcode(status)}", flush=True)
''').replace("@BATCH@", str(BATCH)).replace("@DURATION@", str(STEPS * BATCH))


class Process:
    """A process running the runner, with its stdout lines arriving on a queue."""

    def __init__(self, *args):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
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

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Server(Process):
    """The runner as a fork server: each invocation is a child process of its own."""

    def __init__(self, runner):
        super().__init__(runner, "--serve")
        self.child = None
        assert self.wait_for("READY", timeout=300) is not None, "".join(self.output)

    def start(self, run_dir, point="-"):
        """Fork an invocation on `run_dir` that pauses at `point`."""
        self.proc.stdin.write(f"{run_dir} {point}\n")
        self.proc.stdin.flush()
        line = self.wait_for("PID ")
        assert line is not None, "".join(self.output)
        self.child = int(line.split()[1])

    def kill_child(self):
        """SIGKILL the child; returns once the server has reaped it."""
        os.kill(self.child, signal.SIGKILL)
        assert self.wait_for("EXIT ") == f"EXIT {-signal.SIGKILL}", "".join(self.output[-20:])

    def finish_child(self, timeout=300):
        assert self.wait_for("EXIT ", timeout) == "EXIT 0", f"runner failed:\n{''.join(self.output)}"

    def stop(self):
        if self.child is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGKILL)  # not yet reaped: still our child's pid
        super().stop()


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


def test_sigkills_at_every_phase_lose_nothing(tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    run_dir, ref_dir = str(tmp_path / "killed"), str(tmp_path / "reference")
    start = time.time()
    reference = Process(str(runner), ref_dir)  # the uninterrupted run, on the other core meanwhile
    server = None
    mid_write, resumes, paused = 0, [], []
    config = None
    try:
        server = Server(str(runner))
        for point in KILL_PLAN:
            newest = checkpoints(run_dir)[-1] if checkpoints(run_dir) else None
            stale = temporaries(run_dir)
            logged = len(log_lines(run_dir))
            server.start(run_dir, point)
            line = server.wait_for("PAUSED")
            assert line is not None, f"{point} never reached:\n{''.join(server.output)}"
            paused.append(line.split()[1])
            server.kill_child()

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

        server.start(run_dir)
        server.finish_child()
        assert reference.wait_for("DONE", timeout=300) is not None, "".join(reference.output)
    finally:
        for process in (server, reference):  # a failed assertion must not leave runners behind
            if process is not None:
                process.stop()
    assert not temporaries(run_dir)
    assert "training complete" in log_lines(run_dir)[-1]
    elapsed = time.time() - start
    print(f"\nkills survived: {len(paused)} (left a temporary file behind: {mid_write}; restarts that resumed "
          f"from a checkpoint: {len(resumes)}, at images {resumes}); {elapsed:.1f} s")
    assert paused == [p.split(":")[0] for p in KILL_PLAN]  # every kill at its phase
    # Every kill inside a write (or before a rename) left its temporary, which the next restart removed;
    # every invocation resumed but the first (a new run) and those killed before their resume.
    assert mid_write == WRITES and len(resumes) == len(KILL_PLAN) - 2 - KILL_PLAN.count("pre-resume:1") and resumes == sorted(resumes)

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
