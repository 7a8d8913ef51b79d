"""EMA-length sweeps (paper Fig. 5): post-hoc reconstruct a range of sigma_rel, evaluate each."""

import os

from mpdiff.config import SAMPLING
from mpdiff.data.pixels import decode_images
from mpdiff.diffusion.generate import generate
from mpdiff.ema.reconstruct import reconstruct
from mpdiff.errors import ConfigError
from mpdiff.storage.files import atomic_write, read_json, write_json, write_text
from mpdiff.storage.layout import RunLayout
from mpdiff.storage.network_files import load_network


def _evaluator(run_dir):
    config_path = RunLayout(run_dir).config
    try:
        spec = read_json(config_path, what="run config", error=ConfigError)["dataset"]["spec"]
    except (ConfigError, KeyError, TypeError):
        raise ConfigError(f"{config_path}: missing or unreadable; ema-sweep needs a run directory") from None
    if spec != "digits":
        raise ConfigError(f"{run_dir}: no built-in evaluation for dataset {spec!r} yet (the digits metrics need "
                          f"the built-in dataset; FID/FD_DINOv2 evaluation is planned)")
    from mpdiff.metrics.digits import evaluate_digits, load_digit_classifier
    classifier = load_digit_classifier()
    return lambda images, labels: evaluate_digits(images, labels, classifier=classifier)


def ema_sweep(run_dir, sigma_rels, seeds, num_steps=SAMPLING.num_steps, at_nimg=None, out_dir=None, progress=True):
    """Returns dict(rows, table, plot, json). Each row: sigma_rel + the evaluation's numbers."""
    evaluate = _evaluator(run_dir)
    out_dir = out_dir or RunLayout(run_dir).ema_sweep_dir
    paths = reconstruct(run_dir, sigma_rels, at_nimg=at_nimg, out_dir=os.path.join(out_dir, "networks"),
                        progress=progress)
    rows = []
    for path in paths:  # reconstruct() sorts and de-duplicates targets: read each one's sigma_rel back
        net, meta = load_network(path)
        sigma_rel = round(float(meta["sigma_rel"]), 6)
        images, classes = generate(net, seeds, num_steps=num_steps, progress=progress)
        result = evaluate(decode_images(images).numpy(), classes if net.label_dim else None)
        rows.append({"sigma_rel": sigma_rel, "nimg": meta["nimg"], "accuracy": result["accuracy"],
                     "fd": result["fd"], "fd_real_vs_real": result["fd_real_vs_real"],
                     "near_copies_fraction": result["near_copies_fraction"], "num_samples": result["num_samples"]})
    table = format_table(rows)
    write_json(os.path.join(out_dir, "sweep.json"), rows)
    write_text(os.path.join(out_dir, "sweep.txt"), table + "\n")
    plot = plot_sweep(rows, os.path.join(out_dir, "sweep.png"))
    return {"rows": rows, "table": table, "plot": plot, "json": os.path.join(out_dir, "sweep.json")}


def format_table(rows):
    lines = [f"{'sigma_rel':>9}  {'accuracy':>8}  {'FD':>8}  {'FD real':>8}  {'near-copy':>9}"]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        lines.append(f"{r['sigma_rel']:>9.3f}  {acc:>8}  {r['fd']:>8.2f}  {r['fd_real_vs_real']:>8.2f}  "
                     f"{r['near_copies_fraction']:>9.3f}")
    best = min(rows, key=lambda r: r["fd"])
    lines.append(f"best FD at sigma_rel {best['sigma_rel']:.3f}")
    return "\n".join(lines)


def plot_sweep(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["sigma_rel"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
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
