"""bf16 sampling with float32 at low noise levels: MNIST FID against the float32 threshold (issue 31).

    python benchmarks/bf16_low_noise.py [--points heun:63:1.0,heun:63:0.1,dpmpp-2m:25:1.0,...] [--sets 0]
    python benchmarks/bf16_low_noise.py --report

A bf16 network cannot resolve the noise in its input at low noise levels (docs/SAMPLING.md, "bf16 at low
noise levels"), so `mpdiff generate --precision bf16` evaluates the network in float32 where sigma <=
`mpdiff.nn.runtime.BF16_FLOAT32_BELOW`. This script measures that choice: each point SAMPLER:NFE:T
samples the MNIST preset's network (benchmarks/nfe_mnist.py's network, seeds and scores) in bf16 with
float32 at sigma <= T (T = 0: every evaluation in bf16, as before the change), and scores it with the
MNIST classifier and the Inception FID against the 1,000 held-out images. The float32 and all-bf16
references are benchmarks/nfe.py's rows (benchmarks/results/nfe/mnist/rows.jsonl).

Rows go to benchmarks/results/nfe/mnist/bf16-low-noise.jsonl as they are measured (a point measured
already is skipped); `--report` writes bf16-low-noise.md beside it.
"""

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import nfe  # noqa: E402
import nfe_mnist  # noqa: E402

ROWS = os.path.join(nfe_mnist.RESULTS, "bf16-low-noise.jsonl")
DEFAULT_POINTS = "heun:63:1.0,heun:63:0.1,heun:63:0.3,dpmpp-2m:25:1.0,dpmpp-2m:15:1.0"


def _rows():
    if not os.path.exists(ROWS):
        return []
    with open(ROWS, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def measure(points, sets, threads):
    import torch

    import mpdiff.nn.runtime as runtime

    torch.set_num_threads(threads)
    done = {(r["sampler"], r["nfe_budget"], r["fp32_below"], r["set"]) for r in _rows()}
    net = nfe_mnist._load(nfe_mnist._main_snapshot(os.path.join(nfe_mnist.mnist_bench.OUT, "run")))
    scorer = nfe_mnist.Scorer()
    for item in points:
        sampler, budget, below = item.split(":")
        for k in sets:
            if (sampler, int(budget), float(below), k) in done:
                continue
            runtime.BF16_FLOAT32_BELOW = float(below)  # what low_noise_float32 reads at each call
            point = {"sampler": sampler, "nfe_budget": int(budget), "precision": "bf16", "set": k, "num": 1000}
            images, classes, counted, seconds, steps = nfe_mnist.sample(net, point)
            row = {**point, "fp32_below": float(below), "steps": steps, **counted, "seconds": seconds,
                   "seconds_per_image": seconds / point["num"], **scorer.classify(images, classes),
                   "black_pixels": float((images == 0).mean()), **scorer.fid(images),
                   "date": datetime.date.today().isoformat(), "machine": nfe.machine(), "load": os.getloadavg()[0]}
            with open(ROWS, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{sampler} NFE {budget} bf16, float32 at sigma <= {below}, set {k}: FID {row['fid']:.2f}, "
                  f"accuracy {100 * row['accuracy']:.1f}%, black pixels {100 * row['black_pixels']:.2f}%, "
                  f"{1000 * row['seconds_per_image']:.1f} ms/img", flush=True)


def report():
    fids = {}
    for r in nfe.read_rows(os.path.join(nfe_mnist.RESULTS, "rows.jsonl")):
        if r.get("fid") is not None:
            fids[(r["sampler"], r["nfe_budget"], "fp32" if r["precision"] == "fp32" else 0.0, r["set"])] = r["fid"]
    for r in _rows():
        fids[(r["sampler"], r["nfe_budget"], r["fp32_below"], r["set"])] = r["fid"]
    lines = ["MNIST preset network, 1,000 samples per seed set (classes balanced), FID against the 1,000 held-out "
             "images; bf16 with the network in float32 at sigma <= T (T = 0: all bf16). Paired against float32 "
             "on the same seed set.", "",
             "| sampler | NFE | seed set | float32 | bf16, T = 0 | T = 0.1 | T = 0.3 | T = 1 | T = 3 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    measured = {(r["sampler"], r["nfe_budget"]) for r in _rows()}  # the points this script measured
    shown = {(s, n, k) for s, n, _, k in fids if (s, n) in measured}
    for sampler, budget, k in sorted(shown, key=lambda t: (t[0] != "heun", -t[1], t[2])):
        exact = fids.get((sampler, budget, "fp32", k))

        def cell(t):
            v = fids.get((sampler, budget, t, k))
            if v is None:
                return "–"
            return f"{v:.2f}" + (f" ({v - exact:+.2f})" if exact is not None and t != "fp32" else "")
        lines.append(f"| {sampler} | {budget} | {k} | " + " | ".join(cell(t) for t in ("fp32", 0.0, 0.1, 0.3, 1.0, 3.0))
                     + " |")
    black = {(r["sampler"], r["nfe_budget"], r["fp32_below"], r["set"]): r["black_pixels"] for r in _rows()}
    for sampler, budget, k in shown:  # float32 and all-bf16: from benchmarks/nfe.py's kept samples
        for t, precision in (("fp32", "fp32"), (0.0, "bf16")):
            path = nfe_mnist.samples_file({"sampler": sampler, "nfe_budget": budget, "precision": precision,
                                           "set": k, "num": 1000})
            if os.path.exists(path):
                with np.load(path) as saved:
                    black[(sampler, budget, t, k)] = float((saved["images"] == 0).mean())
    from mpdiff.metrics.mnist import mnist_splits

    real = float((mnist_splits()["test_images"] == 0).mean())
    lines += ["", f"Share of exactly black pixels (%; MNIST's backgrounds are black: {100 * real:.1f}% of the held-out "
                  "images' pixels):", "",
              "| sampler | NFE | seed set | float32 | bf16, T = 0 | T = 0.1 | T = 0.3 | T = 1 | T = 3 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for sampler, budget, k in sorted(shown, key=lambda t: (t[0] != "heun", -t[1], t[2])):
        lines.append(f"| {sampler} | {budget} | {k} | " + " | ".join(
            f"{100 * black[(sampler, budget, t, k)]:.2f}" if (sampler, budget, t, k) in black else "–"
            for t in ("fp32", 0.0, 0.1, 0.3, 1.0, 3.0)) + " |")
    path = os.path.join(nfe_mnist.RESULTS, "bf16-low-noise.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", default=DEFAULT_POINTS, help=f"SAMPLER:NFE:T, comma-separated [{DEFAULT_POINTS}]")
    parser.add_argument("--sets", default="0", help="seed sets [0]")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if not args.report:
        measure(args.points.split(","), [int(k) for k in args.sets.split(",")], args.threads)
    report()


if __name__ == "__main__":
    main()
