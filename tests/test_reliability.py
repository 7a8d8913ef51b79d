"""Issue 6 at library level: hostile and broken input gives one clear MpdiffError line naming the file or
field, nothing is overwritten, no pickle payload runs, and numerical faults stop a run cleanly.

Every test here is a row of the table in docs/RELIABILITY.md. The same inputs through the command line
are in tests/test_cli.py; the dataset rows at library level are in tests/test_data.py.
"""

import errno
import glob
import hashlib
import os
import pathlib
import pickle
import shlex
import shutil

import pytest
import torch

from mpdiff.threads import torch_threads

import mpdiff.fileio as fileio
from mpdiff import training
from mpdiff.checkpoint import load_network
from mpdiff.errors import CheckpointError, ConfigError, MpdiffError, NumericalError
from mpdiff.fileio import append_line, atomic_write, load_tensors, read_jsonl, safe_torch_load, save_tensors
from mpdiff.generation import resolve_network
from mpdiff.phema import list_snapshots, reconstruct, save_snapshot
from mpdiff.presets import get_preset
from mpdiff.training import RunOptions, Trainer, resolve_config, train

TINY_NET = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=())
TINY_TRAIN = dict(batch=64, duration=512, decay=10, rampup_img=1024)


def options(run_dir, **changes):
    base = dict(run_dir=str(run_dir), status_nimg=64, snapshot_nimg=128, checkpoint_nimg=128, progress=False,
                tensorboard=False, grid_steps=2, max_nonfinite_steps=2)
    base.update(changes)
    return RunOptions(**base)


def tiny_train(run_dir, network=None, training_changes=None, **option_changes):
    return train("digits", options(run_dir, **option_changes), dict(TINY_NET, **(network or {})),
                 dict(TINY_TRAIN, **(training_changes or {})))


def single_thread():
    """Tiny networks run fastest on one thread, and do not stall when other processes load the cores."""
    return torch_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory):
    """Half of a 512-image run, trained as the relative run directory "run": checkpoints and snapshots at 128
    and 256 images. (A run's config records its --run-dir, so only a copy at the same relative path resumes;
    see test_moved_run_directory_resumes.)"""
    home = tmp_path_factory.mktemp("partial")
    cwd = os.getcwd()
    os.chdir(home)
    try:
        with single_thread():
            tiny_train("run", slice_nimg=256)
    finally:
        os.chdir(cwd)
    return home / "run"


@pytest.fixture
def run_copy(partial_run, tmp_path, monkeypatch):
    """A resumable copy of partial_run, as "run" in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(partial_run, "run")
    return pathlib.Path("run")


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    """A run of a different architecture (8 base channels instead of 16)."""
    run_dir = tmp_path_factory.mktemp("other")
    with single_thread():
        tiny_train(run_dir, network=dict(model_channels=8), slice_nimg=128)
    return run_dir


def ckpt(run_dir, nimg):
    return os.path.join(run_dir, "checkpoints", f"training-state-{nimg:012d}.safetensors")


def snap(run_dir, nimg, sigma_rel):
    return os.path.join(run_dir, "snapshots", f"ema-{nimg:012d}-{sigma_rel:.3f}.safetensors")


def digests(directory):
    """{relative path: sha256} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def temporaries(directory):
    return glob.glob(os.path.join(directory, "**", ".*.tmp"), recursive=True)


def one_line(error):
    message = str(error.value if hasattr(error, "value") else error)
    assert message and "\n" not in message and "Traceback" not in message
    assert isinstance(error.value if hasattr(error, "value") else error, MpdiffError)
    return message


class Payload:
    """A pickle that runs a shell command when unpickled (what a hostile checkpoint would carry)."""

    def __init__(self, marker):
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def evil_pickle(marker, protocol=pickle.HIGHEST_PROTOCOL):
    return pickle.dumps(Payload(marker), protocol=protocol)


def test_the_payload_is_live(tmp_path):
    """Control for the pickle tests below: unpickling this payload really does run it."""
    marker = tmp_path / "MARKER"
    pickle.loads(evil_pickle(marker))
    assert marker.exists()


