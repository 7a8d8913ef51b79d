"""Issue 6 through the command line: bad input ends with exit status 1 and exactly one line `error: ...` on
stderr, without a traceback unless --debug; nothing is overwritten and no pickle payload runs. The table of
invalid training options, through the library and the command line. Property tests for the option and
config parsers, and the config classes' JSON form.

The other library-level rows are in tests/test_reliability.py, tests/test_data.py and tests/test_phema.py.
"""

import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import typing
from fractions import Fraction

import pytest
import torch
from conftest import (
    Payload,
    ckpt,
    digests,
    evil_pickle,
    patch_training_loss,
    pixels,
    png_bytes,
    run_cli,
    tiny_run_flags,
    train_tiny,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mpdiff.cli_options import parse_floats, parse_nimg, parse_range
from mpdiff.config import CONFIG_CLASSES, flag_for
from mpdiff.diffusion.generate import parse_seeds
from mpdiff.errors import ConfigError, MpdiffError
from mpdiff.presets import PRESETS
from mpdiff.storage.tensors import load_tensors

# conftest.TINY_RUN as command-line options. A run made with them has the contract of one made by
# conftest.train_tiny, so the commands here resume `partial_run` (its first 256 images) through `run_copy`.
RUN_ARGS = tiny_run_flags()


def fails(args, *expect, code=1, env=None):
    """Run the command; it must fail with `code` and one stderr line `error: ...` containing `expect`
    (informational lines may come before it: the network `generate` loaded, or a training run's
    "resumed from ..." / "new run ..." notes, which go to stderr with --no-progress)."""
    result = run_cli(*args, env=env)
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("network: ")]
    assert "Traceback" not in result.output
    if code == 2:  # click's own usage errors: usage line, hint, then "Error: ..."
        assert lines[-1].startswith("Error: ")
    else:
        errors = [line for line in lines if line.startswith("error: ") or "Error" in line]
        assert errors == [lines[-1]] and lines[-1].startswith("error: "), result.stderr
    for text in expect:
        assert text in lines[-1], lines[-1]
    return lines[-1]


def succeeds(args):
    result = run_cli(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


# ---- the command line trains the run the library trains ----------------------------------------------

def test_train_command_makes_the_same_run_as_the_library(partial_run):
    result = succeeds(["train", "--run-dir", "run", *RUN_ARGS, "--slice", "128"])
    assert "stopped at 128 images (slice); run the same command again to continue" in result.stdout
    got, meta = load_tensors(ckpt("run", 128))
    want, want_meta = load_tensors(ckpt(partial_run, 128))
    assert meta["config"] == want_meta["config"]  # the resume contract: every option that shapes the result
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


# ---- datasets (library-level rows: tests/test_data.py) -------------------------------------------

def png(size=8, mode="L", seed=0):
    return png_bytes(pixels(seed, size, 1 if mode == "L" else 3))


BAD_DATASETS = {
    "corrupt image": ({"a.png": png(), "b.png": b"this is not an image"}, "b.png: cannot read image ("),
    "truncated image": ({"a.png": png(), "b.png": png(seed=1)[:40]}, "b.png: cannot read image ("),
    "zero-byte image": ({"a.png": png(), "b.png": b""}, "b.png: cannot read image ("),
    "mixed sizes": ({"a.png": png(8), "b.png": png(16)}, "b.png: image is 16x16 pixels but"),
    "mixed channels": ({"a.png": png(8, "L"), "b.png": png(8, "RGB")}, "b.png: image is RGB (3 channels) but"),
    "malformed dataset.json": ({"a.png": png(), "dataset.json": b'{"labels": [["a.png", 1]'},
                               "dataset.json: not valid JSON ("),
    "dataset.json names a missing file": ({"a.png": png(), "dataset.json": b'{"labels": [["a.png", 1], ["b.png", 2]]}'},
                                          "labels[1] names 'b.png', which is not an image"),
    "image without a label": ({"a.png": png(), "b.png": png(seed=1), "dataset.json": b'{"labels": [["a.png", 1]]}'},
                              "image 'b.png' has no label"),
    "no images": ({"notes.txt": b"hello"}, "no images found"),
}


# Problems of the image files themselves are met when a step first reads the file (a folder or ZIP is
# streamed, not decoded at the start): the run stops with the file's line and keeps the state so far.
MET_IN_TRAINING = ("corrupt image", "truncated image", "zero-byte image", "mixed sizes", "mixed channels")


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_train_on_a_bad_dataset(tmp_path, case):
    files, expect = BAD_DATASETS[case]
    for name, data in files.items():
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / name).write_bytes(data)
    line = fails(["train", "--data", tmp_path / "data", "--run-dir", tmp_path / "run", *RUN_ARGS], expect)
    if case in MET_IN_TRAINING:  # met when first read (the dynamics probe, or the first step): no state to keep
        assert not list((tmp_path / "run").glob("checkpoints/*.safetensors")), line
    else:
        assert not (tmp_path / "run").exists()  # refused before anything is written


