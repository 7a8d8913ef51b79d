"""Sample quality against network evaluations (NFE) for every sampler, on the digits main job (issue 31).

    python benchmarks/nfe.py train    [--run /tmp/nfe/runs/digits]
    python benchmarks/nfe.py quality  [--run ...] [--num 1000] [--sets 3] [--nfe 5,7,9,11,15,19,25,31,41,63]
                                      [--samplers heun,euler,...] [--threads 1]
    python benchmarks/nfe.py timing   [--batch 256] [--repeats 3]
    python benchmarks/nfe.py report   # benchmarks/results/nfe/: table.md, table.json, nfe.png
    python benchmarks/nfe.py all      # the three in turn (train only when RUN does not exist yet)
    python benchmarks/nfe.py quality|guided|timing|report --preset mnist ...   # the MNIST preset with FID:
                                      # benchmarks/nfe_mnist.py, results in benchmarks/results/nfe/mnist/

`train` runs the digits main job, `mpdiff train --precision bf16 --run-dir RUN` (the default preset,
196,608 images; it resumes if stopped). `quality` samples, for every sampler of
`mpdiff.diffusion.samplers.SAMPLERS` and every NFE budget of `--nfe` (the most steps whose NFE fits:
Heun (NFE + 1)/2 steps, the others NFE steps), `--sets` disjoint sets of `--num` seeds (set k: seeds
k*num .. (k+1)*num - 1, random classes per seed as `mpdiff generate` draws them) with the run's default
EMA length, in bf16, and scores each set with the digits evaluation of `mpdiff eval`
(`mpdiff.metrics.digits.evaluate_digits`: the classifier's agreement with the conditioning class,
and the Fréchet distance of its features to the held-out digits). The NFE of each row is counted by
the generation (`Batch.evaluations`), not computed. The wall time of each set's generation is
recorded too (per image: time / num), and, for scale, the paper's sampler in float32 (Heun, 63 NFE,
`--precision fp32`). Every (sampler, NFE, set) is one row of benchmarks/results/nfe/rows.jsonl,
appended as it is measured: a stopped run resumes where it stopped, and rerunning with more sets or
budgets measures only the new rows.

`timing` measures the wall time per image again, apart from the scoring and on its own: for every
(sampler, budget) and the float32 baseline, `--repeats` generations of one batch of `--batch` images
(the median is reported). The quality rows' times come from long runs on a machine whose other work
comes and goes; the report prefers these when they exist (timing.jsonl).

Threads: on a CPU shared with other processes, one torch thread per process is several times faster
than two (OpenMP threads spin-wait while the other cores are busy; measured on this project's 2-core VM:
328 against 74 network evaluations per second for the digits network); `--threads` sets it.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "nfe")
ROWS = os.path.join(RESULTS, "rows.jsonl")
DEFAULT_RUN = "/tmp/nfe/runs/digits"
DEFAULT_NFE = "5,7,9,11,15,19,25,31,41,63"
BASELINE = ("heun", 63)  # EDM2's sampler: 32 Heun steps


def train(run, threads):
    command = ["mpdiff", "train", "--precision", "bf16", "--run-dir", run, "--no-progress"]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))


def machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def read_rows(path=None):
    """The rows of `path` (default ROWS); rows of the same key (a later score of the same samples, e.g. the
    MNIST preset's FID) are merged into the first, in order."""
    path = path or ROWS
    if not os.path.exists(path):
        return []
    merged = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                merged.setdefault(row_key(row), {}).update(row)
    return list(merged.values())


def row_key(row):
    """A row's point: the sampler, budget, precision, seed set and count, and for a guided row the guide
    (kind, w, interval)."""
    guided = (row["kind"], row["w"], tuple(row["interval"] or ())) if "kind" in row else ()
    return (*guided, *key(row))


def key(row):
    return (row["sampler"], row["nfe_budget"], row["precision"], row["set"], row["num"])


def measure(net, sampler, budget, precision, index, num):
    """One row: generate seed set `index` with `sampler` within `budget` NFE, time it, score it."""
    import numpy as np

    from mpdiff.config import SAMPLING
    from mpdiff.data.pixels import decode_images
    from mpdiff.diffusion.generate import generate_batches
    from mpdiff.metrics.digits import evaluate_digits

    sampling = SAMPLING.replace(sampler=sampler, precision=precision, batch_size=num).with_nfe(budget)
    seeds = range(index * num, (index + 1) * num)
    start = time.perf_counter()
    batches = list(generate_batches(net, seeds, sampling=sampling))
    seconds = time.perf_counter() - start
    images = np.concatenate([decode_images(b.images).numpy() for b in batches])
    classes = [c for b in batches for c in b.classes]
    counted = batches[0].evaluations
    assert all(b.evaluations == counted for b in batches)
    result = evaluate_digits(images, classes)
    return {"sampler": sampler, "nfe_budget": budget, "precision": precision, "set": index, "num": num,
            "steps": sampling.num_steps, "nfe": counted["nfe"], "accuracy": result["accuracy"], "fd": result["fd"],
            "fd_real_vs_real": result["fd_real_vs_real"], "seconds": seconds, "seconds_per_image": seconds / num,
            "date": datetime.date.today().isoformat(), "machine": machine(), "load": os.getloadavg()[0]}


def quality(run, num, sets, budgets, samplers, threads):
    import torch

    from mpdiff.loading import resolve_network

    torch.set_num_threads(threads)
    net, described = resolve_network(run, None)
    print(f"network: {described}", flush=True)
    done = {key(r) for r in read_rows()}
    points = [(s, b, "bf16") for s in samplers for b in budgets] + [(*BASELINE, "fp32")]
    os.makedirs(RESULTS, exist_ok=True)
    for index in range(sets):  # set by set: a stopped run has every point of the first sets
        for sampler, budget, precision in points:
            if (sampler, budget, precision, index, num) in done:
                continue
            row = measure(net, sampler, budget, precision, index, num)
            row["network"] = described
            with open(ROWS, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(f"set {index} {sampler:13s} {precision} NFE {row['nfe']:2d} ({row['steps']:2d} steps): accuracy "
                  f"{100 * row['accuracy']:5.1f}%  FD {row['fd']:6.2f}  {1000 * row['seconds_per_image']:6.2f} ms/img",
                  flush=True)


def timing(run, batch, repeats, budgets, samplers, threads):
    import torch

    from mpdiff.config import SAMPLING
    from mpdiff.diffusion.generate import generate_batches
    from mpdiff.loading import resolve_network

    torch.set_num_threads(threads)
    net, _ = resolve_network(run, None)
    points = [(s, b, "bf16") for s in samplers for b in budgets] + [(*BASELINE, "fp32")]
    list(generate_batches(net, range(batch), sampler="euler", num_steps=2, batch_size=batch))  # warm up
    rows = []
    for repeat in range(repeats):  # round-robin: slow phases of the machine hit every point alike
        for sampler, budget, precision in points:
            sampling = SAMPLING.replace(sampler=sampler, precision=precision, batch_size=batch).with_nfe(budget)
            start = time.perf_counter()
            made = list(generate_batches(net, range(batch), sampling=sampling))
            seconds = time.perf_counter() - start
            rows.append({"sampler": sampler, "nfe_budget": budget, "precision": precision, "repeat": repeat,
                         "batch": batch, "nfe": made[0].evaluations["nfe"], "seconds_per_image": seconds / batch,
                         "threads": threads, "load": os.getloadavg()[0], "date": datetime.date.today().isoformat(),
                         "machine": machine()})
            print(f"repeat {repeat} {sampler:13s} {precision} NFE {rows[-1]['nfe']:2d}: "
                  f"{1000 * seconds / batch:6.2f} ms/img (load {rows[-1]['load']:.1f})", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "timing.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def timings():
    """{(sampler, nfe, precision): median ms per image} of timing.jsonl, or {} when it is absent."""
    import numpy as np

    path = os.path.join(RESULTS, "timing.jsonl")
    if not os.path.exists(path):
        return {}
    groups = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            groups.setdefault((r["sampler"], r["nfe"], r["precision"]), []).append(1000 * r["seconds_per_image"])
    return {k: float(np.median(v)) for k, v in groups.items()}


# ------------------------------------------------------------------------------------------ report

def summarise(rows):
    """{(sampler, nfe, precision): mean, std and count of accuracy, FD and time over the seed sets, and the
    mean differences to the baseline (Heun, 63 NFE, bf16) on the same seed sets}."""
    import numpy as np

    groups = {}
    for r in rows:
        groups.setdefault((r["sampler"], r["nfe"], r["precision"]), []).append(r)
    base = {r["set"]: r for r in groups.get((*BASELINE, "bf16"), [])}
    out = {}
    for k, group in sorted(groups.items()):
        acc = np.array([r["accuracy"] for r in group])
        fd = np.array([r["fd"] for r in group])
        paired = [r for r in group if r["set"] in base]
        ms = np.array([1000 * r["seconds_per_image"] for r in group])
        out[k] = {"sampler": k[0], "nfe": k[1], "precision": k[2], "sets": len(group), "steps": group[0]["steps"],
                  "accuracy": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                  "fd": float(fd.mean()), "fd_std": float(fd.std(ddof=1)) if len(fd) > 1 else 0.0,
                  "fd_min": float(fd.min()), "fd_max": float(fd.max()), "ms_per_image": float(np.median(ms)),
                  "fd_real_vs_real": float(np.mean([r["fd_real_vs_real"] for r in group]))
                  if all("fd_real_vs_real" in r for r in group) else None,
                  "fd_vs_baseline": float(np.mean([r["fd"] - base[r["set"]]["fd"] for r in paired]))
                  if paired else None,
                  "accuracy_vs_baseline": float(np.mean([r["accuracy"] - base[r["set"]]["accuracy"] for r in paired]))
                  if paired else None}
        scored = [r for r in group if "fid" in r]  # the MNIST preset: FID, on the seed sets given it
        if scored:
            fid = np.array([r["fid"] for r in scored])
            with_base = [r for r in scored if "fid" in base.get(r["set"], {})]
            out[k].update({"fid": float(fid.mean()), "fid_std": float(fid.std(ddof=1)) if len(fid) > 1 else None,
                           "fid_sets": [r["set"] for r in scored],
                           "fid_vs_baseline": float(np.mean([r["fid"] - base[r["set"]]["fid"] for r in with_base]))
                           if with_base else None})
    return out


def matches(point, base):
    """As good as the baseline within its seed-to-seed spread: on the same seed sets, FD on average no more
    than the baseline's standard deviation over the sets above it, accuracy no more than its below."""
    return point["fd_vs_baseline"] <= base["fd_std"] and point["accuracy_vs_baseline"] >= -base["accuracy_std"]


def report():
    rows = read_rows()
    if not rows:
        sys.exit(f"no rows in {ROWS}: run `python benchmarks/nfe.py quality` first")
    points = summarise(rows)
    timed = timings()
    for k, ms in timed.items():  # the timing pass's medians, where measured
        if k in points:
            points[k]["ms_per_image"], points[k]["timed"] = ms, True
    base = points.get((*BASELINE, "bf16"))
    if base is None:
        sys.exit(f"no row of the baseline, {BASELINE[0]} at {BASELINE[1]} NFE in bf16: measure it first")
    samplers = list(dict.fromkeys(r["sampler"] for r in rows if r["precision"] == "bf16"))
    budgets = sorted({p["nfe"] for p in points.values() if p["precision"] == "bf16"})
    fewest = {}
    for s in samplers:
        good = [p["nfe"] for p in points.values() if p["sampler"] == s and p["precision"] == "bf16" and matches(p, base)]
        fewest[s] = min(good) if good else None
    fp32 = points.get((*BASELINE, "fp32"))
    lines = [f"Digits main job ({rows[0]['network']}), {rows[0]['num']} samples per seed set, "
             f"{base['sets']} sets; bf16; mean over the sets (± standard deviation). {rows[0]['machine']}, "
             f"{rows[0]['date']} to {rows[-1]['date']}.", "",
             "FD (classifier features, lower is better; real digits against real digits: "
             f"{base['fd_real_vs_real']:.2f}):", "",
             "| sampler | " + " | ".join(f"NFE {n}" for n in budgets) + " |",
             "| --- |" + " --- |" * len(budgets)]
    for s in samplers:
        cells = [(f"{p['fd']:.2f} ± {p['fd_std']:.2f}" if (p := points.get((s, n, "bf16"))) else "–") for n in budgets]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "Against Heun at 63 NFE on the same seed sets: mean difference of FD / of accuracy (points); "
              f"seed-to-seed spread of the baseline: FD ± {base['fd_std']:.2f}, accuracy ± "
              f"{100 * base['accuracy_std']:.2f}:", "",
              "| sampler | " + " | ".join(f"NFE {n}" for n in budgets) + " |", "| --- |" + " --- |" * len(budgets)]
    for s in samplers:
        cells = [(f"{p['fd_vs_baseline']:+.2f} / {100 * p['accuracy_vs_baseline']:+.1f}" + (" ✓" if matches(p, base)
                  else "") if (p := points.get((s, n, "bf16"))) else "–") for n in budgets]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "Class accuracy (%):", "", "| sampler | " + " | ".join(f"NFE {n}" for n in budgets) + " |",
              "| --- |" + " --- |" * len(budgets)]
    for s in samplers:
        cells = [(f"{100 * p['accuracy']:.1f} ± {100 * p['accuracy_std']:.1f}" if (p := points.get((s, n, "bf16")))
                  else "–") for n in budgets]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    how = "the timing pass: median of its repeats" if timed else f"median over the sets, batches of {rows[0]['num']}"
    lines += ["", f"Wall time per image (ms; {how}; one torch thread, bf16):", "", "| sampler | " + " | ".join(f"NFE {n}" for n in budgets) + " |",
              "| --- |" + " --- |" * len(budgets)]
    for s in samplers:
        cells = [(f"{p['ms_per_image']:.2f}" if (p := points.get((s, n, "bf16"))) else "–") for n in budgets]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if fp32 is not None:
        lines += ["", f"Heun, 63 NFE, float32: FD {fp32['fd']:.2f} ± {fp32['fd_std']:.2f}, accuracy "
                      f"{100 * fp32['accuracy']:.1f} ± {100 * fp32['accuracy_std']:.1f}%, "
                      f"{fp32['ms_per_image']:.2f} ms per image."]
    lines += ["", "Fewest NFE as good as Heun at 63 NFE within its seed spread (✓ above: on the same seed sets, "
                  "FD on average at most one of the baseline's standard deviations above it, accuracy at most one "
                  "below):", ""]
    for s in samplers:
        if fewest[s] is None:
            lines.append(f"- {s}: none of the budgets measured")
            continue
        p = points[(s, fewest[s], "bf16")]
        faster = f"; {fp32['ms_per_image'] / p['ms_per_image']:.1f}x as fast as Heun-63 in float32" if fp32 else ""
        lines.append(f"- {s}: NFE {fewest[s]} (FD {p['fd']:.2f}, accuracy {100 * p['accuracy']:.1f}%, "
                     f"{p['ms_per_image']:.2f} ms per image{faster})")
    write_tables(RESULTS, "\n".join(lines) + "\n",
                 {"points": list(points.values()), "fewest_nfe_matching_heun_63": fewest,
                  "machine": rows[0]["machine"], "dates": [rows[0]["date"], rows[-1]["date"]]})
    plot(points, samplers, base)


def write_tables(folder, text, summary):
    """A report's table.md (`text`, also printed) and table.json (`summary`) in `folder`."""
    with open(os.path.join(folder, "table.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(folder, "table.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(text)


def plot(points, samplers, base):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), dpi=110)
    (fd_ax, diff_ax), (acc_ax, time_ax) = axes
    for s in samplers:
        pts = sorted((p for p in points.values() if p["sampler"] == s and p["precision"] == "bf16"),
                     key=lambda p: p["nfe"])
        x = [p["nfe"] for p in pts]
        fd_ax.errorbar(x, [p["fd"] for p in pts], yerr=[p["fd_std"] for p in pts], marker="o", ms=3, capsize=2,
                       label=s)
        diff_ax.plot(x, [p["fd_vs_baseline"] for p in pts], marker="o", ms=3, label=s)
        acc_ax.errorbar(x, [100 * p["accuracy"] for p in pts], yerr=[100 * p["accuracy_std"] for p in pts],
                        marker="o", ms=3, capsize=2, label=s)
        time_ax.plot([p["ms_per_image"] for p in pts], [p["fd"] for p in pts], marker="o", ms=3, label=s)
    band = dict(color="grey", alpha=0.2, label="Heun 63 NFE ± seed spread")
    fd_ax.axhspan(base["fd"] - base["fd_std"], base["fd"] + base["fd_std"], **band)
    time_ax.axhspan(base["fd"] - base["fd_std"], base["fd"] + base["fd_std"], **band)
    diff_ax.axhspan(-base["fd_std"], base["fd_std"], **band)
    acc_ax.axhspan(100 * (base["accuracy"] - base["accuracy_std"]), 100 * (base["accuracy"] + base["accuracy_std"]),
                   **band)
    fd_ax.set(xscale="log", yscale="log", xlabel="NFE per image", ylabel="FD to held-out digits (lower is better)",
              title="Fréchet distance (mean ± std over seed sets)")
    diff_ax.set(xscale="log", xlabel="NFE per image", ylabel="FD minus Heun-63's, same seeds",
                title="FD against Heun at 63 NFE, paired")
    diff_ax.set_yscale("symlog", linthresh=2)
    diff_ax.set_yticks([-2, -1, 0, 1, 2, 5, 10, 20, 50, 100, 200])
    diff_ax.yaxis.set_major_formatter(ScalarFormatter())
    acc_ax.set(xscale="log", xlabel="NFE per image", ylabel="class accuracy (%)", ylim=(90, 100.5),
               title="Class accuracy")
    time_ax.set(xscale="log", yscale="log", xlabel="wall time per image (ms; bf16, one thread)", ylabel="FD",
                title="FD against time")
    ticks = sorted({p["nfe"] for p in points.values()})
    for ax in (fd_ax, diff_ax, acc_ax):
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    for ax in (fd_ax, time_ax):
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    fd_ax.set_yticks([10, 15, 20, 30, 50, 100, 200])
    time_ax.set_yticks([10, 15, 20, 30, 50, 100, 200])
    time_ax.set_xticks([2, 3, 5, 10, 20])
    time_ax.xaxis.set_major_formatter(ScalarFormatter())
    time_ax.xaxis.set_minor_formatter(NullFormatter())
    fd_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "nfe.png"))
    plt.close(fig)