# ---- invalid options ----------------------------------------------------------------------------

def test_unknown_preset():
    with pytest.raises(ConfigError) as e:
        get_preset("edm2-img512-huge")
    assert "unknown preset 'edm2-img512-huge'; choose one of: " in one_line(e) and "digits" in str(e.value)


def option_case(name, run_changes, training_changes, network_changes, expect):
    return pytest.param(run_changes, training_changes, network_changes, expect, id=name)


INVALID_OPTIONS = [
    option_case("batch-gpu does not divide batch", dict(batch_gpu=48), {}, {}, "--batch-gpu 48 must divide --batch 64"),
    option_case("batch-gpu negative", dict(batch_gpu=-32), {}, {}, "--batch-gpu -32 must divide --batch 64"),
    option_case("duration not a multiple", {}, dict(duration=100), {},
                "--duration 100 images must be a positive multiple of --batch 64"),
    option_case("duration zero", {}, dict(duration=0), {}, "--duration 0 images must be a positive multiple"),
    option_case("status not a multiple", dict(status_nimg=100), {}, {},
                "--status 100 images must be a positive multiple of --batch 64"),
    option_case("snapshot not a multiple", dict(snapshot_nimg=96), {}, {},
                "--snapshot 96 images must be a positive multiple"),
    option_case("checkpoint not a multiple", dict(checkpoint_nimg=32), {}, {},
                "--checkpoint 32 images must be a positive multiple"),
    option_case("sample not a multiple", dict(sample_nimg=100), {}, {},
                "--sample 100 images must be a positive multiple"),
    option_case("slice negative", dict(slice_nimg=-64), {}, {}, "--slice -64 images must be a positive multiple"),
    option_case("batch negative", {}, dict(batch=-64), {}, "--batch must be positive, got -64"),
    option_case("batch zero", {}, dict(batch=0), {}, "--batch must be positive, got 0"),
    option_case("max-nonfinite-steps zero", dict(max_nonfinite_steps=0), {}, {},
                "--max-nonfinite-steps must be at least 1"),
    option_case("keep-checkpoints zero", dict(keep_checkpoints=0), {}, {}, "--keep-checkpoints must be at least 1"),
    option_case("snapshot dtype", dict(snapshot_dtype="float64"), {}, {}, "unknown storage dtype 'float64'"),
    option_case("EMA length out of range", {}, dict(ema_sigma_rels=(0.05, 0.5)), {},
                "sigma_rel 0.5 is outside the valid range"),
    option_case("levels do not fit the resolution", {}, {}, dict(channel_mult=(1, 2, 2, 2, 2)),
                "cannot be halved 4 times"),
    option_case("lr negative", {}, dict(lr=-0.01), {}, "--lr"),
    option_case("lr zero", {}, dict(lr=0.0), {}, "--lr"),
    option_case("decay negative", {}, dict(decay=-5), {}, "--decay"),
    option_case("rampup negative", {}, dict(rampup_img=-64), {}, "--rampup"),
    option_case("P_std negative", {}, dict(P_std=-1.0), {}, "--p-std"),
    option_case("dropout above 1", {}, {}, dict(dropout=2.0), "--dropout"),
    option_case("channels zero", {}, {}, dict(model_channels=0), "--channels"),
    option_case("channels negative", {}, {}, dict(model_channels=-16), "--channels"),
    option_case("batch-gpu zero", dict(batch_gpu=0), {}, {}, "--batch-gpu"),
]


@pytest.mark.parametrize("run_changes, training_changes, network_changes, expect", INVALID_OPTIONS)
def test_invalid_options(tmp_path, run_changes, training_changes, network_changes, expect):
    with pytest.raises(MpdiffError) as e:
        tiny_train(tmp_path / "run", network=network_changes, training_changes=training_changes,
                   **{"slice_nimg": 64, **run_changes})  # one step if the option is wrongly accepted
    assert expect in one_line(e)


