"""EMA-length sweeps (paper Fig. 5): post-hoc reconstruct a range of sigma_rel, evaluate each.

Each length is reported as it finishes (with the time left), and the table ends by saying when the best
length lies at an edge of the swept range, with a range to sweep next, and how well the snapshots
reconstruct it."""

import os
import time

import torch

from mpdiff.config import SAMPLING, SIGMA_REL_MAX
from mpdiff.diffusion.generate import generate_batches
from mpdiff.ema.profiles import profile_reconstruction_error
from mpdiff.ema.reconstruct import PROFILE_ERROR_WARNING, reconstruct, select_inputs
from mpdiff.ema.snapshots import list_snapshots
from mpdiff.errors import ConfigError
from mpdiff.metrics.estimate import duration_text
from mpdiff.storage.files import atomic_write, read_json, write_json, write_text
from mpdiff.storage.layout import RunLayout
from mpdiff.storage.images import save_grid
from mpdiff.storage.network_files import load_network


# The built-in evaluations keep every sample, and its features, in memory (--metrics streams them): more
# samples than this say nothing more about sets of 1,437 (digits) or 60,000 (MNIST) images.
BUILTIN_MAX_SAMPLES = 100_000


def _evaluator(run_dir, metrics=None, ref=None, dinov2=None, device="cpu", count=None):
    """How the sweep scores one EMA length's samples: a function (samples, classes) -> dict, or None for the
    grids-only mode. Everything it needs is checked first, before any network is loaded or sample made.

    With `metrics` (names of :mod:`mpdiff.metrics.compute`) the samples' Fréchet distances to the
    reference statistics `ref` (.npz of ``mpdiff ref``), the samples an iterable of uint8 batches (streamed);
    without them, the built-in digits or MNIST evaluation for a run on those (the samples uint8 [N, C, H, W],
    at most BUILTIN_MAX_SAMPLES), and otherwise no score (one grid per EMA length is still written).
    `count`: the number of samples per length, checked against what the evaluation needs or keeps.
    """
    config_path = RunLayout(run_dir).config
    if not os.path.lexists(config_path):
        raise ConfigError(f"{config_path}: missing; ema-sweep needs a run directory")
    config = read_json(config_path, what="run config", error=ConfigError)  # its own line says what is wrong
    try:
        spec = config["dataset"]["spec"]
    except (KeyError, TypeError):
        raise ConfigError(f"{config_path}: names no dataset (dataset.spec); ema-sweep needs a run directory") from None
    if metrics:
        from mpdiff.metrics.compute import check_image_count, compute_metrics, load_reference, reference_detectors

        if ref is None:
            raise ConfigError("--metrics needs --ref REF.npz (reference statistics from mpdiff ref)")
        if count is not None:
            check_image_count(count, "--seeds")
        reference = load_reference(ref, metrics, source=spec)  # what it lacks, its shapes and values
        detectors = reference_detectors(ref, reference, metrics, device=device, dinov2=dinov2)  # their dimensions
        return lambda batches, labels: compute_metrics(batches, reference, metrics, detectors=detectors)
    if spec in ("digits", "mnist") and count is not None and count > BUILTIN_MAX_SAMPLES:
        raise ConfigError(f"--seeds: the built-in {spec} evaluation keeps every sample in memory, at most "
                          f"{BUILTIN_MAX_SAMPLES:,}, got {count:,} (--metrics with --ref streams them)")
    if spec in ("digits", "mnist"):
        from mpdiff.metrics import digits, mnist
        load, evaluate = {"digits": (digits.load_digit_classifier, digits.evaluate_digits),
                          "mnist": (mnist.load_mnist_classifier, mnist.evaluate_mnist)}[spec]
        classifier = load()
        return lambda images, labels: evaluate(images, labels, classifier=classifier)
    return None


# The columns a built-in set's evaluation adds to a row (digits: DIGITS_KEYS; MNIST: those it has).
DIGITS_KEYS = ("accuracy", "fd", "fd_real_vs_real", "near_copies_fraction", "num_samples")
ROW_INFO = ("sigma_rel", "nimg", "grid")  # the other keys of a row are scores


def profile_errors(run_dir, sigma_rels, at_nimg=None):
    """{sigma_rel (6 decimals): relative L2 error of its reconstructed profile} from the run's snapshots."""
    at_nimg, inputs = select_inputs(list_snapshots(run_dir), at_nimg)
    in_t, in_sigma = [r.nimg for r in inputs], [r.sigma_rel for r in inputs]
    return {round(float(s), 6): profile_reconstruction_error(in_t, in_sigma, at_nimg, s)[1] for s in sigma_rels}


