"""The EDM2 ablation ladder (configs A-G, SPEC §4) reproduced on the built-in digits, on a CPU.

    python benchmarks/ablation.py run      [--configs ABCDEFG] [--duration 192Ki] [--parallel 2]
    python benchmarks/ablation.py sweep    # post-hoc EMA sweep of every finished config
    python benchmarks/ablation.py report   # table (Markdown + JSON) and figures

Every config trains `mpdiff train --preset digits --config X` for the same number of images (the
preset's schedule with the ladder's per-config deltas, `mpdiff.presets.ladder_preset`), with the
training-dynamics diagnostics on. Each run resumes when the command is repeated; finished runs and
sweeps are skipped. Then every config's EMA snapshots are swept over sigma_rel (`mpdiff ema-sweep`,
digits classifier accuracy and Frechet distance), config A's traditional EMA is evaluated as well,
and the report writes:

- benchmarks/results/ablation/table.md and table.json: final loss, best EMA length with its accuracy
  and FD, growth of activation and weight magnitudes from the first to the last status row, wall time;
- ema-length.png: FD against sigma_rel, one curve per config (the paper's Fig. 5a);
- dynamics-<X>-*.png: each config's magnitude plots (`mpdiff plot-dynamics`).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "..", "out", "ablation"))
RESULTS = os.path.join(HERE, "results", "ablation")
CONFIGS = "ABCDEFG"
SWEEP = "0.02:0.25:8"
SWEEP_SEEDS = "0-249"
SWEEP_STEPS = 16


def run_dir(config):
    return os.path.join(OUT, config)


def finished(config):
    log = os.path.join(run_dir(config), "log.txt")
    return os.path.exists(log) and "training complete" in open(log, encoding="utf-8").read()


def train(configs, duration, parallel, threads):
    from recipes import run_commands  # benchmarks/ is on sys.path

    run_commands({c: ["mpdiff", "train", "--preset", "digits", "--config", c, "--duration", duration,
                      "--run-dir", run_dir(c), "--no-progress"] for c in configs if not finished(c)},
                 OUT, parallel, threads, label="config {}")


def sweep(configs, metrics=None, ref=None):
    for config in configs:
        if not finished(config):
            print(f"config {config}: not finished, skipped")
            continue
        out = os.path.join(run_dir(config), "ema-sweep")
        if not os.path.exists(os.path.join(out, "sweep.json")):
            scoring = ["--metrics", metrics, "--ref", ref] if metrics else []  # else the digits evaluation
            subprocess.run(["mpdiff", "ema-sweep", run_dir(config), "--sigma-rel", SWEEP, "--seeds", SWEEP_SEEDS,
                            "--sampler", "heun", "--steps", str(SWEEP_STEPS), "--no-progress", *scoring], check=True)
        traditional = os.path.join(run_dir(config), "ema-traditional.safetensors")
        samples = os.path.join(run_dir(config), "traditional-samples")
        result = os.path.join(run_dir(config), "traditional-eval.json")
        if os.path.exists(traditional) and not os.path.exists(result):
            if os.path.exists(samples):
                shutil.rmtree(samples)
            subprocess.run(["mpdiff", "generate", traditional, "--seeds", SWEEP_SEEDS, "--sampler", "heun",
                            "--steps", str(SWEEP_STEPS),
                            "--out", samples, "--no-progress"], check=True)
            text = subprocess.run(["mpdiff", "eval", samples, "--json"], check=True, capture_output=True,
                                  text=True).stdout
            with open(result + ".tmp", "w") as f:
                f.write(text)
            os.replace(result + ".tmp", result)


def _rows(config):
    return [json.loads(line) for line in open(os.path.join(run_dir(config), "stats.jsonl"), encoding="utf-8")]


def _growth(rows, kind):
    """Mean magnitude over blocks/layers at the last status row over that at the first."""
    with_dynamics = [r["dynamics"][kind] for r in rows if r.get("dynamics", {}).get(kind)]
    if len(with_dynamics) < 2:
        return None
    first, last = with_dynamics[0], with_dynamics[-1]
    names = sorted(set(first) & set(last))
    return sum(last[n] for n in names) / max(sum(first[n] for n in names), 1e-30)


def _wall_seconds(config):
    from recipes import wall_seconds  # the same log.txt reading as the recipes (benchmarks/ is on sys.path)

    return wall_seconds(os.path.join(run_dir(config), "log.txt"))


def report(configs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(RESULTS, exist_ok=True)
    table = []
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for config in configs:
        sweep_path = os.path.join(run_dir(config), "ema-sweep", "sweep.json")
        if not os.path.exists(sweep_path):
            continue
        sweep_rows = json.load(open(sweep_path))
        score = "fd" if "fd" in sweep_rows[0] else [k for k in sweep_rows[0] if k not in ("sigma_rel", "nimg", "grid")][0]
        sweep_rows = [dict(r, fd=r[score], accuracy=r.get("accuracy"), fd_real_vs_real=r.get("fd_real_vs_real"))
                      for r in sweep_rows]
        best = min(sweep_rows, key=lambda r: r["fd"])
        rows = _rows(config)
        entry = {"config": config, "final_loss": rows[-1]["loss"], "best_sigma_rel": best["sigma_rel"],
                 "accuracy": best["accuracy"], "fd": best["fd"], "fd_real_vs_real": best["fd_real_vs_real"],
                 "activation_growth": _growth(rows, "act"), "weight_growth": _growth(rows, "weight"),
                 "wall_seconds": _wall_seconds(config), "nimg": rows[-1]["nimg"]}
        traditional = os.path.join(run_dir(config), "traditional-eval.json")
        if os.path.exists(traditional):
            t = json.load(open(traditional))
            entry.update(traditional_accuracy=t["accuracy"], traditional_fd=t["fd"])
        table.append(entry)
        sigmas = [r["sigma_rel"] for r in sweep_rows]
        axes[0].plot(sigmas, [r["fd"] for r in sweep_rows], marker="o", label=config)
        axes[1].plot(sigmas, [float("nan") if r["accuracy"] is None else r["accuracy"] for r in sweep_rows], marker="o",
                     label=config)
        subprocess.run(["mpdiff", "plot-dynamics", run_dir(config), "--out", os.path.join(RESULTS, f"dynamics-{config}")],
                       check=False)
    axes[0].set(xlabel="EMA length sigma_rel", ylabel="Frechet distance (digits classifier features)",
                title="Sample quality against EMA length", yscale="log")
    axes[1].set(xlabel="EMA length sigma_rel", ylabel="classifier accuracy", title="Class accuracy")
    for ax in axes:
        ax.legend(title="config")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(os.path.join(RESULTS, "ema-length.png"), dpi=110)
    with open(os.path.join(RESULTS, "table.json"), "w") as f:
        json.dump(table, f, indent=1)
    lines = ["| config | final loss | best sigma_rel | accuracy | FD | activation growth | weight growth | wall time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in table:
        def num(v, fmt):
            return "-" if v is None else format(v, fmt)
        lines.append(f"| {e['config']} | {e['final_loss']:.1f} | {e['best_sigma_rel']:.3f} | {num(e['accuracy'], '.3f')} | "
                     f"{e['fd']:.2f} | {num(e['activation_growth'], '.2f')}x | {num(e['weight_growth'], '.2f')}x | "
                     f"{num(e['wall_seconds'] and e['wall_seconds'] / 60, '.1f')} min |")
    with open(os.path.join(RESULTS, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "sweep", "report", "all"])
    parser.add_argument("--configs", default=CONFIGS)
    parser.add_argument("--duration", default="192Ki")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--metrics", default=None, help="Score the sweep with these metrics (e.g. fid) against --ref "
                                                        "instead of the digits evaluation.")
    parser.add_argument("--ref", default=None, help="Reference statistics for --metrics (mpdiff ref digits ...).")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    configs = [c for c in args.configs.upper() if c in CONFIGS]
    if args.action in ("run", "all"):
        train(configs, args.duration, args.parallel, args.threads)
    if args.action in ("sweep", "all"):
        sweep(configs, args.metrics, args.ref)
    if args.action in ("report", "all"):
        report(configs)


if __name__ == "__main__":
    sys.exit(main())
