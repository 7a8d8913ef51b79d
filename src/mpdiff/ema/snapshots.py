"""EMA snapshots: one network file per (training time, EMA profile), the inputs of post-hoc EMA.

Writing them (:func:`save_ema_snapshots`) and listing them with a consistency check
(:func:`list_snapshots`, which reads headers only). Their names come from :mod:`mpdiff.storage.layout`.
"""

import dataclasses
import os
from typing import Optional

from mpdiff.config import SIGMA_REL_MAX, NetworkConfig, check_sigma_rels
from mpdiff.errors import CheckpointError, NumericalError, first_line
from mpdiff.storage.files import parse_json
from mpdiff.storage.layout import check_folder, parse_snapshot_name, snapshot_dir_of, snapshot_name
from mpdiff.storage.network_files import NETWORK_FORMAT, save_network
from mpdiff.storage.tensors import check_dtypes, first_nonfinite, open_safetensors

SNAPSHOT_KIND = "ema-snapshot"


def save_ema_snapshots(ema, snapshot_dir, network_config, step, batch_size, dtype="float32"):
    """Write one snapshot per tracked profile of `ema` (a PowerFunctionEMA) at its current time; returns the paths."""
    states = [ema.averaged_state_dict(index) for index in range(len(ema.sigma_rels))]
    for sigma_rel, state in zip(ema.sigma_rels, states):
        bad = first_nonfinite(state)
        if bad is not None:  # a NaN snapshot would poison every reconstruction that uses it
            raise NumericalError(f"EMA profile {sigma_rel:.3f} holds non-finite values in {bad} at {ema.nimg} "
                                 f"images; no snapshot written")
    return [save_snapshot(os.path.join(snapshot_dir, snapshot_name(ema.nimg, sigma_rel)), state, nimg=ema.nimg,
                          sigma_rel=sigma_rel, step=step, batch_size=batch_size, network_config=network_config,
                          dtype=dtype) for sigma_rel, state in zip(ema.sigma_rels, states)]


def save_snapshot(path, state_dict, nimg, sigma_rel, step, batch_size, network_config, dtype="float32"):
    """Write one EMA snapshot as a loadable network file (kind "ema-snapshot"); returns `path`.

    `network_config` is a NetworkConfig or, for modules that are not mpdiff networks, any JSON-able dict.
    """
    check_sigma_rels(sigma_rel)
    save_network(path, state_dict, network_config, dtype=dtype, nimg=int(nimg), sigma_rel=float(sigma_rel),
                 step=int(step), batch_size=int(batch_size), kind=SNAPSHOT_KIND)
    return path


@dataclasses.dataclass(frozen=True)
class SnapshotRecord:
    path: str
    nimg: int
    sigma_rel: float
    dtype: str
    signature: tuple            # ((tensor name, shape), ...) sorted by name
    network: dict               # network config stored in the file
    step: Optional[int] = None
    batch_size: Optional[int] = None


def _read_snapshot_record(path):
    try:
        with open_safetensors(path, what="snapshot") as f:  # checks the header against the file's size
            check_dtypes(path, f)  # float8 or complex: damage, named before anything is read
            raw_meta = f.metadata() or {}
            signature = tuple(sorted((key, tuple(f.get_slice(key).get_shape())) for key in f.keys()))
    except CheckpointError:
        raise
    except Exception as e:  # any way a header can be garbled
        raise CheckpointError(f"{path}: unreadable or damaged snapshot ({first_line(e)})") from None
    try:
        meta = {k: parse_json(v) for k, v in raw_meta.items()}
    except ValueError as e:  # storage.files.JsonProblem: not JSON, a key twice, nested too deeply
        raise CheckpointError(f"{path}: snapshot metadata: {e}") from None
    if meta.get("format") != NETWORK_FORMAT or meta.get("kind") != SNAPSHOT_KIND:
        raise CheckpointError(f"{path}: not an mpdiff EMA snapshot (format {meta.get('format')!r}, "
                              f"kind {meta.get('kind')!r})")
    nimg, sigma_rel = meta.get("nimg"), meta.get("sigma_rel")
    if not isinstance(nimg, int) or nimg < 0 or not isinstance(sigma_rel, (int, float)) \
            or not 0 < sigma_rel < SIGMA_REL_MAX or not isinstance(meta.get("network"), dict):
        raise CheckpointError(f"{path}: snapshot metadata needs integer nimg >= 0, sigma_rel in (0, 0.2887) and a "
                              f"network config; got nimg={nimg!r}, sigma_rel={sigma_rel!r}")
    named = parse_snapshot_name(path)
    if named and (named.nimg != nimg or named.sigma_rel_text != f"{sigma_rel:.3f}"):
        raise CheckpointError(f"{path}: file name does not match its metadata (nimg={nimg}, sigma_rel={sigma_rel})")
    return SnapshotRecord(path=path, nimg=nimg, sigma_rel=float(sigma_rel), dtype=str(meta.get("dtype")),
                          signature=signature, network=meta["network"], step=meta.get("step"),
                          batch_size=meta.get("batch_size"))


def list_snapshots(path):
    """All EMA snapshots of a run directory or snapshot directory, checked for consistency.

    Snapshots are the files named as mpdiff names them (``ema-<nimg>-<sigma_rel>.safetensors``, see
    :mod:`mpdiff.storage.layout`); other files are not read. Reads every file's header (not the
    tensors). Returns SnapshotRecords sorted by (nimg, sigma_rel); raises CheckpointError naming the
    file for: no snapshots, a damaged or foreign file, metadata that disagrees with the name, a
    different network config, different tensor names/shapes, or a different dtype.
    """
    directory = snapshot_dir_of(path)
    if not check_folder(directory):  # a symlink loop or a file in its place is refused there, in one line
        raise CheckpointError(f"{directory}: no such directory; expected a run directory with snapshots/ in it")
    names = sorted(name for name in os.listdir(directory) if parse_snapshot_name(name))
    if not names:
        raise CheckpointError(f"{directory}: no EMA snapshots (ema-*.safetensors) found")
    records = sorted((_read_snapshot_record(os.path.join(directory, name)) for name in names),
                     key=lambda r: (r.nimg, r.sigma_rel))
    first = records[0]
    for record in records:  # (nimg, sigma_rel) is unique: the name says both, and must agree with the metadata
        if NetworkConfig.completed(record.network) != NetworkConfig.completed(first.network):  # fields added later
            raise CheckpointError(f"{record.path}: network config differs from {first.path}")
        if record.signature != first.signature:
            ours, theirs = dict(record.signature), dict(first.signature)
            diff = sorted(set(ours) ^ set(theirs)) or sorted(k for k in ours if ours[k] != theirs[k])
            raise CheckpointError(f"{record.path}: tensor names/shapes differ from {first.path} (e.g. {diff[0]})")
        if record.dtype != first.dtype:
            raise CheckpointError(f"{record.path}: stored as {record.dtype} but {first.path} is {first.dtype}; "
                                  f"all snapshots must share one dtype")
    return records
