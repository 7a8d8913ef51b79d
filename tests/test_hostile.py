"""Issue 10 where a user meets it: hostile inputs through the command line end in success or exit status 1
with exactly one `error: ...` line, and nothing is lost, corrupted or left hanging.

Groups (the mechanisms themselves, property-tested, are in tests/test_mechanisms.py):

* data loss: files that only look like our temporaries, damaged stats rows, two writers in one run
  directory, EMA lengths that collide in file names, generate output folders written whole, symlinked and
  non-file output paths;
* hangs (each command under a deadline that fails the test): symlink loops, FIFOs in place of every file
  mpdiff reads;
* silent garbage: non-finite checkpoints, network files and options, impossible checkpoint metadata;
* tracebacks instead of one line: undecodable names, unreadable JSON, malformed stats rows, odd
  checkpoint directories, devices, state_dicts, post-hoc EMA times, stray copies, huge networks,
  a run directory that overlaps the dataset.

Defects these tests found in src/ were fixed; none is expected to fail.
"""

import hashlib
import json
import os
import resource
import shutil
import socket
import stat
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from conftest import (
    ckpt,
    deadline,
    patch_training_loss,
    pixels,
    png_bytes,
    run_cli,
    snap,
    tiny_config,
    tiny_run_flags,
)

import mpdiff.storage.samples
import mpdiff.train.step
from mpdiff.storage.files import read_jsonl
from mpdiff.storage.lock import run_directory_lock
from mpdiff.storage.tensors import load_tensors, save_tensors

RUN_ARGS = tiny_run_flags()             # conftest.TINY_RUN: 512 images in steps of 64, checkpoints every 128
GEN = ["--seeds", "0-3", "--steps", "2", "--no-progress"]
TIMEOUT = 60                            # seconds for any one command (conftest.deadline, or a process)


# ---- helpers ------------------------------------------------------------------------------------------

