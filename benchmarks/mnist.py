"""The built-in 32x32 MNIST (`--data mnist`, issue 14): sample quality against training time, on a CPU.

    python benchmarks/mnist.py run      [--preset mnist] [--duration N] [--threads 2]
    python benchmarks/mnist.py quality  [--num 1000] [--every 1] [--steps 32] [--no-fid] [--threads 2]
    python benchmarks/mnist.py report
    python benchmarks/mnist.py all      # the three in turn

`run` trains `mpdiff train --preset mnist --data mnist --run-dir out/mnist/run --no-progress` (the
preset: a 32x32 class-conditional U-Net, EMA snapshots every 4 Ki images; `--duration` is passed
through when given; `--preset cpu32` has the same network and trains 64 Ki images, class-conditional
too, as the classes come from the dataset). Run it alone on the machine: the training time is the
curve's x axis.

`quality` evaluates, after training, every `--every`-th EMA snapshot at sigma_rel 0.05 (the last one
always) and, at the end of training, also the longest tracked sigma_rel: `--num` samples (seeds
0..num-1, classes balanced, seed % 10), `--steps` Heun steps, scored by

- accuracy: agreement of the MNIST classifier (`mpdiff.metrics.mnist`, trained on the 1,000 held-out
  images only) with the class each sample was conditioned on;
- fd_mnist and FID (Inception-v3, `mpdiff fetch-inception` once): against (a) the 1,000 held-out
  images and (b) the 4,000 training images. The reference statistics are computed once and cached as
  out/mnist/ref-held-out.npz and ref-train.npz (`mpdiff.metrics.compute.save_reference`);
- the training time at that snapshot: the wall time of the training loop up to it, summed from the
  run's stats.jsonl rows (images in the interval / img_per_sec; snapshot and checkpoint writing
  included, process start-up not); log.txt's wall time of the whole run is reported next to it.

Once, for scale (out/mnist/scale.json): FID and fd_mnist between two random halves of the training
split (2,000 vs 2,000) and between the held-out images and 1,000 random training images. Rows are
appended to out/mnist/quality.json as they are measured; a stopped evaluation resumes.

`report` writes benchmarks/results/mnist/: table.md and table.json (every evaluated snapshot, the
scale, the acceptance: accuracy >= 80% within 15 minutes of training), curve.png (accuracy and FID
against training minutes, with the 15-minute mark and the 80% line), grid-final.png (the run's final
grid) and grid-real.png (training images, the same layout).

Cost (measured with one thread on this project's 2-core VM while other jobs held the cores; an idle
machine with `--threads 2` is about 2-3x faster): Inception-v3 costs about 6 Gflop per image, ~0.5 s
per image here, so the references (5,000 real images) take ~40 min once and every 1,000 samples
~8 min more; sampling 1,000 images with 32 Heun steps (63 evaluations of the 0.11-Gflop mnist-preset
network each) takes ~6 min. A full evaluation of a 48 Ki-image run (12 snapshots + the longest EMA at
the end, 1,000 samples each) is thus ~3.5 h on one busy thread, ~1.5 h on two idle ones; `--every 2`
and `--num 500` each roughly halve it, and `--no-fid` leaves only the sampling (the classifier takes
seconds).

Smoke test (minutes; delete the folder afterwards): `--out /tmp/m/out --results /tmp/m/results` on
every action, `run --duration 1Ki`, `quality --num 20 --steps 4 --real-every 50`.
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

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "..", "out", "mnist"))
RESULTS = os.path.join(HERE, "results", "mnist")
QUALITY_SIGMA_REL = 0.05
ACCEPT_ACCURACY = 0.80
ACCEPT_MINUTES = 15.0
SCALE_SEED = 0


def default_preset():
    from mpdiff.presets import PRESETS

    return "mnist" if "mnist" in PRESETS else "cpu32"


def _load_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Paths:
    def __init__(self, out, results):
        self.out, self.results = out, results
        self.run = os.path.join(out, "run")
        self.quality = os.path.join(out, "quality.json")
        self.scale = os.path.join(out, "scale.json")
        self.ref = {"held_out": os.path.join(out, "ref-held-out.npz"), "train": os.path.join(out, "ref-train.npz")}


def finished(paths):
    log = os.path.join(paths.run, "log.txt")
    if not os.path.exists(log):
        return False
    with open(log, encoding="utf-8") as f:
        return "training complete" in f.read()


def train_command(paths, preset, duration):
    return ["mpdiff", "train", "--preset", preset, "--data", "mnist", "--run-dir", paths.run, "--no-progress",
            *(["--duration", duration] if duration else [])]


def train(paths, preset, duration, threads):
    command = [*train_command(paths, preset, duration), "--threads", str(threads)]  # a run keeps its threads
    print(" ".join(command), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    subprocess.run(command, check=True, env=env)


# ------------------------------------------------------------------------------------------ quality

def _stats_rows(run):
    rows = []
    with open(os.path.join(run, "stats.jsonl"), encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "nimg" in row and row.get("img_per_sec"):
                rows.append(row)
    return sorted(rows, key=lambda r: r["nimg"])


def training_seconds(rows, nimg):
    """Wall seconds of the training loop up to image count `nimg`: the stats rows' intervals
    (images / img_per_sec) summed, the last one interpolated. None past the last row."""
    total, previous = 0.0, 0
    for row in rows:
        seconds = (row["nimg"] - previous) / row["img_per_sec"]
        if nimg <= row["nimg"]:
            share = (nimg - previous) / (row["nimg"] - previous) if row["nimg"] > previous else 1.0
            return total + share * seconds
        total, previous = total + seconds, row["nimg"]
    return None


def _real_features(detectors, images, batch_size=100):
    """{metric: float64 features [N, D]} of uint8 images, batch by batch."""
    import torch

    out = {d.metric: [] for d in detectors}
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        for d in detectors:
            out[d.metric].append(d.features(batch).double().numpy())
    return {metric: np.concatenate(parts) for metric, parts in out.items()}


def _stats_of(features):
    from mpdiff.metrics.detectors import FeatureStats

    return FeatureStats(features.shape[1]).add(features)


def _source(split, real_every):
    from mpdiff.metrics.mnist import CLASSIFIER_VERSION

    images = "every image" if real_every == 1 else f"every {real_every}th image (a smoke test)"
    return f"built-in mnist, {split} split, {images}; fd_mnist of the mnist classifier v{CLASSIFIER_VERSION}"


def _read_reference(path, metric_names, split, real_every):
    """{metric: (mu, sigma)} of our .npz if it is this split's, of this classifier version, and holds
    every metric asked for; else None (computed again)."""
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as npz:
        if "source" not in npz.files or str(npz["source"]) != _source(split, real_every) \
                or not all(f"{m}_mu" in npz.files for m in metric_names):
            return None
        return {m: (npz[f"{m}_mu"], npz[f"{m}_sigma"]) for m in metric_names}


def references(paths, detectors, real_every=1):
    """Reference statistics of the held-out and training images, and the real-vs-real scale: computed
    once (one pass of every detector over the 5,000 real images) and cached under the out folder.
    `real_every` > 1 uses every k-th real image only, for smoke tests."""
    from mpdiff.metrics.compute import save_reference
    from mpdiff.metrics.frechet import frechet_distance
    from mpdiff.metrics.mnist import mnist_splits
    from mpdiff.storage.files import write_json

    metric_names = [d.metric for d in detectors]
    refs = {split: _read_reference(path, metric_names, split, real_every) for split, path in paths.ref.items()}
    scale = _load_json(paths.scale, {})
    if all(refs.values()) and all(m in scale.get("train_halves", {}) for m in metric_names) \
            and scale.get("real_every") == real_every:
        return refs, scale
    parts = {k: v[::real_every] for k, v in mnist_splits().items()}
    start = time.perf_counter()
    print(f"reference features of {len(parts['test_images'])} held-out and {len(parts['train_images'])} training "
          f"images ({', '.join(metric_names)}) ...", flush=True)
    held_out = _real_features(detectors, parts["test_images"])
    train = _real_features(detectors, parts["train_images"])
    rng = np.random.default_rng(SCALE_SEED)
    order = rng.permutation(len(parts["train_images"]))
    half_a, half_b = order[:len(order) // 2], order[len(order) // 2:]
    subset = rng.choice(len(parts["train_images"]), len(parts["test_images"]), replace=False)
    scale = {"train_halves": {}, "held_out_vs_train_subset": {}, "held_out_vs_train": {},
             "counts": {"train_halves": [len(half_a), len(half_b)], "held_out_vs_train_subset": [len(held_out[metric_names[0]]), len(subset)],
                        "held_out_vs_train": [len(held_out[metric_names[0]]), len(train[metric_names[0]])]},
             "seed": SCALE_SEED, "real_every": real_every}

    def fd(x, y):
        return frechet_distance(*_stats_of(x).mean_cov(), *_stats_of(y).mean_cov())

    for m in metric_names:
        scale["train_halves"][m] = fd(train[m][half_a], train[m][half_b])
        scale["held_out_vs_train_subset"][m] = fd(held_out[m], train[m][subset])
        scale["held_out_vs_train"][m] = fd(held_out[m], train[m])
    scale["seconds"] = round(time.perf_counter() - start, 1)
    os.makedirs(paths.out, exist_ok=True)
    for split, features in (("held_out", held_out), ("train", train)):
        save_reference(paths.ref[split], {m: _stats_of(features[m]) for m in metric_names},
                       source=_source(split, real_every))
    write_json(paths.scale, scale)
    shown = json.dumps({k: scale[k] for k in ("train_halves", "held_out_vs_train_subset")})
    print(f"references and scale in {scale['seconds']:.0f} s: {shown}", flush=True)
    return {split: _read_reference(path, metric_names, split, real_every) for split, path in paths.ref.items()}, scale


def _snapshots_to_evaluate(run, every):
    """(nimg, sigma_rel, path) of every `every`-th snapshot at QUALITY_SIGMA_REL (the last one always) and
    the last one at the longest tracked sigma_rel."""
    from mpdiff.ema.snapshots import list_snapshots

    snapshots = list_snapshots(run)
    chosen = sorted((s for s in snapshots if abs(s.sigma_rel - QUALITY_SIGMA_REL) < 1e-6), key=lambda s: s.nimg)
    picked = [s for i, s in enumerate(chosen) if (i + 1) % every == 0 or i == len(chosen) - 1]
    last = max(s.nimg for s in snapshots)
    longest = max((s for s in snapshots if s.nimg == last), key=lambda s: s.sigma_rel)
    if all(abs(longest.sigma_rel - s.sigma_rel) > 1e-6 or longest.nimg != s.nimg for s in picked):
        picked.append(longest)
    return [(s.nimg, s.sigma_rel, s.path) for s in picked]


def quality(paths, num, every, steps, fid, threads, while_training=False, real_every=1):
    import torch

    from mpdiff.data.pixels import decode_images
    from mpdiff.diffusion.generate import generate
    from mpdiff.metrics.frechet import frechet_distance
    from mpdiff.metrics.mnist import (
        MnistDetector,
        classifier_outputs,
        load_mnist_classifier,
    )
    from mpdiff.storage.files import write_json
    from mpdiff.storage.network_files import load_network

    if not finished(paths) and not while_training:
        raise SystemExit(f"{paths.run}: training is not complete; evaluating now would slow it and distort its "
                         f"time axis (--while-training to do it anyway)")
    torch.set_num_threads(threads)
    classifier = load_mnist_classifier()
    print(f"MNIST classifier: accuracy {100 * classifier.test_accuracy:.2f}% on the training split "
          f"({'trained now' if classifier.trained_now else classifier.cache_path})", flush=True)
    detectors = [MnistDetector(classifier)]
    if fid:
        from mpdiff.metrics.inception import InceptionDetector

        detectors.append(InceptionDetector())
    refs, _ = references(paths, detectors, real_every)
    stats = _stats_rows(paths.run)
    rows = _load_json(paths.quality, [])
    metric_names = [d.metric for d in detectors]

    def done(nimg, sigma_rel):
        return any(r["nimg"] == nimg and abs(r["sigma_rel"] - sigma_rel) < 1e-6 and r["num"] == num
                   and r["steps"] == steps and all(f"{m}_held_out" in r for m in metric_names) for r in rows)

    for nimg, sigma_rel, path in _snapshots_to_evaluate(paths.run, every):
        if done(nimg, sigma_rel):
            continue
        start = time.perf_counter()
        net, _ = load_network(path)
        seeds = list(range(num))
        images, classes = generate(net, seeds, class_idx=[s % 10 for s in seeds] if net.label_dim else None,
                                   sampler="heun", num_steps=steps, progress=False)
        images = decode_images(images).numpy()
        sampled = time.perf_counter()
        _, predicted = classifier_outputs(classifier, images)
        row = {"nimg": nimg, "kimg": nimg / 1000, "sigma_rel": sigma_rel, "num": num, "steps": steps,
               "train_seconds": training_seconds(stats, nimg),
               "accuracy": float(np.mean(predicted == np.asarray(classes))) if net.label_dim else None}
        features = _real_features(detectors, images)
        for m in metric_names:
            mu, sigma = _stats_of(features[m]).mean_cov()
            for split in ("held_out", "train"):
                row[f"{m}_{split}"] = frechet_distance(mu, sigma, *refs[split][m])
        row["sample_seconds"] = round(sampled - start, 1)
        row["eval_seconds"] = round(time.perf_counter() - sampled, 1)
        rows = [r for r in rows if not (r["nimg"] == nimg and abs(r["sigma_rel"] - sigma_rel) < 1e-6)] + [row]
        rows.sort(key=lambda r: (r["nimg"], r["sigma_rel"]))
        write_json(paths.quality, rows)
        minutes = row["train_seconds"] / 60 if row["train_seconds"] is not None else float("nan")
        shown = ", ".join(f"{k} {row[k]:.2f}" for k in row if k.endswith(("_held_out", "_train")))
        print(f"{nimg:,} images ({minutes:.1f} min), EMA {sigma_rel:.3f}: accuracy "
              f"{row['accuracy'] if row['accuracy'] is None else round(row['accuracy'], 4)}, {shown} "
              f"[sampling {row['sample_seconds']:.0f} s, metrics {row['eval_seconds']:.0f} s]", flush=True)


# ------------------------------------------------------------------------------------------ report

def _wall_seconds(run):
    from recipes import wall_seconds  # benchmarks/ is on sys.path when this script runs

    log = os.path.join(run, "log.txt")
    return wall_seconds(log) if os.path.exists(log) else None


def acceptance(rows):
    """The acceptance of issue 14 on the sigma_rel-0.05 curve: the best accuracy of a snapshot within
    ACCEPT_MINUTES of training, and the first training time at which accuracy reaches ACCEPT_ACCURACY."""
    curve = [r for r in rows if abs(r["sigma_rel"] - QUALITY_SIGMA_REL) < 1e-6 and r.get("accuracy") is not None
             and r.get("train_seconds") is not None]
    within = [r for r in curve if r["train_seconds"] <= ACCEPT_MINUTES * 60]
    best = max(within, key=lambda r: r["accuracy"]) if within else None
    first = next((r for r in curve if r["accuracy"] >= ACCEPT_ACCURACY), None)
    return {
        "target_accuracy": ACCEPT_ACCURACY, "within_minutes": ACCEPT_MINUTES,
        "best_within": None if best is None else {k: best[k] for k in ("nimg", "train_seconds", "accuracy")},
        "first_reaching": None if first is None else {k: first[k] for k in ("nimg", "train_seconds", "accuracy")},
        "met": bool(best and best["accuracy"] >= ACCEPT_ACCURACY),
    }


def real_grid(path, per_class=10):
    from mpdiff.metrics.mnist import mnist_splits
    from mpdiff.storage.images import class_grid, save_grid

    parts = mnist_splits()
    rng = np.random.default_rng(0)
    picks = [int(i) for c in range(10) for i in rng.choice(np.flatnonzero(parts["train_labels"] == c), per_class,
                                                            replace=False)]
    save_grid(path, *class_grid(parts["train_images"][picks], [int(parts["train_labels"][i]) for i in picks],
                                per_class=per_class))


def report(paths):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _load_json(paths.quality, [])
    scale = _load_json(paths.scale, {})
    if not rows:
        raise SystemExit(f"{paths.quality}: nothing evaluated yet (run `quality` first)")
    os.makedirs(paths.results, exist_ok=True)
    config = _load_json(os.path.join(paths.run, "config.json"), {})
    stats = _stats_rows(paths.run)
    from mpdiff.metrics.mnist import load_mnist_classifier

    classifier = load_mnist_classifier()
    metrics = [m for m in ("fd_mnist", "fid") if any(f"{m}_held_out" in r for r in rows)]
    summary = {
        "preset": config.get("preset"),
        "command": " ".join(["mpdiff", "train", *_train_args(config)]),
        "nimg": stats[-1]["nimg"] if stats else None,
        "train_seconds": training_seconds(stats, stats[-1]["nimg"]) if stats else None,
        "wall_seconds": _wall_seconds(paths.run),
        "classifier_accuracy_on_train_split": classifier.test_accuracy,
        "acceptance": acceptance(rows), "scale": scale, "rows": rows,
        "network": config.get("network"), "training": config.get("training"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    with open(os.path.join(paths.results, "table.json"), "w") as f:
        json.dump(summary, f, indent=1)

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    names = {"fd_mnist": "FD (MNIST classifier)", "fid": "FID"}
    head = ["kimg", "training (min)", "EMA sigma_rel", "samples", "accuracy"]
    for m in metrics:
        head += [f"{names[m]} vs held-out", f"{names[m]} vs train"]
    lines = ["# MNIST 32x32: sample quality against training time", "",
             (f"Run: `{summary['command']}`; {num(summary['nimg'], ',')} images, training loop "
              f"{num(summary['train_seconds'] and summary['train_seconds'] / 60, '.1f')} min "
              f"(whole run, log.txt: {num(summary['wall_seconds'] and summary['wall_seconds'] / 60, '.1f')} min), "
              f"{summary['machine']}, {summary['date']}."),
             (f"Classifier (trained on the 1,000 held-out images only): {100 * classifier.test_accuracy:.2f}% on the "
              f"4,000 training images."), "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [f"{r['kimg']:.1f}", num(r["train_seconds"] and r["train_seconds"] / 60, ".1f"), f"{r['sigma_rel']:.3f}",
                 str(r["num"]), num(r["accuracy"] and 100 * r["accuracy"], ".1f") + ("%" if r["accuracy"] is not None else "")]
        for m in metrics:
            cells += [num(r.get(f"{m}_held_out"), ".2f"), num(r.get(f"{m}_train"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    if scale:
        counts = scale.get("counts", {})
        smoke = scale.get("real_every", 1) != 1
        lines += ["", "Real against real, for scale" + (" (SMOKE TEST: a subset of the real images)" if smoke else "") + ":",
                  "", "| pair | images | " + " | ".join(names[m] for m in metrics) + " |",
                  "|" + " --- |" * (2 + len(metrics))]
        for key, label in (("train_halves", "two random halves of the training split"),
                           ("held_out_vs_train_subset", "held-out vs random training images"),
                           ("held_out_vs_train", "held-out vs all training images")):
            lines.append(f"| {label} | {' vs '.join(str(c) for c in counts.get(key, []))} | "
                         + " | ".join(num(scale.get(key, {}).get(m), ".2f") for m in metrics) + " |")
    a = summary["acceptance"]
    lines += ["", f"Acceptance (accuracy >= {100 * ACCEPT_ACCURACY:.0f}% within {ACCEPT_MINUTES:.0f} min of training, "
                  f"EMA {QUALITY_SIGMA_REL}): **{'met' if a['met'] else 'not met'}**"
              + (f"; best within: {100 * a['best_within']['accuracy']:.1f}% at {a['best_within']['train_seconds'] / 60:.1f} min"
                 if a["best_within"] else "")
              + (f"; first reaching it: {a['first_reaching']['train_seconds'] / 60:.1f} min" if a["first_reaching"] else "")
              + "."]
    with open(os.path.join(paths.results, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    _curve(plt, rows, scale, metrics, os.path.join(paths.results, "curve.png"))
    grid = os.path.join(paths.run, "samples", "grid-final.png")
    if os.path.exists(grid):
        shutil.copyfile(grid, os.path.join(paths.results, "grid-final.png"))
    real_grid(os.path.join(paths.results, "grid-real.png"))
    print(f"wrote {paths.results}")


def _train_args(config):
    """The `mpdiff train` arguments of the run, as the benchmark gave them (relative paths)."""
    from mpdiff.presets import PRESETS

    preset = config.get("preset") or default_preset()
    args = ["--preset", preset, "--data", "mnist", "--run-dir", "out/mnist/run"]
    duration = config.get("training", {}).get("duration")
    if preset in PRESETS and duration is not None and duration != PRESETS[preset].training.duration:
        args += ["--duration", str(duration)]
    return args


def _curve(plt, rows, scale, metrics, path):
    main = [r for r in rows if abs(r["sigma_rel"] - QUALITY_SIGMA_REL) < 1e-6 and r.get("train_seconds") is not None]
    extra = [r for r in rows if r not in main and r.get("train_seconds") is not None]
    minutes = [r["train_seconds"] / 60 for r in main]
    figure, axes = plt.subplots(1, 1 + len(metrics), figsize=(5 * (1 + len(metrics)), 4))
    axes = np.atleast_1d(axes)
    ax = axes[0]
    ax.plot(minutes, [100 * r["accuracy"] if r["accuracy"] is not None else np.nan for r in main], "o-", color="black",
            label=f"EMA {QUALITY_SIGMA_REL}")
    for r in extra:
        if r["accuracy"] is not None:
            ax.plot(r["train_seconds"] / 60, 100 * r["accuracy"], "s", color="tab:purple", label=f"EMA {r['sigma_rel']:.3f}")
    ax.axhline(100 * ACCEPT_ACCURACY, color="tab:red", ls="--", lw=1, label=f"{100 * ACCEPT_ACCURACY:.0f}%")
    ax.set(ylabel="classifier agreement with the class (%)", ylim=(0, 100), title="class accuracy")
    colors = {"held_out": "tab:blue", "train": "tab:orange"}
    counts = scale.get("counts", {})
    halves = counts.get("train_halves", [2000, 2000])
    pair = counts.get("held_out_vs_train_subset", [1000, 1000])
    everything = counts.get("held_out_vs_train", [1000, 4000])
    for ax, m in zip(axes[1:], metrics):
        for split, label in (("held_out", f"vs held-out ({everything[0]:,})"), ("train", f"vs training ({everything[1]:,})")):
            have = [(t, r[f"{m}_{split}"]) for t, r in zip(minutes, main) if f"{m}_{split}" in r]  # rows without it: skipped
            ax.plot([t for t, _ in have], [v for _, v in have], "o-", color=colors[split], label=label)
            for r in extra:
                if f"{m}_{split}" in r:
                    ax.plot(r["train_seconds"] / 60, r[f"{m}_{split}"], "s", color=colors[split])
        if scale.get("train_halves", {}).get(m) is not None:
            ax.axhline(scale["train_halves"][m], color="gray", ls=":",
                       label=f"real: training halves ({halves[0]:,} vs {halves[1]:,})")
        if scale.get("held_out_vs_train_subset", {}).get(m) is not None:
            ax.axhline(scale["held_out_vs_train_subset"][m], color="gray", ls="-.",
                       label=f"real: held-out vs {pair[1]:,} training")
        ax.set(yscale="log", ylabel=m, title={"fid": "FID (Inception-v3)", "fd_mnist": "FD of MNIST-classifier features"}[m])
    for ax in axes:
        ax.axvline(ACCEPT_MINUTES, color="tab:red", ls="--", lw=1)
        ax.set(xlabel="training time (min)")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "quality", "report", "all"])
    parser.add_argument("--preset", default=None, help="mpdiff preset [mnist if it exists, else cpu32].")
    parser.add_argument("--duration", default=None, help="Training length, passed to mpdiff train [the preset's].")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for training and evaluation [2].")
    parser.add_argument("--num", type=int, default=1000, help="Samples per evaluated snapshot [1000].")
    parser.add_argument("--every", type=int, default=1, help="Evaluate every k-th snapshot (the last always) [1].")
    parser.add_argument("--steps", type=int, default=32, help="Heun steps per sample [32].")
    parser.add_argument("--no-fid", dest="fid", action="store_false", help="Skip Inception (FID): classifier metrics only.")
    parser.add_argument("--while-training", action="store_true", help="Evaluate even if training is not complete.")
    parser.add_argument("--real-every", type=int, default=1,
                        help="Smoke tests only: references and scale from every k-th real image [1].")
    parser.add_argument("--out", default=OUT, help=f"Run, references and quality.json [{os.path.relpath(OUT)}].")
    parser.add_argument("--results", default=RESULTS, help=f"Report folder [{os.path.relpath(RESULTS)}].")
    args = parser.parse_args()
    if args.num < 2 or args.every < 1 or args.steps < 1 or args.real_every < 1:
        parser.error("--num must be at least 2, --every, --steps and --real-every at least 1")
    paths = Paths(os.path.abspath(args.out), os.path.abspath(args.results))
    os.makedirs(paths.out, exist_ok=True)
    if args.action in ("run", "all"):
        train(paths, args.preset or default_preset(), args.duration, args.threads)
    if args.action in ("quality", "all"):
        quality(paths, args.num, args.every, args.steps, args.fid, args.threads, args.while_training, args.real_every)
    if args.action in ("report", "all"):
        report(paths)


if __name__ == "__main__":
    sys.exit(main())
