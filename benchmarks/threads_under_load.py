"""Training speed with the default CPU threads, while other processes load the cores (issue 33).

    python benchmarks/threads_under_load.py [--busy 2] [--preset mnist] [--duration 1536] [--settle 70]
                                            [--out benchmarks/results/threads_under_load]

Starts --busy processes that spin on the CPU (the artificial load: other users' jobs), waits --settle
seconds for the 1-minute load average to see them, then times the same short `mpdiff train` (fresh run
directory each, no grid, no dynamics, no TensorBoard) with:

- `old`: torch's own default, every core (here `--threads` set to os.cpu_count(), which is what torch
  chose before issue 33 when OMP_NUM_THREADS was not set);
- `new`: mpdiff's default (no --threads, no OMP_NUM_THREADS): the usable CPUs less the load of others;
- `one`: --threads 1, the workaround the issue found (OMP_NUM_THREADS=1).

and, with the busy processes stopped and the load let to fall again for --settle seconds, `old` and `new`
on the quieter machine. Speed: the median img/s of the run's stats rows after the first (which pays
one-time costs). The load averages at the start of each run are recorded beside it. Other processes on
the machine (not ours) add to the load: the table says what the load was.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SPIN = "while True:\n    pass\n"


def run_training(preset, duration, threads, run_dir):
    """(median img/s after the first row, wall seconds, the threads line of the log) of one short run."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    args = [sys.executable, "-m", "mpdiff", "train", "--preset", preset, "--duration", str(duration),
            "--status", "256", "--snapshot", str(duration), "--checkpoint", str(duration), "--run-dir", run_dir,
            "--no-progress", "--no-final-grid", "--no-dynamics", "--no-tensorboard", "--data-workers", "0",
            "--batch-gpu", "64"]
    if threads is not None:
        args += ["--threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "stats.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    speeds = [r["img_per_sec"] for r in rows[1:]] or [rows[0]["img_per_sec"]]
    note = next((line.split("threads", 1)[1].strip() for line in proc.stderr.splitlines()
                 if line.startswith("threads ")), "")
    return statistics.median(speeds), wall, note


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=2, help="spinning processes (the artificial load)")
    parser.add_argument("--preset", default="mnist")
    parser.add_argument("--duration", type=int, default=1536, help="images per timed run (batch 64 steps)")
    parser.add_argument("--settle", type=float, default=70, help="seconds for the load average to follow")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "threads_under_load"))
    args = parser.parse_args()
    cores = os.cpu_count()
    results, work = [], tempfile.mkdtemp(prefix="threads-")

    def measure(state, configs):
        for name, threads in configs:
            load = os.getloadavg()[0]
            run_dir = os.path.join(work, f"{state}-{name}")
            ips, wall, note = run_training(args.preset, args.duration, threads, run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
            results.append(dict(state=state, config=name, load_at_start=round(load, 2), img_per_sec=round(ips, 1),
                                wall_s=round(wall, 1), threads=note))
            print(json.dumps(results[-1]), flush=True)

    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.busy)]
    try:
        time.sleep(args.settle)
        measure(f"{args.busy} busy", [("old", cores), ("new", None), ("one", 1)])
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()
    time.sleep(args.settle)
    measure("no busy", [("old", cores), ("new", None)])
    shutil.rmtree(work, ignore_errors=True)

    os.makedirs(args.out, exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.platform(), cpus=cores,
                python=platform.python_version(), preset=args.preset, duration=args.duration, busy=args.busy)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(meta, results=results), f, indent=1)
    lines = ["| machine state | threads | load at start | img/s | wall time |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['state']} | {r['config']}: {r['threads']} | {r['load_at_start']} | {r['img_per_sec']} | "
              f"{r['wall_s']} s |" for r in results]
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(f"{meta}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