def ema_sweep(run_dir, sigma_rels, seeds, num_steps=None, at_nimg=None, out_dir=None, progress=True,
              metrics=None, ref=None, dinov2=None, device="cpu", vae=None, sampler=SAMPLING.sampler, report=None):
    """Returns dict(rows, table, plot, json). Each row: sigma_rel, nimg, the grid of its samples and the
    evaluation's numbers (none in the grids-only mode; see :func:`_evaluator`). A latent run's samples are
    decoded with the VAE folder `vae` (default: the one its run recorded) before they are scored. `sampler`
    and `num_steps` are those of :class:`mpdiff.config.SamplingConfig`. `report(line)` hears of each length
    as it finishes (its scores, and the time the rest will take)."""
    from mpdiff.data.latents import network_encoder

    evaluate = _evaluator(run_dir, metrics, ref, dinov2, device, count=len(seeds))
    out_dir = out_dir or RunLayout(run_dir).ema_sweep_dir
    paths = reconstruct(run_dir, sigma_rels, at_nimg=at_nimg, out_dir=os.path.join(out_dir, "networks"),
                        progress=progress)
    errors = profile_errors(run_dir, sigma_rels, at_nimg)
    rows, encoder, started = [], None, time.time()
    for path in paths:  # reconstruct() sorts and de-duplicates targets: read each one's sigma_rel back
        net, meta = load_network(path)
        if encoder is None:  # pixels, or latents decoded by the VAE (every target has the run's network)
            encoder = network_encoder(net, run_dir, vae, device=device)
        sigma_rel = round(float(meta["sigma_rel"]), 6)
        shown, kept = [], None if metrics or evaluate is None else []
        batches = _sample_batches(net, seeds, encoder, shown, kept, num_steps=num_steps, sampler=sampler,
                                  progress=progress)
        result = evaluate(batches, None) if metrics else None  # streamed through the detectors
        for _ in batches:  # grids only, or a built-in evaluation (which keeps them): every sample is made
            pass
        grid = os.path.join(out_dir, f"grid-{sigma_rel:.3f}.png")
        save_grid(grid, torch.cat(shown).numpy())
        row = {"sigma_rel": sigma_rel, "nimg": meta["nimg"], "grid": grid}
        if kept is not None:
            classes = [c for _, batch_classes in kept for c in batch_classes]
            result = evaluate(torch.cat([p for p, _ in kept]).numpy(), classes if net.label_dim else None)
        if result is not None:
            row.update({k: result[k] for k in (metrics or DIGITS_KEYS) if k in result})
        rows.append(row)
        if report is not None:
            report(length_line(row, len(rows), len(paths), time.time() - started, errors.get(sigma_rel)))
    table = format_table(rows, errors)
    write_json(os.path.join(out_dir, "sweep.json"), rows)
    write_text(os.path.join(out_dir, "sweep.txt"), table + "\n")
    plot = plot_sweep(rows, os.path.join(out_dir, "sweep.png")) if evaluate is not None else None
    return {"rows": rows, "table": table, "plot": plot, "json": os.path.join(out_dir, "sweep.json")}


GRID_IMAGES = 64


def _sample_batches(net, seeds, encoder, shown, kept, **sampling):
    """The samples of `seeds` as uint8 batches, streamed: the first GRID_IMAGES are added to the list `shown`,
    and every batch, as (pixels, classes), to the list `kept` unless it is None."""
    for batch in generate_batches(net, seeds, **sampling):
        pixels = encoder.decode(batch.images)
        shown.append(pixels[:GRID_IMAGES - sum(len(p) for p in shown)])
        if kept is not None:
            kept.append((pixels, batch.classes))
        yield pixels


def score_key(rows):
    """(key, name) of the score the best length minimises: the built-in evaluation's FD, else the first
    asked metric; None in the grids-only mode."""
    if rows and "fd_real_vs_real" in rows[0]:
        return "fd", "FD"
    metrics = [k for k in (rows[0] if rows else {}) if k not in ROW_INFO]
    return (metrics[0], metrics[0]) if metrics else None


def length_line(row, done, total, seconds, error=None):
    """One finished length, for the terminal: its scores, its profile error when large, the time left."""
    scores = [f"{k} {row[k]:.4g}" for k in row if k not in ROW_INFO + ("num_samples", "fd_real_vs_real")
              and isinstance(row[k], (int, float))]
    left = total - done
    timing = f"{duration_text(seconds)} so far" + (f", about {duration_text(seconds / done * left)} for the {left} "
                                                   f"left" if left else "")
    misses = (f"; its reconstruction misses the target profile by {error:.0%}"
              if error is not None and error > PROFILE_ERROR_WARNING else "")
    return (f"sigma_rel {row['sigma_rel']:.3f} ({done} of {total}): {', '.join(scores) or 'grid ' + row['grid']}"
            f"{misses} ({timing})")


