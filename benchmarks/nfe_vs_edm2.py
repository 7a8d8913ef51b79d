"""Sampling speed at equal quality against NVIDIA's network, side by side (issue 31).

    python benchmarks/nfe_vs_edm2.py --edm2 /path/to/NVlabs/edm2 [--preset mnist|digits] [--batch 100]
                                     [--rounds 3] [--threads 1] [--out benchmarks/results/nfe]
    python benchmarks/nfe_vs_edm2.py --report [--preset mnist]   # the table again, with newer quality rows

The paper's setting is NVIDIA's network in float32 with EDM2's sampler: Heun, 32 steps, 63 network
evaluations (NFE) per image. This script times it in the same process and the same rounds as ours
with fewer evaluations (DPM-Solver++(2M), mpdiff's default, at 25 and 15 NFE) and in float32 and bf16,
so that the speed-ups of the solver and of the network compose in one measured ratio instead of a
product of ratios from different days.

- **Networks**: NVIDIA's `training.networks_edm2.Precond` (from a checkout the user fetched; never part
  of mpdiff) built with the preset's network, and ours from its state_dict (`mpdiff.nn.compat.load_edm2`,
  the fast twin), scalar gains drawn at random so that every path runs (benchmarks/vs_edm2.py's pair).
  Time does not depend on the weights' values; the quality of each setting is the trained preset
  network's, measured by benchmarks/nfe.py (its rows are read back and shown beside the times).
- **Sampling**: every setting runs mpdiff's solver functions on one batch of `--batch` images from
  sigma_max, eval mode, no autograd, ours as `mpdiff generate` runs it (in bf16, the evaluations at
  sigma <= 3 in float32: `mpdiff.nn.runtime.low_noise_float32`; "bf16-all": every evaluation in bf16, as
  before that). The solvers' own arithmetic is negligible next to the network's.
- **Rounds**: each round times every setting once, back to back, in a shuffled order; the table gives
  the median over rounds of ms per image and of the ratio to NVIDIA's Heun-63 in float32 in the same
  round.
"""

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import vs_edm2  # noqa: E402  (the NVIDIA/ours network pair)

# name: (side, precision, sampler, steps); the first is the baseline of the ratios
SETTINGS = {
    "nvidia fp32 heun-63": ("nvidia", None, "heun", 32),
    "ours fp32 heun-63": ("ours", None, "heun", 32),
    "ours bf16 heun-63": ("ours", "bf16", "heun", 32),
    "ours bf16-all heun-63": ("ours", "bf16-all", "heun", 32),
    "ours fp32 dpmpp-2m-25": ("ours", None, "dpmpp-2m", 25),
    "ours bf16 dpmpp-2m-25": ("ours", "bf16", "dpmpp-2m", 25),
    "ours bf16-all dpmpp-2m-25": ("ours", "bf16-all", "dpmpp-2m", 25),
    "ours fp32 dpmpp-2m-15": ("ours", None, "dpmpp-2m", 15),
    "ours bf16 dpmpp-2m-15": ("ours", "bf16", "dpmpp-2m", 15),
}
BASELINE = "nvidia fp32 heun-63"


def preset_network(name):
    """NVIDIA's Precond keyword arguments of an mpdiff preset's config-G U-Net."""
    from mpdiff.presets import PRESETS

    n = PRESETS[name].network
    return dict(img_resolution=n.img_resolution, img_channels=n.img_channels, label_dim=n.label_dim,
                model_channels=n.model_channels, channel_mult=list(n.channel_mult), num_blocks=n.num_blocks,
                attn_resolutions=list(n.attn_resolutions))


