"""How soon training starts on a large ZIP (issue 16): streamed datasets open as an index.

    python benchmarks/first_step.py [--images 100000] [--out benchmarks/results/first_step]

Writes ZIPs of 1,000 and of --images 32x32 RGB PNGs (997 distinct images, repeated; stored, not
deflated), then for each times, in a fresh process:

- `mpdiff train` of one step (batch 64, the digits network at C0 16, no grid, no dynamics): the
  seconds until its first log line (the dataset's index is open and the network built) and until it
  exits (the step taken and checkpointed);
- `mpdiff dataset check`, which decodes and checks every image: what training would pay up front if
  it decoded the dataset before the first step, as mpdiff did before issue 16.

The difference between the two ZIPs' training times is what the dataset's size costs the start.
"""

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = ["--preset", "digits", "--channels", "16", "--batch", "64", "--duration", "64", "--status", "64",
         "--checkpoint", "64", "--no-final-grid", "--no-dynamics", "--no-tensorboard", "--data-workers", "0"]


def write_zip(path, count):
    tiles = []
    for i in range(997):
        buffer = io.BytesIO()
        array = np.random.RandomState(i).randint(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
        tiles.append(buffer.getvalue())
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for i in range(count):
            z.writestr(f"{i // 1000:05d}/img{i:08d}.png", tiles[i % 997])
    return path


def timed_command(args):
    """(seconds to the first line on stderr, seconds to exit, exit status, stderr) of `mpdiff ARGS`."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mpdiff", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    first, lines = None, []
    for line in proc.stderr:
        if first is None:
            first = time.perf_counter() - start
        lines.append(line)
    proc.wait()
    return first, time.perf_counter() - start, proc.returncode, "".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "first_step"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in (1_000, args.images):
            data = write_zip(os.path.join(tmp, f"{count}.zip"), count)
            first, total, code, err = timed_command(["train", *TRAIN, "--data", data,
                                                     "--run-dir", os.path.join(tmp, f"run{count}")])
            if code:
                raise SystemExit(f"training on {count} images failed:\n{err[-2000:]}")
            _, check, code, err = timed_command(["dataset", "check", data])
            if code:
                raise SystemExit(f"dataset check of {count} images failed:\n{err[-2000:]}")
            rows.append(dict(images=count, zip_mib=os.path.getsize(data) / 2 ** 20, first_line_s=first,
                             one_step_run_s=total, dataset_check_s=check))
            print(rows[-1], flush=True)
    summary = dict(date=time.strftime("%Y-%m-%d %H:%M", time.gmtime()), machine=f"{platform.machine()}, "
                   f"{os.cpu_count()} cores", python=platform.python_version(),
                   command=" ".join(["python", "benchmarks/first_step.py", *sys.argv[1:]]), rows=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "first_step.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"{summary['date']} UTC, {summary['machine']}", "",
             "| images | ZIP | first log line | one-step run, start to exit | `mpdiff dataset check` (decode all) |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['images']:,} | {r['zip_mib']:.0f} MiB | {r['first_line_s']:.1f} s | "
                     f"{r['one_step_run_s']:.1f} s | {r['dataset_check_s']:.1f} s |")
    with open(os.path.join(args.out, "first_step.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