def test_refused_options_do_not_block_the_corrected_command(tmp_path):
    with pytest.raises(ConfigError, match="sigma_rel 0.5 is outside"):
        tiny_train(tmp_path / "run", training_changes=dict(ema_sigma_rels=(0.5,)), slice_nimg=64)
    assert not (tmp_path / "run" / "config.json").exists()
    tiny_train(tmp_path / "run", slice_nimg=64)  # the same command with the mistake fixed


# ---- resuming with different options -------------------------------------------------------------

@pytest.mark.parametrize("network, training_changes, run_changes, differ", [
    ({}, dict(lr=0.02), {}, "training"),
    (dict(model_channels=8), {}, {}, "network"),
    ({}, {}, dict(seed=1), "run"),
    ({}, {}, dict(dataset="./elsewhere"), None),
])
def test_resume_with_different_options_is_refused_and_nothing_is_touched(run_copy, tmp_path, network,
                                                                          training_changes, run_changes, differ):
    run_dir = run_copy
    before = digests(run_dir)
    with pytest.raises(MpdiffError) as e:
        tiny_train(run_dir, network=network, training_changes=training_changes, **run_changes)
    message = one_line(e)
    if differ:
        assert message.startswith(f"{run_dir} holds a run with different options (") and differ in message
        assert message.endswith("re-run the original command to resume, or choose a new --run-dir")
    else:  # a different dataset fails already when it is opened
        assert "elsewhere: no such file or directory" in message
    assert digests(run_dir) == before


def test_moved_run_directory_resumes(partial_run, tmp_path):
    moved = shutil.copytree(partial_run, tmp_path / "moved")
    tiny_train(moved, slice_nimg=64)
    assert f"resumed from {ckpt(moved, 256)} at 256 images" in (moved / "log.txt").read_text()


def test_unreadable_config_json(run_copy, tmp_path):
    run_dir = run_copy
    (run_dir / "config.json").write_text('{"preset": "digits", ')
    before = digests(run_dir)
    with pytest.raises(ConfigError) as e:
        tiny_train(run_dir)
    assert one_line(e).startswith(f"{run_dir / 'config.json'}: unreadable (")
    assert "move it away or use a new --run-dir" in str(e.value)
    assert digests(run_dir) == before


@pytest.mark.parametrize("text", ["{}", "[]", '"run"', '{"preset": "digits", "network": 3, "run": {}}'])
def test_config_json_that_is_not_a_run_config(run_copy, text):
    (run_copy / "config.json").write_text(text)
    with pytest.raises(ConfigError) as e:
        tiny_train(run_copy)
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
    tiny_train(run_dir, slice_nimg=128)  # resumes at 128, trains to 256, writes that checkpoint anew
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
    tiny_train(run_copy, slice_nimg=128)
    log = (run_copy / "log.txt").read_text()
    assert f"skipping damaged checkpoint: {ckpt(run_copy, 256)}: " in log
    assert f"resumed from {ckpt(run_copy, 128)} at 128 images" in log


def test_checkpoint_of_another_configuration_is_refused(run_copy, other_run, tmp_path):
    run_dir = run_copy
    foreign = ckpt(run_dir, 384)
    shutil.copy(ckpt(other_run, 128), foreign)  # looks newest by its name
    before = digests(run_dir)
    with pytest.raises(ConfigError) as e:
        tiny_train(run_dir)
    assert one_line(e) == (f"{foreign}: checkpoint was written with a different configuration; use a new --run-dir "
                           f"or the original options")
    assert digests(run_dir) == before


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(run_copy, tmp_path):
    run_dir = run_copy
    for nimg in (128, 256):
        with open(ckpt(run_dir, nimg), "r+b") as f:
            f.truncate(100)
    stats = (run_dir / "stats.jsonl").read_text()
    with pytest.raises(CheckpointError) as e:
        tiny_train(run_dir, slice_nimg=64)
    assert "none of the 2 checkpoints is usable" in one_line(e)
    assert (run_dir / "stats.jsonl").read_text() == stats


