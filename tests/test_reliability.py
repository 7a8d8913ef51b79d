"""Issue 6 at library level: hostile and broken input gives one clear MpdiffError line naming the file or
field, nothing is overwritten, no pickle payload runs, and numerical faults stop a run cleanly.

Every test here is a row of the table in docs/RELIABILITY.md. The same inputs through the command line
and the table of invalid options (library and command line) are in tests/test_cli.py; the dataset rows at
library level are in tests/test_data.py; the snapshot-listing errors and invalid post-hoc EMA targets in
tests/test_phema.py.
"""

import errno
import glob
import math
import os
import shutil

import pytest
import torch
from conftest import Payload, ckpt, digests, evil_pickle, patch_training_loss, snap, train_tiny

import mpdiff.storage.files
import mpdiff.train.step
from mpdiff.ema.reconstruct import reconstruct
from mpdiff.errors import CheckpointError, ConfigError, MpdiffError, NumericalError
from mpdiff.loading import resolve_network
from mpdiff.presets import get_preset
from mpdiff.storage.files import (
    _FILE_MODE,
    _default_file_mode,
    append_line,
    atomic_write,
    read_jsonl,
    write_text,
)
from mpdiff.storage.tensors import load_tensors, safe_torch_load, save_tensors

# The runs here are conftest.TINY_RUN: 512 images in steps of 64, checkpoints every 128 images, snapshots
# and stats rows every 64. `partial_run` is its first half (read it); `run_copy` a resumable copy of it as
# "run" in the working directory; `other_run` a run with 8 base channels instead of 16.


def temporaries(directory):
    return glob.glob(os.path.join(directory, "**", ".*.tmp"), recursive=True)


def one_line(error):
    message = str(error.value if hasattr(error, "value") else error)
    assert message and "\n" not in message and "Traceback" not in message
    assert isinstance(error.value if hasattr(error, "value") else error, MpdiffError)
    return message


def test_the_payload_is_live(tmp_path):
    """Control for the pickle tests below: unpickling this payload really does run it."""
    import pickle
    marker = tmp_path / "MARKER"
    pickle.loads(evil_pickle(marker))
    assert marker.exists()


# ---- invalid options ----------------------------------------------------------------------------

def test_unknown_preset():
    with pytest.raises(ConfigError) as e:
        get_preset("edm2-img512-huge")
    assert "unknown preset 'edm2-img512-huge'; choose one of: " in one_line(e) and "digits" in str(e.value)


# The table of invalid options (library and command line) is in tests/test_cli.py.


def test_refused_options_do_not_block_the_corrected_command(tmp_path):
    with pytest.raises(ConfigError, match="sigma_rel 0.5 is outside"):
        train_tiny(tmp_path / "run", ema_sigma_rels=(0.5,), slice_nimg=64)
    assert not (tmp_path / "run").exists()
    train_tiny(tmp_path / "run", slice_nimg=64)  # the same command with the mistake fixed


# ---- resuming with different options -------------------------------------------------------------

@pytest.mark.parametrize("changes, differ", [
    (dict(lr=0.02), "lr"),
    (dict(model_channels=8), "model_channels"),
    (dict(seed=1), "seed"),
    (dict(snapshot_nimg=128), "snapshot_nimg"),
    (dict(dataset="./elsewhere"), None),
])
def test_resume_with_different_options_is_refused_and_nothing_is_touched(run_copy, changes, differ):
    run_dir = run_copy
    before = digests(run_dir)
    with pytest.raises(MpdiffError) as e:
        train_tiny(run_dir, **changes)
    message = one_line(e)
    if differ:
        assert message == (f"{run_dir} holds a run with different options ({differ} differ); re-run the original "
                           f"command to resume, or choose a new run_dir")
    else:  # a different dataset fails already when it is opened
        assert "elsewhere: no such file or directory" in message
    assert digests(run_dir) == before


def test_moved_run_directory_resumes(partial_run, tmp_path):
    moved = shutil.copytree(partial_run, tmp_path / "moved")
    train_tiny(moved, slice_nimg=64)
    assert f"resumed from {ckpt(moved, 256)} at 256 images" in (moved / "log.txt").read_text()


def test_unreadable_config_json(run_copy, tmp_path):
    run_dir = run_copy
    (run_dir / "config.json").write_text('{"preset": "digits", ')
    before = digests(run_dir)
    with pytest.raises(ConfigError) as e:
        train_tiny(run_dir)
    assert one_line(e).startswith(f"{run_dir / 'config.json'}: not valid JSON (")
    assert str(e.value).endswith("; move it away or use a new run directory")
    assert digests(run_dir) == before


