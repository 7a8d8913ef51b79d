"""Training runs end to end, and the generate/eval/phema/ema-sweep/info commands on their output (issue 4).

The runs are conftest.TINY_RUN (the digits preset with 16 base channels, 512 images in steps of 64); the
tests that train or sample are marked slow (seconds each; they run in CI all the same).
Sampling itself is tested in tests/test_sampling.py, the command line's errors in tests/test_cli.py.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import ckpt, run_cli, train_tiny

from mpdiff import build_network
from mpdiff.data.datasets import open_dataset
from mpdiff.errors import ConfigError
from mpdiff.nn.flops import describe_preset
from mpdiff.storage.files import read_jsonl
from mpdiff.storage.tensors import load_tensors
from mpdiff.train.data_order import batch_indices

# Warm-up over 2 steps and t_ref = 4 steps, so that the 8 steps of the run pass through every part of
# the learning-rate schedule (SPEC §1.3).
SCHEDULE = dict(lr=0.01, rampup_img=128, decay=4)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """TINY_RUN to the end (512 images), with TensorBoard events."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train_tiny(run_dir, **SCHEDULE, tensorboard=True)
    return run_dir


def weights(run_dir, nimg=512):
    return load_tensors(ckpt(run_dir, nimg))


@pytest.mark.slow
def test_run_directory_contents(reference_run):
    d = reference_run
    config = json.loads((d / "config.json").read_text())
    assert config["network"]["img_resolution"] == 8 and config["network"]["label_dim"] == 10
    rows = read_jsonl(d / "stats.jsonl")
    assert [r["nimg"] for r in rows] == list(range(64, 513, 64))
    assert all(np.isfinite(r["loss"]) and r["img_per_sec"] > 0 for r in rows)
    assert os.listdir(d / "tensorboard")
    snaps = sorted(os.listdir(d / "snapshots"))
    assert snaps[0] == "ema-000000000064-0.050.safetensors" and len(snaps) == 2 * 8
    assert (d / "samples" / "grid-final.png").exists()
    # Old checkpoints are pruned only after the newer one verified (keep 2 by default).
    assert sorted(os.listdir(d / "checkpoints")) == ["training-state-000000000384.safetensors",
                                                     "training-state-000000000512.safetensors"]


@pytest.mark.slow
def test_learning_rate_of_each_step_follows_the_schedule(reference_run):
    # alpha(t) = alpha_ref / sqrt(max(t / t_ref, 1)) * min(t / t_warmup, 1) (Eq. 67, linear warm-up), where t
    # is the image count before the step; each stats row (one per step here) records its step's rate.
    rows = read_jsonl(reference_run / "stats.jsonl")
    lr = {row["nimg"] - 64: row["lr"] for row in rows}  # images before the step -> its learning rate
    t_ref = SCHEDULE["decay"] * 64
    assert lr[0] == 0.0                                                           # the first step does not move
    assert lr[64] == pytest.approx(0.005, rel=1e-12)                              # half-way up the warm-up
    assert lr[128] == pytest.approx(0.01, rel=1e-12)                              # end of warm-up
    assert lr[192] == pytest.approx(0.01, rel=1e-12)                              # before t_ref: alpha_ref
    assert lr[256] == pytest.approx(0.01, rel=1e-12)                              # at t_ref
    for t in (320, 384, 448):                                                     # after t_ref: 1/sqrt decay
        assert lr[t] == pytest.approx(0.01 / math.sqrt(t / t_ref), rel=1e-12)
    assert lr[448] == pytest.approx(0.01 / math.sqrt(1.75), rel=1e-12)


@pytest.mark.slow
def test_resume_gives_identical_weights(reference_run, tmp_path):
    d = tmp_path / "sliced"
    for _ in range(3):  # 192 + 192 + 128 images, each invocation resuming the previous one mid-cadence
        train_tiny(d, **SCHEDULE, slice_nimg=192)
    ref, ref_meta = weights(reference_run)
    got, meta = weights(d)
    assert meta["nimg"] == ref_meta["nimg"] == 512
    assert set(got) == set(ref)
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    log = (d / "log.txt").read_text()
    assert f"resumed from {ckpt(d, 192)} at 192 images" in log and f"resumed from {ckpt(d, 384)}" in log


