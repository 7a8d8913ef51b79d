"""Issue 6 through the command line: bad input ends with exit status 1 and exactly one line `error: ...` on
stderr, without a traceback unless --debug; nothing is overwritten and no pickle payload runs. Property
tests for the option and config parsers. The library-level rows are in tests/test_reliability.py.
"""

import dataclasses
import hashlib
import io
import json
import os
import pickle
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import typing
from fractions import Fraction

import numpy as np
import pytest
import torch

from mpdiff.threads import torch_threads
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mpdiff import training
from mpdiff.cli import cli, parse_floats, parse_nimg, parse_range
from mpdiff.errors import ConfigError
from mpdiff.fileio import load_tensors
from mpdiff.phema import save_snapshot
from mpdiff.presets import PRESETS, NetworkConfig, TrainingConfig
from mpdiff.sampling import parse_seeds

# The run every test resumes or reads: the digits preset made small. The options are the run's contract,
# so a test that resumes it passes exactly these again (plus runtime-only ones such as --slice).
RUN_ARGS = ["--batch", "64", "--duration", "512", "--channels", "16", "--status", "64", "--snapshot", "64",
            "--checkpoint", "128", "--max-nonfinite-steps", "2", "--no-progress", "--no-tensorboard"]


def invoke(args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def fails(args, *expect, code=1, env=None):
    """Run the command; it must fail with `code` and one stderr line `error: ...` containing `expect`
    (informational lines may come before it: the network `generate` loaded, or a training run's
    "resumed from ..." / "new run ..." notes, which go to stderr with --no-progress)."""
    result = invoke(args, env)
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
    result = invoke(args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """Half of the run (checkpoints at 128 and 256 images, snapshots every 64), made with `mpdiff train` as the
    relative run directory "run" (a run's config records its --run-dir as given)."""
    home = tmp_path_factory.mktemp("cli")
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(home)
    torch.set_num_threads(1)
    try:
        succeeds(["train", "--run-dir", "run", *RUN_ARGS, "--slice", "256"])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return home / "run"


@pytest.fixture
def run_copy(cli_run, tmp_path, monkeypatch):
    """A resumable copy of cli_run, as "run" in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(cli_run, "run")
    return "run"


def ckpt(run_dir, nimg):
    return os.path.join(run_dir, "checkpoints", f"training-state-{nimg:012d}.safetensors")


def digests(directory):
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


class Payload:
    def __init__(self, marker):
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


# ---- datasets (library-level rows: tests/test_data.py) -------------------------------------------

def png(size=8, mode="L", seed=0):
    array = np.random.RandomState(seed).randint(0, 256, (size, size) if mode == "L" else (size, size, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


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


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_train_on_a_bad_dataset(tmp_path, case):
    files, expect = BAD_DATASETS[case]
    for name, data in files.items():
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / name).write_bytes(data)
    fails(["train", "--data", tmp_path / "data", "--run-dir", tmp_path / "run", *RUN_ARGS], expect)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_train_on_a_missing_dataset(tmp_path):
    fails(["train", "--data", tmp_path / "nowhere", "--run-dir", tmp_path / "run", *RUN_ARGS],
          f"{tmp_path / 'nowhere'}: no such file or directory")
    assert not (tmp_path / "run").exists()


def test_eval_of_a_missing_folder(tmp_path):
    fails(["eval", tmp_path / "nowhere"], f"{tmp_path / 'nowhere'}: no such file or directory")


# ---- invalid options -----------------------------------------------------------------------------



def option_case(args, expect):
    return pytest.param(args, expect, id=" ".join(args))


BAD_OPTIONS = [
    option_case(["--preset", "nope"], "unknown preset 'nope'; choose one of: edm2-img512-xs,"),
    option_case(["--duration", "12apples"], "--duration: cannot parse '12apples'; expected an image count like 4096"),
    option_case(["--duration", "-5"], "--duration: cannot parse '-5'"),
    option_case(["--duration", "0"], "--duration: '0' must be a positive whole number of images"),
    option_case(["--duration", "1.5"], "--duration: '1.5' must be a positive whole number of images"),
    option_case(["--rampup", "-5"], "--rampup: cannot parse '-5'"),
    option_case(["--batch-gpu", "48"], "--batch-gpu 48 must divide --batch 64"),
    option_case(["--batch-gpu", "-32"], "--batch-gpu -32 must divide --batch 64"),
    option_case(["--duration", "100"], "--duration 100 images must be a positive multiple of --batch 64"),
    option_case(["--status", "100"], "--status 100 images must be a positive multiple of --batch 64"),
    option_case(["--snapshot", "96"], "--snapshot 96 images must be a positive multiple of --batch 64"),
    option_case(["--checkpoint", "32"], "--checkpoint 32 images must be a positive multiple of --batch 64"),
    option_case(["--sample", "100"], "--sample 100 images must be a positive multiple of --batch 64"),
    option_case(["--slice", "1Ki2"], "--slice: cannot parse '1Ki2'"),
    option_case(["--batch", "-64"], "--batch must be positive, got -64"),
    option_case(["--batch", "0"], "--batch must be positive, got 0"),
    option_case(["--max-nonfinite-steps", "0"], "--max-nonfinite-steps must be at least 1"),
    option_case(["--ema", "0.05,0.5"], "sigma_rel 0.5 is outside the valid range (0, 0.2887)"),
    option_case(["--ema", "short"], "--ema: cannot parse 'short'; expected comma-separated numbers"),
    option_case(["--lr", "-0.01"], "--lr"),
    option_case(["--lr", "0"], "--lr"),
    option_case(["--decay", "-5"], "--decay"),
    option_case(["--p-std", "-1"], "--p-std"),
    option_case(["--dropout", "2"], "--dropout"),
    option_case(["--channels", "0"], "--channels"),
    option_case(["--channels", "-16"], "--channels"),
    option_case(["--batch-gpu", "0"], "--batch-gpu"),
]


@pytest.mark.parametrize("args, expect", BAD_OPTIONS)
def test_invalid_train_options(tmp_path, args, expect):
    # RUN_ARGS first: later options win. --slice 64: a single step if an option is wrongly accepted.
    fails(["train", "--run-dir", tmp_path / "run", *RUN_ARGS, "--slice", "64", *args], expect)


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


def test_debug_shows_the_traceback():
    """--debug (anywhere before the command) prints the traceback, then the same one line."""
    base = [sys.executable, "-m", "mpdiff.cli"]
    plain = subprocess.run(base + ["train", "--preset", "nope"], capture_output=True, text=True)
    debug = subprocess.run(base + ["--debug", "train", "--preset", "nope"], capture_output=True, text=True)
    assert plain.returncode == debug.returncode == 1
    assert plain.stderr.startswith("error: unknown preset 'nope'") and plain.stderr.count("\n") == 1
    assert "Traceback (most recent call last)" in debug.stderr and "ConfigError" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1] == plain.stderr.rstrip()
    result = invoke(["train", "--preset", "nope"], env={"MPDIFF_DEBUG": "1"})
    assert "Traceback" in result.stderr and result.exit_code == 1


def test_debug_flag_works_when_invoked_programmatically():
    result = invoke(["--debug", "train", "--preset", "nope"])
    assert "Traceback" in result.stderr and result.exit_code == 1


# ---- resuming --------------------------------------------------------------------------------------

def test_resume_with_different_options_is_refused(run_copy):
    before = digests(run_copy)
    fails(["train", "--run-dir", run_copy, *RUN_ARGS, "--lr", "0.02"],
          "run holds a run with different options (", "training", "re-run the original command to resume")
    assert digests(run_copy) == before


def test_damaged_newest_checkpoint_is_skipped(run_copy):
    with open(ckpt(run_copy, 256), "r+b") as f:
        f.truncate(1000)
    result = succeeds(["train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "128"])
    assert "stopped at 256 images" in result.stdout
    log = open(os.path.join(run_copy, "log.txt")).read()
    assert f"skipping damaged checkpoint: {ckpt(run_copy, 256)}: not a readable safetensors file (" in log
    assert f"resumed from {ckpt(run_copy, 128)} at 128 images" in log
    load_tensors(ckpt(run_copy, 256))  # written anew


def test_malicious_pickle_as_checkpoint_is_skipped_without_running(run_copy, tmp_path):
    marker = tmp_path / "MARKER"
    with open(ckpt(run_copy, 384), "wb") as f:
        pickle.dump(Payload(marker), f)
    succeeds(["train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "64"])
    log = open(os.path.join(run_copy, "log.txt")).read()
    assert f"skipping damaged checkpoint: {ckpt(run_copy, 384)}: not a readable safetensors file (" in log
    assert f"resumed from {ckpt(run_copy, 256)} at 256 images" in log
    assert not marker.exists()


def test_checkpoint_of_another_architecture_is_refused(run_copy, tmp_path):
    succeeds(["train", "--run-dir", tmp_path / "small", *RUN_ARGS, "--channels", "8", "--slice", "128"])
    shutil.copy(ckpt(tmp_path / "small", 128), ckpt(run_copy, 384))
    before = digests(run_copy)
    fails(["train", "--run-dir", run_copy, *RUN_ARGS],
          f"error: {ckpt(run_copy, 384)}: checkpoint was written with a different configuration")
    assert digests(run_copy) == before


def test_run_dir_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("")
    fails(["train", "--run-dir", tmp_path / "file" / "run", *RUN_ARGS],
          f"{tmp_path / 'file' / 'run' / 'config.json'}: cannot write here (Not a directory)")


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2 ** 20, 4 * 2 ** 20))


def test_no_room_for_the_next_checkpoint(run_copy):
    """A real kernel refusal (RLIMIT_FSIZE: checkpoints of this run are 8 MB, snapshots 1.6 MB): one line,
    exit status 1, the previous checkpoints untouched, no temporary left."""
    before = digests(os.path.join(run_copy, "checkpoints"))
    proc = subprocess.run([sys.executable, "-m", "mpdiff.cli", "train", "--run-dir", run_copy, *RUN_ARGS,
                           "--slice", "128"], capture_output=True, text=True, preexec_fn=_limit_file_size,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()  # informational lines ("resumed from ...") may come first
    assert "Traceback" not in proc.stderr and [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert lines[-1] == (
        f"error: {ckpt(run_copy, 384)}: write failed (file too large for this file system or process limit); "
        f"the previous file, if any, is intact")
    assert digests(os.path.join(run_copy, "checkpoints")) == before
    assert not [n for n in os.listdir(os.path.join(run_copy, "checkpoints")) if n.endswith(".tmp")]
    load_tensors(ckpt(run_copy, 256))


def test_nonfinite_training_stops_with_one_line(run_copy, monkeypatch):
    real = training.edm2_loss
    monkeypatch.setattr(training, "edm2_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    before = digests(os.path.join(run_copy, "checkpoints"))
    fails(["train", "--run-dir", run_copy, *RUN_ARGS],
          "training produced non-finite losses or gradients for 2 consecutive steps (at 320 images); stopped. "
          f"Last good checkpoint: {ckpt(run_copy, 256)}")
    assert digests(os.path.join(run_copy, "checkpoints")) == before
    rows = [json.loads(line) for line in open(os.path.join(run_copy, "stats.jsonl"))]
    assert rows[-1]["nimg"] == 320 and rows[-1]["nonfinite_loss_steps"] == 1


# ---- generate ---------------------------------------------------------------------------------------

def test_generate_option_errors(cli_run, tmp_path):
    out = ["--out", tmp_path / "out", "--no-progress", "--steps", "2"]
    fails(["generate", cli_run, "--seeds", "5-2", *out],
          "--seeds: cannot parse '5-2'; expected e.g. '0-99' or '1,5,7-9'")
    fails(["generate", cli_run, "--seeds", "one", *out], "--seeds: cannot parse 'one'")
    fails(["generate", cli_run, "--seeds", "-3", *out], "--seeds: '-3' gives no non-negative seeds")
    fails(["generate", cli_run, "--seeds", ",", *out], "--seeds: ',' gives no non-negative seeds")
    fails(["generate", cli_run, "--seeds", "0-1", "--class", "10", *out],
          "--class 10 is out of range for a network with 10 classes")
    fails(["generate", cli_run, "--seeds", "0-1", "--class", "-1", *out], "--class -1 is out of range")
    fails(["generate", cli_run, "--seeds", "0-1", "--steps", "0", "--out", tmp_path / "out"],
          "--steps and --batch must be at least 1")
    fails(["generate", cli_run, "--seeds", "0-1", "--batch", "0", *out], "--steps and --batch must be at least 1")
    fails(["generate", cli_run, "--seeds", "0-1", "--sigma-rel", "0.2", *out],
          f"{cli_run}: no snapshot or reconstruction with sigma_rel 0.200 (tracked: 0.050, 0.100)")
    assert not (tmp_path / "out").exists()


def test_generate_from_bad_sources(cli_run, tmp_path):
    out = ["--seeds", "0-1", "--out", tmp_path / "out", "--no-progress", "--steps", "2"]
    fails(["generate", tmp_path / "nothing", *out], f"{tmp_path / 'nothing'}: no such run directory or network file")
    (tmp_path / "empty").mkdir()
    fails(["generate", tmp_path / "empty", *out], f"{tmp_path / 'empty'}: no EMA snapshots (ema-*.safetensors) found")
    fails(["generate", ckpt(cli_run, 256), *out], "not an mpdiff network file (format 'mpdiff-training-state/1'")
    data = open(os.path.join(cli_run, "snapshots", "ema-000000000256-0.100.safetensors"), "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    fails(["generate", tmp_path / "cut.safetensors", *out],
          f"{tmp_path / 'cut.safetensors'}: not a readable safetensors file (")
    (tmp_path / "image.safetensors").write_bytes(png())
    fails(["generate", tmp_path / "image.safetensors", *out], "not a readable safetensors file (")
    fails(["generate", cli_run, "--guide", tmp_path / "cut.safetensors", *out], "not a readable safetensors file (")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["evil.pkl", "evil.pt", "evil.safetensors"])
def test_generate_refuses_a_malicious_pickle_without_running_it(tmp_path, name):
    marker = tmp_path / "MARKER"
    path = tmp_path / name
    if name.endswith(".pt"):
        torch.save({"weight": torch.zeros(1), "payload": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))
    line = fails(["generate", path, "--seeds", "0", "--out", tmp_path / "out", "--no-progress"], f"error: {path}: ")
    assert ("refused to load" in line) != name.endswith(".safetensors")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_generate_into_an_unwritable_place(cli_run, tmp_path):
    (tmp_path / "file").write_text("")
    fails(["generate", cli_run, "--seeds", "0-1", "--steps", "2", "--no-progress", "--out", tmp_path / "file" / "out"],
          "cannot write here (Not a directory)")


def test_generate_with_an_absurd_seed_range(cli_run, tmp_path):
    fails(["generate", cli_run, "--seeds", "0-99999999999999", "--out", tmp_path / "out"], "--seeds")


# ---- post-hoc EMA ---------------------------------------------------------------------------------------

def test_phema_errors(cli_run, tmp_path):
    run = ["phema", cli_run, "--no-progress", "--out", tmp_path / "out"]
    for sigma_rel in ["0.5", "0", "-0.1", "0.29"]:
        fails([*run, "--sigma-rel", sigma_rel],
              f"sigma_rel {float(sigma_rel):g} is outside the valid range (0, 0.2887)")
    fails([*run, "--sigma-rel", "wide"], "--sigma-rel: cannot parse 'wide'; expected comma-separated numbers")
    fails([*run, "--sigma-rel", "0.1:0.2"], "--sigma-rel: cannot parse '0.1:0.2'; expected A:B:N")
    fails([*run, "--sigma-rel", "0.1:0.2:0"], "--sigma-rel: N must be")
    fails([*run, "--sigma-rel", "0.1", "--at", "100"],
          "reconstruction time 100000 images must be an integer in (0, 256] (the last snapshot time)")
    fails([*run, "--sigma-rel", "0.1", "--at", "-1"], "reconstruction time -1000 images must be an integer in (0, 256]")
    fails(["phema", tmp_path / "nowhere", "--sigma-rel", "0.1"],
          f"{tmp_path / 'nowhere'}: no such directory; expected a run directory with snapshots/ in it")
    (tmp_path / "empty").mkdir()
    fails(["phema", tmp_path / "empty", "--sigma-rel", "0.1"], "no EMA snapshots (ema-*.safetensors) found")
    (tmp_path / "file").write_text("")
    fails(["phema", cli_run, "--sigma-rel", "0.1", "--no-progress", "--out", tmp_path / "file" / "out"],
          "cannot write here (Not a directory)")
    assert not (tmp_path / "out").exists()


def test_phema_on_duplicated_and_mismatched_snapshots(cli_run, tmp_path):
    run = shutil.copytree(cli_run, tmp_path / "run")
    first = run / "snapshots" / "ema-000000000064-0.050.safetensors"
    copy = run / "snapshots" / "ema-000000000064-0.050-copy.safetensors"
    shutil.copy(first, copy)
    fails(["phema", run, "--sigma-rel", "0.1"], f"{first}: duplicates the snapshot nimg=64, sigma_rel=0.05 of {copy}")
    copy.unlink()
    later = run / "snapshots" / "ema-000000000256-0.100.safetensors"
    tensors, meta = load_tensors(later)
    save_snapshot(later, tensors, nimg=256, sigma_rel=0.1, step=4, batch_size=64, network_config=meta["network"],
                  dtype="bfloat16")
    fails(["phema", run, "--sigma-rel", "0.1"], f"{later}: stored as bfloat16 but {first} is float32")
    assert not (run / "phema").exists()


def test_phema_with_an_absurd_range(cli_run):
    fails(["phema", cli_run, "--sigma-rel", f"0.05:0.2:{10 ** 15}"], "--sigma-rel")


# ---- property tests: option and config parsers -------------------------------------------------------

PROPERTY = dict(max_examples=300, deadline=None, derandomize=True, database=None,
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


def _well_typed(value, annotation):
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return any(_well_typed(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        return len(kinds) == len(value) and all(_well_typed(v, k) for v, k in zip(value, kinds))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation)


@pytest.mark.parametrize("cls", [NetworkConfig, TrainingConfig])
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


@pytest.mark.parametrize("cls", [NetworkConfig, TrainingConfig])
def test_config_from_dict_checks_field_types(cls):
    @settings(**PROPERTY)
    @given(d=config_dicts(cls))
    def check(d):
        try:
            config = cls.from_dict(d, source="config.json")
        except ConfigError:
            return
        for field in dataclasses.fields(cls):
            assert _well_typed(getattr(config, field.name), field.type), (field.name, getattr(config, field.name))
    check()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_configs_round_trip_through_json(name):
    preset = PRESETS[name]
    for config in (preset.network, preset.training):
        assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config