def edge_note(rows, key, errors=None):
    """Lines on the best length (by `key`, lower is better): when it is the shortest or longest swept, the
    optimum may lie outside the range, and a range to sweep next; when its profile is poorly reconstructed,
    by how much. [] otherwise."""
    values = sorted(r["sigma_rel"] for r in rows)
    best = min(rows, key=lambda r: r[key])["sigma_rel"]
    lines = []
    if len(values) >= 2 and best in (values[0], values[-1]):
        count = len(values)
        if best == values[0]:
            low, high = max(0.001, round(best / 3, 3)), values[1]
            side = "shortest"
        else:
            low, high = values[-2], min(round(SIGMA_REL_MAX - 0.0005, 3), round(2 * best, 3))
            side = "longest"
        if high > low and not (side == "longest" and best >= round(SIGMA_REL_MAX - 0.0005, 3)):
            advice = f"sweep e.g. --sigma-rel {low:g}:{high:g}:{count}"
        else:
            advice = f"sigma_rel cannot exceed {SIGMA_REL_MAX:.4f}"
        lines.append(f"note: the best is the {side} length swept ({values[0]:.3f}-{values[-1]:.3f}), so the optimum may "
                     f"lie outside the range; {advice}")
    error = (errors or {}).get(best)
    if error is not None and error > PROFILE_ERROR_WARNING:
        lines.append(f"note: sigma_rel {best:.3f}'s reconstruction misses its target profile by {error:.0%} (relative "
                     f"L2): more or denser snapshots would reconstruct it better (mpdiff plot-ema-profile shows it)")
    return lines


def format_table(rows, errors=None):
    """The sweep as text: the built-in evaluation's columns, the asked metrics, or the grids; then the best
    length, and :func:`edge_note`'s lines. `errors`: {sigma_rel: profile error} (:func:`profile_errors`)."""
    scored = score_key(rows)
    if scored is None:
        return "\n".join([f"{'sigma_rel':>9}  grid (no evaluation for this dataset: --metrics and --ref to score)"] +
                         [f"{r['sigma_rel']:>9.3f}  {r['grid']}" for r in rows])
    if "fd_real_vs_real" in rows[0]:
        copies = "near_copies_fraction" in rows[0]  # the digits evaluation's; MNIST's has none
        lines = [f"{'sigma_rel':>9}  {'accuracy':>8}  {'FD':>8}  {'FD real':>8}" + (f"  {'near-copy':>9}" if copies else "")]
        for r in rows:
            acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
            lines.append(f"{r['sigma_rel']:>9.3f}  {acc:>8}  {r['fd']:>8.2f}  {r['fd_real_vs_real']:>8.2f}"
                         + (f"  {r['near_copies_fraction']:>9.3f}" if copies else ""))
    else:
        metrics = [k for k in rows[0] if k not in ROW_INFO]
        lines = [f"{'sigma_rel':>9}  " + "  ".join(f"{m:>10}" for m in metrics)]
        lines += [f"{r['sigma_rel']:>9.3f}  " + "  ".join(f"{r[m]:>10.3f}" for m in metrics) for r in rows]
    key, name = scored
    best = min(rows, key=lambda r: r[key])
    lines.append(f"best {name} at sigma_rel {best['sigma_rel']:.3f}")
    return "\n".join(lines + edge_note(rows, key, errors))


def plot_sweep(rows, path):
    """FD (or the first metric) and, for the digits, accuracy against sigma_rel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["sigma_rel"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    if "fd_real_vs_real" not in rows[0]:  # metrics against reference statistics
        for metric, color in zip([k for k in rows[0] if k not in ROW_INFO],
                                 ("tab:blue", "tab:red", "tab:green")):
            ax.plot(x, [r[metric] for r in rows], "o-", color=color, label=metric)
        rows = [dict(r, accuracy=None) for r in rows]
    else:
        ax.plot(x, [r["fd"] for r in rows], "o-", color="tab:blue", label="FD (classifier features)")
        ax.axhline(rows[0]["fd_real_vs_real"], color="tab:blue", ls=":", label="FD real vs real")
    ax.set_xlabel("EMA length sigma_rel")
    ax.set_ylabel("Frechet distance (lower is better)")
    if rows[0]["accuracy"] is not None:
        ax2 = ax.twinx()
        ax2.plot(x, [100 * r["accuracy"] for r in rows], "s--", color="tab:orange", label="class accuracy")
        ax2.set_ylabel("class accuracy (%)")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(f"EMA sweep at {rows[0]['nimg'] / 1000:.0f} kimg")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path