def test_a_finished_run_extends_to_a_longer_duration_exactly(reference_run, tmp_path):
    # The schedule, data order and noise depend on the image count only: a run finished at 256 images and
    # then extended to 512 equals the run made for 512 from the start, and may not be shortened again.
    from mpdiff.errors import ConfigError

    d = tmp_path / "extended"
    train_tiny(d, **SCHEDULE, duration=256)
    assert "training complete at 256 images" in (d / "log.txt").read_text()
    train_tiny(d, **SCHEDULE)
    ref, _ = weights(reference_run)
    got, meta = weights(d)
    assert meta["nimg"] == 512 and all(torch.equal(ref[key], got[key]) for key in ref)
    assert json.loads((d / "config.json").read_text())["training"]["duration"] == 512
    with pytest.raises(ConfigError, match=r"^duration 256 is shorter than the 512 images this run has trained"):
        train_tiny(d, **SCHEDULE, duration=256)


@pytest.mark.slow
def test_gradient_accumulation_matches_full_batch(reference_run, tmp_path):
    d = tmp_path / "accum"
    train_tiny(d, **SCHEDULE, batch_gpu=16)  # 4 micro-batches per step
    ref, _ = weights(reference_run)
    got, _ = weights(d)
    for key in ref:
        if key.startswith("net."):
            assert torch.allclose(ref[key], got[key], rtol=1e-3, atol=1e-4), key
    moved = ref["net.unet.out_conv.weight"] - weights(reference_run, 384)[0]["net.unet.out_conv.weight"]
    assert moved.abs().max() > 1e-2  # the weights really trained, far beyond the tolerance above


@pytest.mark.slow
def test_seeds_give_reproducible_runs(partial_run, tmp_path):
    train_tiny(tmp_path / "same", slice_nimg=128)
    train_tiny(tmp_path / "other", slice_nimg=128, seed=1)
    first = load_tensors(ckpt(partial_run, 128))[0]
    same = load_tensors(ckpt(tmp_path / "same", 128))[0]
    other = load_tensors(ckpt(tmp_path / "other", 128))[0]
    assert set(first) == set(same) and all(torch.equal(first[k], same[k]) for k in first)
    assert not torch.equal(first["net.unet.out_conv.weight"], other["net.unet.out_conv.weight"])


def test_batch_indices_are_epoch_permutations():
    first = batch_indices(0, 10, 0, 10)
    assert sorted(first) == list(range(10))
    assert batch_indices(0, 10, 3, 12) == (first + batch_indices(0, 10, 10, 10))[3:15]
    assert batch_indices(0, 10, 10, 10) != first


@pytest.mark.slow
def test_traditional_ema_is_tracked_saved_and_resumed(tmp_path):
    from mpdiff.storage.network_files import load_network
    training = dict(SCHEDULE, ema_halflife_img=16)
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"
    train_tiny(whole, **training)
    for _ in range(2):
        train_tiny(sliced, **training, slice_nimg=256)
    net, meta = load_network(whole / "ema-traditional.safetensors")
    assert meta["kind"] == "traditional-ema" and meta["halflife_img"] == 16 and meta["nimg"] == 512
    a, _ = weights(whole)
    b, _ = weights(sliced)
    traditional = {k: v for k, v in a.items() if k.startswith("tema.")}
    assert traditional and all(torch.equal(v, b[k]) for k, v in traditional.items())
    # A 16-image half-life (a quarter step: 94% of the weight on the latest weights) lags the raw weights
    # by ~4 images, sigma_rel 0.05 at 512 images by ~27: close to the raw weights, but not equal to them.
    raw, avg = a["net.unet.out_conv.weight"], a["tema.unet.out_conv.weight"]
    assert not torch.equal(raw, avg)
    assert (avg - raw).norm() < (a["ema.0.unet.out_conv.weight"] - raw).norm()


# ---- commands on a finished run -------------------------------------------------------------------