def test_torn_stats_line_is_dropped_on_resume(run_copy):
    """A crash mid-append leaves a torn last line in stats.jsonl; resuming rewrites the file without it."""
    run_dir = run_copy
    with open(run_dir / "stats.jsonl", "a") as f:
        f.write('{"nimg": 320, "loss": 0.4')
    tiny_train(run_dir, slice_nimg=64)
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
    "config that cannot be built": "its network config cannot be built (RuntimeError: ",
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
    ("net.pkl", "pickle", "refused to load: it is a general Python pickle, not a torch weights file, and unpickling "
                          "it could run code"),
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

def _snapshot_case(case, run_dir, other_run, marker):
    """Break the copied run's snapshots; return the path the error must name."""
    target = snap(run_dir, 128, 0.05)
    if case == "no such directory":
        return os.path.join(run_dir, "nowhere")
    if case == "no snapshots":
        for path in glob.glob(os.path.join(run_dir, "snapshots", "*")):
            os.remove(path)
        return os.path.join(run_dir, "snapshots")
    if case == "duplicate":
        shutil.copy(target, target.replace("0.050", "0.050-copy"))
        return target  # sorted after the copy
    if case == "another architecture":
        shutil.copy(snap(other_run, 128, 0.05), target)
        return snap(run_dir, 128, 0.1)  # the first file whose config differs from the (foreign) first one
    if case in ("float16", "tensor missing"):
        target = snap(run_dir, 256, 0.05)  # a later file: the first one is the reference the others must match
        net, meta = load_network(target)
        state = net.state_dict()
        if case == "tensor missing":
            state.pop(sorted(state)[0])
        save_snapshot(target, state, nimg=256, sigma_rel=0.05, step=4, batch_size=64, network_config=meta["network"],
                      dtype="float16" if case == "float16" else "float32")
        return target
    if case == "truncated":
        data = open(target, "rb").read()
        open(target, "wb").write(data[: len(data) // 2])
        return target
    if case == "pickle":
        open(target, "wb").write(evil_pickle(marker))
        return target
    if case == "name and metadata disagree":
        renamed = snap(run_dir, 192, 0.05)
        os.rename(target, renamed)
        return renamed
    raise ValueError(case)


SNAPSHOT_CASES = {
    "no such directory": "no such directory; expected a run directory with snapshots/ in it",
    "no snapshots": "no EMA snapshots (ema-*.safetensors) found",
    "duplicate": "duplicates the snapshot nimg=128, sigma_rel=0.05 of ",
    "another architecture": "network config differs from ",
    "float16": "stored as float16 but ",
    "tensor missing": "tensor names/shapes differ from ",
    "truncated": "unreadable or damaged snapshot (",
    "pickle": "unreadable or damaged snapshot (",
    "name and metadata disagree": "file name does not match its metadata (nimg=128, sigma_rel=0.05)",
}


@pytest.mark.parametrize("case", sorted(SNAPSHOT_CASES))
def test_missing_duplicated_or_mismatched_snapshots(run_copy, other_run, tmp_path, case):
    run_dir = run_copy
    marker = tmp_path / "MARKER"
    named = _snapshot_case(case, os.fspath(run_dir), other_run, marker)
    source = named if case == "no such directory" else run_dir
    for attempt in (lambda: list_snapshots(source), lambda: reconstruct(source, [0.07], progress=False)):
        with pytest.raises(CheckpointError) as e:
            attempt()
        message = one_line(e)
        assert message.startswith(f"{named}: ") and SNAPSHOT_CASES[case] in message
    assert not os.path.exists(os.path.join(run_dir, "phema")) and not marker.exists()


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, 0.2887, 0.5, float("nan"), float("inf")])
def test_sigma_rel_out_of_range(partial_run, sigma_rel):
    with pytest.raises(ConfigError) as e:
        reconstruct(partial_run, [0.05, sigma_rel], progress=False)
    assert "is outside the valid range (0, 0.2887) of the power-function EMA" in one_line(e)


