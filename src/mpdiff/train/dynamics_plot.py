"""Plots of a run's training dynamics over training (`mpdiff plot-dynamics`; paper Figs. 3 and 15).

Reads the ``dynamics`` objects of RUN_DIR/stats.jsonl (:mod:`mpdiff.train.dynamics`) and draws one
figure per quantity, one line per U-Net block: encoder blocks in blues, decoder blocks in reds,
darker further along the forward pass. matplotlib with the Agg backend; imported only to draw.
"""

import math
import os

import numpy as np

from mpdiff.errors import MpdiffError
from mpdiff.storage.files import atomic_write, read_jsonl, show_path, write_destination
from mpdiff.storage.layout import DYNAMICS_PLOT_FILES, RunLayout
from mpdiff.train.dynamics import block_of

# (quantity in the rows, file name, title, y label)
FIGURES = (
    ("act", DYNAMICS_PLOT_FILES[0], "Block output RMS on the fixed probe batch", "activation RMS"),
    ("weight", DYNAMICS_PLOT_FILES[1], "Weight RMS, mean over each block's layers", "weight RMS"),
    ("update", DYNAMICS_PLOT_FILES[2], "Relative update per optimizer step, mean over each block's layers",
     "||Δw|| / ||w||"),
)


def dynamics_rows(run_dir):
    """[(nimg, dynamics)] of a run's stats rows that carry dynamics, by image count (the last row of an
    image count wins). Raises MpdiffError naming the file when there are none."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise MpdiffError(f"{show_path(run_dir)}: not a directory; expected a run directory")
    stats = RunLayout(run_dir).stats
    found = {}
    for row in read_jsonl(stats):
        if not isinstance(row, dict) or not isinstance(row.get("dynamics"), dict):
            continue  # damaged lines, and rows written without dynamics
        nimg = row.get("nimg")
        if isinstance(nimg, int) and not isinstance(nimg, bool):
            found[nimg] = dict(row["dynamics"], lr=row.get("lr"))
    if not found:
        raise MpdiffError(f"{show_path(stats)}: no stats row holds training dynamics; train with --dynamics "
                          f"(the default) to record them")
    return sorted(found.items())


def per_block(values):
    """{block: mean of its layers' values} for {layer: value}; layers outside the blocks are left out."""
    grouped = {}
    for layer, value in values.items():
        block = block_of(layer)
        if block is not None and _number(value):
            grouped.setdefault(block, []).append(value)
    return {block: float(np.mean(found)) for block, found in grouped.items()}


def block_series(rows, quantity):
    """(blocks in forward order, {block: array over rows}, NaN where a row lacks it) of one quantity:
    'act' per block as measured, 'weight' and 'update' as per-block means of their layers."""
    per_row = []
    for _, dynamics in rows:
        values = dynamics.get(quantity)
        values = values if isinstance(values, dict) else {}
        per_row.append({k: v for k, v in values.items() if _number(v)} if quantity == "act" else per_block(values))
    blocks = list(dict.fromkeys(block for values in per_row for block in values))
    return blocks, {block: np.array([values.get(block, math.nan) for values in per_row]) for block in blocks}


def block_colors(blocks):
    """{block: RGBA}: encoder blocks in blues, decoder blocks in reds, darker deeper into each half."""
    from matplotlib import colormaps

    colors = {}
    for side, cmap in (("enc", colormaps["Blues"]), ("dec", colormaps["Reds"])):
        mine = [b for b in blocks if b.startswith(side + ".")]
        for block, shade in zip(mine, np.linspace(0.35, 0.95, max(len(mine), 1))):
            colors[block] = cmap(shade)
    return colors


def plot_dynamics(run_dir, out_dir=None):
    """Draw activations, weights and updates of a run over training into `out_dir` (default
    RUN_DIR/plots); returns the paths of the PNG files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = dynamics_rows(run_dir)
    out_dir = os.fspath(out_dir) if out_dir is not None else RunLayout(run_dir).plots_dir
    nimg = np.array([n for n, _ in rows], dtype=np.float64)
    scale, unit = (1e6, "Mimg") if nimg.max() >= 1e7 else (1e3, "kimg")
    paths = []
    for quantity, name, title, ylabel in FIGURES:
        blocks, series = block_series(rows, quantity)
        if not blocks:
            continue  # e.g. no update yet; the other figures still tell something
        path = os.path.join(out_dir, name)
        write_destination(path)  # refused destinations (a directory, a FIFO) before any drawing
        colors = block_colors(blocks)
        log = _wants_log(np.concatenate([series[b] for b in blocks]), allow_zeros=quantity == "update")
        shown = (lambda v: np.where(v > 0, v, math.nan)) if log else (lambda v: v)  # log: zero updates left out
        figure, axes = plt.subplots(figsize=(9, 5), dpi=120)
        for block in blocks:
            axes.plot(nimg / scale, shown(series[block]), color=colors[block], linewidth=1, label=block)
        if quantity == "update":  # with forced weight normalisation the relative update follows the rate
            lr = np.array([d["lr"] if _number(d.get("lr")) else math.nan for _, d in rows])
            axes.plot(nimg / scale, shown(lr), color="black", linestyle="--", linewidth=1, label="learning rate")
        if log:
            axes.set_yscale("log")
        axes.set_xlabel(f"training images ({unit})")
        axes.set_ylabel(ylabel)
        axes.set_title(f"{title}\nblue: encoder, red: decoder (darker = later in the forward pass)", fontsize=10)
        axes.grid(True, which="major", alpha=0.3)
        axes.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if len(blocks) <= 24 else 2,
                    frameon=False)
        figure.tight_layout()
        with atomic_write(path, "wb") as f:
            figure.savefig(f, format="png")
        plt.close(figure)
        paths.append(path)
    return paths


def _wants_log(values, allow_zeros=False, decades=1.0):
    """Log y when the positive values span more than `decades` decades (growth, warm-up, decay) and none
    is negative (nor zero, unless `allow_zeros`)."""
    values = values[np.isfinite(values)]
    positive = values[values > 0]
    if not positive.size or (values < 0).any() or (not allow_zeros and (values == 0).any()):
        return False
    return math.log10(positive.max() / positive.min()) > decades


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