@pytest.mark.parametrize("text", ["{}", "[]", '"run"', '{"preset": "digits", "network": 3, "run": {}}'])
def test_config_json_that_is_not_a_run_config(run_copy, text):
    (run_copy / "config.json").write_text(text)
    with pytest.raises(ConfigError) as e:
        train_tiny(run_copy)
    assert one_line(e).startswith(f"{run_copy / 'config.json'}: ")


# ---- damaged, foreign and hostile checkpoints ---------------------------------------------------

def _forged(run_dir, other_run):
    """Our metadata (so the config matches) around the tensors of a different architecture."""
    _, meta = load_tensors(ckpt(run_dir, 256))
    tensors, _ = load_tensors(ckpt(other_run, 128))
    save_tensors(ckpt(run_dir, 256), tensors, meta)


DAMAGE = {
    "truncated": (lambda data, marker: data[: len(data) // 2], "not a readable safetensors file ("),
    "zero bytes": (lambda data, marker: b"", "not a readable safetensors file ("),
    "tail cut": (lambda data, marker: data[:-100], "not a readable safetensors file ("),
    "header garbage": (lambda data, marker: b"\xff" * 8 + data[8:], "not a readable safetensors file ("),
    "malicious pickle": (lambda data, marker: evil_pickle(marker), "not a readable safetensors file ("),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE) + ["tensors of another network"])
def test_damaged_newest_checkpoint_is_skipped_and_reported(partial_run, run_copy, other_run, tmp_path, damage):
    run_dir = run_copy
    newest, previous = ckpt(run_dir, 256), ckpt(run_dir, 128)
    marker = tmp_path / "MARKER"
    if damage in DAMAGE:
        corrupt, reason = DAMAGE[damage]
        with open(newest, "rb") as f:
            data = f.read()
        with open(newest, "wb") as f:
            f.write(corrupt(data, marker))
    else:
        _forged(run_dir, other_run)
        reason = "weights do not match the network ("
    train_tiny(run_dir, slice_nimg=128)  # resumes at 128, trains to 256, writes that checkpoint anew
    log = (run_dir / "log.txt").read_text().splitlines()
    skipped = [line for line in log if "skipping damaged checkpoint" in line]
    assert len(skipped) == 1 and f"skipping damaged checkpoint: {newest}: {reason}" in skipped[0]
    assert f"resumed from {previous} at 128 images" in log[log.index(skipped[0]) + 1]
    assert not marker.exists()
    # The rewritten checkpoint is whole and equals the one the damage destroyed (bit-exact resume).
    got, _ = load_tensors(newest)
    want, _ = load_tensors(ckpt(partial_run, 256))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("field", ["optim_param_groups", "ema_sigma_rels", "nimg", "counters"])
def test_checkpoint_with_missing_metadata_is_skipped(run_copy, field):
    tensors, meta = load_tensors(ckpt(run_copy, 256))
    save_tensors(ckpt(run_copy, 256), tensors, {k: v for k, v in meta.items() if k != field})
    train_tiny(run_copy, slice_nimg=128)
    log = (run_copy / "log.txt").read_text()
    assert f"skipping damaged checkpoint: {ckpt(run_copy, 256)}: " in log
    assert f"resumed from {ckpt(run_copy, 128)} at 128 images" in log


def test_checkpoint_of_another_configuration_is_refused(run_copy, other_run, tmp_path):
    run_dir = run_copy
    foreign = ckpt(run_dir, 384)
    shutil.copy(ckpt(other_run, 128), foreign)  # looks newest by its name
    before = digests(run_dir)
    with pytest.raises(ConfigError) as e:
        train_tiny(run_dir)
    assert one_line(e) == (f"{foreign}: checkpoint was written with a different configuration; use a new run "
                           f"directory or the original options")
    assert digests(run_dir) == before


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(run_copy, tmp_path):
    run_dir = run_copy
    for nimg in (128, 256):
        with open(ckpt(run_dir, nimg), "r+b") as f:
            f.truncate(100)
    stats = (run_dir / "stats.jsonl").read_text()
    with pytest.raises(CheckpointError) as e:
        train_tiny(run_dir, slice_nimg=64)
    assert one_line(e) == (f"{run_dir / 'checkpoints'}: none of the 2 checkpoints is usable (reasons in log.txt); "
                           f"move them away to start the run over")
    assert (run_dir / "stats.jsonl").read_text() == stats


def test_torn_stats_line_is_dropped_on_resume(run_copy):
    """A crash mid-append leaves a torn last line in stats.jsonl; resuming rewrites the file without it."""
    run_dir = run_copy
    with open(run_dir / "stats.jsonl", "a") as f:
        f.write('{"nimg": 320, "loss": 0.4')
    train_tiny(run_dir, slice_nimg=64)
    rows = read_jsonl(run_dir / "stats.jsonl")
    lines = (run_dir / "stats.jsonl").read_text().splitlines()
    assert [r["nimg"] for r in rows] == [64, 128, 192, 256, 320] and len(lines) == len(rows)


# ---- network files given to `mpdiff generate` ---------------------------------------------------

def _bad_network_file(kind, run_dir, path):
    good = snap(run_dir, 256, 0.1)
    tensors, meta = load_tensors(good)
    if kind == "truncated":
        data = open(good, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
    elif kind == "zero bytes":
        open(path, "wb").close()
    elif kind == "an image":
        open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + bytes(200))
    elif kind == "a training checkpoint":
        shutil.copy(ckpt(run_dir, 256), path)
    elif kind == "no network config":
        save_tensors(path, tensors, {k: v for k, v in meta.items() if k != "network"})
    elif kind == "config that cannot be built":
        save_tensors(path, tensors, dict(meta, network=dict(meta["network"], model_channels=-16)))
    elif kind == "config value of the wrong type":
        save_tensors(path, tensors, dict(meta, network=dict(meta["network"], model_channels="sixteen")))
    elif kind == "unknown config field":
        save_tensors(path, tensors, dict(meta, network=dict(meta["network"], turbo=True)))
    elif kind == "weights of another shape":
        save_tensors(path, tensors, dict(meta, network=dict(meta["network"], label_dim=5)))
    elif kind == "a tensor missing":
        save_tensors(path, {k: v for k, v in tensors.items() if k != sorted(tensors)[-1]}, meta)
    else:
        raise ValueError(kind)


BAD_NETWORK_FILES = {
    "truncated": "not a readable safetensors file (",
    "zero bytes": "not a readable safetensors file (",
    "an image": "not a readable safetensors file (",
    "a training checkpoint": "not an mpdiff network file (format 'mpdiff-training-state/1', expected "
                             "'mpdiff-network/1')",
    "no network config": "metadata has no network config",
    "config that cannot be built": "network config: model_channels must be positive, got -16",  # the flag's check
    "config value of the wrong type": ("network option model_channels = 'sixteen' has the wrong type",  # patch 10
                                       "its network config cannot be built (TypeError: "),
    "unknown config field": "unknown network option(s) 'turbo'",
    "weights of another shape": "tensor unet.emb_label.weight has shape (32, 10), expected (32, 5)",
    "a tensor missing": "weights do not match its network config (missing [",
}


@pytest.mark.parametrize("kind", sorted(BAD_NETWORK_FILES))
def test_bad_network_file(partial_run, tmp_path, kind):
    path = str(tmp_path / "net.safetensors")
    _bad_network_file(kind, partial_run, path)
    with pytest.raises(MpdiffError) as e:
        resolve_network(path)
    message = one_line(e)
    expect = BAD_NETWORK_FILES[kind]
    assert message.startswith(path + ": ") and any(text in message for text in
                                                   (expect if isinstance(expect, tuple) else (expect,)))


def test_missing_network_file_or_run_dir(tmp_path):
    with pytest.raises(CheckpointError) as e:
        resolve_network(tmp_path / "nothing.safetensors")
    assert one_line(e) == f"{tmp_path / 'nothing.safetensors'}: no such run directory or network file"


# ---- pickles: refused, and their payload never runs --------------------------------------------

def _write_pickle(path, marker, how):
    if how == "pickle":
        path.write_bytes(evil_pickle(marker))
    elif how == "pickle protocol 0":
        path.write_bytes(evil_pickle(marker, protocol=0))
    elif how == "torch.save":
        torch.save({"unet.enc.8x8_conv.weight": torch.zeros(16, 2, 3, 3), "payload": Payload(marker)}, path)


@pytest.mark.parametrize("name, how, expect", [
    ("net.pkl", "pickle", f"refused to load: it would import and call {os.name}.system, which no EDM2 release "
                          f"pickle needs"),  # a .pkl is read as NVIDIA's release format (tests/test_edm2_pickle.py)
    ("net.pickle", "pickle protocol 0", f"refused to load: it would import and call {os.name}.system"),
    ("net.pt", "pickle protocol 0", f"refused to load: it would import and call {os.name}.system"),
    ("net.pt", "torch.save", f"refused to load: it would import and call {os.name}.system"),
    ("net.pth", "torch.save", "refused to load"),
    ("net.safetensors", "pickle", "not a readable safetensors file ("),
    ("net.safetensors", "torch.save", "not a readable safetensors file ("),
])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, name, how, expect):
    marker = tmp_path / "MARKER"
    path = tmp_path / name
    _write_pickle(path, marker, how)
    with pytest.raises(CheckpointError) as e:
        resolve_network(path)
    message = one_line(e)
    assert message.startswith(f"{path}: ") and expect in message
    assert not marker.exists()


