"""EMA-length sweeps (paper Fig. 5): post-hoc reconstruct a range of sigma_rel, evaluate each."""

import os

from mpdiff.config import SAMPLING
from mpdiff.diffusion.generate import generate
from mpdiff.ema.reconstruct import reconstruct
from mpdiff.errors import ConfigError
from mpdiff.storage.files import atomic_write, read_json, write_json, write_text
from mpdiff.storage.layout import RunLayout
from mpdiff.storage.images import save_grid
from mpdiff.storage.network_files import load_network


def _evaluator(run_dir, metrics=None, ref=None, dinov2=None, device="cpu"):
    """How the sweep scores one EMA length's samples: a function (uint8 images, classes) -> dict, or None
    for the grids-only mode.

    With `metrics` (names of :mod:`mpdiff.metrics.compute`) the samples' Fréchet distances to the
    reference statistics `ref` (.npz of ``mpdiff ref``); without them, the built-in digits evaluation
    for a run on the digits, and otherwise no score (one grid per EMA length is still written).
    """
    config_path = RunLayout(run_dir).config
    try:
        spec = read_json(config_path, what="run config", error=ConfigError)["dataset"]["spec"]
    except (ConfigError, KeyError, TypeError):
        raise ConfigError(f"{config_path}: missing or unreadable; ema-sweep needs a run directory") from None
    if metrics:
        from mpdiff.metrics.compute import compute_metrics, dataset_batches, load_reference, make_detector

        if ref is None:
            raise ConfigError("--metrics needs --ref REF.npz (reference statistics from mpdiff ref)")
        reference = load_reference(ref)
        missing = [m for m in metrics if m not in reference]
        if missing:
            raise ConfigError(f"{ref}: the reference statistics have no {', '.join(missing)}")
        detectors = [make_detector(m, device=device, dinov2=dinov2) for m in metrics]
        return lambda images, labels: compute_metrics(dataset_batches(images), reference, metrics, detectors=detectors)
    if spec != "digits":
        return None
    from mpdiff.metrics.digits import evaluate_digits, load_digit_classifier
    classifier = load_digit_classifier()
    return lambda images, labels: evaluate_digits(images, labels, classifier=classifier)


DIGITS_KEYS = ("accuracy", "fd", "fd_real_vs_real", "near_copies_fraction", "num_samples")


def ema_sweep(run_dir, sigma_rels, seeds, num_steps=SAMPLING.num_steps, at_nimg=None, out_dir=None, progress=True,
              metrics=None, ref=None, dinov2=None, device="cpu", vae=None):
    """Returns dict(rows, table, plot, json). Each row: sigma_rel, nimg, the grid of its samples and the
    evaluation's numbers (none in the grids-only mode; see :func:`_evaluator`). A latent run's samples are
    decoded with the VAE folder `vae` (default: the one its run recorded) before they are scored."""
    from mpdiff.data.latents import network_encoder

    evaluate = _evaluator(run_dir, metrics, ref, dinov2, device)
    out_dir = out_dir or RunLayout(run_dir).ema_sweep_dir
    paths = reconstruct(run_dir, sigma_rels, at_nimg=at_nimg, out_dir=os.path.join(out_dir, "networks"),
                        progress=progress)
    rows, encoder = [], None
    for path in paths:  # reconstruct() sorts and de-duplicates targets: read each one's sigma_rel back
        net, meta = load_network(path)
        if encoder is None:  # pixels, or latents decoded by the VAE (every target has the run's network)
            encoder = network_encoder(net, run_dir, vae, device=device)
        sigma_rel = round(float(meta["sigma_rel"]), 6)
        images, classes = generate(net, seeds, num_steps=num_steps, progress=progress)
        pixels = encoder.decode(images)
        grid = os.path.join(out_dir, f"grid-{sigma_rel:.3f}.png")
        save_grid(grid, pixels[:GRID_IMAGES].numpy())
        row = {"sigma_rel": sigma_rel, "nimg": meta["nimg"], "grid": grid}
        if evaluate is not None:
            result = evaluate(pixels.numpy() if not metrics else pixels, classes if net.label_dim else None)
            row.update({k: result[k] for k in (metrics or DIGITS_KEYS)})
        rows.append(row)
    table = format_table(rows)
    write_json(os.path.join(out_dir, "sweep.json"), rows)
    write_text(os.path.join(out_dir, "sweep.txt"), table + "\n")
    plot = plot_sweep(rows, os.path.join(out_dir, "sweep.png")) if evaluate is not None else None
    return {"rows": rows, "table": table, "plot": plot, "json": os.path.join(out_dir, "sweep.json")}


GRID_IMAGES = 64


def format_table(rows):
    """The sweep as text: the digits evaluation's columns, the asked metrics, or the grids."""
    if rows and "fd_real_vs_real" in rows[0]:
        lines = [f"{'sigma_rel':>9}  {'accuracy':>8}  {'FD':>8}  {'FD real':>8}  {'near-copy':>9}"]
        for r in rows:
            acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
            lines.append(f"{r['sigma_rel']:>9.3f}  {acc:>8}  {r['fd']:>8.2f}  {r['fd_real_vs_real']:>8.2f}  "
                         f"{r['near_copies_fraction']:>9.3f}")
        best = min(rows, key=lambda r: r["fd"])
        lines.append(f"best FD at sigma_rel {best['sigma_rel']:.3f}")
        return "\n".join(lines)
    metrics = [k for k in (rows[0] if rows else {}) if k not in ("sigma_rel", "nimg", "grid")]
    if not metrics:
        return "\n".join([f"{'sigma_rel':>9}  grid (no evaluation for this dataset: --metrics and --ref to score)"] +
                         [f"{r['sigma_rel']:>9.3f}  {r['grid']}" for r in rows])
    lines = [f"{'sigma_rel':>9}  " + "  ".join(f"{m:>10}" for m in metrics)]
    lines += [f"{r['sigma_rel']:>9.3f}  " + "  ".join(f"{r[m]:>10.3f}" for m in metrics) for r in rows]
    best = min(rows, key=lambda r: r[metrics[0]])
    lines.append(f"best {metrics[0]} at sigma_rel {best['sigma_rel']:.3f}")
    return "\n".join(lines)


def plot_sweep(rows, path):
    """FD (or the first metric) and, for the digits, accuracy against sigma_rel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["sigma_rel"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    if "fd_real_vs_real" not in rows[0]:  # metrics against reference statistics
        for metric, color in zip([k for k in rows[0] if k not in ("sigma_rel", "nimg", "grid")],
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
