"""ScaleLong's comparison (scaled long skips, SPEC §9) reproduced on the built-in digits, on a CPU.

    python benchmarks/scalelong.py run       [--only uvit-none,G-cs] [--duration 128Ki] [--parallel 2]
    python benchmarks/scalelong.py quality   # sample quality over training, from every run's EMA snapshots
    python benchmarks/scalelong.py report    # tables (Markdown + JSON) and figures
    python benchmarks/scalelong.py all

Three backbones: the UViT (`--preset digits-uvit`), and the U-Net of ablation configs C (plain
concatenated skips, no normalisation of the long path) and G (EDM2: magnitude-preserving
concatenation), each with

- none:   the long skips as they are (ScaleLong's "Org");
- sqrt2:  every skip x 1/sqrt(2) (Imagen, SR3, NCSN++; ScaleLong's "1/sqrt(2)-CS");
- cs:     kappa^(i-1) on the i-th skip from the outermost, kappa from the preset;
- ls:     the learned gate shared by the skips;
- and for G also cs-mp: cs's ratios through the magnitude-preserving concatenation (SPEC §9.6).

Every run trains the same number of images with the same seed, with the dynamics diagnostics on
(skip RMS before and after scaling, output sensitivity, gradient norm in every stats row). Then each
EMA snapshot (sigma_rel 0.05, every 16 Ki images) is sampled (250 images, 16 Heun steps) and scored
by the digits classifier: accuracy against the requested class and the Frechet distance of its
features to the held-out digits. The report writes, under benchmarks/results/scalelong/:

- table.md / table.json: per run, final loss, final FD and accuracy (1,000 samples, and the 250 of the
  curve), images to reach the target FD (the one "none" reaches halfway through its training) and the
  speed-up over "none", the oscillation of the skip and decoder features, the gradient norm and the
  sensitivity;
- curves-<backbone>.png: loss, FD and accuracy over training, one line per variant;
- stability-<backbone>.png: skip RMS, gradient norm and sensitivity over training.

Runs resume when the command is repeated; finished runs and evaluations are skipped.
"""

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "..", "out", "scalelong"))
RESULTS = os.path.join(HERE, "results", "scalelong")
SQRT_HALF = "0.7071067811865476"

BACKBONES = {  # name: mpdiff train arguments of the backbone
    "uvit": ["--preset", "digits-uvit"],
    "C": ["--preset", "digits", "--config", "C"],
    "G": ["--preset", "digits"],
}
VARIANTS = {  # name: skip-scaling arguments
    "none": ["--skip-scaling", "none"],
    "sqrt2": ["--skip-scaling", "cs", "--kappa", SQRT_HALF, "--kappa-rule", "all"],
    "cs": ["--skip-scaling", "cs"],
    "ls": ["--skip-scaling", "ls"],
    "cs-mp": ["--skip-scaling", "cs-mp"],
}
# Variant-major, so that a partial experiment already compares the backbones' baselines and CS.
RUNS = [f"{b}-{v}" for v in VARIANTS for b in BACKBONES if v != "cs-mp" or b == "G"]
QUALITY_SIGMA_REL = 0.05
QUALITY_SEEDS = range(250)
QUALITY_STEPS = 16
FINAL_SEEDS = range(1000)   # the final snapshot once more with 4x the samples: less noise where it matters


def run_dir(name):
    return os.path.join(OUT, name)


def finished(name):
    log = os.path.join(run_dir(name), "log.txt")
    return os.path.exists(log) and "training complete" in open(log, encoding="utf-8").read()


def command(name, duration):
    """The training command of a run: '<backbone>-<variant>', or '<backbone>-<variant>@<seed>' for a
    replicate with another training seed."""
    base, _, seed = name.partition("@")
    backbone, variant = base.split("-", 1)
    return ["mpdiff", "train", *BACKBONES[backbone], *VARIANTS[variant], "--duration", duration,
            "--run-dir", run_dir(name), "--no-progress", "--no-final-grid", *(["--seed", seed] if seed else [])]