def test_safe_torch_load_still_reads_plain_state_dicts(tmp_path):
    torch.save({"w": torch.arange(3.0), "n": 3}, tmp_path / "plain.pt")
    state = safe_torch_load(tmp_path / "plain.pt")
    assert torch.equal(state["w"], torch.arange(3.0)) and state["n"] == 3
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: empty file$"):
        safe_torch_load(tmp_path / "empty.pt")


def test_state_dict_with_non_tensor_values(tmp_path):
    torch.save({"unet.enc.8x8_conv.weight": "not a tensor"}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError) as e:
        resolve_network(tmp_path / "odd.pt")
    assert one_line(e).startswith(f"{tmp_path / 'odd.pt'}: ") and "unet.enc.8x8_conv.weight" in str(e.value)


# ---- EMA snapshots and post-hoc EMA --------------------------------------------------------------

# The snapshot-listing errors and the invalid reconstruction targets are in tests/test_phema.py.


# ---- outputs that cannot be written --------------------------------------------------------------

def test_run_dir_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(MpdiffError) as e:
        train_tiny(tmp_path / "file" / "run")
    assert one_line(e) == f"{tmp_path / 'file' / 'run'}: cannot write here (Not a directory)"


def test_read_only_checkpoint_directory_keeps_the_previous_checkpoint(run_copy, tmp_path, monkeypatch):
    run_dir = run_copy
    checkpoints = run_dir / "checkpoints"
    before = digests(checkpoints)
    os.chmod(checkpoints, 0o500)
    probe = checkpoints / "probe"
    try:
        probe.write_text("")  # root (as in CI containers) ignores the mode: make mkstemp fail as the kernel would
        probe.unlink()
        real_mkstemp = mpdiff.storage.files.tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if os.path.samefile(dir, checkpoints):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
            return real_mkstemp(*args, dir=dir, **kwargs)
        monkeypatch.setattr(mpdiff.storage.files.tempfile, "mkstemp", mkstemp)
    except PermissionError:
        pass
    try:
        with pytest.raises(MpdiffError) as e:
            train_tiny(run_dir, slice_nimg=128)
    finally:
        os.chmod(checkpoints, 0o755)
    assert one_line(e) == f"{ckpt(run_dir, 384)}: cannot write here (Permission denied)"
    assert digests(checkpoints) == before and not temporaries(run_dir)
    load_tensors(ckpt(run_dir, 256))


