"""The MNIST preset of benchmarks/nfe.py (issue 31): sample quality against NFE with the Inception FID and
the MNIST classifier, and guided MNIST (CFG and autoguidance) with and without the guidance interval.

    python benchmarks/nfe.py quality --preset mnist [--nfe 5,9,15,25] [--samplers ...] [--sets 1] [--num 1000]
                                     [--fid heun:63,dpmpp-2m:15,heun:63:fp32,...] [--fid-sets 0,1]
    python benchmarks/nfe.py guided  --preset mnist [--guided-sampler dpmpp-2m] [--guided-nfe 25] [--w 2,3]
                                     [--interval 0.28,2.9] [--fid cfg:2:all,cfg:3:0.28-2.9,...]
    python benchmarks/nfe.py timing  --preset mnist [--batch 100] [--repeats 2]
    python benchmarks/nfe.py report  --preset mnist   # benchmarks/results/nfe/mnist/

- **Network**: the MNIST recipe's run (`python benchmarks/mnist.py run`: out/mnist/run, the `mnist`
  preset, 48 Ki images), its final snapshot at EMA sigma_rel 0.050 (benchmarks/mnist.py's), sampled in
  bf16; Heun at 63 NFE also in float32 (the paper's setting).
- **Seeds**: set k is seeds k*num .. (k+1)*num - 1, class seed % 10 (balanced, as benchmarks/mnist.py).
- **Scores** of every point: the MNIST classifier's agreement with the class (accuracy) and the Fréchet
  distance of its features to the 1,000 held-out images (fd); for the points of `--fid`, in that order
  and after every point has its classifier scores, FID (Inception-v3) against the 1,000 held-out images.
  The held-out reference is benchmarks/mnist.py's, computed by its functions and cached in
  out/mnist/ref-held-out.npz. Inception costs ~0.4-0.5 s per image on one busy thread: ~8 min per point.
- **Samples** of every point are kept (out/nfe-mnist/samples/, 1 MB per 1,000 images), so that FID is
  added to a measured point without sampling it again.
- **Guided** (`guided`): the main network with the CFG guide (the unconditional run of
  `python benchmarks/guidance.py guide`, out/guidance/uncond, EMA 0.050) or the autoguide (the main run's
  16 Ki snapshot at EMA 0.100, benchmarks/guidance.py's), at each `--w`, guided at every step and only
  inside `--interval`; `--guided-sampler` at `--guided-nfe` NFE of the main network. The NFE counted
  (the main network's and the guide's) and the wall time are recorded with each row. `--fid` points are
  KIND:W:LO-HI or KIND:W:all.

Rows go to benchmarks/results/nfe/mnist/rows.jsonl and guided.jsonl as they are measured (a later FID
is a second row of the same point, merged when read): a stopped run resumes.
"""

import datetime
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import guidance as guidance_bench  # noqa: E402  (benchmarks/guidance.py: the guides)
import mnist as mnist_bench  # noqa: E402  (benchmarks/mnist.py: the run, the reference, the features)
import nfe  # noqa: E402  (benchmarks/nfe.py: rows, summaries, the digits report's criteria)

RESULTS = os.path.join(HERE, "results", "nfe", "mnist")
SAMPLES = os.path.normpath(os.path.join(HERE, "..", "out", "nfe-mnist", "samples"))
DEFAULT_NFE = "5,9,15,25"
BATCH = 250  # images per sampled batch (memory); images do not depend on it


def held_out_reference(detectors):
    """{metric: (mu, sigma)} of the 1,000 held-out MNIST images, as benchmarks/mnist.py caches it
    (out/mnist/ref-held-out.npz); computed (held-out images only) when absent."""
    from mpdiff.metrics.compute import save_reference
    from mpdiff.metrics.mnist import mnist_splits

    paths = mnist_bench.Paths(mnist_bench.OUT, mnist_bench.RESULTS)
    names = [d.metric for d in detectors]
    found = mnist_bench._read_reference(paths.ref["held_out"], names, "held_out", 1)
    if found is not None:
        return found
    start = time.perf_counter()
    print(f"reference features of the 1,000 held-out images ({', '.join(names)}) ...", flush=True)
    features = mnist_bench._real_features(detectors, mnist_splits()["test_images"])
    os.makedirs(paths.out, exist_ok=True)
    save_reference(paths.ref["held_out"], {m: mnist_bench._stats_of(features[m]) for m in names},
                   source=mnist_bench._source("held_out", 1))
    print(f"reference in {time.perf_counter() - start:.0f} s: {paths.ref['held_out']}", flush=True)
    return mnist_bench._read_reference(paths.ref["held_out"], names, "held_out", 1)