def test_train_on_a_missing_dataset(tmp_path):
    fails(["train", "--data", tmp_path / "nowhere", "--run-dir", tmp_path / "run", *RUN_ARGS],
          f"{tmp_path / 'nowhere'}: no such file or directory")
    assert not (tmp_path / "run").exists()


def test_eval_of_a_missing_folder(tmp_path):
    fails(["eval", tmp_path / "nowhere"], f"{tmp_path / 'nowhere'}: no such file or directory")


# ---- invalid training options: one table for the library and the command line ----------------------

def option_error(name, expect, args=None, **fields):
    """A row: config `fields` given to the library and/or `args` given to `mpdiff train` must be refused with
    one line containing `expect`, in which {field} stands for the field's name in the library's message
    and for its flag on the command line. Rows without fields are the command line's own parsing; rows
    without args cannot be said on the command line."""
    return pytest.param(args, fields or None, expect, id=name)


OPTION_ERRORS = [
    # Values checked when a run is set up (mpdiff.train.run.validate_run).
    option_error("batch-gpu does not divide batch", "{batch_gpu} 48 must divide {batch} 64",
                 ["--batch-gpu", "48"], batch_gpu=48),
    option_error("batch-gpu negative", "{batch_gpu} -32 must divide {batch} 64", ["--batch-gpu", "-32"], batch_gpu=-32),
    option_error("batch-gpu zero", "{batch_gpu} 0 must divide {batch} 64", ["--batch-gpu", "0"], batch_gpu=0),
    option_error("duration not a multiple", "{duration} 100 images must be a positive multiple of {batch} 64",
                 ["--duration", "100"], duration=100),
    option_error("duration zero", "{duration} 0 images must be a positive multiple of {batch} 64", duration=0),
    option_error("status not a multiple", "{status_nimg} 100 images must be a positive multiple of {batch} 64",
                 ["--status", "100"], status_nimg=100),
    option_error("snapshot not a multiple", "{snapshot_nimg} 96 images must be a positive multiple of {batch} 64",
                 ["--snapshot", "96"], snapshot_nimg=96),
    option_error("checkpoint not a multiple", "{checkpoint_nimg} 32 images must be a positive multiple of {batch} 64",
                 ["--checkpoint", "32"], checkpoint_nimg=32),
    option_error("sample not a multiple", "{sample_nimg} 100 images must be a positive multiple of {batch} 64",
                 ["--sample", "100"], sample_nimg=100),
    option_error("slice negative", "{slice_nimg} -64 images must be a positive multiple of {batch} 64", slice_nimg=-64),
    option_error("batch negative", "{batch} must be positive, got -64", ["--batch", "-64"], batch=-64),
    option_error("batch zero", "{batch} must be positive, got 0", ["--batch", "0"], batch=0),
    option_error("max-nonfinite-steps zero", "{max_nonfinite_steps} must be at least 1",
                 ["--max-nonfinite-steps", "0"], max_nonfinite_steps=0),
    option_error("keep-checkpoints zero", "{keep_checkpoints} must be at least 1", keep_checkpoints=0),
    option_error("snapshot dtype", "{snapshot_dtype} 'float64' is not one of float32, float16, bfloat16",
                 snapshot_dtype="float64"),  # the command line's choice list refuses it: test_malformed_...
    option_error("EMA length out of range",
                 "{ema_sigma_rels}: sigma_rel 0.5 is outside the valid range (0, 0.2887) of the power-function EMA",
                 ["--ema", "0.05,0.5"], ema_sigma_rels=(0.05, 0.5)),
    option_error("EMA lengths collide in file names", "{ema_sigma_rels}: two EMA lengths round to 0.070",
                 ["--ema", "0.0701,0.0704"], ema_sigma_rels=(0.0701, 0.0704)),
    option_error("levels do not fit the resolution", "dataset resolution 8 cannot be halved 4 times "
                 "(channel_mult has 5 levels)", channel_mult=(1, 2, 2, 2, 2)),
    option_error("lr negative", "{lr} must be positive and finite, got -0.01", ["--lr", "-0.01"], lr=-0.01),
    option_error("lr zero", "{lr} must be positive and finite, got 0.0", ["--lr", "0"], lr=0.0),
    option_error("lr infinite", "{lr} must be positive and finite, got inf", ["--lr", "inf"], lr=float("inf")),
    option_error("decay negative", "{decay} must be positive (0 on the command line: constant learning rate), "
                 "got -5.0", ["--decay", "-5"], decay=-5.0),
    option_error("rampup negative", "{rampup_img} must be at least 0 images, got -64", rampup_img=-64),
    option_error("P_mean not finite", "{P_mean} must be finite, got nan", ["--p-mean", "nan"], P_mean=float("nan")),
    option_error("P_std negative", "{P_std} must be positive and finite, got -1.0", ["--p-std", "-1"], P_std=-1.0),
    option_error("dropout above 1", "{dropout} must be in [0, 1), got 2.0", ["--dropout", "2"], dropout=2.0),
    option_error("channels zero", "{model_channels} must be positive, got 0", ["--channels", "0"], model_channels=0),
    option_error("channels negative", "{model_channels} must be positive, got -16", ["--channels", "-16"],
                 model_channels=-16),
    option_error("traditional EMA half-life zero", "{ema_halflife_img} must be a positive number of images, got 0",
                 ema_halflife_img=0),
    # The command line's own parsing of the text.
    option_error("unknown preset", "unknown preset 'nope'; choose one of: ", ["--preset", "nope"]),
    option_error("duration not a number", "--duration: cannot parse '12apples'; expected an image count like 4096",
                 ["--duration", "12apples"]),
    option_error("duration negative text", "--duration: cannot parse '-5'", ["--duration", "-5"]),
    option_error("duration zero text", "--duration: '0' must be a positive whole number of images",
                 ["--duration", "0"]),
    option_error("duration fractional", "--duration: '1.5' must be a positive whole number of images",
                 ["--duration", "1.5"]),
    option_error("rampup negative text", "--rampup: cannot parse '-5'", ["--rampup", "-5"]),
    option_error("slice garbled", "--slice: cannot parse '1Ki2'", ["--slice", "1Ki2"]),
    option_error("slice negative text", "--slice: cannot parse '-64'", ["--slice", "-64"]),
    option_error("EMA lengths not numbers", "--ema: cannot parse 'short'; expected comma-separated numbers",
                 ["--ema", "short"]),
    option_error("traditional EMA half-life zero text", "--ema-halflife: '0' must be a positive whole number",
                 ["--ema-halflife", "0"]),
]