def test_phema_output_under_a_regular_file(partial_run, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(MpdiffError) as e:
        reconstruct(partial_run, [0.07], out_dir=tmp_path / "file" / "out", progress=False)
    assert one_line(e) == f"{tmp_path / 'file' / 'out'}: cannot open the folder (Not a directory)"


def test_disk_full_while_writing_a_checkpoint(run_copy, monkeypatch):
    """ENOSPC from the kernel when the new checkpoint is flushed: the previous one stays, no temporary is
    left, the error is one line, and the same command continues once there is space again."""
    run_dir = run_copy
    before = digests(run_dir / "checkpoints")
    real_fsync = os.fsync

    def fsync(fd):
        if "training-state" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to tell which file is being flushed")
    with monkeypatch.context() as disk_full:
        disk_full.setattr(os, "fsync", fsync)
        with pytest.raises(MpdiffError) as e:
            train_tiny(run_dir, slice_nimg=128)
    assert one_line(e) == (f"{ckpt(run_dir, 384)}: write failed (disk full); the previous file, if any, is intact")
    assert digests(run_dir / "checkpoints") == before and not temporaries(run_dir)
    load_tensors(ckpt(run_dir, 256))
    train_tiny(run_dir, slice_nimg=128)  # space again: the same command resumes from the intact checkpoint
    starts = [line for line in (run_dir / "log.txt").read_text().splitlines() if "resumed from" in line or "new run" in line]
    assert f"resumed from {ckpt(run_dir, 256)} at 256 images" in starts[-1]
    assert load_tensors(ckpt(run_dir, 384))[1]["nimg"] == 384


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("bug"),
                                     KeyboardInterrupt()])
