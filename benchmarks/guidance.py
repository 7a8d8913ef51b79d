"""Guidance on the built-in 32x32 MNIST (issue 15): sample quality against guidance strength, for
classifier-free guidance and for autoguidance, on a CPU.

    python benchmarks/guidance.py guide    [--duration 24Ki] [--threads 2]
    python benchmarks/guidance.py quality  [--num 500] [--steps 32] [--w 1,1.5,2,3] [--no-fid] [--threads 2]
    python benchmarks/guidance.py report
    python benchmarks/guidance.py all      # the three in turn

The main network is the MNIST recipe's run (`python benchmarks/mnist.py run`: out/mnist/run, the
`mnist` preset, 48 Ki images, class-conditional), at EMA sigma_rel 0.050, its final snapshot. Guides:

- **CFG** (EDM2's way): a separately trained *unconditional* network. `guide` trains it:
  `mpdiff train --preset mnist --uncond --duration 24Ki --run-dir out/guidance/uncond` (the same
  architecture, half the images). It is used at the main network's EMA length, as EDM2 does.
- **Autoguidance**: an earlier snapshot of the main run itself (`--autoguide-nimg`, 16 Ki images by
  default: a third of the training) at its own, longer EMA length (`--autoguide-sigma-rel`, 0.100).

`quality` samples `--num` images per (guide, w) (seeds 0..num-1, classes balanced, seed % 10; Heun,
`--steps`) through `mpdiff.diffusion.generate.generate_batches` and scores them as
benchmarks/mnist.py does: agreement of the held-out-trained MNIST classifier with the conditioning
class, and fd_mnist and FID against the 1,000 held-out and the 4,000 training images (the reference
statistics of out/mnist, made by `mnist.py quality` and computed here if absent). w = 1 is the
unguided model, shared by both. Rows are appended to out/guidance/quality.json as they are measured;
a stopped evaluation resumes. `report` writes benchmarks/results/guidance/table.md, table.json and
guidance.png (accuracy and FID against w), plus a grid of the best setting of each kind.

Cost on this project's 2-core VM: a guided sample costs two network evaluations per step, so 500
guided samples at 32 steps take about as long as 1,000 unguided ones (~3-6 min), and Inception-v3
adds ~1-2 min per 500 images.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mnist as mnist_bench  # noqa: E402  (benchmarks/mnist.py: paths, references, scoring)

OUT = os.path.normpath(os.path.join(HERE, "..", "out", "guidance"))
RESULTS = os.path.join(HERE, "results", "guidance")
SIGMA_REL = 0.050
DEFAULT_W = "1,1.5,2,3"


def guide_command(out, duration):
    return ["mpdiff", "train", "--preset", "mnist", "--uncond", "--duration", duration,
            "--run-dir", os.path.join(out, "uncond"), "--no-progress"]


def train_guide(out, duration, threads):
    command = guide_command(out, duration)
    print(" ".join(command), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    subprocess.run(command, check=True, env=env)


def _shown(path):
    """A path relative to the repository when inside it."""
    root = os.path.dirname(HERE)
    path = os.path.abspath(path)
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else path


def guide_finished(out):
    log = os.path.join(out, "uncond", "log.txt")
    return os.path.exists(log) and "training complete" in open(log, encoding="utf-8").read()


def _snapshot(run, nimg=None, sigma_rel=SIGMA_REL):
    """The snapshot of `run` at `nimg` (None: the last) with this EMA length."""
    from mpdiff.ema.snapshots import list_snapshots

    found = [s for s in list_snapshots(run) if abs(s.sigma_rel - sigma_rel) < 1e-6 and (nimg is None or s.nimg == nimg)]
    if not found:
        raise SystemExit(f"{run}: no snapshot at {nimg or 'the end'} with sigma_rel {sigma_rel}")
    return max(found, key=lambda s: s.nimg)


def settings(guide_run, mnist_paths, w_values, autoguide_nimg, autoguide_sigma_rel):
    """[(kind, w, main snapshot, guide snapshot or None)] to evaluate; w = 1 once, unguided."""
    main = _snapshot(mnist_paths.run)
    guides = {"cfg": _snapshot(guide_run),
              "autoguidance": _snapshot(mnist_paths.run, autoguide_nimg, autoguide_sigma_rel)}
    rows = [("none", 1.0, main, None)]
    for kind, guide in guides.items():
        rows += [(kind, w, main, guide) for w in w_values if w != 1]
    return rows


def quality(out, guide_run, mnist_paths, num, steps, w_values, fid, threads, autoguide_nimg, autoguide_sigma_rel):
    import torch

    from mpdiff.data.pixels import decode_images
    from mpdiff.diffusion.generate import generate_batches
    from mpdiff.metrics.frechet import frechet_distance
    from mpdiff.metrics.mnist import MnistDetector, classifier_outputs, load_mnist_classifier
    from mpdiff.storage.files import write_json
    from mpdiff.storage.network_files import load_network

    torch.set_num_threads(threads)
    classifier = load_mnist_classifier()
    detectors = [MnistDetector(classifier)]
    if fid:
        from mpdiff.metrics.inception import InceptionDetector

        detectors.append(InceptionDetector())
    refs, _ = mnist_bench.references(mnist_paths, detectors)
    path = os.path.join(out, "quality.json")
    rows = mnist_bench._load_json(path, [])
    names = [d.metric for d in detectors]
    for kind, w, main, guide in settings(guide_run, mnist_paths, w_values, autoguide_nimg, autoguide_sigma_rel):
        if any(r["kind"] == kind and r["w"] == w and r["num"] == num and r["steps"] == steps
               and all(f"{m}_held_out" in r for m in names) for r in rows):
            continue
        start = time.perf_counter()
        net, _ = load_network(main.path)
        guide_net = load_network(guide.path)[0] if guide is not None else None
        seeds = list(range(num))
        images, classes = [], []
        for batch in generate_batches(net, seeds, [s % 10 for s in seeds], guide=guide_net, guidance=w,
                                      sampler="heun", num_steps=steps, batch_size=100):
            images.append(decode_images(batch.images).numpy())
            classes += batch.classes
        images = np.concatenate(images)
        sampled = time.perf_counter()
        _, predicted = classifier_outputs(classifier, images)
        row = {"kind": kind, "w": w, "num": num, "steps": steps,
               "net": _shown(main.path), "guide": guide and _shown(guide.path),
               "accuracy": float(np.mean(predicted == np.asarray(classes)))}
        features = mnist_bench._real_features(detectors, images)
        for m in names:
            mu, sigma = mnist_bench._stats_of(features[m]).mean_cov()
            for split in ("held_out", "train"):
                row[f"{m}_{split}"] = frechet_distance(mu, sigma, *refs[split][m])
        row["sample_seconds"] = round(sampled - start, 1)
        row["eval_seconds"] = round(time.perf_counter() - sampled, 1)
        rows = [r for r in rows if not (r["kind"] == kind and r["w"] == w)] + [row]
        rows.sort(key=lambda r: (r["kind"] != "none", r["kind"], r["w"]))
        os.makedirs(out, exist_ok=True)
        write_json(path, rows)
        grid_dir = os.path.join(out, "grids")
        os.makedirs(grid_dir, exist_ok=True)
        from mpdiff.storage.images import class_grid, save_grid

        save_grid(os.path.join(grid_dir, f"{kind}-w{w:g}.png"), *class_grid(images, classes, per_class=10))
        shown = ", ".join(f"{k} {row[k]:.2f}" for k in row if k.endswith(("_held_out", "_train")))
        print(f"{kind} w {w:g}: accuracy {100 * row['accuracy']:.1f}%, {shown} "
              f"[sampling {row['sample_seconds']:.0f} s, metrics {row['eval_seconds']:.0f} s]", flush=True)


def report(out, results):
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = mnist_bench._load_json(os.path.join(out, "quality.json"), [])
    if not rows:
        raise SystemExit("nothing evaluated yet (run `quality` first)")
    os.makedirs(results, exist_ok=True)
    metrics = [m for m in ("fd_mnist", "fid") if f"{m}_held_out" in rows[0]]
    summary = {"rows": rows, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d", time.gmtime()), "guide_command": " ".join(guide_command("out/guidance", "24Ki"))}
    with open(os.path.join(results, "table.json"), "w") as f:
        json.dump(summary, f, indent=1)
    names = {"fd_mnist": "FD (MNIST classifier)", "fid": "FID"}
    head = ["guidance", "w", "guide", "samples", "accuracy"]
    for m in metrics:
        head += [f"{names[m]} vs held-out", f"{names[m]} vs train"]
    lines = ["# Guidance on MNIST 32x32: quality against guidance strength", "",
             f"{summary['machine']}, {summary['date']}; {rows[0]['num']} samples per row (classes balanced), "
             f"{rows[0]['steps']} Heun steps. Network: {rows[0]['net']}.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["kind"], f"{r['w']:g}", r["guide"] or "-", str(r["num"]), f"{100 * r['accuracy']:.1f}%"]
        for m in metrics:
            cells += [f"{r[f'{m}_held_out']:.2f}", f"{r[f'{m}_train']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(results, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(4.2 * (1 + len(metrics)), 3.4))
    base = next((r for r in rows if r["kind"] == "none"), None)
    for kind, color in (("cfg", "tab:blue"), ("autoguidance", "tab:orange")):
        mine = sorted([r for r in rows if r["kind"] == kind] + ([base] if base else []), key=lambda r: r["w"])
        w = [r["w"] for r in mine]
        axes[0].plot(w, [100 * r["accuracy"] for r in mine], "o-", color=color, label=kind)
        for ax, m in zip(axes[1:], metrics):
            ax.plot(w, [r[f"{m}_train"] for r in mine], "o-", color=color, label=kind)
    axes[0].set_ylabel("class accuracy (%)")
    for ax, m in zip(axes[1:], metrics):
        ax.set_ylabel(f"{names[m]} vs train")
    for ax in axes:
        ax.set_xlabel("guidance strength w")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(results, "guidance.png"), dpi=110)
    for kind in ("cfg", "autoguidance"):
        mine = [r for r in rows if r["kind"] == kind and "fid_train" in r]
        if mine:
            best = min(mine, key=lambda r: r["fid_train"])
            grid = os.path.join(out, "grids", f"{kind}-w{best['w']:g}.png")
            if os.path.exists(grid):
                shutil.copy(grid, os.path.join(results, f"grid-{kind}-best.png"))
    grid = os.path.join(out, "grids", "none-w1.png")
    if os.path.exists(grid):
        shutil.copy(grid, os.path.join(results, "grid-unguided.png"))
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["guide", "quality", "report", "all"])
    parser.add_argument("--duration", default="24Ki", help="Training length of the CFG guide [24Ki].")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num", type=int, default=500, help="Samples per setting [500].")
    parser.add_argument("--steps", type=int, default=32, help="Heun steps [32].")
    parser.add_argument("--w", default=DEFAULT_W, help=f"Guidance strengths [{DEFAULT_W}].")
    parser.add_argument("--autoguide-nimg", type=int, default=16384, help="Snapshot of the main run used as the "
                                                                           "autoguide [16384].")
    parser.add_argument("--autoguide-sigma-rel", type=float, default=0.100, help="Its EMA length [0.100].")
    parser.add_argument("--no-fid", dest="fid", action="store_false")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--guide-run", default=None, help="The CFG guide's run directory [OUT/uncond].")
    parser.add_argument("--mnist-out", default=mnist_bench.OUT, help="The MNIST recipe's folder (run, references).")
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args()
    mnist_paths = mnist_bench.Paths(args.mnist_out, mnist_bench.RESULTS)
    w_values = [float(v) for v in args.w.split(",")]
    if args.action in ("guide", "all") and not guide_finished(args.out):
        train_guide(args.out, args.duration, args.threads)
    if args.action in ("quality", "all"):
        quality(args.out, args.guide_run or os.path.join(args.out, "uncond"), mnist_paths, args.num, args.steps, w_values, args.fid, args.threads, args.autoguide_nimg,
                args.autoguide_sigma_rel)
    if args.action in ("report", "all"):
        report(args.out, args.results)


if __name__ == "__main__":
    sys.exit(main())