def _render(template, name_of):
    return re.sub(r"\{(\w+)\}", lambda match: name_of(match.group(1)), template)


@pytest.mark.parametrize("args, fields, expect", [row for row in OPTION_ERRORS if row.values[1]])
def test_invalid_train_options_in_the_library(args, fields, expect):
    slice_nimg = fields.pop("slice_nimg", 64)  # a single step if an option is wrongly accepted
    with pytest.raises(MpdiffError) as error:
        train_tiny("run", slice_nimg=slice_nimg, **fields)
    message = str(error.value)
    assert "\n" not in message and _render(expect, lambda name: name) in message
    assert not os.path.exists("run")  # refused before anything is written


@pytest.mark.parametrize("args, fields, expect", [row for row in OPTION_ERRORS if row.values[0]])
def test_invalid_train_options_on_the_command_line(args, fields, expect):
    # RUN_ARGS first: later options win. --slice 64: a single step if an option is wrongly accepted.
    fails(["train", "--run-dir", "run", *RUN_ARGS, "--slice", "64", *args], _render(expect, flag_for))
    assert not os.path.exists("run")


@pytest.mark.parametrize("args, expect", [
    (["train", "--batch", "many"], "Invalid value for '--batch': 'many' is not a valid integer"),
    (["train", "--snapshot-dtype", "float64"], "Invalid value for '--snapshot-dtype'"),
    (["train", "--attn", "flash"], "Invalid value for '--attn'"),
    (["train", "--no-such-option"], "No such option '--no-such-option'"),
    (["generate", "run", "--out", "x", "--class", "three"], "Invalid value for '--class'"),
    (["generate", "run"], "Missing option '--out'"),
    (["phema", "run"], "Missing option '--sigma-rel'"),
])
def test_malformed_command_lines_get_click_usage_errors(args, expect):
    fails(args, expect, code=2)