def test_atomic_write_failure_keeps_the_old_file(tmp_path, failure):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    with pytest.raises(MpdiffError if isinstance(failure, OSError) else type(failure)) as e:
        with atomic_write(path) as f:
            f.write(b"new, half written")
            raise failure
    if isinstance(failure, OSError):
        assert one_line(e) == f"{path}: write failed (disk full); the previous file, if any, is intact"
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["file.bin"]


def test_atomic_write_gives_ordinary_file_modes(tmp_path):
    umask = os.umask(0o022)
    try:
        fileio_mode = _default_file_mode()
    finally:
        os.umask(umask)
    assert fileio_mode == 0o644
    write_text(tmp_path / "a.txt", "x")
    assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == _FILE_MODE  # not mkstemp's 0o600


def test_append_failure_is_one_line(tmp_path):
    with pytest.raises(MpdiffError) as e:
        append_line(tmp_path / "missing" / "log.txt", "x")
    assert one_line(e) == f"{tmp_path / 'missing' / 'log.txt'}: append failed (No such file or directory)"


# ---- numerical faults -----------------------------------------------------------------------------

class PoisonGrad(torch.autograd.Function):
    """Identity forward; backward turns every gradient into inf/nan (finite loss, non-finite gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def faulty_loss(monkeypatch, bad_calls, how="nan loss"):
    """Make the training step's loss misbehave on the given (1-based) calls; one call per step here (no
    accumulation)."""
    calls = []

    def loss(real, *args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        if bad_calls(len(calls)):
            value = value * float("nan") if how == "nan loss" else PoisonGrad.apply(value)
        return value
    patch_training_loss(monkeypatch, loss)
    return calls


def test_persistent_nan_stops_with_the_last_good_checkpoint_intact(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    faulty_loss(monkeypatch, lambda call: call >= 3)  # two good steps (checkpoint at 128), then NaN for good
    with pytest.raises(NumericalError) as e:
        train_tiny(run_dir)
    assert one_line(e) == (f"training produced non-finite losses or gradients for 2 consecutive steps (at 192 "
                           f"images); stopped. Last good checkpoint: {ckpt(run_dir, 128)}")
    assert os.listdir(run_dir / "checkpoints") == [os.path.basename(ckpt(run_dir, 128))]
    tensors, meta = load_tensors(ckpt(run_dir, 128))
    assert meta["nimg"] == 128 and meta["counters"]["nonfinite_loss_steps"] == 0
    assert all(torch.isfinite(t).all() for t in tensors.values())
    rows = read_jsonl(run_dir / "stats.jsonl")  # the bad step before the stop is in the stats
    assert [(r["nimg"], r["nonfinite_loss_steps"], r["nonfinite_grad_steps"]) for r in rows] == \
        [(64, 0, 0), (128, 0, 0), (192, 1, 1)]


@pytest.mark.parametrize("how, loss_steps", [("nan loss", 1), ("inf gradients", 0)])
def test_transient_faults_are_counted_and_training_continues(tmp_path, monkeypatch, how, loss_steps):
    faulty_loss(monkeypatch, lambda call: call in (2, 4, 5), how)  # at most 2 in a row; the limit is 3
    run_dir = tmp_path / "run"
    train_tiny(run_dir, duration=384, max_nonfinite_steps=3)
    rows = read_jsonl(run_dir / "stats.jsonl")
    assert [r["nimg"] for r in rows] == [64, 128, 192, 256, 320, 384]
    assert [r["nonfinite_grad_steps"] for r in rows] == [0, 1, 1, 2, 3, 3]
    assert [r["nonfinite_loss_steps"] for r in rows] == [0, loss_steps, loss_steps, 2 * loss_steps,
                                                         3 * loss_steps, 3 * loss_steps]
    assert [r["consecutive_nonfinite"] for r in rows] == [0, 1, 0, 1, 2, 0]
    assert all(r["nonfinite_grad_values"] > 0 for r in rows[1:])
    tensors, meta = load_tensors(ckpt(run_dir, 384))
    assert all(torch.isfinite(t).all() for t in tensors.values()) and meta["counters"]["nonfinite_grad_steps"] == 3
    assert "training complete" in (run_dir / "log.txt").read_text()


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    from mpdiff.train.loop import Trainer
    trainer = train_tiny(tmp_path / "run", slice_nimg=64)  # a first checkpoint at 64 images
    trainer = Trainer(trainer.plan)
    trainer.resume()
    with torch.no_grad():
        next(trainer.state.net.parameters()).view(-1)[0] = float("inf")
    before = digests(tmp_path / "run" / "checkpoints")
    with pytest.raises(NumericalError) as e:
        trainer.save_checkpoint()
    assert one_line(e) == "network weights became non-finite at 64 images; not overwriting the last good checkpoint"
    assert digests(tmp_path / "run" / "checkpoints") == before


# ---- host synchronisation --------------------------------------------------------------------------

def test_steps_read_nothing_back_and_the_tally_is_read_once_per_status_row(tmp_path, monkeypatch):
    """Between two status rows no mpdiff code in a step reads a tensor's value on the host (item, tolist,
    float, int, bool): the loss and the non-finite guard stay on the device until the row's one read.
    Exempt are the host's own numbers: the data order (a permutation drawn on the host,
    train/data_order.py) and the optimiser's step counters (torch keeps them on the host)."""
    import sys

    import mpdiff.train.step as step_module

    in_step, reads, leaks = [False], [], []
    real_call, real_read = step_module.TrainStep.__call__, step_module.DeviceTally.read

    def call(self, state):
        in_step[0] = True
        try:
            return real_call(self, state)
        finally:
            in_step[0] = False

    def read(self):
        reads.append(self.steps)
        return real_read(self)

    def watch(name):
        real = getattr(torch.Tensor, name)

        def watched(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if in_step[0] and "mpdiff" in caller and not caller.endswith("data_order.py"):
                leaks.append(f"{name} in {caller}:{sys._getframe(1).f_lineno}")
            return real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, watched)

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        watch(name)
    monkeypatch.setattr(step_module.TrainStep, "__call__", call)
    monkeypatch.setattr(step_module.DeviceTally, "read", read)
    run_dir = tmp_path / "run"
    train_tiny(run_dir, status_nimg=256, snapshot_nimg=256, checkpoint_nimg=512)  # 8 steps of 64 images
    assert leaks == []
    assert reads == [4, 4]  # one read at 256 images and one at 512, four steps each
    rows = read_jsonl(run_dir / "stats.jsonl")
    assert [r["nimg"] for r in rows] == [256, 512] and all(math.isfinite(r["loss"]) for r in rows)


