"""Plots of a run's training dynamics over training (`mpdiff plot-dynamics`; paper Figs. 3 and 15).

Reads the ``dynamics`` objects of RUN_DIR/stats.jsonl (:mod:`mpdiff.train.dynamics`) and draws one
figure per quantity, one line per block: encoder blocks in blues, decoder blocks in reds,
darker further along the forward pass. Two more figures hold ScaleLong's stability measurements
(SPEC §10.4): the long skips' RMS before and after scaling, one line per skip, and the gradient norm
with the output's sensitivity to input perturbations. matplotlib with the Agg backend; imported
only to draw.
"""

import math
import os

import numpy as np

from mpdiff.errors import MpdiffError
from mpdiff.storage.files import atomic_write, read_jsonl, show_path, write_destination
from mpdiff.storage.layout import DYNAMICS_PLOT_FILES, RunLayout, check_folder
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
            found[nimg] = dict(row["dynamics"], lr=row.get("lr"), grad_norm=row.get("grad_norm"),
                               grad_norm_max=row.get("grad_norm_max"))
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


def plot_dynamics(run_dir, out_dir=None, say=None):
    """Draw activations, weights and updates of a run over training into `out_dir` (default
    RUN_DIR/plots); returns the paths of the PNG files written. `say(message)` hears of each figure
    left out for want of data. Fewer than two rows with dynamics: MpdiffError (no curve to draw)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = dynamics_rows(run_dir)
    if len(rows) < 2:
        raise MpdiffError(f"{show_path(RunLayout(run_dir).stats)}: only one stats row (at {rows[0][0]:,} images) "
                          f"holds training dynamics, and a curve needs two or more; wait for the run's next row, "
                          f"or train with a shorter --status (its start-of-run summary warns of this)")
    say = say or (lambda message: None)
    marker = "o" if len(rows) <= 12 else None  # a few rows: show where the measurements are
    out_dir = os.fspath(out_dir) if out_dir is not None else RunLayout(run_dir).plots_dir
    check_folder(out_dir)  # a symlink loop or a file in its place: one line, before any drawing
    nimg = np.array([n for n, _ in rows], dtype=np.float64)
    scale, unit = (1e6, "Mimg") if nimg.max() >= 1e7 else (1e3, "kimg")
    paths = []
    for quantity, name, title, ylabel in FIGURES:
        blocks, series = block_series(rows, quantity)
        if not blocks:  # e.g. no update yet; the other figures still tell something
            say(f"{name} not drawn: no stats row holds {quantity!r} values")
            continue
        path = os.path.join(out_dir, name)
        write_destination(path)  # refused destinations (a directory, a FIFO) before any drawing
        colors = block_colors(blocks)
        log = _wants_log(np.concatenate([series[b] for b in blocks]), allow_zeros=quantity == "update")
        shown = (lambda v: np.where(v > 0, v, math.nan)) if log else (lambda v: v)  # log: zero updates left out
        figure, axes = plt.subplots(figsize=(9, 5), dpi=120)
        for block in blocks:
            axes.plot(nimg / scale, shown(series[block]), color=colors[block], linewidth=1, label=block,
                      marker=marker, markersize=3)
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
        _save(figure, path)
        paths.append(path)
    for draw, name in ((_plot_skips, DYNAMICS_PLOT_FILES[3]), (_plot_stability, DYNAMICS_PLOT_FILES[4])):
        path = os.path.join(out_dir, name)
        if draw(rows, nimg / scale, unit, path):
            paths.append(path)
    return paths


def _save(figure, path):
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_write(path, "wb") as f:
        figure.savefig(f, format="png")
    plt.close(figure)


def skip_series(rows, quantity):
    """(skip names outermost first, {skip: array over rows}) of 'skip_in' or 'skip_out'."""
    per_row = [{k: v for k, v in (d.get(quantity) if isinstance(d.get(quantity), dict) else {}).items()
                if _number(v)} for _, d in rows]
    names = sorted({k for values in per_row for k in values}, key=lambda k: int(k[4:]) if k[4:].isdigit() else 0)
    return names, {k: np.array([values.get(k, math.nan) for values in per_row]) for k in names}


def _plot_skips(rows, x, unit, path):
    """Long-skip RMS before (encoder output) and after the skip scaling; False if the run has none."""
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    names, before = skip_series(rows, "skip_in")
    if not names:
        return False
    _, after = skip_series(rows, "skip_out")
    write_destination(path)
    colors = {name: colormaps["viridis"](shade) for name, shade in zip(names, np.linspace(0, 0.9, len(names)))}
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120, sharey=True)
    for ax, series, title in ((axes[0], before, "as the encoder produced it"),
                              (axes[1], after, "as the decoder receives it (after skip scaling)")):
        for name in names:
            if name in series:
                ax.plot(x, series[name], color=colors[name], linewidth=1, label=name)
        ax.set(xlabel=f"training images ({unit})", title=f"Long-skip RMS on the probe batch, {title}")
        ax.title.set_fontsize(9)
        ax.grid(True, alpha=0.3)
    values = np.concatenate([*before.values(), *after.values()])
    if _wants_log(values):
        axes[0].set_yscale("log")
    axes[0].set_ylabel("RMS (skip0 = outermost)")
    axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _save(figure, path)
    return True


def _plot_stability(rows, x, unit, path):
    """Gradient norm (mean and max of each row's steps) and output sensitivity over training."""
    import matplotlib.pyplot as plt

    def column(key):
        return np.array([d[key] if _number(d.get(key)) else math.nan for _, d in rows], dtype=np.float64)

    grad, grad_max, sensitivity = column("grad_norm"), column("grad_norm_max"), column("sensitivity")
    if np.isnan(grad).all() and np.isnan(sensitivity).all():
        return False
    write_destination(path)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    axes[0].plot(x, grad, color="tab:blue", linewidth=1, label="mean over the row's steps")
    axes[0].plot(x, grad_max, color="tab:blue", linewidth=0.8, linestyle=":", label="max")
    axes[0].set(ylabel="||gradient|| of the mean loss", title="Gradient norm")
    axes[1].plot(x, sensitivity, color="tab:red", linewidth=1)
    axes[1].set(ylabel="RMS(F(u + d) - F(u)) / RMS(d)", title="Output sensitivity to a small input perturbation")
    for ax, values in ((axes[0], np.concatenate([grad, grad_max])), (axes[1], sensitivity)):
        if _wants_log(values):
            ax.set_yscale("log")
        ax.set_xlabel(f"training images ({unit})")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    _save(figure, path)
    return True


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