def test_unknown_preset_in_info():
    fails(["info", "edm2-img512-huge"], "unknown preset 'edm2-img512-huge'")


@pytest.mark.parametrize("debug", [["--debug"], {"MPDIFF_DEBUG": "1"}], ids=["--debug", "MPDIFF_DEBUG=1"])
def test_debug_shows_the_traceback(debug):
    """--debug or MPDIFF_DEBUG=1 prints the traceback, then the same one line as without."""
    plain = run_cli("train", "--preset", "nope")
    shown = run_cli(*debug, "train", "--preset", "nope") if isinstance(debug, list) else \
        run_cli("train", "--preset", "nope", env=debug)
    assert plain.exit_code == shown.exit_code == 1
    assert plain.stderr.startswith("error: unknown preset 'nope'; choose one of: ") and plain.stderr.count("\n") == 1
    assert shown.stderr.startswith("Traceback (most recent call last)") and "ConfigError" in shown.stderr
    assert shown.stderr.rstrip().splitlines()[-1] == plain.stderr.rstrip()


def test_python_dash_m_mpdiff_is_the_command_line():
    """The one command run as a process: `python -m mpdiff` (a failing command: exit status 1, one line)."""
    info = subprocess.run([sys.executable, "-m", "mpdiff", "info"], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and info.stdout.splitlines()[0].startswith("edm2-img512-xxs "), info.stderr
    failed = subprocess.run([sys.executable, "-m", "mpdiff", "train", "--preset", "nope"], capture_output=True,
                            text=True, timeout=120)
    assert failed.returncode == 1 and failed.stdout == "", failed.stderr
    assert failed.stderr.startswith("error: unknown preset 'nope'") and failed.stderr.count("\n") == 1


def test_the_public_api_is_importable_from_the_package():
    import mpdiff
    from mpdiff.diffusion.loss import edm2_loss
    from mpdiff.nn.compat import load_edm2

    assert mpdiff.load_edm2 is load_edm2 and mpdiff.edm2_loss is edm2_loss  # promised by issue 3
    for name in mpdiff.__all__:
        assert getattr(mpdiff, name) is not None, name


# ---- resuming --------------------------------------------------------------------------------------

def test_resume_with_different_options_is_refused(run_copy):
    before = digests(run_copy)
    fails(["train", "--run-dir", run_copy, *RUN_ARGS, "--lr", "0.02"],
          "error: run holds a run with different options (--lr differ); re-run the original command to resume, or "
          "choose a new --run-dir")
    assert digests(run_copy) == before


def test_damaged_newest_checkpoint_is_skipped(run_copy):
    with open(ckpt(run_copy, 256), "r+b") as f:
        f.truncate(1000)
    result = succeeds(["train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "128"])
    assert "stopped at 256 images" in result.stdout
    log = (run_copy / "log.txt").read_text()
    assert f"skipping damaged checkpoint: {ckpt(run_copy, 256)}: not a readable safetensors file (" in log
    assert f"resumed from {ckpt(run_copy, 128)} at 128 images" in log
    load_tensors(ckpt(run_copy, 256))  # written anew


def test_malicious_pickle_as_checkpoint_is_skipped_without_running(run_copy, tmp_path):
    marker = tmp_path / "MARKER"
    with open(ckpt(run_copy, 384), "wb") as f:
        f.write(evil_pickle(marker))
    succeeds(["train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "64"])
    log = (run_copy / "log.txt").read_text()
    assert f"skipping damaged checkpoint: {ckpt(run_copy, 384)}: not a readable safetensors file (" in log
    assert f"resumed from {ckpt(run_copy, 256)} at 256 images" in log
    assert not marker.exists()


def test_checkpoint_of_another_architecture_is_refused(run_copy, other_run):
    shutil.copy(ckpt(other_run, 128), ckpt(run_copy, 384))
    before = digests(run_copy)
    fails(["train", "--run-dir", run_copy, *RUN_ARGS],
          f"error: {ckpt(run_copy, 384)}: checkpoint was written with a different configuration")
    assert digests(run_copy) == before


def test_run_dir_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("")
    fails(["train", "--run-dir", tmp_path / "file" / "run", *RUN_ARGS],
          f"{tmp_path / 'file' / 'run'}: cannot write here (Not a directory)")


def test_no_room_for_the_next_checkpoint(run_copy):
    """A real kernel refusal (RLIMIT_FSIZE, set on this process while the command runs: checkpoints of this run
    are 8 MB, snapshots 1.6 MB): one line, exit status 1, the previous checkpoints untouched, no temporary left."""
    before = digests(os.path.join(run_copy, "checkpoints"))
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.getsignal(signal.SIGXFSZ)
    try:  # only the soft limit, which this process may raise again; a write past it fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2 ** 20, limits[1]))
        line = fails(["train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "128"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert line == (f"error: {ckpt(run_copy, 384)}: write failed (file too large for this file system or process "
                    f"limit); the previous file, if any, is intact")
    assert digests(os.path.join(run_copy, "checkpoints")) == before
    assert not [n for n in os.listdir(os.path.join(run_copy, "checkpoints")) if n.endswith(".tmp")]
    load_tensors(ckpt(run_copy, 256))


def test_nonfinite_training_stops_with_one_line(run_copy, monkeypatch):
    patch_training_loss(monkeypatch, lambda real, *a, **k: real(*a, **k) * float("nan"))
    before = digests(os.path.join(run_copy, "checkpoints"))
    fails(["train", "--run-dir", run_copy, *RUN_ARGS],
          "training produced non-finite losses or gradients for 2 consecutive steps (at 320 images); stopped. "
          f"Last good checkpoint: {ckpt(run_copy, 256)}")
    assert digests(os.path.join(run_copy, "checkpoints")) == before
    rows = [json.loads(line) for line in (run_copy / "stats.jsonl").read_text().splitlines()]
    assert rows[-1]["nimg"] == 320 and rows[-1]["nonfinite_loss_steps"] == 1


# ---- generate ---------------------------------------------------------------------------------------

GENERATE_OPTION_ERRORS = [  # (options after `generate RUN --no-progress --out out`, the error line holds)
    (["--seeds", "5-2"], "--seeds: cannot parse '5-2'; expected e.g. '0-99' or '1,5,7-9'"),
    (["--seeds", "one"], "--seeds: cannot parse 'one'"),
    (["--seeds", "-3"], "--seeds: '-3' gives no non-negative seeds"),
    (["--seeds", ","], "--seeds: ',' gives no non-negative seeds"),
    (["--seeds", "0-99999999999999"], "--seeds"),
    (["--seeds", "0-1", "--class", "10"], "--class 10 is out of range for a network with 10 classes"),
    (["--seeds", "0-1", "--class", "-1"], "--class -1 is out of range"),
    (["--seeds", "0-1", "--steps", "0"], "--steps and --batch must be at least 1"),
    (["--seeds", "0-1", "--batch", "0"], "--steps and --batch must be at least 1"),
    (["--seeds", "0-1", "--sigma-rel", "0.2"], "{run}: no snapshot or reconstruction with sigma_rel 0.200 (tracked: "
                                               "0.050, 0.100)"),
]


@pytest.mark.parametrize("options, expect", GENERATE_OPTION_ERRORS,
                         ids=[" ".join(options) for options, _ in GENERATE_OPTION_ERRORS])
def test_generate_option_errors(partial_run, options, expect):
    fails(["generate", partial_run, "--no-progress", "--out", "out", *options], expect.format(run=partial_run))
    assert os.listdir(".") == []


def _bad_source(case, run):
    """A source for `generate` (written in the working directory), as the table below names it."""
    if case in ("cut", "guide cut"):
        with open(os.path.join(run, "snapshots", "ema-000000000256-0.100.safetensors"), "rb") as f:
            data = f.read()
        with open("cut.safetensors", "wb") as f:
            f.write(data[: len(data) // 2])
        return [run, "--guide", "cut.safetensors"] if case == "guide cut" else ["cut.safetensors"]
    if case == "image":
        with open("image.safetensors", "wb") as f:
            f.write(png())
        return ["image.safetensors"]
    if case == "empty":
        os.mkdir("empty")
        return ["empty"]
    return {"nothing": ["nothing"], "training state": [ckpt(run, 256)]}[case]


@pytest.mark.parametrize("case, expect", [
    ("nothing", "error: nothing: no such run directory or network file"),
    ("empty", "error: empty: no EMA snapshots (ema-*.safetensors) found"),
    ("training state", "not an mpdiff network file (format 'mpdiff-training-state/1'"),
    ("cut", "error: cut.safetensors: not a readable safetensors file ("),
    ("image", "error: image.safetensors: not a readable safetensors file ("),
    ("guide cut", "cut.safetensors: not a readable safetensors file ("),
])
def test_generate_from_bad_sources(partial_run, case, expect):
    fails(["generate", *_bad_source(case, partial_run), "--seeds", "0-1", "--out", "out", "--no-progress",
           "--steps", "2"], expect)
    assert not os.path.exists("out")


@pytest.mark.parametrize("name", ["evil.pkl", "evil.pt", "evil.safetensors"])
def test_generate_refuses_a_malicious_pickle_without_running_it(tmp_path, name):
    marker = tmp_path / "MARKER"
    path = tmp_path / name
    if name.endswith(".pt"):
        torch.save({"weight": torch.zeros(1), "payload": Payload(marker)}, path)
    else:
        path.write_bytes(evil_pickle(marker))
    line = fails(["generate", path, "--seeds", "0", "--out", tmp_path / "out", "--no-progress"], f"error: {path}: ")
    assert ("refused to load" in line) != name.endswith(".safetensors")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_generate_into_an_unwritable_place(partial_run, tmp_path):
    (tmp_path / "file").write_text("")
    fails(["generate", partial_run, "--seeds", "0-1", "--steps", "2", "--no-progress", "--out", tmp_path / "file" / "out"],
          "cannot write here (Not a directory)")


# ---- post-hoc EMA (snapshot-listing errors and invalid targets: tests/test_phema.py) -----------------------

@pytest.mark.parametrize("options, expect", [
    (["--sigma-rel", "wide"], "--sigma-rel: cannot parse 'wide'; expected comma-separated numbers"),
    (["--sigma-rel", "0.1:0.2"], "--sigma-rel: cannot parse '0.1:0.2'; expected A:B:N"),
    (["--sigma-rel", "0.1:0.2:0"], "--sigma-rel: N must be from 1 to 10000"),
    (["--sigma-rel", f"0.05:0.2:{10 ** 15}"], "--sigma-rel: N must be from 1 to 10000"),
    (["--sigma-rel", "0.1", "--at", "-64"], "--at: cannot parse '-64'; expected an image count"),
    (["--sigma-rel", "0.1", "--at", "2Ki"],  # the same forms as every image count: 2048 images
     "reconstruction time 2048 images must be an integer in (0, 256] (the last snapshot time)"),
    (["--sigma-rel", "0.1", "--out", "file/out"],
     "error: file/out: cannot open the folder (Not a directory)"),
])
def test_phema_option_errors(partial_run, options, expect):
    with open("file", "w"):
        pass
    before = digests(partial_run)
    fails(["phema", partial_run, "--no-progress", "--out", "out", *options], expect)
    assert os.listdir(".") == ["file"] and digests(partial_run) == before


PROPERTY = dict(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
UNITS = {"": 1, "k": 1000, "m": 1000 ** 2, "g": 1000 ** 3, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30}
nimg_like = st.from_regex(r"\A ?[0-9]{1,12}(\.[0-9]{1,4})? ?([kKmMgG]i?)? ?\Z")


@settings(**PROPERTY)
@given(text=st.text(max_size=16) | nimg_like)
def test_parse_nimg_gives_a_count_or_config_error(text):
    try:
        value = parse_nimg(text, "--duration")
    except ConfigError as e:
        assert str(e).startswith("--duration: ") and "\n" not in str(e)
        return
    assert type(value) is int and value > 0


def _exact_nimg(text):
    number, unit = text.strip().rstrip("kKmMgGi"), text.strip()[len(text.strip().rstrip("kKmMgGi")):]
    return Fraction(number.strip()) * UNITS[unit.lower()]


@settings(**PROPERTY)
@example("4.1M")
@example("9" * 400)
@given(text=nimg_like)
def test_parse_nimg_is_exact(text):
    exact = _exact_nimg(text)
    if exact.denominator == 1 and 0 < exact < 2 ** 63:
        assert parse_nimg(text) == exact
    else:
        with pytest.raises(ConfigError):
            parse_nimg(text)


@settings(**PROPERTY)
@given(text=st.text(max_size=16) | st.lists(st.floats(allow_nan=False), min_size=1, max_size=4).map(
    lambda values: ",".join(repr(v) for v in values)))
def test_parse_floats_gives_numbers_or_config_error(text):
    try:
        values = parse_floats(text, "--ema")
    except ConfigError as e:
        assert str(e).startswith("--ema: ") and "\n" not in str(e)
        return
    assert values and all(type(v) is float for v in values)


@settings(**PROPERTY)
@given(text=st.text(alphabet="0123456789.:-,e ", max_size=14)
       | st.tuples(st.floats(-1, 1), st.floats(-1, 1), st.integers(-2, 50)).map(lambda t: f"{t[0]}:{t[1]}:{t[2]}"))
def test_parse_range_gives_n_values_or_config_error(text):
    try:
        values = parse_range(text, "--sigma-rel")
    except ConfigError as e:
        assert str(e).startswith("--sigma-rel: ") and "\n" not in str(e)
        return
    assert values and all(type(v) is float for v in values)
    if text.count(":") == 2:
        lo, hi, n = text.split(":")
        assert len(values) == int(n) and values[0] == round(float(lo), 6)


seed_part = st.one_of(st.integers(0, 999).map(str), st.tuples(st.integers(0, 999), st.integers(0, 999)).map(
    lambda t: f"{t[0]}-{t[1]}"))


def _expected_seeds(text):
    seeds = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = map(int, part.split("-"))
            if hi < lo:
                return None
            seeds += range(lo, hi + 1)
        else:
            seeds.append(int(part))
    return seeds


@settings(**PROPERTY)
@given(text=st.text(alphabet="0123456789-, x", max_size=12) | st.lists(seed_part, min_size=1, max_size=4).map(",".join))
def test_parse_seeds_gives_seeds_or_config_error(text):
    try:
        seeds = parse_seeds(text)
    except ConfigError as e:
        assert str(e).startswith("--seeds: ") and "\n" not in str(e)
        return
    assert seeds and all(type(s) is int and s >= 0 for s in seeds)
    if all(c in "0123456789-," for c in text) and all(p and not p.startswith("-") for p in text.split(",")):
        assert seeds == _expected_seeds(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2 ** 40) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


def config_dicts(cls):
    names = [f.name for f in dataclasses.fields(cls)]
    valid = cls().to_dict()
    return st.dictionaries(st.sampled_from(names) | st.text(max_size=8), json_values, max_size=5) | \
        st.dictionaries(st.sampled_from(names), json_values, max_size=3).map(lambda d: {**valid, **d})


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_config_from_dict_gives_a_config_or_config_error(cls):
    @settings(**PROPERTY)
    @given(d=config_dicts(cls))
    def check(d):
        try:
            config = cls.from_dict(d, source="config.json")
        except ConfigError as e:
            assert str(e).startswith("config.json: ") and "\n" not in str(e)
            return
        assert isinstance(config, cls)
    check()


# Values of each annotation that mpdiff.config uses, other than any default: a field keeps such a value
# through JSON. And values that are not of the annotation: a field refuses them.
_OTHER_VALUE = {int: 7, float: 0.375, bool: None, str: "other", typing.Tuple[int, ...]: (3, 5),
                typing.Tuple[float, ...]: (0.0625, 0.125), typing.Tuple[float, float]: (0.5, 0.75)}
_WRONG_VALUES = {int: ["7", 7.5, True, None], float: ["0.5", True, None, [0.5]], bool: [1, "true", None],
                 str: [3, True, None, ["x"]], typing.Tuple[int, ...]: ["3,5", 3, [3, 5.5], [True]],
                 typing.Tuple[float, ...]: ["0.5", 0.5, [0.5, "x"]], typing.Tuple[float, float]: [[0.5], [0.5, 0.6, 0.7],
                                                                                               "0.5,0.6"]}


def _annotation(field):
    """(the annotation without Optional, whether None is allowed)."""
    args = typing.get_args(field.type)
    if typing.get_origin(field.type) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return field.type, False


CONFIG_FIELDS = [pytest.param(cls, field, id=f"{cls.__name__}.{field.name}")
                 for cls in CONFIG_CLASSES for field in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls, field", CONFIG_FIELDS)
def test_every_config_field_round_trips_through_json(cls, field):
    annotation, optional = _annotation(field)
    assert annotation in _OTHER_VALUE, f"{cls.__name__}.{field.name}: a new kind of field; add it to the tables"
    default = cls().to_dict()
    other = not field.default if annotation is bool else _OTHER_VALUE[annotation]
    values = [other] + ([None] if optional else [])
    for value in values:
        if value == field.default:
            continue
        config = cls().replace(**{field.name: value})
        again = cls.from_dict(json.loads(json.dumps(config.to_dict())), source="config.json")
        assert again == config and getattr(again, field.name) == value and type(getattr(again, field.name)) is type(value)
    assert cls.from_dict(json.loads(json.dumps(default))) == cls()


@pytest.mark.parametrize("cls, field", CONFIG_FIELDS)
def test_every_config_field_refuses_a_value_of_the_wrong_type(cls, field):
    annotation, optional = _annotation(field)
    what = cls.KIND
    for wrong in [{"nested": 1}] + [v for v in _WRONG_VALUES[annotation] if not (v is None and optional)]:
        with pytest.raises(ConfigError) as error:
            cls.from_dict(dict(cls().to_dict(), **{field.name: wrong}), source="config.json")
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"config.json: {what} option {field.name} = ")
        assert "has the wrong type (expected " in message, message


def test_config_from_dict_refuses_unknown_fields_and_non_objects():
    for cls in CONFIG_CLASSES:
        with pytest.raises(ConfigError, match=f"^config.json: unknown {cls.KIND} option\\(s\\) 'turbo'$"):
            cls.from_dict(dict(cls().to_dict(), turbo=True), source="config.json")
        with pytest.raises(ConfigError, match=f"^config.json: the {cls.KIND} config must be a JSON object, got list$"):
            cls.from_dict([], source="config.json")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_configs_round_trip_through_json(name):
    preset = PRESETS[name]
    for config in (preset.network, preset.training, preset.cadence):
        assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_network_shape_flags(tmp_path):
    # --channel-mult (the level count), --blocks and --attn-res ('none' for no attention) reach the network.
    from mpdiff.cli_options import parse_ints

    assert parse_ints("1,2,2,2", "--channel-mult") == [1, 2, 2, 2]
    assert parse_ints("none", "--attn-res", allow_none=True) == []
    with pytest.raises(ConfigError, match=r"^--channel-mult: cannot parse '1,x'; expected comma-separated whole"):
        parse_ints("1,x", "--channel-mult")
    run_dir = tmp_path / "run"
    result = run_cli("train", *RUN_ARGS, "--duration", "64", "--channel-mult", "1,2", "--blocks", "1",
                     "--attn-res", "none", "--no-final-grid", "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    network = json.loads((run_dir / "config.json").read_text())["network"]
    assert (network["channel_mult"], network["num_blocks"], network["attn_resolutions"]) == ([1, 2], 1, [])
    assert "2 levels (8x8, 4x4), attention at no level" in (run_dir / "log.txt").read_text()
    assert "samples:" not in result.output