def test_the_guard_trips_on_the_device_between_rows_and_names_the_exact_step(tmp_path, monkeypatch):
    """Rows every 4 steps: the guard trips on step 6 (at 320 images, the second bad step in a row) and
    the run stops at the next read, naming 320; nothing after 256 images is written."""
    faulty_loss(monkeypatch, lambda call: call >= 5)
    run_dir = tmp_path / "run"
    with pytest.raises(NumericalError) as e:
        train_tiny(run_dir, status_nimg=256, snapshot_nimg=256, checkpoint_nimg=256)
    assert one_line(e) == (f"training produced non-finite losses or gradients for 2 consecutive steps (at 320 "
                           f"images); stopped. Last good checkpoint: {ckpt(run_dir, 256)}")
    assert os.listdir(run_dir / "checkpoints") == [os.path.basename(ckpt(run_dir, 256))]
    assert [r["nimg"] for r in read_jsonl(run_dir / "stats.jsonl")] == [256]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_step_does_not_synchronise(tmp_path):
    """torch's sync debug mode turns any device-to-host wait inside the steps into an error."""
    import mpdiff.train.step as step_module

    real_call = step_module.TrainStep.__call__

    def call(self, state):
        if self.tally is None:  # the first step sets up the tally
            return real_call(self, state)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_call(self, state)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    step_module.TrainStep.__call__ = call
    try:
        train_tiny(tmp_path / "run", device="cuda", status_nimg=256, snapshot_nimg=256, checkpoint_nimg=512)
    finally:
        step_module.TrainStep.__call__ = real_call
