"""Hostile inputs, round three (issue 30): the run directory, its checkpoints and the remaining tracebacks,
each fixed at its mechanism and checked through the command line where it reaches the user.

Mechanisms: storage.files.parse_json (every JSON we read: nested too deep is one line), storage.layout.check_folder
(every run-directory folder before it is listed or written: a symlink loop, a file in its place), storage.tensors
(a tensor of a dtype we never write is damage; a checkpoint holds float32 only, so the older good one is used),
storage.lock.run_directory_use (phema and ema-sweep writing elsewhere hold a shared lock that needs no write
permission), distributed.Distributed.peers_watched (a killed rank is one line on the others).
"""

import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ckpt, digests, run_cli, snap, tiny_run_flags
from test_hostile3 import _one_line_failure as one_line_failure

from mpdiff.errors import MpdiffError
from mpdiff.storage.files import JSON_MAX_DEPTH, read_json
from mpdiff.storage.tensors import load_tensors, save_tensors

TRAIN = ["train", "--run-dir", "run", *tiny_run_flags()]


def _with_dtype(path, dtype, name=None):
    """Rewrite the safetensors file `path` with one tensor (the first, or `name`) cast to `dtype`; returns its name."""
    tensors, meta = load_tensors(path)
    name = name or sorted(tensors)[0]
    tensors[name] = tensors[name].to(dtype)
    save_tensors(path, tensors, meta)
    return name


# ---- every JSON we read: nested too deep is one line ---------------------------------------------------

@pytest.mark.parametrize("document", [b"[" * 100_000, b'{"preset": ' + b"[" * (JSON_MAX_DEPTH + 1)
                                      + b"]" * (JSON_MAX_DEPTH + 1) + b"}"], ids=["100,000 levels", "101 levels"])
def test_a_config_nested_too_deep_is_one_line(run_copy, document):
    # 100,000 levels made a RecursionError; 101 parse, but whatever walks them later might recurse.
    (run_copy / "config.json").write_bytes(document)
    line = one_line_failure(run_cli(*TRAIN))
    assert "run/config.json: JSON nested too deeply" in line, line
    with pytest.raises(MpdiffError, match="nested too deeply"):
        read_json(run_copy / "config.json")


def test_nested_json_in_metadata_a_stats_row_or_a_lock_file_is_one_line_or_a_damaged_row(run_copy):
    deep = "[" * 5000 + "]" * 5000
    # a snapshot's metadata (read by phema): deeper than any we write, though Python would parse it
    path = snap(run_copy, 192, 0.05)
    tensors, meta = load_tensors(path)
    nested = []
    for _ in range(JSON_MAX_DEPTH):
        nested = [nested]
    save_tensors(path, tensors, {**meta, "extra": nested})
    line = one_line_failure(run_cli("phema", "run", "--sigma-rel", "0.07", "--no-progress"))
    assert line.endswith(f"{path}: snapshot metadata: JSON nested too deeply"), line
    os.remove(path)
    # a lock file holding deep JSON is not our lock (it made a RecursionError while looking for a holder)
    (run_copy / ".mpdiff.lock").write_text(deep)
    line = one_line_failure(run_cli("phema", "run", "--sigma-rel", "0.07", "--no-progress"))
    assert "is not an mpdiff lock file" in line, line
    os.remove(run_copy / ".mpdiff.lock")
    # a stats row: kept as it is and reported, like any damaged row
    with open(run_copy / "stats.jsonl", "a") as f:
        f.write(deep + "\n")
    result = run_cli(*TRAIN, "--slice", "64")
    assert result.exit_code == 0, result.output
    assert "is damaged (nested too deeply); kept as it is" in (run_copy / "log.txt").read_text()


# ---- the run directory's folders: a symlink loop or a file in a folder's place -------------------------

@pytest.mark.parametrize("folder, kind", [("checkpoints", "loop"), ("snapshots", "loop"), ("samples", "loop"),
                                          ("tensorboard", "file"), ("tensorboard", "dangling link")])