class Scorer:
    """The MNIST classifier (accuracy, fd) and Inception (FID) against the held-out reference."""

    def __init__(self):
        from mpdiff.metrics.inception import InceptionDetector
        from mpdiff.metrics.mnist import MnistDetector, load_mnist_classifier

        self.classifier = load_mnist_classifier()
        self.mnist, self.inception = MnistDetector(self.classifier), InceptionDetector()
        self.ref = held_out_reference([self.mnist, self.inception])

    def _distance(self, detector, images):
        from mpdiff.metrics.frechet import frechet_distance

        features = mnist_bench._real_features([detector], images)[detector.metric]
        return frechet_distance(*mnist_bench._stats_of(features).mean_cov(), *self.ref[detector.metric])

    def classify(self, images, classes):
        from mpdiff.metrics.mnist import classifier_outputs

        _, predicted = classifier_outputs(self.classifier, images)
        return {"accuracy": float(np.mean(predicted == np.asarray(classes))), "fd": self._distance(self.mnist, images)}

    def fid(self, images):
        start = time.perf_counter()
        return {"fid": self._distance(self.inception, images), "inception_seconds": time.perf_counter() - start}


def sample(net, point, guide=None):
    """(uint8 images, classes, counted evaluations per image, seconds, steps) of one point."""
    from mpdiff.config import SAMPLING
    from mpdiff.data.pixels import decode_images
    from mpdiff.diffusion.generate import generate_batches

    interval = tuple(point["interval"]) if point.get("interval") else None
    sampling = SAMPLING.replace(sampler=point["sampler"], precision=point["precision"], batch_size=BATCH,
                                guidance_interval=interval).with_nfe(point["nfe_budget"])
    seeds = list(range(point["set"] * point["num"], (point["set"] + 1) * point["num"]))
    start = time.perf_counter()
    batches = list(generate_batches(net, seeds, [s % 10 for s in seeds], sampling=sampling, guide=guide,
                                    guidance=point.get("w", 1.0)))
    seconds = time.perf_counter() - start
    counted = batches[0].evaluations
    assert all(b.evaluations == counted for b in batches)
    images = np.concatenate([decode_images(b.images).numpy() for b in batches])
    return images, [c for b in batches for c in b.classes], counted, seconds, sampling.num_steps


def samples_file(point):
    guided = f"{point['kind']}-w{point['w']:g}-{'-'.join(f'{v:g}' for v in point['interval']) if point['interval'] else 'all'}-" \
        if "kind" in point else ""
    return os.path.join(SAMPLES, f"{guided}{point['sampler']}-nfe{point['nfe_budget']}-{point['precision']}-"
                                 f"set{point['set']}-n{point['num']}.npz")


