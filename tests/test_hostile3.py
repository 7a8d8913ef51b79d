"""Hostile inputs, round three (issue 30): each class fixed at its mechanism, checked through the command
line where it reaches the user. Mechanisms: storage.files (JSON readers refuse a key given twice; logs are
read line by line, without a whole-file limit; an append breaks a hard link first), storage.lock (a lock
file with other hard links is refused, never truncated), train.checkpoint (only readable checkpoints are
pruned or count as kept; the optimiser settings must be this run's Adam), config.NetworkConfig.check (the
same checks for a value from a flag and from a file)."""

import json
import os
import shutil

import pytest
from conftest import ckpt, run_cli, tiny_run_flags, train_tiny

from mpdiff.errors import CheckpointError, MpdiffError
from mpdiff.storage.files import append_line, read_json
from mpdiff.storage.tensors import load_tensors, save_tensors


def _one_line_failure(result):
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# ---- what we wrote earlier is read back with the same checks as user input ---------------------------

def test_a_key_given_twice_in_a_json_file_is_refused_in_one_line(run_copy):
    config = (run_copy / "config.json").read_text()
    doubled = config.replace('"preset": "digits"', '"preset": "digits", "preset": "mnist"', 1)
    assert doubled != config
    (run_copy / "config.json").write_text(doubled)
    with pytest.raises(MpdiffError, match="key 'preset' appears twice"):
        read_json(run_copy / "config.json")
    line = _one_line_failure(run_cli("train", "--run-dir", "run", *tiny_run_flags()))
    assert "config.json" in line and "appears twice" in line


def test_network_metadata_gets_the_checks_of_the_flags(partial_run, tmp_path):
    # sigma_data NaN or 1e30 in a network file made all-black images with exit 0.
    snapshot = sorted((partial_run / "snapshots").iterdir())[-1]
    tensors, meta = load_tensors(snapshot)
    for value, expected in ((float("nan"), "sigma_data must be in (0, 10000], got nan"),
                            (1e30, "sigma_data must be in (0, 10000], got 1e+30")):
        path = tmp_path / f"net-{value}.safetensors"
        save_tensors(path, tensors, dict(meta, network=dict(meta["network"], sigma_data=value)))
        line = _one_line_failure(run_cli("generate", str(path), "--seeds", "0-1", "--steps", "2",
                                         "--out", str(tmp_path / f"out-{value}")))
        assert line.endswith(f"{path}: network config: {expected}"), line
        assert not (tmp_path / f"out-{value}").exists()


@pytest.mark.parametrize("flags, message", [
    (["--blocks", "0"], "--blocks must be positive, got 0"),
    (["--channel-mult", "0"], "--channel-mult must be a list of positive integers"),
    (["--mlp-ratio", "nan", "--backbone", "uvit"], "--mlp-ratio must be positive and finite, got nan"),
    (["--kappa", "nan"], "--kappa must be finite, got nan"),  # stored, it would never equal itself on resume
    (["--attn-res", "3"], "--attn-res 3: no level of this network has that resolution (its levels: 8, 4, 2)"),
])
def test_shape_and_value_flags_are_checked_before_anything_is_built(flags, message):
    line = _one_line_failure(run_cli("train", "--run-dir", "run", *tiny_run_flags(), *flags))
    assert message in line, line
    assert not os.path.exists("run/config.json")


def test_info_refuses_a_resolution_the_levels_cannot_halve():
    line = _one_line_failure(run_cli("info", "digits", "--resolution", "3"))
    assert "cannot be halved" in line, line


# ---- checkpoints: a damaged newest one never costs an older good one ---------------------------------

def test_a_zero_byte_newest_checkpoint_never_costs_the_older_good_one(run_copy):
    # checkpoints at 128 and 256 (good) and an empty file where the one at 512 would be: the run resumes
    # from 256 and writes 384. Pruning to two used to count the empty file and delete 128 and 256.
    open(ckpt(run_copy, 512), "wb").close()
    trainer = train_tiny(run_copy, slice_nimg=128)  # 128 more images
    assert trainer.state.nimg == 384
    assert os.path.getsize(ckpt(run_copy, 256)) > 0 and os.path.exists(ckpt(run_copy, 384))
    assert not os.path.exists(ckpt(run_copy, 128))   # the oldest good one is pruned: two good ones stay
    assert os.path.getsize(ckpt(run_copy, 512)) == 0  # the damaged file is left for its owner
    assert "skipping damaged checkpoint" in (run_copy / "log.txt").read_text()