def known(name):
    base, _, seed = name.partition("@")
    return base in RUNS and (not seed or seed.isdigit())


def train(names, duration, parallel, threads):
    from recipes import run_commands  # benchmarks/ is on sys.path

    run_commands({n: command(n, duration) for n in names if not finished(n)}, OUT, parallel, threads)


def quality(names, metrics=None, ref=None):
    """quality.json per run: [{nimg, accuracy, fd}] of every EMA snapshot at QUALITY_SIGMA_REL, plus the
    Fréchet distances `metrics` (e.g. fid) of the same samples against reference statistics `ref`."""
    import torch

    from mpdiff.data.pixels import decode_images
    from mpdiff.diffusion.generate import generate
    from mpdiff.ema.snapshots import list_snapshots
    from mpdiff.metrics.digits import evaluate_digits, load_digit_classifier
    from mpdiff.storage.files import write_json
    from mpdiff.storage.layout import RunLayout
    from mpdiff.storage.network_files import load_network

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    classifier = load_digit_classifier()
    scorers = []
    if metrics:
        from mpdiff.metrics.compute import compute_metrics, dataset_batches, load_reference, make_detector, parse_metrics

        names_asked = parse_metrics(metrics)
        reference = load_reference(ref)
        detectors = [make_detector(m) for m in names_asked]
        scorers.append(lambda pixels: compute_metrics(dataset_batches(pixels), reference, names_asked,
                                                      detectors=detectors))
    for name in names:
        if not os.path.isdir(os.path.join(run_dir(name), "snapshots")):
            continue  # not started, or no snapshot yet
        path = os.path.join(run_dir(name), "quality.json")
        rows = json.load(open(path)) if os.path.exists(path) else []
        done = {r["nimg"] for r in rows}
        snapshots = [s for s in list_snapshots(RunLayout(run_dir(name)).snapshot_dir)
                     if abs(s.sigma_rel - QUALITY_SIGMA_REL) < 1e-6 and s.nimg not in done]
        for snapshot in sorted(snapshots, key=lambda s: s.nimg):
            net, _ = load_network(snapshot.path)
            images, classes = generate(net, list(QUALITY_SEEDS), sampler="heun", num_steps=QUALITY_STEPS, progress=False)
            pixels = decode_images(images)
            result = evaluate_digits(pixels.numpy(), classes, classifier=classifier)
            row = {"nimg": snapshot.nimg, "accuracy": result["accuracy"], "fd": result["fd"],
                   "fd_real_vs_real": result["fd_real_vs_real"]}
            for score in scorers:
                row.update({k: v for k, v in score(pixels).items() if k != "num_images"})
            rows.append(row)
            rows.sort(key=lambda r: r["nimg"])
            write_json(path, rows)
            print(f"{name} at {snapshot.nimg:,} images: accuracy {result['accuracy']:.3f}, FD {result['fd']:.2f}",
                  flush=True)
        final_path = os.path.join(run_dir(name), "quality-final.json")
        if finished(name) and not os.path.exists(final_path):
            last = max((s for s in list_snapshots(RunLayout(run_dir(name)).snapshot_dir)
                        if abs(s.sigma_rel - QUALITY_SIGMA_REL) < 1e-6), key=lambda s: s.nimg)
            net, _ = load_network(last.path)
            images, classes = generate(net, list(FINAL_SEEDS), sampler="heun", num_steps=QUALITY_STEPS, progress=False)
            result = evaluate_digits(decode_images(images).numpy(), classes, classifier=classifier)
            write_json(final_path, {"nimg": last.nimg, "num_samples": len(FINAL_SEEDS), "accuracy": result["accuracy"],
                                    "fd": result["fd"], "fd_real_vs_real": result["fd_real_vs_real"],
                                    "fd_real_vs_real_std": result["fd_real_vs_real_std"]})
            print(f"{name} final, {len(FINAL_SEEDS)} samples: accuracy {result['accuracy']:.3f}, FD {result['fd']:.2f}",
                  flush=True)


# ------------------------------------------------------------------------------------------ report