def measured_quality(preset):
    """{(sampler, nfe, precision): {seed set: {metric: value}}}: benchmarks/nfe.py's rows (their bf16 is every
    evaluation in bf16: "bf16-all" here) and, for mnist, benchmarks/bf16_low_noise.py's rows at the float32
    threshold mpdiff uses ("bf16")."""
    from mpdiff.nn.runtime import BF16_FLOAT32_BELOW

    folder = os.path.join(HERE, "results", "nfe", *(["mnist"] if preset == "mnist" else []))
    points = {}
    for name in ("rows.jsonl", "bf16-low-noise.jsonl"):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                precision = row.get("precision", "bf16")
                if "fp32_below" in row:  # bf16 with float32 at sigma <= T: "bf16" at mpdiff's T, else "bf16@T"
                    same = abs(row["fp32_below"] - BF16_FLOAT32_BELOW) < 1e-9
                    precision = "bf16" if same else f"bf16@{row['fp32_below']:g}"
                elif precision == "bf16":
                    precision = "bf16-all"
                merged = points.setdefault((row["sampler"], row["nfe_budget"], precision), {})
                merged = merged.setdefault(row.get("set", 0), {})
                merged.update({k: row[k] for k in ("fid", "fd", "accuracy") if row.get(k) is not None})
    return points


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edm2", default=os.environ.get("MPDIFF_EDM2_REF"),
                        help="NVlabs/edm2 checkout [$MPDIFF_EDM2_REF].")
    parser.add_argument("--preset", choices=("mnist", "digits"), default="mnist")
    parser.add_argument("--batch", type=int, default=100, help="images per timed sampling [100]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "nfe"))
    parser.add_argument("--bf16-below", default="", type=lambda t: [float(v) for v in t.split(",") if v],
                        help="also time bf16 with float32 at sigma <= each of these (comma list) [none]")
    parser.add_argument("--report", action="store_true", help="only rebuild the table from the last run's JSON")
    args = parser.parse_args()
    if args.report:
        return report(args.preset, args.out)
    if not args.edm2 or not os.path.exists(os.path.join(args.edm2, "training", "networks_edm2.py")):
        raise SystemExit("--edm2: give a checkout of github.com/NVlabs/edm2 (training/networks_edm2.py)")
    torch.set_num_threads(args.threads)
    from mpdiff.diffusion.samplers import SAMPLERS
    from mpdiff.diffusion.schedules import edm_sigmas
    import mpdiff.nn.runtime as runtime
    from mpdiff.nn.runtime import low_noise_float32, set_precision

    config = preset_network(args.preset)
    theirs, ours = vs_edm2.build_pair(args.edm2, config)
    theirs.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, config["img_channels"], config["img_resolution"], config["img_resolution"],
                    generator=gen, dtype=torch.float64) * 80
    labels = torch.eye(config["label_dim"])[torch.arange(args.batch) % config["label_dim"]]

    def runner(side, precision, sampler, steps):
        net = theirs if side == "nvidia" else ours
        sigmas = edm_sigmas(steps)

        def run():
            denoise = net
            below = runtime.BF16_FLOAT32_BELOW
            if side == "ours" and precision == "bf16-all":  # every evaluation in bf16 (before issue 31)
                denoise = set_precision(ours.eval(), "bf16")
            elif side == "ours":  # as mpdiff generate runs it: bf16 evaluates sigma <= T in float32
                runtime.BF16_FLOAT32_BELOW = float(precision[5:]) if (precision or "").startswith("bf16@") else below
                denoise = low_noise_float32(set_precision(ours.eval(), precision and precision[:4]), ours)
            try:
                with torch.no_grad():
                    return SAMPLERS[sampler](lambda y, s, c: denoise(y, s, c), x, sigmas, labels)
            finally:
                runtime.BF16_FLOAT32_BELOW = below
        return run

    for below in args.bf16_below:  # bf16 with float32 at sigma <= T, T other than mpdiff's
        SETTINGS.update({f"ours bf16@{below:g} {name.split()[-1]}": (side, f"bf16@{below:g}", sampler, steps)
                         for name, (side, precision, sampler, steps) in list(SETTINGS.items()) if precision == "bf16"})
    runners = {name: runner(*plan) for name, plan in SETTINGS.items()}
    with torch.no_grad():  # the same function: D of ours against NVIDIA's on one batch, float32
        sigma = torch.full([args.batch], 2.0)
        set_precision(ours.eval(), None)
        ref = theirs(x.float() / 40, sigma, labels)
        difference = ((ours(x.float() / 40, sigma, labels) - ref).norm() / ref.norm()).item()
    for run in runners.values():  # warm-up
        run()
    times = {name: [] for name in runners}
    order = list(runners)
    for r in range(args.rounds):
        random.Random(r).shuffle(order)
        for name in order:
            start = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - start) / args.batch * 1000)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.1f}" for n in SETTINGS), flush=True)
    ratios = {name: statistics.median(times[BASELINE][r] / times[name][r] for r in range(args.rounds))
              for name in times}
    rows = [dict(setting=name, nfe=2 * steps - 1 if sampler == "heun" else steps,
                 ms_per_image=statistics.median(times[name]), ms_all=times[name], speedup=ratios[name])
            for name, (_, _, sampler, steps) in SETTINGS.items()]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    result = dict(preset=args.preset, batch=args.batch, rounds=args.rounds, threads=args.threads,
                  date=datetime.date.today().isoformat(), machine=machine, load_after=os.getloadavg()[0],
                  d_relative_difference=difference, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"vs-edm2-{args.preset}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    report(args.preset, args.out)


def report(preset, out):
    """vs-edm2-PRESET.md: the measured times beside the quality measured so far. NVIDIA's network computes
    our float32 network's function (the relative difference of D in the header), so its quality is ours
    in float32. Quality is paired: the difference from Heun-63 in float32 on the seed sets both have."""
    with open(os.path.join(out, f"vs-edm2-{preset}.json"), encoding="utf-8") as f:
        result = json.load(f)
    from mpdiff.nn.runtime import BF16_FLOAT32_BELOW

    quality = measured_quality(preset)
    metric = "fid" if preset == "mnist" else "fd"
    exact = quality.get(("heun", 63, "fp32"), {})
    lines = [f"Sampling against NVIDIA's network ({preset} preset's U-Net, batch {result['batch']}, "
             f"{result['threads']} torch thread(s), {result['rounds']} rounds, {result['machine']}, {result['date']}, "
             f"load {result['load_after']:.1f} after); D of ours vs NVIDIA's in float32: relative difference "
             f"{result['d_relative_difference']:.1e}. Quality: {metric.upper()} and class accuracy of the trained "
             f"{preset} network, 1,000 samples per seed set (benchmarks/nfe.py, benchmarks/bf16_low_noise.py), "
             "the difference from Heun-63 in float32 paired on the same sets (bf16: the network in float32 at "
             f"sigma <= {BF16_FLOAT32_BELOW:g}, as mpdiff samples; bf16@T: at sigma <= T; bf16-all: every "
             "evaluation in bf16).", "",
             f"| setting | NFE | ms per image | speed vs NVIDIA fp32 Heun-63 | {metric.upper()}: mean (sets) | "
             f"vs fp32 Heun-63, paired | accuracy |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        side, precision, rest = row["setting"].split(" ", 2)
        sampler = rest.rsplit("-", 1)[0]
        sets = quality.get((sampler, row["nfe"], "fp32" if side == "nvidia" else (precision or "fp32")), {})
        scored = sorted(k for k, v in sets.items() if metric in v)
        paired = [sets[k][metric] - exact[k][metric] for k in scored if metric in exact.get(k, {})]
        accuracy = [v["accuracy"] for v in sets.values() if "accuracy" in v]
        cells = [f"{statistics.mean(sets[k][metric] for k in scored):.2f} ({', '.join(map(str, scored))})"
                 if scored else "–",
                 f"{statistics.mean(paired):+.2f}" if paired else "–",
                 f"{100 * statistics.mean(accuracy):.1f}%" if accuracy else "–"]
        lines.append(f"| {row['setting']} | {row['nfe']} | {row['ms_per_image']:.1f} | {row['speedup']:.2f}x | "
                     + " | ".join(cells) + " |")
    with open(os.path.join(out, f"vs-edm2-{preset}.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