@pytest.mark.parametrize("setting, value", [("maximize", True), ("amsgrad", True), ("betas", [0.9, 0.5]),
                                            ("lr", float("nan"))])
def test_optimiser_settings_in_a_checkpoint_must_be_this_runs_adam(run_copy, setting, value):
    # maximize = true trained by gradient ascent and said "done"; amsgrad gave a traceback.
    tensors, meta = load_tensors(ckpt(run_copy, 256))
    groups = [dict(group, **{setting: value}) for group in meta["optim_param_groups"]]
    save_tensors(ckpt(run_copy, 256), tensors, dict(meta, optim_param_groups=groups))
    trainer = train_tiny(run_copy, slice_nimg=128)  # the older good one (128) is tried, and used
    assert trainer.state.nimg == 256
    log = (run_copy / "log.txt").read_text()
    assert "skipping damaged checkpoint" in log and "optimiser" in log and "resumed from" in log
    assert not any(group.get("maximize") or group.get("amsgrad") for group in
                   trainer.state.optimizer.state_dict()["param_groups"])


# ---- links: never write through a hard link into someone else's file ---------------------------------

def test_a_run_copied_with_hard_links_appends_to_its_own_log(partial_run, tmp_path):
    original = tmp_path / "original"
    shutil.copytree(partial_run, original)
    copy = tmp_path / "copy"
    os.makedirs(copy)
    for root, _, files in os.walk(original):  # cp -al
        target = copy / os.path.relpath(root, original)
        os.makedirs(target, exist_ok=True)
        for name in files:
            os.link(os.path.join(root, name), target / name)
    before = (original / "log.txt").read_bytes()
    append_line(copy / "log.txt", "resumed in the copy")
    assert (original / "log.txt").read_bytes() == before
    assert (copy / "log.txt").read_bytes() == before + b"resumed in the copy\n"
    assert os.stat(copy / "log.txt").st_nlink == 1


def test_a_lock_file_hard_linked_to_a_user_file_is_refused_and_the_file_kept(run_copy, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's data\n")
    lock = run_copy / ".mpdiff.lock"
    if lock.exists():
        lock.unlink()
    os.link(precious, lock)
    line = _one_line_failure(run_cli("train", "--run-dir", "run", *tiny_run_flags()))
    assert "hard link" in line, line
    assert precious.read_text() == "the user's data\n"


# ---- append-only logs are read line by line ---------------------------------------------------------

def test_a_stats_log_longer_than_any_file_limit_still_resumes(tmp_path):
    from mpdiff.storage.files import JSON_MAX_BYTES
    from mpdiff.train.report import truncate_stats

    row = (json.dumps({"nimg": 64, "loss": 1.0, "pad": "x" * 4000}) + "\n").encode()
    path = tmp_path / "stats.jsonl"
    count = JSON_MAX_BYTES // len(row) + 10  # more than the 64 MiB that stopped a long run from resuming
    with open(path, "wb") as f:
        f.write(row * count)
        f.write((json.dumps({"nimg": 128}) + "\n").encode())
    assert truncate_stats(path, 64) == []
    assert os.path.getsize(path) == len(row) * count


def test_a_damaged_checkpoint_is_named_and_the_error_is_one_line(tmp_path):
    path = tmp_path / "training-state-000000000064.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as error:
        load_tensors(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_two_reconstructions_of_nearby_lengths_keep_two_files(run_copy):
    # phema --sigma-rel 0.07, then 0.0704: both were named ...-0.070 and the second replaced the first.
    for sigma_rel in ("0.07", "0.0704"):
        result = run_cli("phema", "run", "--sigma-rel", sigma_rel, "--no-progress")
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (run_copy / "phema").glob("phema-*.safetensors"))
    assert names == ["phema-000000000256-0.070.safetensors", "phema-000000000256-0.0704.safetensors"]
    from mpdiff.storage.network_files import read_network_metadata

    recorded = [read_network_metadata(run_copy / "phema" / name)["sigma_rel"] for name in names]
    assert recorded == pytest.approx([0.07, 0.0704])


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not"),
    ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE='two' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
     "RANK=5 is not a rank of a world of WORLD_SIZE=2 processes"),
])
def test_stray_launch_variables_on_a_plain_command_are_one_line(env, message):
    line = _one_line_failure(run_cli("train", "--run-dir", "run", *tiny_run_flags(), env=env))
    assert message in line, line


