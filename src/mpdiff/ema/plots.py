"""Plots for post-hoc EMA (matplotlib, Agg backend; imported only by commands that draw)."""

import os

import numpy as np

from mpdiff.ema.profiles import (
    power_function_profile,
    reconstructed_profile,
    solve_posthoc_coefficients,
)
from mpdiff.ema.reconstruct import select_inputs, target_sigma_rels
from mpdiff.ema.snapshots import list_snapshots
from mpdiff.storage.files import atomic_write
from mpdiff.storage.layout import RunLayout, check_folder, run_dir_of


def plot_ema_profile(run_dir, sigma_rel, at_nimg=None, out_path=None, num_points=4001):
    """Draw the target power profile at `at_nimg` and its reconstruction from the run's snapshots.

    The y axis is weight per unit of relative time tau / at_nimg (a profile peaks at gamma + 1), the
    x axis training time in kimg; snapshot times are marked. Returns (figure path, max abs error) with
    the error in the y axis's units. Default path: RUN_DIR/phema/profile-{nimg:012d}-{sigma_rel:.3f}.png.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    [sigma_rel] = target_sigma_rels(sigma_rel)
    records = list_snapshots(run_dir)
    at_nimg, inputs = select_inputs(records, at_nimg)
    in_t = np.array([r.nimg for r in inputs], dtype=np.float64)
    in_sigma_rel = np.array([r.sigma_rel for r in inputs])
    coefficients = solve_posthoc_coefficients(in_t, in_sigma_rel, at_nimg, sigma_rel)[:, 0]

    # Sample just before and after every snapshot time so the jumps of the truncated profiles show.
    tau = np.concatenate([np.linspace(0, at_nimg, num_points), in_t * (1 - 1e-9), in_t])
    tau = np.unique(np.clip(tau, 0, at_nimg))
    target = power_function_profile(tau, at_nimg, sigma_rel) * at_nimg
    approx = reconstructed_profile(tau, in_t, in_sigma_rel, coefficients) * at_nimg
    max_error = float(np.max(np.abs(approx - target)))

    if out_path is None:
        out_path = RunLayout(run_dir_of(run_dir)).profile_plot(at_nimg, sigma_rel)
    check_folder(os.path.dirname(os.path.abspath(out_path)))  # atomic_write makes it; a loop or a file is one line
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    axes.plot(tau / 1000, target, color="black", linewidth=2, label=f"target, sigma_rel = {sigma_rel:.3f}")
    axes.plot(tau / 1000, approx, color="tab:orange", linewidth=1,
              label=f"reconstruction from {len(inputs)} snapshots")
    axes.plot(np.unique(in_t) / 1000, np.zeros(len(np.unique(in_t))), "|", color="tab:blue", markersize=8,
              label="snapshot times")
    axes.set_xlabel("training time (kimg)")
    axes.set_ylabel("weight per unit of relative time")
    axes.set_title(f"Post-hoc EMA at {at_nimg / 1000:g} kimg: max |error| = {max_error:.3g} "
                   f"(peak {target.max():.3g})", fontsize=10)
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    with atomic_write(out_path, "wb") as f:
        figure.savefig(f, format="png")
    plt.close(figure)
    return out_path, max_error