def _save_samples(path, images, classes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial.npz"
    np.savez(partial, images=images, classes=np.asarray(classes))
    os.replace(partial, path)


def _append(path, row):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _shown(point):
    guided = f"{point['kind']} w {point['w']:g} {point['interval'] or 'every step'} " if "kind" in point else ""
    return f"{guided}set {point['set']} {point['sampler']:12s} {point['precision']} NFE {point['nfe_budget']:2d}"


def measure(points, fid_points, path, network_of, scorer, network):
    """Every point's classifier row (sampled, timed, its samples kept), then FID for `fid_points` in order."""
    rows = {nfe.row_key(r): r for r in nfe.read_rows(path)}
    for point in points + [p for p in fid_points if p not in points]:
        if nfe.row_key(point) in rows:
            continue
        net, guide = network_of(point)
        images, classes, counted, seconds, steps = sample(net, point, guide)
        _save_samples(samples_file(point), images, classes)
        row = {**point, "steps": steps, **counted, **scorer.classify(images, classes), "seconds": seconds,
               "seconds_per_image": seconds / point["num"], "date": datetime.date.today().isoformat(),
               "machine": nfe.machine(), "load": os.getloadavg()[0], "network": network}
        _append(path, row)
        rows[nfe.row_key(row)] = row
        print(f"{_shown(point)} ({steps} steps, counted NFE {counted['nfe']} + guide {counted['guide_nfe']}): "
              f"accuracy {100 * row['accuracy']:5.1f}%  fd {row['fd']:7.2f}  "
              f"{1000 * row['seconds_per_image']:6.2f} ms/img (load {row['load']:.1f})", flush=True)
    for point in fid_points:
        k = nfe.row_key(point)
        if "fid" in rows[k]:
            continue
        with np.load(samples_file(point)) as saved:
            images = saved["images"]
        scored = {**point, **scorer.fid(images), "fid_date": datetime.date.today().isoformat(),
                  "fid_load": os.getloadavg()[0]}
        _append(path, scored)
        rows[k].update(scored)
        print(f"{_shown(point)}: FID {scored['fid']:7.2f}  [Inception {scored['inception_seconds']:.0f} s]", flush=True)


# ------------------------------------------------------------------------------------------ the runs

def _main_snapshot(run):
    return guidance_bench._snapshot(run, None, mnist_bench.QUALITY_SIGMA_REL)


def _load(snapshot):
    from mpdiff.storage.network_files import load_network

    return load_network(snapshot.path)[0]


def _shown_path(path):
    return guidance_bench._shown(path)


def quality(run, num, sets, budgets, samplers, fid, fid_sets, threads):
    """Every sampler at every budget (Heun at each budget it has, and at 63) on seed sets 0 .. sets-1, and
    Heun at 63 NFE in float32; then FID for the SAMPLER:NFE points of `fid` on `fid_sets`."""
    import torch

    torch.set_num_threads(threads)
    snapshot = _main_snapshot(run)
    net, network = _load(snapshot), f"{_shown_path(snapshot.path)}"
    print(f"network: {network}", flush=True)
    scorer = Scorer()
    base = {"sampler": nfe.BASELINE[0], "nfe_budget": nfe.BASELINE[1]}
    grid = [{"sampler": s, "nfe_budget": b} for s in samplers for b in budgets] + [base]
    grid = [dict(t) for t in dict.fromkeys(tuple(p.items()) for p in grid)]
    points = [{**p, "precision": "bf16", "set": k, "num": num} for k in range(sets) for p in grid]
    points += [{**base, "precision": "fp32", "set": 0, "num": num}]
    fid_points = [{"sampler": s, "nfe_budget": int(b), "precision": (p or ["bf16"])[0], "set": k, "num": num}
                  for k in fid_sets for s, b, *p in (item.split(":") for item in fid)]
    measure(points, fid_points, os.path.join(RESULTS, "rows.jsonl"), lambda point: (net, None), scorer, network)


def guided(run, guide_run, num, sampler, budget, w_values, interval, fid, threads):
    """Unguided, CFG and autoguidance at each w, at every step and inside `interval`, `sampler` at `budget`
    NFE of the main network (seed set 0); then FID for the KIND:W:LO-HI|all points of `fid`."""
    import torch

    torch.set_num_threads(threads)
    main = _main_snapshot(run)
    guides = {"cfg": guidance_bench._snapshot(guide_run, None, guidance_bench.SIGMA_REL),
              "autoguidance": guidance_bench._snapshot(run, 16384, 0.100)}
    net, loaded = _load(main), {kind: _load(s) for kind, s in guides.items()}
    network = _shown_path(main.path)
    print(f"network: {network}; guides: " + ", ".join(f"{k} {_shown_path(s.path)}" for k, s in guides.items()),
          flush=True)
    scorer = Scorer()
    common = {"sampler": sampler, "nfe_budget": budget, "precision": "bf16", "set": 0, "num": num}
    points = [{"kind": kind, "w": w, "interval": span, "guide": _shown_path(guides[kind].path), **common}
              for kind in guides for w in w_values for span in (None, list(interval))]
    fid_points = []
    for item in fid:
        kind, w, span = item.split(":")
        span = None if span == "all" else [float(v) for v in span.split("-")]
        fid_points.append(next(p for p in points if (p["kind"], p["w"], p["interval"]) == (kind, float(w), span)))
    measure(points, fid_points, os.path.join(RESULTS, "guided.jsonl"), lambda point: (net, loaded[point["kind"]]),
            scorer, network)


# ------------------------------------------------------------------------------------------ report

def matches(point, base):
    """Heun-63's quality within its seed spread: on the same seeds, FID no more than its standard deviation
    over the seed sets above it, accuracy no more than its below."""
    return (point.get("fid_vs_baseline") is not None and base.get("fid_std") is not None
            and point["fid_vs_baseline"] <= base["fid_std"]
            and point["accuracy_vs_baseline"] >= -base["accuracy_std"])


def _table(title, samplers, budgets, points, cell):
    lines = ["", title, "", "| sampler | " + " | ".join(f"NFE {n}" for n in budgets) + " |",
             "| --- |" + " --- |" * len(budgets)]
    for s in samplers:
        lines.append(f"| {s} | " + " | ".join((cell(p) if (p := points.get((s, n, "bf16"))) else "–")
                                             for n in budgets) + " |")
    return lines


def _spread(value, std, digits=2):
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def distances(points, rows):
    """Adds rms_to_heun_63 to every point whose set-0 samples are kept: the root mean square difference of its
    images (uint8) to Heun-63's (bf16) of the same seeds."""
    def images(row):
        path = samples_file(row)
        if not os.path.exists(path):
            return None
        with np.load(path) as saved:
            return saved["images"].astype(np.float64)

    first = {(r["sampler"], r["nfe"], r["precision"]): r for r in rows if r["set"] == 0}
    base = images(first[(*nfe.BASELINE, "bf16")]) if (*nfe.BASELINE, "bf16") in first else None
    for k, p in points.items():
        mine = images(first[k]) if base is not None and k in first else None
        if mine is not None and mine.shape == base.shape:
            p["rms_to_heun_63"] = float(np.sqrt(np.mean((mine - base) ** 2)))


def report_guided():
    rows = nfe.read_rows(os.path.join(RESULTS, "guided.jsonl"))
    if not rows:
        return [], []
    plain = {nfe.key(r): r for r in nfe.read_rows(os.path.join(RESULTS, "rows.jsonl"))}
    r0 = rows[0]
    none = plain.get((r0["sampler"], r0["nfe_budget"], r0["precision"], r0["set"], r0["num"]))
    lines = ["", f"Guided, {r0['sampler']} at {r0['nfe_budget']} NFE of the main network, {r0['num']} samples "
                 f"(seeds {r0['set'] * r0['num']}-{(r0['set'] + 1) * r0['num'] - 1}, classes balanced), bf16; NFE "
                 "counted per image: the main network's + the guide's:", "",
             "| guidance | w | guided where (σ) | NFE: net + guide = total | accuracy | FD (classifier) | FID | "
             "ms per image |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    shown = ([{**none, "kind": "none", "w": 1.0, "interval": None}] if none else []) + sorted(
        rows, key=lambda r: (r["kind"], r["w"], r["interval"] is not None))
    for r in shown:
        span = "–" if r["kind"] == "none" else ("every step" if not r["interval"] else
                                                f"({r['interval'][0]:g}, {r['interval'][1]:g}]")
        fid = f"{r['fid']:.2f}" if "fid" in r else "–"
        lines.append(f"| {r['kind']} | {r['w']:g} | {span} | {r['nfe']} + {r['guide_nfe']} = "
                     f"{r['nfe'] + r['guide_nfe']} | {100 * r['accuracy']:.1f}% | {r['fd']:.2f} | {fid} | "
                     f"{1000 * r['seconds_per_image']:.2f} |")
    return lines, shown


def report():
    rows = nfe.read_rows(os.path.join(RESULTS, "rows.jsonl"))
    if not rows:
        sys.exit(f"no rows in {RESULTS}: run `python benchmarks/nfe.py quality --preset mnist` first")
    points = nfe.summarise(rows)
    timed = nfe.timings()
    for k, ms in timed.items():
        if k in points:
            points[k]["ms_per_image"], points[k]["timed"] = ms, True
    base = points[(*nfe.BASELINE, "bf16")]
    fp32 = points.get((*nfe.BASELINE, "fp32"))
    distances(points, rows)
    samplers = list(dict.fromkeys(r["sampler"] for r in rows if r["precision"] == "bf16"))
    budgets = sorted({p["nfe"] for p in points.values() if p["precision"] == "bf16"})
    dates = sorted({r["date"] for r in rows} | {r["fid_date"] for r in rows if "fid_date" in r})
    lines = [f"MNIST preset ({rows[0]['network']}, EMA 0.050), {rows[0]['num']} samples per seed set (classes "
             f"balanced), bf16. {rows[0]['machine']}, {dates[0]} to {dates[-1]}.",
             f"Seed-to-seed spread of Heun at 63 NFE (standard deviation over its {base['sets']} seed sets; FID "
             f"over sets {base.get('fid_sets')}): FID ± "
             + (f"{base['fid_std']:.2f}" if base.get("fid_std") is not None else "(one set: not measured)")
             + f", accuracy ± {100 * base['accuracy_std']:.2f} points, FD ± {base['fd_std']:.2f}."]
    lines += _table("FID (Inception-v3 against the 1,000 held-out images; lower is better; mean ± std where "
                    "several seed sets were scored):", samplers, budgets, points,
                    lambda p: _spread(p["fid"], p["fid_std"]) if p.get("fid") is not None else "–")
    lines += _table("Against Heun at 63 NFE on the same seeds: FID difference / accuracy difference (points) "
                    "(✓: within the seed spread):", samplers, budgets, points,
                    lambda p: (f"{p['fid_vs_baseline']:+.2f}" if p.get("fid_vs_baseline") is not None else "–")
                    + f" / {100 * p['accuracy_vs_baseline']:+.1f}" + (" ✓" if matches(p, base) else ""))
    lines += _table("Class accuracy (%):", samplers, budgets, points,
                    lambda p: _spread(100 * p["accuracy"], 100 * p["accuracy_std"], 1))
    lines += _table("FD of the MNIST classifier's features to the held-out images:", samplers, budgets, points,
                    lambda p: _spread(p["fd"], p["fd_std"]))
    lines += _table("Distance to Heun-63's images of the same seeds (root mean square over pixels, 0-255; set 0): "
                    "how far a solver's samples are from the ODE's solution:", samplers, budgets, points,
                    lambda p: f"{p['rms_to_heun_63']:.1f}" if p.get("rms_to_heun_63") is not None else "–")
    how = "the timing pass: median of its repeats" if timed else "the sampling of the scored sets, median"
    lines += _table(f"Wall time per image (ms; {how}; one torch thread, bf16):", samplers, budgets, points,
                    lambda p: f"{p['ms_per_image']:.2f}")
    singles = [p for p in points.values() if p["precision"] == "fp32"]
    fids = {(r["sampler"], r["nfe_budget"], r["precision"], r["set"]): r["fid"] for r in rows if "fid" in r}
    if singles:
        lines += ["", "In float32 (means over the seed sets scored; FID paired against Heun-63 in float32 on the same "
                      "sets; the time of Heun-63 from the timing pass where it ran, the others from their sampling, "
                      "batches of 250):", ""]
    for p in sorted(singles, key=lambda p: -p["nfe"]):
        sets = sorted(k for (s, n, q, k) in fids if (s, n, q) == (p["sampler"], p["nfe"], "fp32"))
        paired = [fids[(p["sampler"], p["nfe"], "fp32", k)] - fids[(*nfe.BASELINE, "fp32", k)] for k in sets
                  if (*nfe.BASELINE, "fp32", k) in fids]
        lines.append(f"- {p['sampler']}, {p['nfe']} NFE: accuracy {100 * p['accuracy']:.1f}%, FD {p['fd']:.2f}"
                     + (f", FID {p['fid']:.2f} (sets {', '.join(map(str, sets))})" if p.get("fid") is not None else "")
                     + (f", {np.mean(paired):+.2f} against Heun-63 in float32 "
                        f"({', '.join(f'{d:+.2f}' for d in paired)})"
                        if paired and (p["sampler"], p["nfe"]) != nfe.BASELINE else "")
                     + f", {p['ms_per_image']:.2f} ms per image"
                     + (f"; its images are {p['rms_to_heun_63']:.1f} RMS (0-255) from Heun-63's in bf16 (set 0)"
                        if p.get("rms_to_heun_63") is not None else ""))
    guided_lines, guided_rows = report_guided()
    nfe.write_tables(RESULTS, "\n".join(lines + guided_lines) + "\n",
                     {"points": list(points.values()), "guided": guided_rows, "machine": rows[0]["machine"],
                      "dates": [dates[0], dates[-1]]})
    plot(points, samplers, base)


def plot(points, samplers, base):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), dpi=110)
    (fid_ax, acc_ax), (fd_ax, time_ax) = axes
    for s in samplers:
        pts = sorted((p for p in points.values() if p["sampler"] == s and p["precision"] == "bf16"),
                     key=lambda p: p["nfe"])
        scored = [p for p in pts if p.get("fid") is not None]
        line, = fid_ax.plot([p["nfe"] for p in scored], [p["fid"] for p in scored], marker="o", ms=4, label=s)
        color = line.get_color()
        acc_ax.plot([p["nfe"] for p in pts], [100 * p["accuracy"] for p in pts], marker="o", ms=3, color=color, label=s)
        fd_ax.plot([p["nfe"] for p in pts], [p["fd"] for p in pts], marker="o", ms=3, color=color, label=s)
        time_ax.plot([p["ms_per_image"] for p in scored], [p["fid"] for p in scored], marker="o", ms=4, color=color,
                     label=s)
    label = "Heun 63 NFE ± seed spread"
    if base.get("fid_std") is not None:
        for ax in (fid_ax, time_ax):
            ax.axhspan(base["fid"] - base["fid_std"], base["fid"] + base["fid_std"], color="grey", alpha=0.2,
                       label=label)
    acc_ax.axhspan(100 * (base["accuracy"] - base["accuracy_std"]), 100 * (base["accuracy"] + base["accuracy_std"]),
                   color="grey", alpha=0.2, label=label)
    fd_ax.axhspan(base["fd"] - base["fd_std"], base["fd"] + base["fd_std"], color="grey", alpha=0.2, label=label)
    fid_ax.set(xscale="log", yscale="log", xlabel="NFE per image", ylabel="FID vs held-out (lower is better)",
               title="FID (Inception-v3, 1,000 samples)")
    acc_ax.set(xscale="log", xlabel="NFE per image", ylabel="class accuracy (%)", title="Class accuracy")
    fd_ax.set(xscale="log", yscale="log", xlabel="NFE per image", ylabel="FD, MNIST classifier features",
              title="Classifier Fréchet distance")
    time_ax.set(xscale="log", yscale="log", xlabel="wall time per image (ms; bf16, one thread)", ylabel="FID",
                title="FID against time")
    fp32 = points.get((*nfe.BASELINE, "fp32"))
    if fp32 is not None and fp32.get("fid") is not None:
        fid_ax.plot([fp32["nfe"]], [fp32["fid"]], "*", color="black", ms=10, label="heun, float32")
        time_ax.plot([fp32["ms_per_image"]], [fp32["fid"]], "*", color="black", ms=10, label="heun 63, float32")
    ticks = sorted({p["nfe"] for p in points.values()})
    for ax in (fid_ax, acc_ax, fd_ax, time_ax):
        if ax is not time_ax:
            ax.set_xticks(ticks)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    fids = [p["fid"] for p in points.values() if p.get("fid") is not None]
    fid_ticks = [v for v in (10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 150, 200, 300, 500) if
                 min(fids) * 0.8 <= v <= max(fids) * 1.25] if fids else []
    for ax in (fid_ax, time_ax):
        ax.set_yticks(fid_ticks)
    time_ax.set_xticks([v for v in (5, 10, 20, 50, 100, 200, 500)
                        if min(p["ms_per_image"] for p in points.values()) * 0.7 <= v
                        <= max(p["ms_per_image"] for p in points.values()) * 1.4])
    fid_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "nfe-mnist.png"))
    plt.close(fig)