def test_a_run_folder_that_loops_or_is_a_file_stops_training_in_one_line(run_copy, folder, kind):
    path = run_copy / folder
    if path.exists():
        shutil.rmtree(path)
    if kind == "loop":
        os.symlink(folder, path)  # checkpoints -> checkpoints: ELOOP
    elif kind == "file":
        path.write_text("the user's notes\n")
    else:
        os.symlink("elsewhere", path)
    before = sorted(os.listdir(run_copy)), (run_copy / "log.txt").read_bytes(), (run_copy / "stats.jsonl").read_bytes()
    line = one_line_failure(run_cli(*TRAIN, "--tensorboard"))
    expected = {"loop": "a symlink loop (it leads back to itself)", "file": "is a regular file where mpdiff keeps a "
                "folder", "dangling link": "a symlink to elsewhere, which does not exist"}[kind]
    assert line.startswith(f"error: run/{folder}: {expected}"), line
    after = sorted(os.listdir(run_copy)), (run_copy / "log.txt").read_bytes(), (run_copy / "stats.jsonl").read_bytes()
    assert after == before  # refused before anything was written


@pytest.mark.parametrize("folder", ["snapshots", "phema"])
def test_phema_with_a_folder_linked_to_itself_is_one_line(run_copy, folder):
    if (run_copy / folder).exists():
        shutil.rmtree(run_copy / folder)
    os.symlink(folder, run_copy / folder)
    line = one_line_failure(run_cli("phema", "run", "--sigma-rel", "0.07", "--no-progress"))
    assert f"run/{folder}: a symlink loop" in line, line  # not "no EMA snapshots found"
    line = one_line_failure(run_cli("plot-ema-profile", "run", "--sigma-rel", "0.07"))
    assert f"run/{folder}: a symlink loop" in line, line


# ---- checkpoints: a tensor of another dtype is damage, and the older good one is used --------------------

@pytest.mark.parametrize("dtype, code", [(torch.float8_e4m3fn, "F8_E4M3"), (torch.complex64, "C64"),
                                         (torch.int32, "I32")])
def test_a_checkpoint_tensor_of_another_dtype_is_skipped_for_the_older_good_one(run_copy, dtype, code):
    # float8 was a traceback; complex64 and int32 were cast silently into the float32 weights.
    name = _with_dtype(ckpt(run_copy, 256), dtype)
    result = run_cli(*TRAIN, "--slice", "64")
    assert result.exit_code == 0, result.output
    log = (run_copy / "log.txt").read_text()
    assert f"skipping damaged checkpoint: run/checkpoints/training-state-000000000256.safetensors: tensor {name} " \
           f"has dtype {code}, not F32" in log
    assert "resumed from run/checkpoints/training-state-000000000128.safetensors" in log
    assert os.path.exists(ckpt(run_copy, 192)) and os.path.exists(ckpt(run_copy, 128))  # the damaged one never counts


def test_network_files_and_torch_files_with_float8_or_complex_tensors_are_one_line(run_copy, tmp_path):
    path = snap(run_copy, 256, 0.1)
    name = _with_dtype(path, torch.float8_e4m3fn, "unet.dec.2x2_block0.conv_res0.weight")
    line = one_line_failure(run_cli("generate", str(path), "--seeds", "0", "--out", str(tmp_path / "a")))
    assert line.endswith(f"{path}: tensor {name} has dtype F8_E4M3, not a dtype mpdiff writes"), line
    line = one_line_failure(run_cli("phema", "run", "--sigma-rel", "0.07", "--no-progress"))
    assert f"{path}: tensor {name} has dtype F8_E4M3" in line, line
    torch.save({"unet.w": torch.zeros(4, dtype=torch.complex64)}, tmp_path / "net.pt")
    line = one_line_failure(run_cli("generate", str(tmp_path / "net.pt"), "--seeds", "0", "--out", str(tmp_path / "b")))
    assert "tensor unet.w is torch.complex64; only float and integer tensors are accepted" in line, line


# ---- a read-only run directory: phema --out elsewhere writes nothing into it ------------------------------

def _read_only_mount_works(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    done = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {probe} {probe} && mount -o remount,bind,ro "
                           f"{probe} && ! touch {probe}/x 2>/dev/null"], capture_output=True)
    return done.returncode == 0