@pytest.mark.slow
def test_generate_command_writes_a_readable_dataset(reference_run, tmp_path):
    result = run_cli("generate", reference_run, "--seeds", "0-11", "--out", "samples", "--steps", "3",
                     "--no-progress")
    assert result.exit_code == 0, result.output
    out = tmp_path / "samples"
    names = sorted(os.listdir(out))
    assert names[:2] == ["000000.png", "000001.png"] and len(names) == 13 and "dataset.json" in names
    assert (tmp_path / "samples-grid.png").exists()
    labels = json.loads((out / "dataset.json").read_text())["labels"]
    assert len(labels) == 12 and all(0 <= c < 10 for _, c in labels)
    ds = open_dataset(str(out))  # the output folder is itself a valid labelled dataset
    assert len(ds) == 12 and ds.resolution == 8 and ds.channels == 1 and ds.num_classes == 10
    assert [int(c) for c in ds.labels] == [c for _, c in labels]
    # Same seeds again -> identical files.
    run_cli("generate", reference_run, "--seeds", "0-11", "--out", "again", "--steps", "3", "--no-progress")
    assert (tmp_path / "again" / "000007.png").read_bytes() == (out / "000007.png").read_bytes()
    # The evaluation reads it back.
    result = run_cli("eval", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["num_samples"] == 12 and 0 <= report["accuracy"] <= 1


@pytest.mark.slow
def test_class_option_and_seed_parsing(reference_run, tmp_path):
    result = run_cli("generate", reference_run, "--seeds", "1,4-5", "--class", "7", "--out", "fixed", "--steps", "2",
                     "--no-progress")
    assert result.exit_code == 0, result.output
    labels = json.loads((tmp_path / "fixed" / "dataset.json").read_text())["labels"]
    assert labels == [["000001.png", 7], ["000004.png", 7], ["000005.png", 7]]


@pytest.mark.slow
def test_phema_command_and_plot(reference_run, tmp_path):
    out = tmp_path / "phema"
    result = run_cli("phema", reference_run, "--sigma-rel", "0.07,0.15", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    files = sorted(os.listdir(out))
    assert files == ["phema-000000000512-0.070.safetensors", "phema-000000000512-0.150.safetensors"]
    gen = run_cli("generate", out / files[0], "--seeds", "0-1", "--out", "s", "--steps", "2", "--no-progress")
    assert gen.exit_code == 0, gen.output
    plot = run_cli("plot-ema-profile", reference_run, "--sigma-rel", "0.07", "--out", "p.png")
    assert plot.exit_code == 0 and (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.slow
def test_ema_sweep_command(reference_run, tmp_path):
    out = tmp_path / "sweep"
    result = run_cli("ema-sweep", reference_run, "--sigma-rel", "0.05:0.15:3", "--seeds", "0-19", "--steps", "2",
                     "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["sigma_rel"] for r in rows] == [0.05, 0.1, 0.15]
    assert all(r["num_samples"] == 20 for r in rows)
    assert (out / "sweep.png").stat().st_size > 1000 and "best FD" in result.output


def test_info_command_json_reports_the_preset():
    # What `info` prints is describe_preset's; that matches the paper is tests/test_flops.py's business.
    result = run_cli("info", "edm2-img512-xs", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    expected = describe_preset("edm2-img512-xs")
    assert info["params"] == expected["params"] and info["gflops"] == pytest.approx(expected["gflops"], rel=1e-9)
    assert info["network"] == expected["network"] and info["training"] == expected["training"]


def test_a_run_takes_its_cadence_from_the_preset_unless_overridden():
    from mpdiff.config import RunOptions
    from mpdiff.presets import get_preset
    from mpdiff.train.run import resolve_run

    resolved, _ = resolve_run("digits", RunOptions(run_dir="r"))
    assert resolved.cadence == get_preset("digits").cadence
    resolved, _ = resolve_run("digits", RunOptions(run_dir="r"), cadence=dict(status_nimg=512))
    assert resolved.cadence == get_preset("digits").cadence.replace(status_nimg=512)
    assert resolved.to_dict()["cadence"]["status_nimg"] == 512  # recorded in config.json


def test_training_sets_the_cuda_precision_policy():
    # NVIDIA's training turns TF32 and reduced-precision reductions off (SPEC §1.5); mpdiff states the same
    # policy explicitly instead of inheriting PyTorch's defaults. The flags can be set on a CPU-only build.
    from mpdiff.config import RunOptions
    from mpdiff.train.loop import Trainer
    from mpdiff.train.precision import (
        CUDA_PRECISION_POLICY,
        current_precision_flags,
        restore_precision_flags,
    )
    from mpdiff.train.run import RunPlan, resolve_run

    saved = current_precision_flags()
    try:
        restore_precision_flags({key: not value for key, value in CUDA_PRECISION_POLICY.items()})
        resolved, dataset = resolve_run("digits", RunOptions(run_dir="r"), network=dict(model_channels=8))
        Trainer(RunPlan.single(resolved, dataset))
        assert current_precision_flags() == CUDA_PRECISION_POLICY
        assert CUDA_PRECISION_POLICY["matmul.allow_tf32"] is False and CUDA_PRECISION_POLICY["cudnn.allow_tf32"] is False
    finally:
        restore_precision_flags(saved)


def test_no_progress_silences_the_dataset_bar_too(monkeypatch):
    import mpdiff.train.run as run_module
    from mpdiff.config import RunOptions

    seen = []
    real = run_module.open_dataset
    monkeypatch.setattr(run_module, "open_dataset", lambda *a, **k: seen.append(k.get("progress")) or real(*a, **k))
    run_module.resolve_run("digits", RunOptions(run_dir="r", progress=False))
    run_module.resolve_run("digits", RunOptions(run_dir="r", progress=True))
    assert seen == [False, None]  # None: a bar for large datasets only


def test_the_run_says_what_it_understood(reference_run):
    # One screen at the start, also in log.txt: data with its label source, the network as built, the batch,
    # and a time estimate measured on the first steps.
    log = (reference_run / "log.txt").read_text()
    assert "data      digits-train: 1,437 images, 8x8, 1 channel, 10 classes (labels from built-in)" in log
    assert "network   U-Net (config G), C0 16, 3 levels (8x8, 4x4, 2x2), attention at 4x4; " in log
    assert "training  batch 64 (micro-batch 64), 8 steps, 512 images" in log
    assert "estimate  " in log and "for the remaining 4 steps" in log


def test_attention_the_resolution_cannot_have_is_a_warning_not_a_silent_drop():
    from mpdiff.config import RunOptions
    from mpdiff.train.run import resolve_run, summary_lines

    # From the preset (EDM2-XS's 16x16 and 8x8 at the digits' 8x8): a warning; asked for by a flag: an error.
    resolved, dataset = resolve_run("edm2-img512-xs", RunOptions(run_dir="r", dataset="digits"))
    lines = summary_lines(resolved, dataset)
    assert "attention at 8x8;" in lines[1]
    assert lines[-1] == ("warning   attention at 16x16 (from the preset) does not exist at resolution 8: "
                         "its levels are 8, 4, 2, 1")
    with pytest.raises(ConfigError, match=r"attn_resolutions 16: no level of this network has that resolution "
                                          r"\(its levels: 8, 4, 2\)"):
        resolve_run("digits", RunOptions(run_dir="r"), network=dict(attn_resolutions=(16, 4)))


@pytest.mark.slow
def test_info_measures_training_and_sampling_for_the_size_asked():
    # `mpdiff info PRESET --resolution R --channels C --batch B`: the network as asked, counted, and measured
    # on this machine in fresh processes (no timing is asserted, only that measurements exist and are sane).
    result = run_cli("info", "digits", "--resolution", "16", "--channels", "8", "--batch", "4", "--json")
    assert result.exit_code == 0, result.output
    desc = json.loads(result.stdout)
    assert (desc["network"]["img_resolution"], desc["network"]["model_channels"]) == (16, 8)
    assert desc["params"] != describe_preset("digits")["params"]
    measured = desc["measured"]
    assert measured["batch"] == 4 and measured["network_bytes"] == 4 * desc["params"]
    for kind in ("train", "sample"):
        assert measured[kind]["img_per_sec"] > 0 and measured[kind]["working_bytes"] >= 0
    assert measured["default_micro_batch"]["micro_batch"] == 4  # a tiny network: the whole batch fits
    text = run_cli("info", "digits", "--resolution", "16", "--channels", "8", "--batch", "4").stdout
    assert "training on CPU would use micro-batch 4 of 4 by default" in text
    refused = run_cli("info", "digits", "--batch", "0")
    assert refused.exit_code == 1 and refused.stderr.strip() == "error: --batch must be positive, got 0"


# ---- the default micro-batch on CPU, and the final grid -----------------------------------------

def test_activation_measurement_scales_with_the_image_area():
    # Saved-for-backward bytes per image: 4x the pixels gives about 4x the bytes (the per-level activations
    # dominate), and weights (batch-independent) do not count.
    from mpdiff.presets import get_preset
    from mpdiff.train.measure import activation_bytes_per_image

    small = get_preset("digits").network.replace(img_resolution=8, model_channels=8)
    large = small.replace(img_resolution=16)
    a, b = activation_bytes_per_image(small), activation_bytes_per_image(large)
    assert 3.5 < b / a < 4.5
    params = sum(p.numel() * 4 for p in build_network(small).parameters())
    assert a < params  # a tiny net's weights would dominate if they were counted per image


def test_the_default_cpu_micro_batch_is_the_largest_divisor_that_fits_the_budget(monkeypatch):
    from mpdiff.presets import get_preset
    from mpdiff.train import measure

    network = get_preset("digits").network.replace(model_channels=8)
    monkeypatch.setattr(measure, "activation_bytes_per_image", lambda net: 1000)
    # Peak estimate = 2 x 1000 bytes per image: a 100,000-byte budget fits 50 images, so of 96's divisors 48.
    assert measure.choose_micro_batch(network, 96, budget=100_000) == (48, 1000, 100_000)
    assert measure.choose_micro_batch(network, 32, budget=100_000)[0] == 32
    assert measure.choose_micro_batch(network, 96, budget=10)[0] == 1


def test_the_chosen_micro_batch_is_printed_recorded_and_kept_on_resume(tmp_path, monkeypatch):
    from mpdiff.train import measure

    run_dir = tmp_path / "run"
    monkeypatch.setattr(measure, "activation_bytes_per_image", lambda net: 1000)
    monkeypatch.setattr(measure, "micro_batch_budget", lambda: 2 * 1000 * 40)
    train_tiny(run_dir, duration=128, final_grid=False)  # the budget fits 40 images: 32 of 64
    log = (run_dir / "log.txt").read_text()
    assert "memory    micro-batch 32: " in log and "the largest divisor of 64 within the" in log
    assert json.loads((run_dir / "config.json").read_text())["run"]["batch_gpu"] == 32
    # Resumed (here: extended) on a machine with another budget, the run keeps the micro-batch it began with.
    monkeypatch.setattr(measure, "micro_batch_budget", lambda: 1 << 40)
    train_tiny(run_dir, duration=256, final_grid=False)
    assert "memory    micro-batch 32 (chosen when this run started)" in (run_dir / "log.txt").read_text()
    # --batch-gpu always wins, and a run is not resumed with another one.
    with pytest.raises(ConfigError, match=r"\(batch_gpu differ\)"):
        train_tiny(run_dir, duration=384, batch_gpu=16, final_grid=False)


def test_no_final_grid_and_the_grid_costs_at_most_one_batch(tmp_path):
    run_dir = tmp_path / "run"
    trainer = train_tiny(run_dir, duration=64, final_grid=False)
    assert not (run_dir / "samples").exists() or not list((run_dir / "samples").iterdir())
    assert "no final grid: --no-final-grid" in (run_dir / "log.txt").read_text()
    # The grid itself: 10 classes x min(10, batch // 10) images; with a batch of 64, 60 images.
    calls = []
    import mpdiff.train.loop as loop
    original = loop.generate
    try:
        loop.generate = lambda net, seeds, **kw: calls.append(len(seeds)) or original(net, seeds, **kw)
        trainer.sample_grid(final=True)
    finally:
        loop.generate = original
    assert calls == [60]


# ---- the ablation ladder's recipe (SPEC §4.2) ------------------------------------------------------

def test_ladder_recipe_matches_the_paper_at_imagenet_512_s():
    from mpdiff.presets import get_preset, ladder_preset

    base = get_preset("edm2-img512-s")
    paper = {  # alpha_ref, t_ref, beta2, P_mean, P_std, loss scaling, dropout, attention
        "A": (1e-4, None, 0.999, -1.2, 1.2, 100.0, 0.10, (32, 16, 8)),
        "B": (2e-4, None, 0.99, -0.4, 1.0, 100.0, 0.10, (16, 8)),
        "C": (2e-4, None, 0.99, -0.4, 1.0, 100.0, 0.10, (16, 8)),
        "D": (1e-2, None, 0.99, -0.4, 1.0, 1.0, 0.10, (16, 8)),
        "E": (1e-2, 70000, 0.99, -0.4, 1.0, 1.0, 0.10, (16, 8)),
        "F": (1e-2, 70000, 0.99, -0.4, 1.0, 1.0, 0.10, (16, 8)),
        "G": (1e-2, 70000, 0.99, -0.4, 1.0, 1.0, 0.00, (16, 8)),
    }
    for config, (lr, decay, beta2, p_mean, p_std, scaling, dropout, attention) in paper.items():
        p = ladder_preset(base, config)
        t, n = p.training, p.network
        assert t.lr == pytest.approx(lr) and t.decay == decay, config
        got = (t.betas[1], t.P_mean, t.P_std, t.loss_scaling, n.dropout, tuple(n.attn_resolutions))
        assert got == (beta2, p_mean, p_std, scaling, dropout, attention), config
        assert n.clip_act == (256 if config == "G" else None), config  # the clamp is G's (SPEC §4.9)
        assert n.config == config and t.batch == base.training.batch
        # A alone uses a traditional EMA: half-life 50 M images of the paper's 2147.5 M.
        assert (t.ema_halflife_img is not None) == (config == "A")
    assert ladder_preset(base, "A").training.ema_halflife_img == pytest.approx(50e6, rel=1e-3)
    assert ladder_preset(base, "G").network == base.network.replace(config="G")
    with pytest.raises(ConfigError, match=r"unknown config 'H'"):
        ladder_preset(base, "H")


def test_config_option_applies_the_ladder_and_explicit_options_still_win():
    from mpdiff.config import RunOptions
    from mpdiff.train.run import resolve_run

    resolved, _ = resolve_run("digits", RunOptions(run_dir="r", progress=False), network={"config": "B"},
                              training={"lr": 0.003})
    assert resolved.network.config == "B" and resolved.network.dropout == 0.10
    assert resolved.training.lr == 0.003 and resolved.training.decay is None and resolved.training.loss_scaling == 100


def test_a_run_written_before_the_config_field_resumes_as_config_g(tmp_path):
    # Runs, checkpoints and snapshots written before NetworkConfig.config existed have no such key: they
    # are config G, resume as such, and their snapshots mix with the new ones.
    from mpdiff.ema.snapshots import list_snapshots
    from mpdiff.storage.tensors import save_tensors

    run_dir = tmp_path / "run"
    train_tiny(run_dir, duration=128, final_grid=False)
    config = json.loads((run_dir / "config.json").read_text())
    del config["network"]["config"]
    (run_dir / "config.json").write_text(json.dumps(config))
    for path in list((run_dir / "checkpoints").iterdir()) + list((run_dir / "snapshots").iterdir()):
        tensors, meta = load_tensors(path)
        network = meta["config"]["network"] if "config" in meta else meta["network"]
        del network["config"]
        save_tensors(path, tensors, meta)
    trainer = train_tiny(run_dir, duration=256, final_grid=False)
    assert "resumed from" in (run_dir / "log.txt").read_text() and trainer.nimg == 256
    assert {r.nimg for r in list_snapshots(run_dir)} == {64, 128, 192, 256}


@pytest.mark.slow
def test_ema_sweep_scores_with_metrics_or_writes_grids_only(reference_run, tmp_path):
    import json
    import shutil

    ref = tmp_path / "ref.npz"
    assert run_cli("ref", "digits", "--out", ref, "--metrics", "fd_digits", "--no-progress").exit_code == 0
    out = tmp_path / "sweep"
    scored = run_cli("ema-sweep", reference_run, "--sigma-rel", "0.05,0.1", "--seeds", "0-19", "--steps", "2",
                     "--out", out, "--metrics", "fd_digits", "--ref", ref, "--no-progress")
    assert scored.exit_code == 0, scored.output
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["sigma_rel"] for r in rows] == [0.05, 0.1] and all(r["fd_digits"] > 0 for r in rows)
    assert all(os.path.getsize(r["grid"]) > 100 for r in rows) and "best fd_digits" in scored.output
    # A run on data without a built-in evaluation: one grid per EMA length, no score, no error.
    copy = tmp_path / "run"
    shutil.copytree(reference_run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["dataset"]["spec"] = "my_images.zip"
    (copy / "config.json").write_text(json.dumps(config))
    grids = run_cli("ema-sweep", copy, "--sigma-rel", "0.05", "--seeds", "0-3", "--steps", "2", "--no-progress")
    assert grids.exit_code == 0, grids.output
    rows = json.loads((copy / "ema-sweep" / "sweep.json").read_text())
    assert list(rows[0]) == ["sigma_rel", "nimg", "grid"] and os.path.exists(rows[0]["grid"])
    assert "grids:" in grids.output
    refused = run_cli("ema-sweep", copy, "--sigma-rel", "0.05", "--seeds", "0-3", "--metrics", "fid")
    assert refused.exit_code != 0 and "--ref" in refused.output
