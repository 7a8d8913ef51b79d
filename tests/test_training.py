"""Training loop, sampling and the generate/eval/phema commands on tiny runs (issue 4)."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mpdiff.cli import cli
from mpdiff.data import open_dataset
from mpdiff.fileio import load_tensors, read_jsonl
from mpdiff.training import RunOptions, batch_indices, train

TINY_NET = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=16)
TINY_TRAIN = dict(batch=64, duration=1024, decay=4, rampup_img=256)


def run_options(run_dir, **kw):
    base = dict(run_dir=str(run_dir), status_nimg=256, snapshot_nimg=256, checkpoint_nimg=512, progress=False,
                tensorboard=False, grid_steps=2)
    base.update(kw)
    return RunOptions(**base)


def final_state(run_dir, nimg=1024):
    tensors, meta = load_tensors(os.path.join(run_dir, "checkpoints", f"training-state-{nimg:012d}.safetensors"))
    return tensors, meta


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    train("digits", run_options(run_dir, tensorboard=True), TINY_NET, TINY_TRAIN)
    return run_dir


def test_run_directory_contents(reference_run):
    d = reference_run
    config = json.loads((d / "config.json").read_text())
    assert config["network"]["img_resolution"] == 8 and config["network"]["label_dim"] == 10
    rows = read_jsonl(d / "stats.jsonl")
    assert [r["nimg"] for r in rows] == [256, 512, 768, 1024]
    assert all(np.isfinite(r["loss"]) and r["img_per_sec"] > 0 for r in rows)
    assert rows[0]["lr"] < rows[-1]["lr"] or rows[-1]["lr"] > 0
    assert os.listdir(d / "tensorboard")
    snaps = sorted(os.listdir(d / "snapshots"))
    assert snaps[0] == "ema-000000000256-0.050.safetensors" and len(snaps) == 8
    assert (d / "samples" / "grid-final.png").exists()
    # Old checkpoints are pruned only after the newer one verified (keep 2 by default).
    assert sorted(os.listdir(d / "checkpoints")) == ["training-state-000000000512.safetensors",
                                                     "training-state-000000001024.safetensors"]


def test_resume_gives_identical_weights(reference_run, tmp_path):
    d = tmp_path / "sliced"
    for _ in range(3):  # 384 + 384 + 256 images, each invocation resuming the previous one
        train("digits", run_options(d, slice_nimg=384, checkpoint_nimg=128), TINY_NET, TINY_TRAIN)
    ref, ref_meta = final_state(reference_run)
    got, meta = final_state(d)
    assert meta["nimg"] == ref_meta["nimg"] == 1024
    assert set(got) == set(ref)
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    assert "resumed from" in (d / "log.txt").read_text()


def test_gradient_accumulation_matches_full_batch(reference_run, tmp_path):
    d = tmp_path / "accum"
    train("digits", run_options(d, batch_gpu=16), TINY_NET, TINY_TRAIN)
    ref, _ = final_state(reference_run)
    got, _ = final_state(d)
    for key in ref:
        if key.startswith("net."):
            assert torch.allclose(ref[key], got[key], rtol=1e-3, atol=1e-4), key


def test_seeds_give_reproducible_runs(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    train("digits", run_options(a), TINY_NET, dict(TINY_TRAIN, duration=256))
    train("digits", run_options(b), TINY_NET, dict(TINY_TRAIN, duration=256))
    train("digits", run_options(c, seed=1), TINY_NET, dict(TINY_TRAIN, duration=256))
    ta, tb, tc = (final_state(d, 256)[0]["net.unet.out_conv.weight"] for d in (a, b, c))
    assert torch.equal(ta, tb) and not torch.equal(ta, tc)


def test_batch_indices_are_epoch_permutations():
    first = batch_indices(0, 10, 0, 10)
    assert sorted(first) == list(range(10))
    assert batch_indices(0, 10, 3, 12) == (first + batch_indices(0, 10, 10, 10))[3:15]
    assert batch_indices(0, 10, 10, 10) != first


def test_generate_is_deterministic_per_seed_across_batch_sizes(reference_run):
    from mpdiff.generation import resolve_network
    from mpdiff.sampling import generate
    net, _ = resolve_network(str(reference_run))
    a, ca = generate(net, [3, 4, 5, 6, 7], batch_size=5, num_steps=4, progress=False)
    b, cb = generate(net, [5, 6, 7, 3, 4], batch_size=2, num_steps=4, progress=False)
    assert ca == cb[3:] + cb[:3]
    assert torch.allclose(a, torch.cat([b[3:], b[:3]]), atol=1e-5)
    c, _ = generate(net, [3, 4, 5, 6, 7], batch_size=5, num_steps=4, progress=False)
    assert torch.equal(a, c)


def test_generate_command_writes_a_readable_dataset(reference_run, tmp_path):
    out = tmp_path / "samples"
    result = CliRunner().invoke(cli, ["generate", str(reference_run), "--seeds", "0-11", "--out", str(out),
                                      "--steps", "3", "--no-progress"])
    assert result.exit_code == 0, result.output
    names = sorted(os.listdir(out))
    assert names[:2] == ["000000.png", "000001.png"] and len(names) == 13 and "dataset.json" in names
    assert (tmp_path / "samples-grid.png").exists()
    labels = json.loads((out / "dataset.json").read_text())["labels"]
    assert len(labels) == 12 and all(0 <= c < 10 for _, c in labels)
    ds = open_dataset(str(out))  # the output folder is itself a valid labelled dataset
    assert len(ds) == 12 and ds.resolution == 8 and ds.channels == 1 and ds.num_classes == 10
    assert [int(c) for c in ds.labels] == [c for _, c in labels]
    # Same seeds again -> identical files.
    again = tmp_path / "again"
    CliRunner().invoke(cli, ["generate", str(reference_run), "--seeds", "0-11", "--out", str(again),
                             "--steps", "3", "--no-progress"])
    assert (again / "000007.png").read_bytes() == (out / "000007.png").read_bytes()
    # The evaluation reads it back.
    result = CliRunner().invoke(cli, ["eval", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["num_samples"] == 12 and 0 <= report["accuracy"] <= 1


def test_class_option_and_seed_parsing(reference_run, tmp_path):
    out = tmp_path / "fixed"
    result = CliRunner().invoke(cli, ["generate", str(reference_run), "--seeds", "1,4-5", "--class", "7",
                                      "--out", str(out), "--steps", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    labels = json.loads((out / "dataset.json").read_text())["labels"]
    assert labels == [["000001.png", 7], ["000004.png", 7], ["000005.png", 7]]


def test_phema_command_and_plot(reference_run, tmp_path):
    out = tmp_path / "phema"
    result = CliRunner().invoke(cli, ["phema", str(reference_run), "--sigma-rel", "0.07,0.15", "--out", str(out),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    files = sorted(os.listdir(out))
    assert files == ["phema-000000001024-0.070.safetensors", "phema-000000001024-0.150.safetensors"]
    gen = CliRunner().invoke(cli, ["generate", str(out / files[0]), "--seeds", "0-1", "--out",
                                   str(tmp_path / "s"), "--steps", "2", "--no-progress"])
    assert gen.exit_code == 0, gen.output
    plot = CliRunner().invoke(cli, ["plot-ema-profile", str(reference_run), "--sigma-rel", "0.07",
                                    "--out", str(tmp_path / "p.png")])
    assert plot.exit_code == 0 and (tmp_path / "p.png").stat().st_size > 1000


def test_ema_sweep_command(reference_run, tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(cli, ["ema-sweep", str(reference_run), "--sigma-rel", "0.05:0.15:3", "--seeds",
                                      "0-19", "--steps", "2", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["sigma_rel"] for r in rows] == [0.05, 0.1, 0.15]
    assert all(r["num_samples"] == 20 for r in rows)
    assert (out / "sweep.png").stat().st_size > 1000 and "best FD" in result.output


def test_info_command_json():
    result = CliRunner().invoke(cli, ["info", "edm2-img512-xs", "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["params"] == 124_713_253 and abs(info["gflops"] - 45.5) / 45.5 < 0.02


def test_traditional_ema_is_tracked_saved_and_resumed(tmp_path):
    from mpdiff.checkpoint import load_network
    train_cfg = dict(TINY_TRAIN, ema_halflife_img=32)
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"
    train("digits", run_options(whole), TINY_NET, train_cfg)
    for _ in range(2):
        train("digits", run_options(sliced, slice_nimg=512, checkpoint_nimg=256), TINY_NET, train_cfg)
    net, meta = load_network(whole / "ema-traditional.safetensors")
    assert meta["kind"] == "traditional-ema" and meta["halflife_img"] == 32 and meta["nimg"] == 1024
    a, _ = final_state(whole)
    b, _ = final_state(sliced)
    traditional = {k: v for k, v in a.items() if k.startswith("tema.")}
    assert traditional and all(torch.equal(v, b[k]) for k, v in traditional.items())
    # A 32-image half-life (half a step) is a much shorter average than sigma_rel 0.05 (~50 images):
    # close to the raw weights, but not equal to them.
    raw, avg = a["net.unet.out_conv.weight"], a["tema.unet.out_conv.weight"]
    assert not torch.equal(raw, avg)
    assert (avg - raw).norm() < (a["ema.0.unet.out_conv.weight"] - raw).norm()