def test_phema_of_a_read_only_run_directory_writes_elsewhere(run_copy, tmp_path):
    # It was refused: the lock was taken (and created) inside the run directory even with --out elsewhere.
    os.remove(run_copy / ".mpdiff.lock")  # none yet, and none can be created
    before = sorted(os.listdir(run_copy)), digests(run_copy)
    out = tmp_path / "elsewhere"
    command = ["phema", "run", "--sigma-rel", "0.07", "--no-progress", "--out", str(out)]
    os.chmod(run_copy, 0o555)
    try:
        if not os.access(run_copy, os.W_OK):  # not root: the permission is enough
            result = run_cli(*command)
            exit_code, output = result.exit_code, result.output
        elif shutil.which("unshare") and _read_only_mount_works(tmp_path):  # root: a read-only bind mount
            script = f'mount --bind run run && mount -o remount,bind,ro run && exec "$@"'
            done = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-m", "mpdiff", *command],
                                  capture_output=True, text=True, timeout=120)
            exit_code, output = done.returncode, done.stdout + done.stderr
        else:
            pytest.skip("cannot make a directory read-only here (root, and no read-only bind mount)")
    finally:
        os.chmod(run_copy, 0o755)
    assert exit_code == 0, output
    assert os.listdir(out) == ["phema-000000000256-0.070.safetensors"]
    assert (sorted(os.listdir(run_copy)), digests(run_copy)) == before


def test_a_reader_and_a_writer_of_one_run_directory_exclude_each_other(run_copy, tmp_path):
    from mpdiff.storage.lock import run_directory_lock, run_directory_read_lock

    with run_directory_read_lock("run", "phema"):  # phema --out elsewhere, reading the snapshots
        line = one_line_failure(run_cli(*TRAIN))
        assert "run: in use by mpdiff phema or ema-sweep reading its snapshots" in line, line
        with run_directory_read_lock("run", "ema-sweep"):  # readers share
            pass
    with run_directory_lock("run", "train"):
        line = one_line_failure(run_cli("phema", "run", "--sigma-rel", "0.07", "--no-progress",
                                        "--out", str(tmp_path / "out")))
        assert "run: in use by mpdiff train (pid" in line, line
    assert not (tmp_path / "out").exists()


def test_only_an_output_outside_the_run_directory_makes_phema_a_reader(run_copy, tmp_path):
    from mpdiff.storage.lock import is_inside

    os.symlink(run_copy.resolve(), tmp_path / "link")
    assert is_inside("run/phema", "run") and is_inside("run", "run") and is_inside(tmp_path / "link/x", "run")
    assert not is_inside(tmp_path / "elsewhere", "run") and not is_inside("run-2", "run")


# ---- a killed torchrun rank --------------------------------------------------------------------------

def test_a_collective_that_failed_because_a_peer_died_is_one_line():
    from mpdiff.distributed import Distributed

    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:23961: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging")
    two, eight = Distributed(rank=0, world_size=2, backend="gloo"), Distributed(rank=3, world_size=8, backend="gloo")
    assert two.peer_stopped(gloo).startswith("rank 1 stopped (killed?), so rank 0 cannot go on; the run can be resumed")
    assert eight.peer_stopped(gloo).startswith("another of the 8 processes stopped (killed?), so rank 3 cannot go on")
    assert Distributed.single().peer_stopped(gloo) is None  # one process: nothing to lose
    assert two.peer_stopped(RuntimeError("CUDA out of memory")) is None  # anything else stays what it is
    with pytest.raises(MpdiffError, match="rank 1 stopped"), two.peers_watched():
        raise gloo
    with pytest.raises(ValueError), two.peers_watched():
        raise ValueError("a bug")


def test_a_killed_rank_leaves_the_other_with_one_line(tmp_path, monkeypatch):
    # Rank 1 joins the process group and is killed; rank 0 (mpdiff train, in this process) printed gloo's
    # traceback at its next collective.
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LOCAL_RANK": "0", "RANK": "0"}
    rank1 = textwrap.dedent("""
        import os, signal, time
        import torch.distributed as dist
        dist.init_process_group("gloo")
        time.sleep(1.5)  # after rank 0 has joined too; it is then at, or on its way to, its first collective
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    peer = subprocess.Popen([sys.executable, "-c", rank1], env={**os.environ, **env, "RANK": "1", "LOCAL_RANK": "1"})
    try:
        result = run_cli(*TRAIN, env=env)
    finally:
        peer.wait(timeout=120)
    assert peer.returncode == -9
    assert not dist.is_initialized()  # closed on the way out
    line = one_line_failure(result)
    assert line.startswith("error: rank 1 stopped (killed?), so rank 0 cannot go on; the run can be resumed from the "
                           "last checkpoint in run/checkpoints"), line