def test_a_matrix_that_is_not_a_covariance_has_no_frechet_distance():
    # A reference whose covariance is not positive semi-definite gave FD 0.0000.
    import numpy as np

    from mpdiff.metrics.frechet import frechet_distance

    features = np.random.default_rng(0).standard_normal((50, 4))
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="sigma2 is not a covariance"):
        frechet_distance(mu, sigma, mu, -sigma)
    skewed = sigma.copy()
    skewed[0, 1] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(mu, skewed, mu, sigma)


# ---- memory is bounded before allocation --------------------------------------------------------------

def _deflated_copy(source, target):
    import zipfile

    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))


@pytest.mark.parametrize("kind", ["deflated storage", "over the budget", "sparse tensor", "meta tensor"])
def test_a_torch_file_is_checked_before_its_tensors_are_allocated_or_used(tmp_path, kind):
    import torch

    path = tmp_path / "net.pt"
    env = None
    if kind == "deflated storage":  # 4 MiB of zeros in a few kB: a small file that allocates much
        torch.save({"unet.w": torch.zeros(2 ** 20)}, tmp_path / "plain.pt")
        _deflated_copy(tmp_path / "plain.pt", path)
        assert os.path.getsize(path) < 100_000
        expected = "is compressed; torch writes weights uncompressed"
    elif kind == "over the budget":
        torch.save({"unet.w": torch.zeros(2 ** 18)}, path)
        env = {"MPDIFF_MAX_NETWORK_BYTES": str(2 ** 16)}
        expected = "more than the network budget of 65,536 bytes"
    elif kind == "sparse tensor":
        torch.save({"unet.w": torch.zeros(4, 4).to_sparse()}, path)
        expected = "tensor unet.w is torch.sparse_coo; only dense tensors are accepted"
    else:
        torch.save({"unet.w": torch.zeros(4, 4, device="meta")}, path)
        expected = "on the meta device; only dense tensors are accepted"
    line = _one_line_failure(run_cli("generate", str(path), "--seeds", "0", "--out", str(tmp_path / "out"), env=env))
    assert expected in line and str(path) in line, line


def test_a_huge_number_of_data_workers_is_refused_before_any_fork():
    line = _one_line_failure(run_cli("train", "--run-dir", "run", *tiny_run_flags(), "--data-workers", "100000"))
    assert "--data-workers must be between 0 and 64 processes, got 100000" in line, line


@pytest.mark.parametrize("flags, message", [
    (["--sigma-max", "1e300"], "--sigma-max must be in [1e-06, 100000], got 1e+300"),
    (["--sigma-min", "1e-320"], "--sigma-min must be in [1e-06, 100000]"),
    (["--rho", "1e-300"], "--rho must be in [0.01, 1000], got 1e-300"),
    (["--churn-noise", "1e300"], "--churn-noise must be in [0, 10], got 1e+300"),
    (["--steps", "1000000000000"], "--steps must be at most 100,000"),
])
def test_sampler_numbers_that_under_or_overflow_are_refused_before_sampling(partial_run, tmp_path, flags, message):
    # These wrote black images with exit 0, or built a list of 10^12 noise levels.
    line = _one_line_failure(run_cli("generate", str(partial_run), "--seeds", "0-1", "--out", str(tmp_path / "out"),
                                     *flags))
    assert message in line, line
    assert not (tmp_path / "out").exists()