def _stats(name):
    rows = []
    for line in open(os.path.join(run_dir(name), "stats.jsonl"), encoding="utf-8"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _quality(name):
    path = os.path.join(run_dir(name), "quality.json")
    return json.load(open(path)) if os.path.exists(path) else []


def images_to_reach(rows, target):
    """Images at which FD first reaches `target`, interpolated linearly in log FD between evaluations;
    None if it never does."""
    previous = None
    for row in rows:
        if row["fd"] <= target:
            if previous is None:
                return row["nimg"]
            a, b = math.log(previous["fd"]), math.log(row["fd"])
            share = (a - math.log(target)) / (a - b) if a != b else 1.0
            return previous["nimg"] + share * (row["nimg"] - previous["nimg"])
        previous = row
    return None


def oscillation(values):
    """Mean absolute relative change between consecutive measurements: how much a quantity moves from
    one stats row to the next (0 for a flat curve)."""
    pairs = [(a, b) for a, b in zip(values, values[1:]) if a and b is not None]
    return sum(abs(b - a) / abs(a) for a, b in pairs) / len(pairs) if pairs else None


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def recomputed_sensitivity(name):
    """The output sensitivity of a run's final training state, measured now on its probe batch (cached in
    RUN/sensitivity-final.json). The report scales each run's logged sensitivity curve so that its last
    point equals this value: the first runs of the experiment logged it divided by the nominal RMS of
    the perturbation instead of its measured RMS (a constant 2.97%, fixed while the experiment ran)."""
    cache = os.path.join(run_dir(name), "sensitivity-final.json")
    if os.path.exists(cache):
        return json.load(open(cache))["sensitivity"]
    import glob

    import torch

    from mpdiff.config import NetworkConfig
    from mpdiff.data.datasets import load_dataset
    from mpdiff.nn.build import build_network
    from mpdiff.storage.tensors import load_tensors
    from mpdiff.train import dynamics

    config = json.load(open(os.path.join(run_dir(name), "config.json")))
    net = build_network(NetworkConfig.from_dict(NetworkConfig.completed(config["network"])))
    checkpoint = sorted(glob.glob(os.path.join(run_dir(name), "checkpoints", "*.safetensors")))[-1]
    tensors, meta = load_tensors(checkpoint)
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    data = load_dataset(config["run"]["dataset"])
    labels = torch.eye(data.num_classes)[torch.as_tensor(data.labels)]
    training = config["training"]
    probe = dynamics.make_probe(torch.as_tensor(data.images), labels, training["P_mean"], training["P_std"],
                                config["run"]["seed"])
    value = dynamics.probe_statistics(net, probe, micro_batch=config["run"].get("batch_gpu"))["sensitivity"]
    with open(cache, "w") as f:
        json.dump({"sensitivity": value, "nimg": meta["nimg"]}, f)
    return value


def sensitivity_curve(name, dyn_rows):
    """(nimg, sensitivity) of the rows with dynamics, calibrated to :func:`recomputed_sensitivity`."""
    points = [(r["nimg"], r["dynamics"].get("sensitivity")) for r in dyn_rows if r["dynamics"].get("sensitivity")]
    if not points:
        return []
    scale = recomputed_sensitivity(name) / points[-1][1] if finished(name) else 1.0
    return [(n, v * scale) for n, v in points]


def summarise(name):
    stats = _stats(name)
    dyn = [r for r in stats if isinstance(r.get("dynamics"), dict)]
    quality_rows = _quality(name)
    skip_in = [_mean(list(r["dynamics"].get("skip_in", {}).values())) for r in dyn]
    decoder = [_mean([v for k, v in r["dynamics"]["act"].items() if k.startswith("dec.")]) for r in dyn]
    sensitivity = sensitivity_curve(name, dyn)
    final_path = os.path.join(run_dir(name), "quality-final.json")
    final = json.load(open(final_path)) if os.path.exists(final_path) else {}
    last = quality_rows[-1] if quality_rows else {}
    best = min(quality_rows, key=lambda r: r["fd"]) if quality_rows else {}
    return {
        "run": name, "nimg": stats[-1]["nimg"] if stats else 0, "final_loss": stats[-1]["loss"] if stats else None,
        "final_fd": last.get("fd"), "final_accuracy": last.get("accuracy"),
        "final_fd_1000": final.get("fd"), "final_accuracy_1000": final.get("accuracy"),
        "fd_real_vs_real_1000": final.get("fd_real_vs_real"), "fd_real_vs_real_std_1000": final.get("fd_real_vs_real_std"),
        "best_fd": best.get("fd"), "best_fd_nimg": best.get("nimg"), "fd_real_vs_real": last.get("fd_real_vs_real"),
        "grad_norm": _mean([r.get("grad_norm") for r in stats[1:]]),
        "grad_norm_oscillation": oscillation([r.get("grad_norm") for r in stats]),
        "skip_rms_final": skip_in[-1] if skip_in else None,
        "skip_rms_oscillation": oscillation(skip_in),
        "decoder_rms_oscillation": oscillation(decoder),
        "sensitivity_final": sensitivity[-1][1] if sensitivity else None,
        "sensitivity_mean": _mean([v for _, v in sensitivity]),
        "wall_seconds": _wall_seconds(name),
    }


def _wall_seconds(name):
    from recipes import wall_seconds  # benchmarks/ is on sys.path when this script runs

    log = os.path.join(run_dir(name), "log.txt")
    return wall_seconds(log) if os.path.exists(log) else None


def report(names):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(RESULTS, exist_ok=True)
    present = [n for n in names if os.path.exists(os.path.join(run_dir(n), "stats.jsonl"))]
    table = [summarise(n) for n in present]
    by_name = {e["run"]: e for e in table}
    replicates = sorted({n for n in os.listdir(OUT) if "@" in n and known(n) and os.path.isdir(run_dir(n))}) \
        if os.path.isdir(OUT) else []
    present += [n for n in replicates if n not in present and os.path.exists(os.path.join(run_dir(n), "stats.jsonl"))]
    table += [summarise(n) for n in replicates if n not in by_name and n in present]
    by_name = {e["run"]: e for e in table}
    for backbone in BACKBONES:
        # The fixed quality: the FD the baseline ("none") reaches halfway through its training. Its final
        # FD would be a target that noise (250 samples) lets a variant miss by a hair and never "reach".
        baseline = _quality(f"{backbone}-none")
        half = [r for r in baseline if r["nimg"] * 2 >= baseline[-1]["nimg"]] if baseline else []
        target = half[0]["fd"] if half else None
        base_reached = images_to_reach(baseline, target) if target else None
        for e in table:
            if e["run"].split("-", 1)[0] != backbone or target is None:
                continue
            reached = images_to_reach(_quality(e["run"]), target)
            e["target_fd"] = target
            e["images_to_target"] = reached
            e["speedup"] = base_reached / reached if reached and base_reached else None
        _figures(plt, backbone, [n for n in present if n.startswith(backbone + "-")])
    with open(os.path.join(RESULTS, "table.json"), "w") as f:
        json.dump(table, f, indent=1)

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = ["| run | final loss | FD, 1000 samples | accuracy, 1000 | FD (final, 250) | best FD of 250 (kimg) | "
             "images to target FD | speed-up | skip RMS (final) | skip RMS osc. | decoder RMS osc. | grad norm (mean) | "
             "grad norm osc. | sensitivity (final) | wall |",
             "| --- | " + "--- | " * 14]
    for e in table:
        lines.append(
            f"| {e['run']} | {num(e['final_loss'], '.1f')} | {num(e['final_fd_1000'], '.2f')} | "
            f"{num(e['final_accuracy_1000'], '.3f')} | {num(e['final_fd'], '.2f')} | {num(e['best_fd'], '.2f')} ({num(e['best_fd_nimg'] and e['best_fd_nimg'] / 1000, '.0f')}) | "
            f"{num(e.get('images_to_target') and e['images_to_target'] / 1000, '.0f')} kimg | "
            f"{num(e.get('speedup'), '.2f')}x | {num(e['skip_rms_final'], '.3g')} | {num(e['skip_rms_oscillation'], '.3f')} | "
            f"{num(e['decoder_rms_oscillation'], '.3f')} | {num(e['grad_norm'], '.3g')} | "
            f"{num(e['grad_norm_oscillation'], '.3f')} | {num(e['sensitivity_final'], '.3g')} | "
            f"{num(e['wall_seconds'] and e['wall_seconds'] / 60, '.1f')} min |")
    with open(os.path.join(RESULTS, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _figures(plt, backbone, names):
    if not names:
        return
    colors = {v: c for v, c in zip(VARIANTS, ("black", "tab:blue", "tab:red", "tab:green", "tab:purple"))}
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    stability, saxes = plt.subplots(1, 3, figsize=(15, 4))
    for name in names:
        variant = name.split("-", 1)[1]
        color = colors.get(variant.split("@")[0], "gray")
        style = "--" if "@" in variant else "-"  # a replicate with another seed: the variant's colour, dashed
        stats = _stats(name)
        kimg = [r["nimg"] / 1000 for r in stats]
        axes[0].plot(kimg, [r["loss"] for r in stats], color=color, linestyle=style, label=variant)
        rows = _quality(name)
        axes[1].plot([r["nimg"] / 1000 for r in rows], [r["fd"] for r in rows], marker="o", linestyle=style, color=color,
                     label=variant)
        axes[2].plot([r["nimg"] / 1000 for r in rows], [r["accuracy"] for r in rows], marker="o", linestyle=style,
                     color=color, label=variant)
        dyn = [r for r in stats if isinstance(r.get("dynamics"), dict)]
        dkimg = [r["nimg"] / 1000 for r in dyn]
        saxes[0].plot(dkimg, [_mean(list(r["dynamics"].get("skip_in", {}).values())) for r in dyn], color=color,
                      linestyle=style, label=variant)
        saxes[1].plot(kimg, [r.get("grad_norm") for r in stats], color=color, linestyle=style, label=variant)
        curve = sensitivity_curve(name, dyn)
        saxes[2].plot([n / 1000 for n, _ in curve], [v for _, v in curve], color=color, linestyle=style, label=variant)
    titles = ("training loss (per stats row)", "FD of 250 samples (EMA 0.05), lower is better", "class accuracy")
    for ax, title in zip(axes, titles):
        ax.set(xlabel="training images (kimg)", title=f"{backbone}: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    stitles = ("mean long-skip RMS (encoder side) on the probe", "gradient norm (mean over each row's steps)",
               "output sensitivity RMS(dF)/RMS(du)")
    for ax, title in zip(saxes, stitles):
        ax.set(xlabel="training images (kimg)", title=f"{backbone}: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for fig, stem in ((figure, "curves"), (stability, "stability")):
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, f"{stem}-{backbone}.png"), dpi=100)
        plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "quality", "report", "all"])
    parser.add_argument("--only", default=None, help="Comma-separated runs, e.g. uvit-none,G-cs [all]; NAME@SEED is "
                                                     "a replicate trained with another seed, e.g. uvit-ls@1.")
    parser.add_argument("--duration", default="128Ki")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--metrics", default=None, help="Also score with these metrics (e.g. fid) against --ref.")
    parser.add_argument("--ref", default=None, help="Reference statistics for --metrics (mpdiff ref digits ...).")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    names = RUNS if args.only is None else [n for n in args.only.split(",") if known(n)]
    if args.only is None and args.action == "quality" and os.path.isdir(OUT):  # and every replicate started
        names = names + sorted(n for n in os.listdir(OUT) if "@" in n and known(n))
    if args.action in ("run", "all"):
        train(names, args.duration, args.parallel, args.threads)
    if args.action in ("quality", "all"):
        quality(names, args.metrics, args.ref)
    if args.action in ("report", "all"):
        report(names)


if __name__ == "__main__":
    sys.exit(main())