def main(argv=None):
    global RESULTS, ROWS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("train", "quality", "guided", "timing", "report", "all"))
    parser.add_argument("--preset", choices=("digits", "mnist"), default="digits",
                        help="digits: the digits main job; mnist: the MNIST preset with FID (benchmarks/nfe_mnist.py) "
                             "[digits]")
    parser.add_argument("--run", default=None, help=f"the run directory [{DEFAULT_RUN}; mnist: out/mnist/run]")
    parser.add_argument("--num", type=int, default=1000, help="images per seed set [1000]")
    parser.add_argument("--sets", type=int, default=None, help="seed sets per point [3; mnist: 1]")
    parser.add_argument("--nfe", default=None, help=f"NFE budgets [{DEFAULT_NFE}; mnist: 5,9,15,25]")
    parser.add_argument("--samplers", default=None, help="comma list [every sampler]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    parser.add_argument("--batch", type=int, default=256, help="images per timed batch [256]")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per point [3]")
    parser.add_argument("--out", default=None, help="results folder [benchmarks/results/nfe; mnist: .../nfe/mnist]")
    parser.add_argument("--fid", default="", help="mnist: SAMPLER:NFE[:PRECISION] points (or guided KIND:W:LO-HI|all) scored with "
                                                  "FID too, in this order, after every point's classifier scores")
    parser.add_argument("--fid-sets", default="0", help="mnist: the seed sets of the --fid points [0]")
    parser.add_argument("--guided-sampler", default="dpmpp-2m", help="mnist guided: the sampler [dpmpp-2m]")
    parser.add_argument("--guided-nfe", type=int, default=25, help="mnist guided: the main network's NFE budget [25]")
    parser.add_argument("--guide-run", default=None, help="mnist guided: the CFG guide's run [out/guidance/uncond]")
    parser.add_argument("--w", default="2,3", help="mnist guided: guidance strengths [2,3]")
    parser.add_argument("--interval", default="0.28,2.9", help="mnist guided: the guidance interval LO,HI "
                                                               "[0.28,2.9: the paper's EDM2-S FID interval]")
    args = parser.parse_args(argv)
    if args.preset == "mnist":
        sys.modules.setdefault("nfe", sys.modules[__name__])  # nfe_mnist's `import nfe` is this module
        import nfe_mnist

        return nfe_mnist.main(args)
    if args.what == "guided":
        parser.error("guided: --preset mnist only")
    args.run, args.out = args.run or DEFAULT_RUN, args.out or RESULTS
    args.sets, args.nfe = args.sets or 3, args.nfe or DEFAULT_NFE
    RESULTS, ROWS = args.out, os.path.join(args.out, "rows.jsonl")
    from mpdiff.diffusion.samplers import SAMPLERS

    samplers = args.samplers.split(",") if args.samplers else list(SAMPLERS)
    budgets = [int(v) for v in args.nfe.split(",")]
    if args.what == "train" or (args.what == "all" and not os.path.exists(args.run)):  # never extends another run
        train(args.run, args.threads)
    if args.what in ("quality", "all"):
        quality(args.run, args.num, args.sets, budgets, samplers, args.threads)
    if args.what in ("timing", "all"):
        timing(args.run, args.batch, args.repeats, budgets, samplers, args.threads)
    if args.what in ("report", "all"):
        report()


if __name__ == "__main__":
    main()