def main(args):
    global RESULTS, SAMPLES
    from mpdiff.diffusion.samplers import SAMPLERS

    if args.out:  # e.g. a smoke test: its samples beside its results
        RESULTS, SAMPLES = args.out, os.path.join(args.out, "samples")
    nfe.RESULTS, nfe.ROWS = RESULTS, os.path.join(RESULTS, "rows.jsonl")
    run = args.run or os.path.join(mnist_bench.OUT, "run")
    samplers = args.samplers.split(",") if args.samplers else list(SAMPLERS)
    budgets = [int(v) for v in (args.nfe or DEFAULT_NFE).split(",")]
    fid = [item for item in args.fid.split(",") if item]
    if args.what == "train":
        sys.exit("train: the MNIST run is `python benchmarks/mnist.py run`")
    if args.what in ("quality", "all"):
        quality(run, args.num, args.sets or 1, budgets, samplers,
                fid if args.what == "quality" else [], [int(v) for v in args.fid_sets.split(",")], args.threads)
    if args.what == "guided":
        interval = tuple(float(v) for v in args.interval.split(","))
        guided(run, args.guide_run or os.path.join(guidance_bench.OUT, "uncond"), args.num, args.guided_sampler, args.guided_nfe,
               [float(v) for v in args.w.split(",")], interval, fid, args.threads)
    if args.what in ("timing", "all"):
        nfe.timing(run, args.batch, args.repeats, budgets, samplers, args.threads)
    if args.what in ("report", "all"):
        report()
