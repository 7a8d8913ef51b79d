"""Is bf16 as good as fp32? The sample-quality check of issue 18, on the default digits run.

    python benchmarks/precision_quality.py [--out out/precision] [--runs fp32-s0,bf16-s0,...]
                                           [--sampling fp32,bf16,bf16-compile] [--sample-sets 2]
                                           [--report benchmarks/results/precision]

Trains the main job (`mpdiff train --preset digits`, 192 Ki images) with several training seeds, in
fp32 and with `--precision bf16`, then samples each run 1,000 images per seed set (seeds 0-999,
1000-1999, ...) with `mpdiff generate` in fp32, in bf16 and in bf16 with `--compile` (the network compiled
with its weights frozen in, as the fastest sampling setting runs), and scores them with `mpdiff eval`
(classifier accuracy and Fréchet distance, docs/EVALUATION.md). The fp32 runs' values give the
seed-to-seed spread, over training seeds and over sample seeds; a bf16 setting passes if its values
fall within that spread.

Everything resumes: runs resume from their checkpoints, and finished evaluations are kept in
OUT/results.json. The report (a markdown table and a JSON) is rewritten after every evaluation.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_RUNS = "fp32-s0,bf16-s0,fp32-s1,bf16-s1,fp32-s2"


def mpdiff(*args):
    proc = subprocess.run([sys.executable, "-m", "mpdiff", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"mpdiff {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def train(out, name):
    precision, seed = name.split("-s")
    run_dir = os.path.join(out, "runs", name)
    if not os.path.exists(os.path.join(run_dir, "samples", "grid-final.png")):
        print(f"training {name} ...", flush=True)
        mpdiff("train", "--preset", "digits", "--seed", seed, "--precision", precision, "--run-dir", run_dir,
               "--no-progress")
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "stats.jsonl"))]
    images = seconds = 0.0
    for previous, row in zip([{"nimg": 0}] + rows, rows):  # each row's img/s covers the images since the last
        images += row["nimg"] - previous["nimg"]
        seconds += (row["nimg"] - previous["nimg"]) / row["img_per_sec"]
    return run_dir, images / seconds


def evaluate(out, results, name, run_dir, setting, first_seed):
    key = f"{name} sampled {setting} seeds {first_seed}-{first_seed + 999}"
    if key not in results:
        folder = os.path.join(out, "samples", key.replace(" ", "_"))
        precision, _, compile_ = setting.partition("-")
        start = time.perf_counter()
        mpdiff("generate", run_dir, "--seeds", f"{first_seed}-{first_seed + 999}", "--out", folder,
               "--sampler", "heun", "--precision", precision, *(["--compile"] if compile_ else []))
        seconds = time.perf_counter() - start
        result = json.loads(mpdiff("eval", folder, "--json"))
        results[key] = dict(run=name, train_precision=name.split("-")[0], sample_precision=setting,
                            seeds=f"{first_seed}-{first_seed + 999}", accuracy=result["accuracy"], fd=result["fd"],
                            generate_seconds=seconds)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(key, f"accuracy {result['accuracy']:.3f} fd {result['fd']:.2f}", flush=True)
    return results[key]


def report(results, speeds, path):
    rows = sorted(results.values(), key=lambda r: (r["train_precision"], r["run"], r["sample_precision"], r["seeds"]))
    reference = [r for r in rows if r["train_precision"] == "fp32" and r["sample_precision"] == "fp32"]
    lines = ["| training | sampling | run (training seed) | sample seeds | accuracy | FD |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['train_precision']} | {r['sample_precision']} | {r['run']} | {r['seeds']} | "
                     f"{100 * r['accuracy']:.1f}% | {r['fd']:.2f} |")
    summary = {}
    if reference:
        acc = [r["accuracy"] for r in reference]
        fd = [r["fd"] for r in reference]
        summary["fp32 spread"] = dict(accuracy=[min(acc), max(acc)], fd=[min(fd), max(fd)], n=len(reference))
        lines += ["", f"fp32 spread over {len(reference)} evaluations (training seeds x sample seeds): accuracy "
                  f"{100 * min(acc):.1f}-{100 * max(acc):.1f}%, FD {min(fd):.2f}-{max(fd):.2f}", "",
                  "A setting's mean is within the spread when it lies in that range. The last column asks of each "
                  "evaluation that it be no worse than the worst fp32 one (accuracy at least its lowest, FD at most "
                  "its highest: a lower FD is better).", "",
                  "| setting | evaluations | accuracy: mean (range) | FD: mean (range) | mean within the fp32 spread "
                  "| every value no worse than fp32's worst |",
                  "| --- | --- | --- | --- | --- | --- |"]
        sample_settings = sorted({r["sample_precision"] for r in rows}, key=lambda p: (p != "fp32", p))
        for train_p in ("fp32", "bf16"):
            for sample_p in sample_settings:
                group = [r for r in rows if r["train_precision"] == train_p and r["sample_precision"] == sample_p]
                if not group:
                    continue
                a = [r["accuracy"] for r in group]
                f = [r["fd"] for r in group]
                mean_in = min(acc) <= statistics.mean(a) <= max(acc) and min(fd) <= statistics.mean(f) <= max(fd)
                inside = all(x >= min(acc) for x in a) and all(x <= max(fd) for x in f)
                label = f"train {train_p}, sample {sample_p}"
                summary[label] = dict(accuracy=a, fd=f, mean_within=mean_in, every_value_no_worse=inside)
                lines.append(f"| {label} | {len(group)} | {100 * statistics.mean(a):.1f}% ({100 * min(a):.1f}-"
                             f"{100 * max(a):.1f}) | {statistics.mean(f):.2f} ({min(f):.2f}-{max(f):.2f}) | "
                             f"{'yes' if mean_in else 'no'} | {'yes' if inside else 'no'} |")
        # Paired: the same network and the same seeds sampled in another setting and in fp32.
        for sample_p in sample_settings[1:]:
            pairs = [(r, q) for r in rows if r["sample_precision"] == sample_p
                     for q in rows if q["run"] == r["run"] and q["seeds"] == r["seeds"] and q["sample_precision"] == "fp32"]
            if pairs:
                da = [100 * (r["accuracy"] - q["accuracy"]) for r, q in pairs]
                df = [r["fd"] - q["fd"] for r, q in pairs]
                summary[f"{sample_p} sampling minus fp32 sampling, paired"] = dict(accuracy_points=da, fd=df)
                lines += ["", f"Sampling in {sample_p} minus sampling in fp32, same network and seeds ({len(pairs)} "
                          f"pairs): accuracy {statistics.mean(da):+.2f} points ({min(da):+.1f} to {max(da):+.1f}), "
                          f"FD {statistics.mean(df):+.3f} ({min(df):+.2f} to {max(df):+.2f})"]
        timed = [r for r in rows if r.get("generate_seconds")]
        if timed:
            lines += ["", "| sampling | mpdiff generate, 1,000 images: mean seconds (compilation included) |",
                      "| --- | --- |"]
            lines += [f"| {p} | {statistics.mean(r['generate_seconds'] for r in timed if r['sample_precision'] == p):.1f} |"
                      for p in sample_settings if any(r["sample_precision"] == p for r in timed)]
    if speeds:
        lines += ["", "| run | training img/s (stats.jsonl) |", "| --- | --- |"]
        lines += [f"| {name} | {speed:.0f} |" for name, speed in sorted(speeds.items())]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "quality.md"), "w") as f:
        f.write(f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} with `python benchmarks/precision_quality.py`"
                f" (1,000 samples per evaluation, 32 Heun steps).\n\n" + "\n".join(lines) + "\n")
    with open(os.path.join(path, "quality.json"), "w") as f:
        json.dump(dict(rows=rows, summary=summary, speeds=speeds), f, indent=1)
    print("\n".join(lines), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "precision"))
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    parser.add_argument("--sampling", default="fp32,bf16,bf16-compile",
                        help="Sampling settings: a precision, with -compile for --compile [fp32,bf16,bf16-compile].")
    parser.add_argument("--sample-sets", type=int, default=2, help="Seed sets of 1,000 per run and precision [2].")
    parser.add_argument("--report", default=os.path.join(HERE, "results", "precision"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    speeds = {}
    for name in args.runs.split(","):
        run_dir, speeds[name] = train(args.out, name)
        for setting in args.sampling.split(","):
            for k in range(args.sample_sets):
                evaluate(args.out, results, name, run_dir, setting, 1000 * k)
        report(results, speeds, args.report)


if __name__ == "__main__":
    main()