@pytest.mark.parametrize("at_nimg", [320, 10 ** 12, 0, -64, 100.5])
def test_reconstruction_time_outside_the_snapshots(partial_run, at_nimg):
    with pytest.raises(ConfigError) as e:
        reconstruct(partial_run, [0.07], at_nimg=at_nimg, progress=False)
    assert one_line(e) == (f"reconstruction time {at_nimg} images must be an integer in (0, 256] "
                           f"(the last snapshot time)")


# ---- outputs that cannot be written --------------------------------------------------------------

def test_run_dir_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(MpdiffError) as e:
        tiny_train(tmp_path / "file" / "run")
    assert one_line(e) == f"{tmp_path / 'file' / 'run' / 'config.json'}: cannot write here (Not a directory)"


def test_read_only_checkpoint_directory_keeps_the_previous_checkpoint(run_copy, tmp_path, monkeypatch):
    run_dir = run_copy
    checkpoints = run_dir / "checkpoints"
    before = digests(checkpoints)
    os.chmod(checkpoints, 0o500)
    probe = checkpoints / "probe"
    try:
        probe.write_text("")  # root (as in CI containers) ignores the mode: make mkstemp fail as the kernel would
        probe.unlink()
        real_mkstemp = fileio.tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if os.path.samefile(dir, checkpoints):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
            return real_mkstemp(*args, dir=dir, **kwargs)
        monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)
    except PermissionError:
        pass
    try:
        with pytest.raises(MpdiffError) as e:
            tiny_train(run_dir, slice_nimg=128)
    finally:
        os.chmod(checkpoints, 0o755)
    assert one_line(e) == f"{ckpt(run_dir, 384)}: cannot write here (Permission denied)"
    assert digests(checkpoints) == before and not temporaries(run_dir)
    load_tensors(ckpt(run_dir, 256))


def test_phema_output_under_a_regular_file(partial_run, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(MpdiffError) as e:
        reconstruct(partial_run, [0.07], out_dir=tmp_path / "file" / "out", progress=False)
    assert one_line(e).endswith(": cannot write here (Not a directory)")


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
            tiny_train(run_dir, slice_nimg=128)
    assert one_line(e) == (f"{ckpt(run_dir, 384)}: write failed (disk full); the previous file, if any, is intact")
    assert digests(run_dir / "checkpoints") == before and not temporaries(run_dir)
    load_tensors(ckpt(run_dir, 256))
    tiny_train(run_dir, slice_nimg=128)  # space again: the same command resumes from the intact checkpoint
    assert f"resumed from {ckpt(run_dir, 256)} at 256 images" in (run_dir / "log.txt").read_text().splitlines()[-1]
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
        fileio_mode = fileio._default_file_mode()
    finally:
        os.umask(umask)
    assert fileio_mode == 0o644
    fileio.write_text(tmp_path / "a.txt", "x")
    assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == fileio._FILE_MODE  # not mkstemp's 0o600


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
    """Make edm2_loss misbehave on the given (1-based) calls; one call per step here (no accumulation)."""
    real = training.edm2_loss
    calls = []

    def loss(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        if bad_calls(len(calls)):
            value = value * float("nan") if how == "nan loss" else PoisonGrad.apply(value)
        return value
    monkeypatch.setattr(training, "edm2_loss", loss)
    return calls


def test_persistent_nan_stops_with_the_last_good_checkpoint_intact(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    faulty_loss(monkeypatch, lambda call: call >= 3)  # two good steps (checkpoint at 128), then NaN for good
    with pytest.raises(NumericalError) as e:
        tiny_train(run_dir)
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
    tiny_train(run_dir, training_changes=dict(duration=384), max_nonfinite_steps=3)
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
    opts = options(tmp_path / "run")
    config, net_config, train_config, dataset = resolve_config("digits", opts, TINY_NET, TINY_TRAIN)
    trainer = Trainer(config, net_config, train_config, dataset, opts)
    with torch.no_grad():
        next(trainer.net.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NumericalError) as e:
        trainer.save_checkpoint()
    assert one_line(e) == "network weights became non-finite at 0 images; not overwriting the last good checkpoint"
    assert not (tmp_path / "run" / "checkpoints").exists()