def error_line(stderr):
    """The one `error: ...` line of a failed command: the last line, no other error, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error: "), stderr
    assert [line for line in lines if line.startswith("error") or "Error" in line] == [lines[-1]], stderr
    return lines[-1]


def refused(*args, expect=()):
    """`mpdiff ARGS` (in this process) exits 1 with one error line containing every text in `expect`."""
    result = run_cli(*args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, (result.exit_code, result.output)
    line = error_line(result.stderr)
    for text in expect:
        assert text in line, line
    return line


def succeeds(*args):
    result = run_cli(*args)
    assert result.exit_code == 0, (result.output, repr(result.exception))
    assert "Traceback" not in result.output and not any(line.startswith("error") for line in result.stderr.splitlines())
    return result


def tree(root, ignore=(".mpdiff.lock",)):
    """{relative path: sha256, '-> target' or file type} of everything under `root`, from lstat only:
    no symlink is followed and nothing but regular files is opened (a FIFO would block)."""
    out = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root)
            if rel in ignore:
                continue
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(mode):
                out[rel] = "-> " + os.fsdecode(os.readlink(path))
            else:
                out[rel] = stat.S_IFMT(mode)
    return out


def files_in(root):
    return {rel for rel, kind in tree(root).items() if isinstance(kind, str) and not kind.startswith("->")}


def log_lines(run_dir):
    with open(os.path.join(run_dir, "log.txt")) as f:
        return f.read().splitlines()


def same_tensors(a, b):
    got, _ = load_tensors(a)
    want, _ = load_tensors(b)
    return sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def first_float_tensor(tensors, prefix=""):
    return next(k for k in sorted(tensors)
                if k.startswith(prefix) and tensors[k].is_floating_point() and tensors[k].numel() > 1)


def with_nan(tensors, name):
    tensors = dict(tensors)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    return tensors


def read(path):
    with open(path, "rb") as f:
        return f.read()


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def is_fifo(path):
    return stat.S_ISFIFO(os.lstat(path).st_mode)


# ======================================================================================================
# Data loss
# ======================================================================================================

def test_training_removes_only_its_own_temporaries(run_copy, tmp_path):
    run = run_copy
    outside = tmp_path / "outside"
    outside.mkdir()
    foreign = {  # files of the user's: none of them may be touched
        run / ".env.tmp": "SECRET=1\n",
        run / "notes" / ".draft.tmp": "draft",
        run / "notes" / ".config.json.abcd1234.tmp": "named like ours, but not in a directory of ours",
        run / ".notes.txt.abcd1234.tmp": "a temporary of a file mpdiff never writes",
        outside / ".x.tmp": "outside",
        outside / ".config.json.abcd1234.tmp": "named like ours, reached through a symlink",
        outside / ".grid-final.png.abcd1234.tmp": "named like ours, in a symlinked samples/",
    }
    (run / "notes").mkdir()
    for path, text in foreign.items():
        path.write_text(text)
    os.symlink(outside, run / "linked")
    os.symlink(outside, run / "samples")            # even our own directory is not entered through a link
    os.symlink(outside / ".x.tmp", run / ".log.txt.zzzzzzzz.tmp")  # a link named like ours is not removed
    ours = [run / ".stats.jsonl.abcd1234.tmp",
            run / "checkpoints" / ".training-state-000000000384.safetensors.a1b2c3d4.tmp"]
    for path in ours:
        path.write_text("left by a killed writer")

    succeeds("train", "--run-dir", run, *RUN_ARGS, "--slice", "64")

    for path, text in foreign.items():
        assert path.read_text() == text, path
    assert os.readlink(run / "linked") == str(outside) and os.readlink(run / "samples") == str(outside)
    assert os.readlink(run / ".log.txt.zzzzzzzz.tmp") == str(outside / ".x.tmp")
    assert not any(path.exists() for path in ours)


def test_damaged_stats_row_in_the_middle_survives_a_resume(run_copy):
    run = run_copy
    lines = (run / "stats.jsonl").read_bytes().splitlines(keepends=True)   # rows at 64, 128, 192, 256
    before = [json.loads(line) for line in lines]
    damaged = b'{"nimg": 100, "loss": 0.5'                                  # an old crash's torn row
    (run / "stats.jsonl").write_bytes(b"".join(lines[:2]) + damaged + b"\n" + b"".join(lines[2:]))

    succeeds("train", "--run-dir", run, *RUN_ARGS, "--slice", "64")

    after = (run / "stats.jsonl").read_bytes().split(b"\n")
    rows = [row for row in read_jsonl(run / "stats.jsonl") if isinstance(row, dict)]
    assert rows[:4] == before and [row["nimg"] for row in rows] == [64, 128, 192, 256, 320]
    assert after[2] == damaged                                              # kept where it was
    assert any(f"{run / 'stats.jsonl'}: line 3 is damaged (not valid JSON" in line and "kept as it is" in line
               for line in log_lines(run))


def test_second_training_in_a_busy_run_dir_is_refused_and_changes_nothing(partial_run, run_copy, monkeypatch):
    """A second `mpdiff train` of a run that a first one is training is refused in one line naming the holder,
    writes nothing, and the first finishes as if alone.

    No race: the second is started from inside the first's first training step (its loss), where the first
    provably holds the run directory's lock. Both run in this process; the lock is an flock, which conflicts
    between two opens of the file in one process as between two processes (another process holding the lock,
    and taking it over once that process is killed: tests/test_mechanisms.py)."""
    shutil.copytree(partial_run, "alone")
    succeeds("train", "--run-dir", "alone", *RUN_ARGS, "--slice", "128")     # the same resume, undisturbed

    args = ["train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "128"]
    during = {}

    def second_training_during_the_first_step(real, *a, **k):
        if not during:
            during["lock"] = read(run_copy / ".mpdiff.lock")
            during["tree"] = tree(run_copy)
            during["second"] = run_cli(*args)
            during["tree after"] = tree(run_copy)
            during["lock after"] = read(run_copy / ".mpdiff.lock")
        return real(*a, **k)

    patch_training_loss(monkeypatch, second_training_during_the_first_step)
    first = succeeds(*args)
    second = during["second"]
    assert second.exit_code == 1 and second.stdout == "", (second.output, repr(second.exception))
    line = error_line(second.stderr)
    assert line == (f"error: run: in use by mpdiff train (pid {os.getpid()} on {socket.gethostname()}, since "
                    f"{json.loads(during['lock'])['since']}); wait for it to finish or stop it, or use another "
                    f"run directory"), line
    assert during["tree after"] == during["tree"] and during["lock after"] == during["lock"]

    assert "stopped at 384 images" in first.stdout and os.path.exists(ckpt(run_copy, 384))
    assert os.path.exists(snap(run_copy, 384, 0.1))
    for folder in ("checkpoints", "snapshots"):    # the same tensors (their metadata holds times)
        names = sorted(os.listdir(run_copy / folder))
        assert names == sorted(os.listdir(os.path.join("alone", folder)))
        for name in names:
            assert same_tensors(run_copy / folder / name, os.path.join("alone", folder, name)), name
    assert [row["nimg"] for row in read_jsonl(run_copy / "stats.jsonl")] == list(range(64, 385, 64))
    assert "in use" not in read(run_copy / "log.txt").decode()


def test_phema_and_ema_sweep_are_refused_while_the_run_dir_is_busy_and_generate_reads(run_copy):
    before = tree(run_copy)
    busy = f"error: {os.path.abspath(run_copy)}: in use by mpdiff train (pid {os.getpid()} on "
    with run_directory_lock(run_copy, "train"):
        for command in (["phema", run_copy, "--sigma-rel", "0.07", "--no-progress"],
                        ["ema-sweep", run_copy, "--sigma-rel", "0.07", "--seeds", "0", "--steps", "2",
                         "--no-progress"]):
            refused(*command, expect=[busy])
        assert tree(run_copy) == before
        succeeds("generate", run_copy, *GEN, "--out", "out")   # a reader takes no lock
    succeeds("phema", run_copy, "--sigma-rel", "0.07", "--no-progress")  # free again once released


def test_ema_lengths_that_collide_in_file_names_are_refused():
    refused("train", "--run-dir", "run", *RUN_ARGS, "--ema", "0.0501,0.0504",
            expect=["error: --ema: two EMA lengths round to 0.050; file names keep 3 decimals"])
    assert not os.path.lexists("run")


@pytest.mark.parametrize("grid", ["out/grid.png", "out", "out/sub/../grid.png"])
def test_generate_grid_inside_the_output_folder_is_refused(partial_run, grid):
    refused("generate", partial_run, *GEN, "--out", "out", "--grid", grid,
            expect=[f"error: --grid {grid} is inside --out out; the folder must hold only labelled samples"])
    assert os.listdir(".") == []


SAMPLES_0_3 = ["000000.png", "000001.png", "000002.png", "000003.png", "dataset.json"]


def test_generate_never_mixes_two_runs_in_one_folder(partial_run):
    """A previous sample folder is replaced whole (the new images, labels for exactly them); a folder holding
    anything else is refused and left as it was."""
    succeeds("generate", partial_run, *GEN, "--out", "out")
    assert sorted(os.listdir("out")) == SAMPLES_0_3
    succeeds("generate", partial_run, "--seeds", "0-1", "--steps", "2", "--no-progress", "--out", "out")
    assert sorted(os.listdir("out")) == ["000000.png", "000001.png", "dataset.json"]
    labels = json.loads(read("out/dataset.json"))["labels"]
    assert sorted(name for name, _ in labels) == ["000000.png", "000001.png"]
    assert sorted(os.listdir(".")) == ["out", "out-grid.png"]   # the previous folder is gone, not parked

    write("out/notes.txt", b"mine")
    before = tree(".")
    refused("generate", partial_run, *GEN, "--out", "out",
            expect=["error: --out out is not empty and is not a previous sample folder"])
    assert tree(".") == before


def test_generate_killed_midway_leaves_no_folder_and_resumes(partial_run, monkeypatch):
    real_save_png = mpdiff.storage.samples.save_png
    written = []

    def killed_after_two(path, image):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        real_save_png(path, image)

    monkeypatch.setattr(mpdiff.storage.samples, "save_png", killed_after_two)
    result = run_cli("generate", partial_run, *GEN, "--out", "out")
    assert result.exit_code == 130 and "interrupted" in result.stderr, (result.output, repr(result.exception))
    # No folder named out: only the hidden one being generated, with the two images made so far.
    assert len(written) == 2 and os.listdir(".") == [".out.generating"]
    assert sorted(os.listdir(".out.generating")) == [".generation.json", "000000.png", "000001.png"]
    made = {n: os.stat(os.path.join(".out.generating", n)).st_mtime_ns for n in ("000000.png", "000001.png")}
    monkeypatch.setattr(mpdiff.storage.samples, "save_png", real_save_png)
    result = succeeds("generate", partial_run, *GEN, "--out", "out")  # the same command: resumed
    assert "resuming" in result.stderr and sorted(os.listdir(".")) == ["out", "out-grid.png"]
    assert sorted(os.listdir("out")) == SAMPLES_0_3
    assert {n: os.stat(os.path.join("out", n)).st_mtime_ns for n in made} == made  # kept, not made again
    shutil.rmtree("out")
    os.remove("out-grid.png")

    # Interrupted while replacing a previous sample folder: the previous one stays as it was.
    succeeds("generate", partial_run, "--seeds", "10-13", "--steps", "2", "--no-progress", "--out", "previous")
    before = tree(".")
    written.clear()
    monkeypatch.setattr(mpdiff.storage.samples, "save_png", killed_after_two)
    result = run_cli("generate", partial_run, *GEN, "--out", "previous")
    assert result.exit_code == 130, (result.output, repr(result.exception))
    assert {k: v for k, v in tree(".").items() if not k.startswith(".previous.generating")} == before
    monkeypatch.setattr(mpdiff.storage.samples, "save_png", real_save_png)
    shutil.rmtree("previous")
    shutil.rmtree(".previous.generating")
    os.remove("previous-grid.png")

    # A folder merely named like a staging copy of ours (its manifest carries no token of it) is not ours to
    # remove, nor is another folder's (tests/test_hostile3_staging.py: a staging copy that carries its token
    # is removed), and a file in the place of the folder being generated is refused, not deleted.
    os.makedirs(".out.generating.k1ll3d00")
    write(".out.generating.k1ll3d00/.generation.json", b"{}")
    os.makedirs(".outer.generating.abcd1234")
    succeeds("generate", partial_run, *GEN, "--out", "out")
    assert sorted(os.listdir("out")) == SAMPLES_0_3
    assert sorted(os.listdir(".")) == [".out.generating.k1ll3d00", ".outer.generating.abcd1234", "out", "out-grid.png"]
    write(".other.generating", b"a file, not a folder")
    refused("generate", partial_run, *GEN, "--out", "other",
            expect=["error: ", ".other.generating: in the way of generation (not a folder); remove it"])
    assert open(".other.generating", "rb").read() == b"a file, not a folder"


def test_generate_grid_through_a_symlink_replaces_its_target(partial_run):
    write("real.png", b"old grid")
    os.symlink("real.png", "link.png")
    os.symlink("new.png", "dangling.png")
    succeeds("generate", partial_run, *GEN, "--out", "out", "--grid", "link.png")
    succeeds("generate", partial_run, *GEN, "--out", "out2", "--grid", "dangling.png")
    assert os.readlink("link.png") == "real.png" and os.readlink("dangling.png") == "new.png"
    for target in ("real.png", "new.png"):
        assert stat.S_ISREG(os.lstat(target).st_mode) and read(target)[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_appends_through_symlinked_log_and_stats(run_copy, tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    for name in ("log.txt", "stats.jsonl"):
        shutil.move(run_copy / name, kept / name)
        os.symlink(kept / name, run_copy / name)
    succeeds("train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "64")
    for name in ("log.txt", "stats.jsonl"):
        assert os.readlink(run_copy / name) == str(kept / name)
    assert [row["nimg"] for row in read_jsonl(kept / "stats.jsonl")] == [64, 128, 192, 256, 320]
    assert "resumed from" in (kept / "log.txt").read_text()


@pytest.mark.parametrize("kind", ["FIFO", "character device", "regular file"])
def test_generate_out_that_is_not_a_folder_is_refused(partial_run, kind):
    out = {"FIFO": "fifo", "character device": "/dev/null", "regular file": "file"}[kind]
    if kind == "FIFO":
        os.mkfifo(out)
    elif kind == "regular file":
        write(out, b"mine")
    before = tree(".")
    line = refused("generate", partial_run, *GEN, "--out", out, expect=[f"error: --out {out} is ", ", not a folder"])
    assert kind == "regular file" or f"is a {kind}, not a folder" in line   # the wording of a file: see below
    assert tree(".") == before
    assert kind != "FIFO" or is_fifo(out)


def test_generate_out_that_is_a_regular_file_is_described_as_one(partial_run):
    write("file", b"mine")
    refused("generate", partial_run, *GEN, "--out", "file",
            expect=["error: --out file is a regular file, not a folder"])


@pytest.mark.parametrize("case", ["--grid FIFO", "--grid directory", "--out symlink to an empty folder",
                                  "--out symlink to a previous sample folder"])
def test_generate_destinations_are_resolved_or_refused_before_any_work(partial_run, monkeypatch, case):
    """A grid path that cannot become a file is refused before any image is generated; an --out symlink is
    written through (the folder it points to gets the samples, the link stays, nothing is left beside it)."""
    import mpdiff.diffusion.generate as generation
    if case == "--out symlink to a previous sample folder":
        succeeds("generate", partial_run, *GEN, "--out", "target")
        os.remove("target-grid.png")
    calls = []
    real = generation.generate_to_folder
    monkeypatch.setattr(generation, "generate_to_folder", lambda *a, **k: calls.append(1) or real(*a, **k))
    if case.startswith("--grid"):
        os.mkfifo("grid.png") if case == "--grid FIFO" else os.mkdir("grid.png")
        args = ["--out", "out", "--grid", "grid.png"]
    else:
        os.makedirs("target", exist_ok=True)
        os.symlink("target", "out")
        args = ["--out", "out"]
    before = tree(".")
    if case.startswith("--grid"):
        kind = "a FIFO" if case == "--grid FIFO" else "a directory"
        refused("generate", partial_run, "--seeds", "0-1", "--steps", "2", "--no-progress", *args,
                expect=[f"grid.png: is {kind}; refusing to replace it with a file"])
        assert not calls and tree(".") == before
    else:
        succeeds("generate", partial_run, "--seeds", "0-1", "--steps", "2", "--no-progress", *args)
        assert os.readlink("out") == "target"
        assert sorted(os.listdir("target")) == ["000000.png", "000001.png", "dataset.json"]
        assert sorted(os.listdir(".")) == ["out", "out-grid.png", "target"]


# ======================================================================================================
# Hangs: each command fails its test (conftest.deadline) instead of hanging the suite after TIMEOUT seconds
# ======================================================================================================

def test_symlink_loops_in_the_run_directory(run_copy):
    run = run_copy
    for directory in (run, run / "checkpoints", run / "snapshots"):
        os.symlink(".", directory / "loop")
        os.symlink("a", directory / "b")
        os.symlink("b", directory / "a")
    os.symlink(".config.json.abcd1234.tmp", run / ".config.json.abcd1234.tmp")   # a loop named like ours
    os.symlink(".", run / "checkpoints" / ".training-state-000000000512.safetensors.abcd1234.tmp")
    links = {rel: kind for rel, kind in tree(run).items() if str(kind).startswith("->")}

    with deadline(TIMEOUT, "mpdiff over symlink loops"):
        result = succeeds("train", "--run-dir", run, *RUN_ARGS, "--slice", "64")
        assert "stopped at 320 images" in result.stdout
        succeeds("generate", run, *GEN, "--out", "out")
        succeeds("phema", run, "--sigma-rel", "0.07", "--no-progress")
    assert {rel: kind for rel, kind in tree(run).items() if str(kind).startswith("->")} == links


def test_fifo_as_config_json(run_copy):
    os.remove(run_copy / "config.json")
    os.mkfifo(run_copy / "config.json")
    before = tree(run_copy)
    with deadline(TIMEOUT, "train with a FIFO as config.json"):
        line = refused("train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "64")
    assert line == ("error: run/config.json: expected a regular run config, found a FIFO; move it away "
                    "or use a new run directory")
    assert tree(run_copy) == before


def test_fifo_as_stats_jsonl(run_copy):
    os.remove(run_copy / "stats.jsonl")
    os.mkfifo(run_copy / "stats.jsonl")
    checkpoints = tree(run_copy / "checkpoints")
    with deadline(TIMEOUT, "train with a FIFO as stats.jsonl"):
        line = refused("train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "64")
    assert line == "error: run/stats.jsonl: expected a regular JSON-lines file, found a FIFO"
    assert tree(run_copy / "checkpoints") == checkpoints and is_fifo(run_copy / "stats.jsonl")


def test_fifo_as_the_newest_checkpoint_is_skipped(run_copy):
    newest = ckpt(run_copy, 256)
    os.remove(newest)
    os.mkfifo(newest)
    with deadline(TIMEOUT, "train with a FIFO as the newest checkpoint"):
        result = succeeds("train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "64")
    assert "stopped at 192 images" in result.stdout
    log = log_lines(run_copy)
    skipped = [line for line in log if "skipping damaged checkpoint" in line]
    assert len(skipped) == 1 and f"{newest}: expected a regular tensor file, found a FIFO" in skipped[0]
    assert f"resumed from {ckpt(run_copy, 128)} at 128 images" in log[log.index(skipped[0]) + 1]
    assert is_fifo(newest)
    load_tensors(ckpt(run_copy, 192))


@pytest.mark.parametrize("command", ["generate", "phema"])
def test_fifo_as_a_snapshot(run_copy, command):
    snapshot = snap(run_copy, 256, 0.1)
    os.remove(snapshot)
    os.mkfifo(snapshot)
    before = tree(run_copy)
    args = [*GEN, "--out", "out"] if command == "generate" else ["--sigma-rel", "0.07", "--no-progress"]
    with deadline(TIMEOUT, f"{command} with a FIFO as a snapshot"):
        line = refused(command, run_copy, *args)
    assert line == f"error: {snapshot}: expected a regular snapshot, found a FIFO"
    assert tree(run_copy) == before and not os.path.exists("out")


@pytest.mark.parametrize("name", ["net.safetensors", "net.pt"])
def test_fifo_as_a_network_file(name):
    os.mkfifo(name)
    with deadline(TIMEOUT, "generate from a FIFO"):
        line = refused("generate", name, *GEN, "--out", "out")
    what = "tensor file" if name.endswith(".safetensors") else "torch file"
    assert line == f"error: {name}: expected a regular {what}, found a FIFO"
    assert not os.path.exists("out")


# ======================================================================================================
# Silent garbage
# ======================================================================================================

def test_nan_checkpoint_is_skipped_on_resume(partial_run, run_copy):
    newest = ckpt(run_copy, 256)
    tensors, meta = load_tensors(newest)
    name = first_float_tensor(tensors, "net.")
    save_tensors(newest, with_nan(tensors, name), meta)

    succeeds("train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "128")

    log = log_lines(run_copy)
    skipped = [line for line in log if "skipping damaged checkpoint" in line]
    assert len(skipped) == 1 and f"{newest}: tensor {name} holds non-finite values" in skipped[0]
    assert f"resumed from {ckpt(run_copy, 128)} at 128 images" in log[log.index(skipped[0]) + 1]
    assert same_tensors(newest, ckpt(partial_run, 256))         # written anew, as the undamaged run had it


def test_nan_checkpoint_is_never_called_the_last_good_one(run_copy, monkeypatch):
    tensors, meta = load_tensors(ckpt(run_copy, 256))
    nan_meta = dict(meta, nimg=384, step=6, ema_nimg=384)
    save_tensors(ckpt(run_copy, 384), with_nan(tensors, first_float_tensor(tensors, "net.")), nan_meta)
    patch_training_loss(monkeypatch, lambda real, *a, **k: real(*a, **k) * float("nan"))
    line = refused("train", "--run-dir", run_copy, *RUN_ARGS, expect=["non-finite"])
    assert f"Last good checkpoint: {ckpt(run_copy, 256)}" in line and "384" not in line, line


@pytest.mark.parametrize("damage", ["NaN weight", "float tensor stored as int32"])
def test_generate_refuses_nan_or_integer_weights(partial_run, damage):
    tensors, meta = load_tensors(snap(partial_run, 256, 0.1))
    name = first_float_tensor(tensors)
    if damage == "NaN weight":
        tensors = with_nan(tensors, name)
        expect = f"(tensor {name} holds non-finite values)"
    else:
        tensors[name] = tensors[name].to(torch.int32)
        expect = f"(tensor {name} is stored as int32, expected a floating-point tensor)"
    save_tensors("bad.safetensors", tensors, meta)
    refused("generate", "bad.safetensors", *GEN, "--out", "out", expect=["error: bad.safetensors: ", expect])
    assert not os.path.exists("out")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_generate_guidance_must_be_finite(partial_run, value):
    refused("generate", partial_run, *GEN, "--out", "out", "--guidance", value,
            expect=[f"error: --guidance must be a finite number, got {float(value)}"])
    assert not os.path.exists("out")


def test_phema_over_a_nan_snapshot_is_refused_and_writes_nothing(run_copy):
    bad = snap(run_copy, 128, 0.05)
    tensors, meta = load_tensors(bad)
    name = first_float_tensor(tensors)
    save_tensors(bad, with_nan(tensors, name), meta)
    before = files_in(run_copy)
    refused("phema", run_copy, "--sigma-rel", "0.07", "--no-progress",
            expect=[f"error: {bad}: tensor {name} holds non-finite values; it cannot be averaged into a network"])
    assert files_in(run_copy) == before                         # no reconstruction, no temporary


@pytest.mark.parametrize("flag, value, expect", [
    ("--p-mean", "nan", "--p-mean must be finite, got nan"),
    ("--p-mean", "inf", "--p-mean must be finite, got inf"),
    ("--lr", "inf", "--lr must be positive and finite, got inf"),
    ("--lr", "nan", "--lr must be positive and finite, got nan"),
    ("--p-std", "inf", "--p-std must be positive and finite, got inf"),
])
def test_nonfinite_training_options_are_refused(flag, value, expect):
    refused("train", "--run-dir", "run", *RUN_ARGS, flag, value, expect=["error: " + expect])
    assert not os.path.lexists("run")


@pytest.mark.parametrize("change, reason", [
    ({"nimg": 10 ** 21}, "inconsistent image count 1000000000000000000000 / step 4"),
    ({"nimg": -64}, "inconsistent image count -64 / step 4"),
    ({"step": 3}, "inconsistent image count 256 / step 3"),
    ({"nimg": 192, "step": 3, "ema_nimg": 192}, "file name does not match its image count 192"),
    ({"ema_nimg": 320}, "EMA state does not match the run"),
    ({"counters": {"elapsed_sec": -1.0}}, "damaged counters in its metadata"),
])
def test_checkpoint_with_impossible_metadata_is_skipped(run_copy, change, reason):
    newest = ckpt(run_copy, 256)
    tensors, meta = load_tensors(newest)
    save_tensors(newest, tensors, dict(meta, **change))
    succeeds("train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "64")
    log = log_lines(run_copy)
    skipped = [line for line in log if "skipping damaged checkpoint" in line]
    assert len(skipped) == 1 and f"{newest}: {reason}" in skipped[0], skipped
    assert f"resumed from {ckpt(run_copy, 128)} at 128 images" in log[log.index(skipped[0]) + 1]


# ======================================================================================================
# Tracebacks instead of one line
# ======================================================================================================

# Undecodable names arrive as bytes (run_cli gives them to the command as a process's sys.argv holds them); its
# stdout is strict UTF-8, as a process's: an unescaped name fails the command. A real process with such argv:
# tests/test_data_hostile.py::test_cli_process_with_undecodable_dataset_path.

def test_new_run_in_a_non_utf8_run_directory():
    result = succeeds("train", "--run-dir", b"run-\xff", *RUN_ARGS, "--slice", "64")
    assert "stopped at 64 images" in result.stdout
    assert "new run in run-\\xff: " in read(b"run-\xff/log.txt").decode()


def test_generate_and_phema_in_a_non_utf8_run_directory(partial_run):
    run = b"run-\xff"
    shutil.copytree(os.fsencode(partial_run), run)
    before = tree(partial_run)
    result = succeeds("generate", run, *GEN, "--out", b"out-\xfe")
    assert "to out-\\xfe; grid: out-\\xfe-grid.png" in result.stdout
    assert sorted(os.listdir(b"out-\xfe")) == [os.fsencode(name) for name in SAMPLES_0_3]
    succeeds("phema", run, "--sigma-rel", "0.07", "--no-progress")
    assert os.listdir(run + b"/phema") == [b"phema-000000000256-0.070.safetensors"]
    kept = ("checkpoints", "snapshots")
    after = {os.fsdecode(rel): digest for rel, digest in tree(run).items() if os.path.dirname(os.fsdecode(rel)) in kept}
    assert after == {rel: digest for rel, digest in before.items() if os.path.dirname(rel) in kept} and after


def test_resume_in_a_non_utf8_run_directory(partial_run):
    run = b"run-\xff"
    shutil.copytree(os.fsencode(partial_run), run)
    result = succeeds("train", "--run-dir", run, *RUN_ARGS, "--slice", "64")
    assert "stopped at 320 images" in result.stdout


@pytest.mark.parametrize("content, expect", [
    (b'\xff\xfe{"preset": "digits"}', "run/config.json: not UTF-8 text (byte 0); move it away"),
    (b"[" * 200_000, "run/config.json: JSON nested too deeply; move it away"),
    (b'{"preset": ' + b"[" * 200_000, "run/config.json: JSON nested too deeply; move it away"),
    (b"\x00" * 64, "run/config.json: not valid JSON ("),
])
def test_config_json_that_cannot_be_read(run_copy, content, expect):
    (run_copy / "config.json").write_bytes(content)
    before = tree(run_copy)
    refused("train", "--run-dir", run_copy, *RUN_ARGS, expect=["error: " + expect])
    assert tree(run_copy) == before


@pytest.mark.parametrize("where", ["config.json", "stats.jsonl", "checkpoint metadata"])
def test_json_integer_with_too_many_digits(run_copy, where):
    """Python refuses to convert integers of more than 4300 digits (a plain ValueError from json.loads)."""
    huge = "9" * 5000
    if where == "config.json":
        (run_copy / "config.json").write_text('{"preset": ' + huge + "}")
    elif where == "stats.jsonl":
        with open(run_copy / "stats.jsonl", "a") as f:
            f.write('{"nimg": ' + huge + "}\n")
    else:  # metadata values are JSON texts: "step" becomes one long number
        tensors, meta = load_tensors(ckpt(run_copy, 256))
        text = {k: json.dumps(v) for k, v in meta.items()}
        data = safetensors.torch.save(tensors, metadata=dict(text, step=huge))  # before the file (mapped) is cut
        with open(ckpt(run_copy, 256), "wb") as f:
            f.write(data)
    if where == "config.json":
        refused("train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "64",
                expect=["error: run/config.json: not usable JSON (Exceeds the limit (4300 digits)"])
        return
    succeeds("train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "64")
    log = "\n".join(log_lines(run_copy))
    if where == "stats.jsonl":
        assert f"{run_copy / 'stats.jsonl'}: line 5 is damaged (not valid JSON); kept as it is" in log
        assert (run_copy / "stats.jsonl").read_text().splitlines()[4] == '{"nimg": ' + huge + "}"
    else:
        assert f"skipping damaged checkpoint: {ckpt(run_copy, 256)}: " in log
        assert f"resumed from {ckpt(run_copy, 128)} at 128 images" in log


STATS_ROWS = {
    "a JSON list": (b"[1]", "a JSON list, not an object"),
    "a JSON string": (b'"x"', "a JSON str, not an object"),
    "garbage bytes": (b"\xff\xfe\x00 garbage \x80", "not UTF-8"),
    "invalid JSON": (b"{]", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(STATS_ROWS))
def test_malformed_stats_rows_are_reported_and_kept(run_copy, case):
    row, reason = STATS_ROWS[case]
    lines = (run_copy / "stats.jsonl").read_bytes().splitlines(keepends=True)
    before = [json.loads(line) for line in lines]
    (run_copy / "stats.jsonl").write_bytes(b"".join(lines[:1]) + row + b"\n" + b"".join(lines[1:]))

    succeeds("train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "64")

    after = (run_copy / "stats.jsonl").read_bytes().split(b"\n")
    rows = read_jsonl(run_copy / "stats.jsonl")
    assert [r for r in rows if isinstance(r, dict)][:4] == before and len(rows) == 6
    assert not isinstance(rows[1], dict) and rows[1].number == 2
    if case != "garbage bytes":  # byte for byte: see test_non_utf8_stats_row_is_kept_byte_for_byte
        assert after[1] == row
    assert any(f"{run_copy / 'stats.jsonl'}: line 2 is damaged ({reason}" in line and "kept as it is" in line
               for line in log_lines(run_copy))


def test_directory_in_place_of_an_older_checkpoint(run_copy):
    directory = ckpt(run_copy, 64)
    os.mkdir(directory)
    write(os.path.join(directory, "mine.txt"), b"user data")
    succeeds("train", "--run-dir", run_copy, *RUN_ARGS, "--slice", "128")
    assert read(os.path.join(directory, "mine.txt")) == b"user data"
    assert sorted(os.listdir(run_copy / "checkpoints")) == [os.path.basename(ckpt(run_copy, n)) for n in (64, 256, 384)]
    assert f"resumed from {ckpt(run_copy, 256)} at 256 images" in read(run_copy / "log.txt").decode()


@pytest.mark.parametrize("device", ["bogus", "cuda", "cuda:7", "cpu:x", "meta", "mps"])
@pytest.mark.parametrize("command", ["train", "generate"])
def test_unusable_devices_are_refused(partial_run, command, device):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    args = (["train", "--run-dir", "run", *RUN_ARGS, "--slice", "64"] if command == "train"
            else ["generate", partial_run, *GEN, "--out", "out"])
    refused(*args, "--device", device, expect=[f"error: --device '{device}'"])
    assert os.listdir(".") == []


def _edm2_state_dict():
    from mpdiff import build_network
    return build_network(tiny_config()).state_dict()


def _bad_state_dict(case):
    sd = _edm2_state_dict()
    if case == "int keys":
        return {0: torch.zeros(1), **sd}
    if case == "a block missing":
        del sd["unet.enc.16x16_block0.conv_res1.weight"]
    elif case == "a decoder tensor missing":
        del sd["unet.dec.16x16_block0.conv_res0.weight"]
    elif case == "odd name":
        sd["unet.enc.banana"] = torch.zeros(1)
    elif case == "empty level name":
        sd["unet.enc."] = torch.zeros(1)
    elif case == "name with a newline":
        sd["unet.enc.16x16_conv.weight\nerror: injected"] = torch.zeros(1)
    elif case == "1-D conv weight":
        sd["unet.enc.16x16_conv.weight"] = torch.zeros(32)
    elif case == "1-D block weight":
        sd["unet.enc.16x16_block0.conv_res1.weight"] = torch.zeros(32)
    elif case == "scalars only":
        sd = {k: torch.tensor(1.0) for k in sd}
    elif case == "empty":
        sd = {}
    elif case == "a list of tensors":
        return list(sd.values())
    else:
        raise ValueError(case)
    return sd


@pytest.mark.parametrize("case", ["int keys", "a block missing", "a decoder tensor missing", "odd name",
                                  "empty level name", "name with a newline", "1-D conv weight", "1-D block weight",
                                  "scalars only", "empty", "a list of tensors"])
def test_state_dict_files_that_do_not_fit_are_one_line(case):
    torch.save(_bad_state_dict(case), "net.pt")
    refused("generate", "net.pt", *GEN, "--out", "out")
    assert not os.path.exists("out")


def test_a_plain_edm2_state_dict_still_generates():
    torch.save(_edm2_state_dict(), "net.pt")
    succeeds("generate", "net.pt", *GEN, "--out", "out")


@pytest.mark.parametrize("args, expect", [
    (["phema", "--sigma-rel", "0.07", "--at", "nan"], "--at: cannot parse 'nan'"),
    (["phema", "--sigma-rel", "0.07", "--at", "inf"], "--at: cannot parse 'inf'"),
    (["phema", "--sigma-rel", "0.07", "--at", "1e300"], "--at: cannot parse '1e300'"),
    (["phema", "--sigma-rel", "1e-300"], "sigma_rel 1e-300 is below 0.001"),
    (["phema", "--sigma-rel", "nan"], "sigma_rel nan is outside the valid range"),
    (["phema", "--sigma-rel", "inf"], "sigma_rel inf is outside the valid range"),
    (["phema", "--sigma-rel", "0.0501,0.0504"], "two EMA lengths round to 0.050"),
    (["plot-ema-profile", "--sigma-rel", "0.07", "--at", "nan"], "--at: cannot parse 'nan'"),
    (["plot-ema-profile", "--sigma-rel", "nan"], "nan"),
    (["ema-sweep", "--sigma-rel", "0.07", "--seeds", "0", "--at", "inf"], "--at: cannot parse 'inf'"),
])
def test_post_hoc_ema_times_and_lengths_are_one_line(run_copy, args, expect):
    before = tree(run_copy)
    refused(args[0], run_copy, *args[1:], expect=[expect])
    assert tree(run_copy) == before


def test_stray_copies_of_our_files_are_ignored(run_copy):
    run = run_copy
    succeeds("phema", run, "--sigma-rel", "0.07", "--no-progress")
    stray = [run / "phema" / "phema-000000000256-0.070 (copy).safetensors",
             run / "snapshots" / "ema-000000000256-0.100 (copy).safetensors",
             run / "checkpoints" / "training-state-000000000256 (copy).safetensors"]
    for path in stray:
        path.write_bytes(b"a copy the file manager made, later damaged")
    result = succeeds("generate", run, *GEN, "--out", "out", "--sigma-rel", "0.07")
    assert f"network: {run / 'phema' / 'phema-000000000256-0.070.safetensors'}" in result.stderr
    result = succeeds("generate", run, *GEN, "--out", "out2")
    assert f"network: {snap(run, 256, 0.1)}" in result.stderr
    succeeds("phema", run, "--sigma-rel", "0.08", "--no-progress")
    succeeds("train", "--run-dir", run, *RUN_ARGS, "--slice", "64")
    assert all(path.read_bytes() == b"a copy the file manager made, later damaged" for path in stray)


_MAXRSS_THEN_RUN = (
    "import resource, sys\n"
    "import mpdiff.cli\n"
    "try:\n"
    "    mpdiff.cli.main(sys.argv[1:])\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
    "sys.exit(code)\n"
)
_ADDRESS_SPACE = 4 * 2 ** 30   # a safety net for this shared machine: a regression fails instead of swapping


def _limited_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE, _ADDRESS_SPACE))


def _generate_with_memory_report(source, env=None):
    """`mpdiff generate SOURCE` as a process (its peak memory is the point, and its address space is limited):
    (exit status, stderr, peak resident memory in KiB)."""
    proc = subprocess.run([sys.executable, "-c", _MAXRSS_THEN_RUN, "generate", source, *GEN, "--out", "out"],
                          capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=_limited_address_space,
                          check=False, env=dict(os.environ, **(env or {})))
    maxrss_kb = int(proc.stdout.split("MAXRSS_KB")[-1]) if "MAXRSS_KB" in proc.stdout else None
    return proc.returncode, proc.stderr, maxrss_kb


def _expanded(*shape):
    """A tensor of `shape` whose storage is one element: a few bytes in the file, whatever its shape."""
    return torch.zeros([1] * len(shape)).expand(*shape)


def test_state_dict_describing_a_huge_network_is_refused_without_allocating_it():
    """Shapes that describe a network of 200,000 channels but do not fit it are refused before anything is
    allocated, even where the memory budget (MPDIFF_MAX_NETWORK_BYTES, here far above that network's size) would
    let the network be built: the shapes are compared with a network built on the meta device."""
    channels = 200_000
    sd = _edm2_state_dict()   # tiny_config: 32 channels, channel_mult (1, 2, 2), 16x16 images
    sd["unet.enc.16x16_conv.weight"] = _expanded(channels, 4, 3, 3)
    sd["unet.enc.16x16_block0.conv_res1.weight"] = _expanded(channels, channels, 3, 3)
    for level in ("8x8", "4x4"):
        sd[f"unet.enc.{level}_block0.conv_res1.weight"] = _expanded(2 * channels, 2 * channels, 3, 3)
    sd["unet.emb_fourier.freqs"] = _expanded(channels)
    sd["unet.emb_noise.weight"] = _expanded(2 * channels, channels)
    torch.save(sd, "huge.pt")
    assert os.path.getsize("huge.pt") < 2 ** 24

    code, stderr, maxrss_kb = _generate_with_memory_report("huge.pt", env={"MPDIFF_MAX_NETWORK_BYTES": str(2 ** 62)})
    assert code == 1, stderr[-2000:]
    line = error_line(stderr)
    assert line.startswith("error: huge.pt: state_dict does not match the network built from {"), line
    assert "'model_channels': 200000, 'channel_mult': [1, 2, 2]," in line, line
    assert line.endswith("(tensor unet.emb_fourier.phases has shape (32,), expected (200000,))"), line
    assert maxrss_kb is not None and maxrss_kb < 1_500_000, maxrss_kb   # torch itself is about 300 MB
    assert not os.path.exists("out")


def test_consistent_state_dict_of_a_huge_network_is_one_line():
    """Every shape agrees with the network the file describes, and the file is tiny (stride-0 tensors):
    the size of that network is what must be refused, before anything is allocated."""
    from mpdiff.nn.build import build_meta_network
    shapes = build_meta_network(tiny_config(model_channels=500_000)).state_dict()   # petabytes: more than any machine
    torch.save({k: _expanded(*v.shape) if v.ndim else torch.zeros(()) for k, v in shapes.items()}, "huge.pt")
    assert os.path.getsize("huge.pt") < 2 ** 20
    code, stderr, maxrss_kb = _generate_with_memory_report("huge.pt")   # the default budget: half the memory
    assert code == 1, stderr[-2000:]
    assert "the network it describes needs " in error_line(stderr)
    assert maxrss_kb is not None and maxrss_kb < 1_500_000


@pytest.mark.parametrize("where", ["equal", "inside the dataset", "around the dataset"])
def test_run_dir_overlapping_the_dataset_is_refused_before_writing(where):
    data = {"equal": "data", "inside the dataset": "data", "around the dataset": "run/data"}[where]
    run_dir = {"equal": "data", "inside the dataset": "data/run", "around the dataset": "run"}[where]
    os.makedirs(data)
    for seed in range(8):
        write(os.path.join(data, f"{seed}.png"), png_bytes(pixels(seed, 8, 1)))
    before = tree(".")
    refused("train", "--data", data, "--run-dir", run_dir, *RUN_ARGS,
            expect=[f"error: --run-dir {run_dir} and the dataset folder {data} overlap"])
    assert tree(".") == before
