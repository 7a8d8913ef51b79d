"""Training checkpoints: a :class:`~mpdiff.train.state.TrainState` as one safetensors file, and back.

The nested state dict is flattened into tensors named ``net.<key>``, ``optim.<param index>.<key>``,
``ema.<profile index>.<param>`` and ``tema.<param>``, with everything else (counters, Adam's
hyper-parameters, the run's configuration contract) in the JSON metadata. Files are written
atomically, read back before older ones are pruned, and a damaged one is skipped on resume.
"""

import math
import os
import stat

import torch

from mpdiff.errors import CheckpointError, ConfigError, NumericalError, first_line
from mpdiff.storage.files import parse_json, printable
from mpdiff.storage.layout import parse_checkpoint_name
from mpdiff.storage.tensors import first_nonfinite, load_tensors, safetensors_code, save_tensors, tensor_layout
from mpdiff.train.state import HEALTH_COUNTERS

CHECKPOINT_FORMAT = "mpdiff-training-state/1"
# Every tensor of a checkpoint (weights, both Adam moments and steps, EMA averages) is float32 as written; a
# tensor of another dtype (float8, complex, an integer) is damage, and the checkpoint is skipped.
CHECKPOINT_DTYPES = (torch.float32,)


def flatten_state(state, contract):
    """(tensors, metadata) for a TrainState.state_dict() and the run's configuration contract."""
    tensors = {f"net.{k}": v for k, v in state["net"].items()}
    for index, entry in state["optimizer"]["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    for index, average in enumerate(state["ema"]["averages"]):
        for name, value in average.items():
            tensors[f"ema.{index}.{name}"] = value
    meta = {"format": CHECKPOINT_FORMAT, "nimg": state["nimg"], "step": state["step"], "counters": state["counters"],
            "config": contract, "optim_param_groups": state["optimizer"]["param_groups"],
            "ema_sigma_rels": list(state["ema"]["sigma_rels"]), "ema_nimg": state["ema"]["nimg"]}
    if "traditional_ema" in state:
        traditional = state["traditional_ema"]
        for name, value in traditional["averages"][0].items():
            tensors[f"tema.{name}"] = value
        meta["traditional_ema"] = {k: traditional[k] for k in ("halflife_img", "rampup_ratio", "nimg")}
    return tensors, meta


def unflatten_state(tensors, meta):
    """The TrainState.state_dict() that :func:`flatten_state` flattened."""
    def with_prefix(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    optimizer = {"state": {}, "param_groups": meta["optim_param_groups"]}
    for key, value in with_prefix("optim.").items():
        index, name = key.split(".", 1)
        optimizer["state"].setdefault(int(index), {})[name] = value
    averages = [{} for _ in meta["ema_sigma_rels"]]
    for key, value in with_prefix("ema.").items():
        index, name = key.split(".", 1)
        averages[int(index)][name] = value
    state = {"net": with_prefix("net."), "optimizer": optimizer, "nimg": meta["nimg"], "step": meta["step"],
             "counters": meta["counters"],
             "ema": {"sigma_rels": meta["ema_sigma_rels"], "nimg": meta["ema_nimg"], "averages": averages}}
    if "traditional_ema" in meta:
        state["traditional_ema"] = dict(meta["traditional_ema"], averages=[with_prefix("tema.")])
    return state


def save_checkpoint(layout, train_state, contract, keep=2):
    """Write the state at its image count, verify it reads back, then prune all but the `keep` newest."""
    if not train_state.weights_finite():
        raise NumericalError(f"network weights became non-finite at {train_state.nimg} images; "
                             f"not overwriting the last good checkpoint")
    path = layout.checkpoint(train_state.nimg)
    save_tensors(path, *flatten_state(train_state.state_dict(), contract))
    load_tensors(path, dtypes=CHECKPOINT_DTYPES)  # the new file must read back before an older one is removed
    # Only readable checkpoints count towards `keep`, and only they are pruned: a damaged newer file (a
    # zero-byte one, say) never costs an older good one, and is left for its owner to look at.
    older = [p for _, p in layout.checkpoints() if p != path and _is_regular(p) and _readable(p)]
    for stale in older[:max(0, len(older) - (keep - 1))]:
        os.remove(stale)
    return path


def _readable(path):
    """Whether a checkpoint's header reads as one of ours (its format, float32 tensors that tile the file),
    without reading its tensors."""
    try:
        _, tensors, metadata = tensor_layout(path)
        codes = {safetensors_code(dtype) for dtype in CHECKPOINT_DTYPES}
        return parse_json(metadata.get("format", "null")) == CHECKPOINT_FORMAT \
            and all(entry["dtype"] in codes for entry in tensors.values())
    except (CheckpointError, ValueError, KeyError, TypeError, OSError):
        return False


def load_checkpoint(path, train_state, contract, duration=None):
    """Restore `train_state` from `path`; CheckpointError or ConfigError (naming the file) when it does not fit."""
    tensors, meta = load_tensors(path, dtypes=CHECKPOINT_DTYPES)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an mpdiff training checkpoint")
    if _upgraded(meta.get("config")) != contract:
        raise ConfigError(f"{path}: checkpoint was written with a different configuration; "
                          f"use a new run directory or the original options")
    check_metadata(path, meta, contract, duration)
    check_optimizer_groups(path, meta.get("optim_param_groups"), train_state.optimizer)
    bad = first_nonfinite(tensors)
    if bad is not None:  # never resume from (or call "good") a state that holds NaN or infinity
        raise CheckpointError(f"{path}: tensor {bad} holds non-finite values")
    try:
        train_state.load_state_dict(unflatten_state(tensors, meta), source=path)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: incomplete training state ({type(e).__name__}: {first_line(e, 120)})") from None


def _upgraded(stored):
    """A stored contract with the network fields added since it was written (NetworkConfig.completed)."""
    from mpdiff.config import NetworkConfig

    if isinstance(stored, dict) and isinstance(stored.get("network"), dict):
        return {**stored, "network": NetworkConfig.completed(stored["network"])}
    return stored


def check_metadata(path, meta, contract, duration=None):
    """Every number in a checkpoint's metadata must be consistent with the run and its file name."""
    training = contract["training"]
    batch = training["batch"]
    duration = training.get("duration", 2 ** 63) if duration is None else duration
    nimg, step = meta.get("nimg"), meta.get("step")
    if not _count(nimg) or not _count(step) or nimg > duration or nimg % batch or step != nimg // batch:
        raise CheckpointError(f"{path}: inconsistent image count {printable(str(nimg)[:24])} / step "
                              f"{printable(str(step)[:24])} "
                              f"(batch {batch}, duration {duration})")
    if parse_checkpoint_name(path) not in (None, nimg):
        raise CheckpointError(f"{path}: file name does not match its image count {nimg}")
    if meta.get("ema_nimg") != nimg or meta.get("ema_sigma_rels") != list(training["ema_sigma_rels"]):
        raise CheckpointError(f"{path}: EMA state does not match the run (time or tracked lengths)")
    counters = meta.get("counters")
    if not isinstance(counters, dict) or set(counters) != set(HEALTH_COUNTERS) | {"elapsed_sec"} \
            or not all(_count(counters[k]) for k in HEALTH_COUNTERS) \
            or not (isinstance(counters["elapsed_sec"], (int, float)) and math.isfinite(counters["elapsed_sec"])
                    and counters["elapsed_sec"] >= 0):
        raise CheckpointError(f"{path}: damaged counters in its metadata")


def check_optimizer_groups(path, stored, optimizer):
    """The optimiser settings in a checkpoint must be those this run's Adam has: a stored `maximize` would
    train by gradient ascent, `amsgrad` would need state the file lacks. Only the learning rate, set again
    at every step, may differ (a finite number at least 0)."""
    ours = optimizer.state_dict()["param_groups"]
    if not (isinstance(stored, list) and len(stored) == len(ours) and all(isinstance(g, dict) for g in stored)):
        raise CheckpointError(f"{path}: optimiser settings missing or of another shape")
    for theirs, mine in zip(stored, ours):
        if set(theirs) != set(mine):
            extra = sorted(set(theirs) ^ set(mine), key=str)
            raise CheckpointError(f"{path}: optimiser settings differ from this run's Adam "
                                  f"({printable(', '.join(map(str, extra))[:60])})")
        for key, value in mine.items():
            given = theirs[key]
            if key == "lr":
                if not (isinstance(given, (int, float)) and not isinstance(given, bool) and math.isfinite(given)
                        and given >= 0):
                    raise CheckpointError(f"{path}: optimiser learning rate {printable(str(given)[:24])} is unusable")
            elif (list(given) if isinstance(given, (list, tuple)) else given) != \
                    (list(value) if isinstance(value, (list, tuple)) else value):
                raise CheckpointError(f"{path}: optimiser setting {key} is {printable(str(given)[:24])}, this "
                                      f"run's Adam has {value}")


def _count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def resume(layout, train_state, contract, say, duration=None):
    """Load the newest usable checkpoint (damaged ones are reported through `say` and skipped).

    Returns its path, or None for a new run. Raises when checkpoints exist but none is usable: a run
    is never silently restarted from scratch over its own checkpoints.
    """
    paths = [p for _, p in reversed(layout.checkpoints())]
    for path in paths:
        try:
            load_checkpoint(path, train_state, contract, duration)
        except CheckpointError as e:
            say(f"skipping damaged checkpoint: {e}")
            continue
        return path
    if paths:
        raise CheckpointError(f"{layout.checkpoint_dir}: none of the {len(paths)} checkpoints is usable "
                              f"(reasons in log.txt); move them away to start the run over")
    return None


def _is_regular(path):
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
