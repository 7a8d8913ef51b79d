"""Loading a network from what the user points at, and writing generated samples as a dataset."""

import glob
import os

import numpy as np
import torch

from .checkpoint import load_network
from .data import decode_images, write_dataset_json
from .errors import CheckpointError, MpdiffError
from .fileio import safe_torch_load
from .images import save_grid, save_png
from .sampling import generate


def resolve_network(source, sigma_rel=None, device="cpu"):
    """Load a network from a run directory, a network/snapshot file, or an official-layout state_dict.

    * run directory: its newest EMA snapshot (or post-hoc reconstruction, if `sigma_rel` names one)
      with the requested sigma_rel (default: the longest tracked profile);
    * ``.safetensors`` network file (snapshot, reconstruction, exported network);
    * ``.pt``/``.pth`` holding a plain state_dict in NVIDIA's layout (loaded with weights_only).
    Returns (net, description).
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        path = _pick_from_run(source, sigma_rel)
        net, _ = load_network(path, device=device)
        return net, path
    if not os.path.exists(source):
        raise CheckpointError(f"{source}: no such run directory or network file")
    if source.endswith((".pt", ".pth", ".pkl", ".pickle")):
        from .compat import load_edm2
        state = safe_torch_load(source)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{source}: expected a state_dict (a dict of tensors)")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{source}: expected a state_dict of tensors, but {str(key)[:80]!r} is a "
                                      f"{type(value).__name__}")
        return load_edm2(state, device=device).requires_grad_(False), source
    net, _ = load_network(source, device=device)
    return net, source


def _pick_from_run(run_dir, sigma_rel):
    from .phema import list_snapshots
    candidates = []
    phema_dir = os.path.join(run_dir, "phema")
    if sigma_rel is not None and os.path.isdir(phema_dir):
        for path in sorted(glob.glob(os.path.join(phema_dir, "phema-*.safetensors"))):
            nimg, value = os.path.basename(path)[len("phema-"):-len(".safetensors")].split("-")
            if abs(float(value) - sigma_rel) < 5e-4:
                candidates.append((int(nimg), path))
    if candidates:
        return max(candidates)[1]
    records = list_snapshots(run_dir)
    tracked = sorted({r.sigma_rel for r in records})
    want = tracked[-1] if sigma_rel is None else sigma_rel
    matching = [r for r in records if abs(r.sigma_rel - want) < 5e-4]
    if not matching:
        raise CheckpointError(f"{run_dir}: no snapshot or reconstruction with sigma_rel {want:.3f} "
                              f"(tracked: {', '.join(f'{s:.3f}' for s in tracked)}); "
                              f"run `mpdiff phema {run_dir} --sigma-rel {want}` first")
    return max(matching, key=lambda r: r.nimg).path


def write_samples(out_dir, images_uint8, seeds, classes, num_classes=0, grid_path=None):
    """One PNG per seed ({seed:06d}.png), an EDM2-style dataset.json, and a grid image.

    The grid goes next to the folder (default ``<out_dir>-grid.png``), not inside it, so that the
    folder stays a valid dataset (every image in it has a label entry).
    """
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise MpdiffError(f"{out_dir}: cannot write here ({e.strerror or e})") from None
    entries = []
    for image, seed, cls in zip(images_uint8, seeds, classes):
        name = f"{seed:06d}.png"
        save_png(os.path.join(out_dir, name), image)
        entries.append((name, cls))
    write_dataset_json(out_dir, entries, num_classes=num_classes or None)
    save_grid(grid_path or default_grid_path(out_dir), *_grid_layout(np.asarray(images_uint8), classes))
    return out_dir


def _grid_layout(images, classes, per_class=16, max_images=256):
    """Class-conditional: one column per class, up to `per_class` rows; else the first images."""
    present = sorted({c for c in classes if c is not None})
    if not present:
        return images[:max_images], None
    columns = {c: [i for i, k in enumerate(classes) if k == c][:per_class] for c in present}
    rows = max(len(v) for v in columns.values())
    blank = np.zeros_like(images[0])
    tiles = [images[columns[c][r]] if r < len(columns[c]) else blank for r in range(rows) for c in present]
    return np.stack(tiles), len(present)


def default_grid_path(out_dir):
    return os.path.normpath(os.fspath(out_dir)) + "-grid.png"


def generate_to_folder(net, seeds, out_dir, class_idx=None, grid_path=None, **kwargs):
    images, classes = generate(net, seeds, class_idx=class_idx, **kwargs)
    images = decode_images(images).numpy()
    return write_samples(out_dir, images, list(seeds), classes, num_classes=net.label_dim, grid_path=grid_path)
