"""A new user's runs, round two (issue 33): recipe values derived from the run's own length (2), warnings
for runs too short to show anything and plot-dynamics saying what it lacks (3), conversion advice, check's
summary and class names (7), ema-sweep's edges and per-length lines, built-in scoring, ref --add and the
real-vs-real scale (5), threads and status lines (1), estimates (6), the small points (8). Seconds each:
one test trains (the tiny run, 2 steps), one sweeps 2 EMA lengths of 2 samples."""

import json

import pytest
from conftest import run_cli

from mpdiff.config import KIB, RunOptions
from mpdiff.presets import LADDER_HALFLIFE_SHARE
from mpdiff.train.advice import run_warnings
from mpdiff.train.run import keep_derived, resolve_run, summary_lines, write_run_config


def resolved(run_dir="r", **sections):
    return resolve_run("digits", RunOptions(run_dir=str(run_dir), progress=False), **sections)[0]


# ---- 2: config A's half-life is 2.3% of the run, after the command line's options ---------------------

def test_config_a_half_life_is_a_share_of_the_run_s_own_duration():
    short = resolved(network={"config": "A"}, training={"duration": 16 * KIB})
    long = resolved(network={"config": "A"}, training={"duration": 64 * KIB})
    assert short.training.ema_halflife_img == round(16 * KIB * LADDER_HALFLIFE_SHARE) == 381
    assert long.training.ema_halflife_img == round(64 * KIB * LADDER_HALFLIFE_SHARE) == 1526
    assert short.derived == ("ema_halflife_img",)
    explicit = resolved(network={"config": "A"}, training={"duration": 16 * KIB, "ema_halflife_img": 1000})
    assert explicit.training.ema_halflife_img == 1000 and explicit.derived == ()  # an explicit option wins
    assert resolved(network={"config": "B"}, training={"duration": 16 * KIB}).training.ema_halflife_img is None


def test_an_extended_config_a_run_keeps_the_half_life_it_started_with(tmp_path):
    from mpdiff.train.run import check_existing_run

    first = resolved(tmp_path / "run", network={"config": "A"}, training={"duration": 16 * KIB})
    write_run_config(first)
    longer = resolved(tmp_path / "run", network={"config": "A"}, training={"duration": 64 * KIB})
    kept = keep_derived(longer)
    assert kept.training.ema_halflife_img == first.training.ema_halflife_img == 381
    assert kept.training.duration == 64 * KIB
    check_existing_run(kept)  # the resume contract holds: the run may be extended
    assert keep_derived(first) == first


# ---- 3: short runs are warned of at the start; plot-dynamics says what it lacks -----------------------

def test_a_run_inside_the_warm_up_or_with_too_few_rows_is_warned_of():
    short = resolved(training={"duration": 16 * KIB})  # the digits warm-up is 16 Ki images, a row every 16 Ki
    warnings = run_warnings(short)
    assert len(warnings) == 2
    assert warnings[0].startswith("the run ends inside the learning-rate warm-up (--rampup 16Ki images, "
                                  "--duration 16Ki)")
    assert warnings[1].startswith("1 stats row in 16Ki images (--status 16Ki): too few") and \
        warnings[1].endswith("--status 2Ki gives 8")
    assert [line for line in summary_lines(short, _digits()) if line.startswith("warning   ")] == \
        [f"warning   {w}" for w in warnings]
    assert run_warnings(resolved()) == []  # the preset's own run: nothing to say
    assert run_warnings(resolved(training={"duration": 32 * KIB})) == ["2 stats rows in 32Ki images (--status "
                                                                      "16Ki): too few for loss curves or mpdiff "
                                                                      "plot-dynamics; --status 4Ki gives 8"]


def test_cs_skip_scaling_on_config_g_is_warned_of():
    warned = run_warnings(resolved(network={"skip_scaling": "cs"}))
    assert len(warned) == 1 and "cs-mp" in warned[0] and "magnitude" in warned[0]
    assert run_warnings(resolved(network={"skip_scaling": "cs-mp"})) == []
    assert run_warnings(resolved(network={"skip_scaling": "cs", "config": "F"})) == []


def _digits():
    from mpdiff.data.datasets import open_dataset

    return open_dataset("digits")


def _stats(run_dir, rows):
    run_dir.mkdir()
    (run_dir / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_dynamics_of_a_single_row_says_what_it_lacks(tmp_path):
    run_dir = tmp_path / "run"
    _stats(run_dir, [{"nimg": 16384, "lr": 0.01, "dynamics": {"act": {"enc.8x8_block0": 1.0}}}])
    result = run_cli("plot-dynamics", run_dir)
    assert result.exit_code == 1 and result.stdout == ""
    assert "only one stats row (at 16,384 images) holds training dynamics" in result.stderr
    assert "shorter --status" in result.stderr


@pytest.mark.slow
def test_plot_dynamics_names_the_figures_it_cannot_draw(tmp_path):
    run_dir = tmp_path / "run"
    _stats(run_dir, [{"nimg": n, "lr": 0.01, "dynamics": {"act": {"enc.8x8_block0": 1.0 + n / 1e5}}}
                     for n in (1024, 2048)])
    result = run_cli("plot-dynamics", run_dir)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1  # activations only
    assert "note: dynamics-weights.png not drawn: no stats row holds 'weight' values" in result.stderr


# ---- 7: conversion advice that fits the data, check's summary, class names kept ----------------------

def _png_folder(root, files):
    """{relative path: (side, channels)}: PNGs of that size and channel count, each a different gray."""
    import numpy as np
    from PIL import Image

    for i, (name, (side, channels)) in enumerate(files.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        array = np.full((side, side, channels) if channels == 3 else (side, side), 20 * i, np.uint8)
        Image.fromarray(array).save(path)
    return root


def test_class_names_of_the_folders_round_trip_through_convert_and_training(tmp_path):
    from mpdiff.data.convert import convert_dataset
    from mpdiff.data.datasets import open_dataset

    src = _png_folder(tmp_path / "src", {f"{cls}/{i}.png": (8, 1) for cls in ("dog", "cat") for i in range(2)})
    assert open_dataset(src).class_names == ("cat", "dog")
    for dest in (tmp_path / "out", tmp_path / "out.zip"):
        result = convert_dataset(src, dest, progress=False)
        assert result.summary() == f"wrote 4 images (8x8, 1 channel, 2 classes from top-level folders: cat, dog) to {dest}"
        ds = open_dataset(dest)
        assert ds.class_names == ("cat", "dog") and ds.labels.tolist() == [0, 0, 1, 1]
        assert ds.label_source == "dataset.json"
    doc = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert doc["class_names"] == ["cat", "dog"] and doc["labels"][0] == ["00000/img00000000.png", 0]
    again = convert_dataset(tmp_path / "out", tmp_path / "again", progress=False)  # from dataset.json this time
    assert again.class_names == ("cat", "dog") and open_dataset(tmp_path / "again").load().class_names == ("cat", "dog")
    run = resolve_run("digits", RunOptions(run_dir=str(tmp_path / "run"), dataset=str(tmp_path / "out"),
                                           progress=False))
    data_line = summary_lines(run[0], run[1])[0]
    assert data_line.endswith("2 classes (labels from dataset.json: cat, dog)")


def test_doubtful_class_names_are_refused(tmp_path):
    from mpdiff.data.datasets import open_dataset
    from mpdiff.errors import DatasetError

    root = _png_folder(tmp_path / "d", {"a.png": (8, 1), "b.png": (8, 1)})
    for names, message in ((["x"], r'"class_names" must be a list of 2 names'), (["x", "x"], "appears twice"),
                           (["x", 3], r"class_names\[1\] must be a name")):
        (root / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["b.png", 1]], "class_names": names}))
        with pytest.raises(DatasetError, match=message):
            open_dataset(root)


def test_48_pixel_photos_are_advised_to_32_and_check_prints_its_summary(tmp_path):
    root = _png_folder(tmp_path / "photos", {f"{i}.png": (48, 3) for i in range(3)})
    result = run_cli("dataset", "check", root, "--no-progress")
    assert result.exit_code == 1
    assert result.stdout == f"{root}: 3 images, not checked one by one: the dataset as a whole is refused (below)\n"
    assert result.stderr.rstrip().endswith(f"convert it with: mpdiff dataset convert {root} {root}-32 --resolution 32 "
                                           f"--transform resize")
    refused = run_cli("dataset", "convert", root, tmp_path / "out", "--no-progress")
    assert refused.exit_code == 1 and "(for these images: --resolution 32 --transform resize)" in refused.stderr


def test_suggested_conversions():
    from mpdiff.data.shapes import suggested_conversion

    def options(*shapes):
        return suggested_conversion(list(shapes))[1].replace(" --resolution ", "").replace(" --transform ", " ")

    assert options((1, 28, 28)) == "32 pad"            # MNIST: a thin black border around the digits
    assert options((3, 48, 48)) == "32 resize"         # photos: down to the cheap size, no black borders
    assert options((1, 48, 48)) == "32 resize"
    assert options((3, 60, 60)) == "64 resize"         # at most a quarter larger: up
    assert options((3, 375, 500)) == "256 center-crop"
    assert options((3, 8, 8), (1, 8, 8)) == ""         # only the channels differ


def test_eval_of_other_images_points_at_metrics(tmp_path):
    root = _png_folder(tmp_path / "samples", {f"{i}.png": (32, 3) for i in range(2)})
    result = run_cli("eval", root)
    assert result.exit_code == 1 and "use mpdiff metrics --images" in result.stderr


# ---- 5: ema-sweep's edges and per-length lines, built-in scoring, ref --add, the real-vs-real scale ----

def _rows(fds, sigma_rels=(0.02, 0.05, 0.1)):
    return [{"sigma_rel": s, "nimg": 512, "grid": f"g{s}.png", "fd_digits": fd} for s, fd in zip(sigma_rels, fds)]


def test_a_best_length_at_an_edge_of_the_sweep_is_said_with_a_range_to_sweep_next():
    from mpdiff.metrics.ema_sweep import edge_note, format_table

    shortest = format_table(_rows([1.0, 2.0, 3.0])).splitlines()
    assert shortest[-2] == "best fd_digits at sigma_rel 0.020"
    assert shortest[-1] == ("note: the best is the shortest length swept (0.020-0.100), so the optimum may lie outside "
                            "the range; sweep e.g. --sigma-rel 0.007:0.05:3")
    assert edge_note(_rows([3.0, 2.0, 1.0]), "fd_digits") == [
        "note: the best is the longest length swept (0.020-0.100), so the optimum may lie outside the range; sweep "
        "e.g. --sigma-rel 0.05:0.2:3"]
    assert edge_note(_rows([2.0, 1.0, 3.0]), "fd_digits") == []  # inside the range: nothing to add
    at_the_limit = edge_note(_rows([3.0, 1.0], (0.1, 0.288)), "fd_digits")
    assert at_the_limit[0].endswith("sigma_rel cannot exceed 0.2887")
    poorly = edge_note(_rows([2.0, 1.0, 3.0]), "fd_digits", errors={0.05: 0.18})
    assert poorly == ["note: sigma_rel 0.050's reconstruction misses its target profile by 18% (relative L2): more or "
                      "denser snapshots would reconstruct it better (mpdiff plot-ema-profile shows it)"]


def test_each_length_is_reported_as_it_finishes(partial_run, tmp_path):
    import shutil

    from mpdiff.metrics.ema_sweep import ema_sweep

    run = tmp_path / "run"
    shutil.copytree(partial_run, run)
    config = json.loads((run / "config.json").read_text())
    config["dataset"]["spec"] = "my_images.zip"  # no built-in evaluation: grids only, no classifier to train
    (run / "config.json").write_text(json.dumps(config))
    lines = []
    result = ema_sweep(run, [0.05, 0.1], [0, 1], num_steps=2, progress=False, report=lines.append)
    assert len(result["rows"]) == 2 and len(lines) == 2
    assert lines[0].startswith("sigma_rel 0.050 (1 of 2): grid ") and "for the 1 left)" in lines[0]
    assert lines[1].startswith("sigma_rel 0.100 (2 of 2): grid ") and lines[1].endswith("so far)")


def test_a_run_on_the_built_in_mnist_is_scored_by_default(tmp_path, monkeypatch):
    from mpdiff.metrics import ema_sweep, mnist

    (tmp_path / "config.json").write_text(json.dumps({"dataset": {"spec": "mnist"}}))
    monkeypatch.setattr(mnist, "load_mnist_classifier", lambda: "classifier")
    monkeypatch.setattr(mnist, "evaluate_mnist", lambda images, labels, classifier: {"fd": 1.0, "by": classifier})
    evaluate = ema_sweep._evaluator(tmp_path)
    assert evaluate is not None and evaluate(None, None) == {"fd": 1.0, "by": "classifier"}


def test_a_reference_file_gains_a_metric_and_keeps_the_others(tmp_path, monkeypatch):
    import numpy as np
    import torch

    from mpdiff.metrics import compute
    from mpdiff.metrics.compute import load_reference, reference_arrays
    from mpdiff.metrics.detectors import Detector

    class Cheap(Detector):
        feature_dim = 2

        def __init__(self, metric, scale):
            super().__init__("cpu")
            self.metric, self.scale = metric, scale

        def preprocess(self, images):
            return images.float()

        def embed(self, x):
            return torch.stack([x.mean(dim=(1, 2, 3)) * self.scale, x[:, 0, 0, 0]], dim=1)

    made = []
    monkeypatch.setattr(compute, "make_detector",
                        lambda m, **k: made.append(m) or Cheap(m, {"fid": 1.0, "fd_digits": 2.0}[m]))
    ref = tmp_path / "ref.npz"
    assert run_cli("ref", "digits", "--out", ref, "--metrics", "fid", "--no-progress").exit_code == 0
    fid = reference_arrays(ref)["fid_mu"]
    missing = run_cli("metrics", "--images", tmp_path, "--ref", ref, "--metrics", "fd_digits")
    assert missing.exit_code == 1 and (f"add them, keeping the others, with: mpdiff ref digits --out {ref} "
                                       f"--metrics fd_digits --add") in missing.stderr
    added = run_cli("ref", "digits", "--out", ref, "--metrics", "fd_digits", "--add", "--no-progress")
    assert added.exit_code == 0, added.output
    assert added.stdout.strip().endswith("keeping its fid") and made == ["fid", "fd_digits"]  # fid not recomputed
    both = load_reference(ref)
    assert set(both) == {"fid", "fd_digits"} and np.array_equal(both["fid"][0], fid)
    other = run_cli("ref", "mnist", "--out", ref, "--metrics", "fd_mnist", "--add", "--no-progress")
    assert other.exit_code == 1 and "holds statistics of digits, not mnist" in other.stderr


@pytest.mark.slow
def test_metrics_prints_the_real_vs_real_scale_of_a_built_in_reference(tmp_path):
    from PIL import Image

    from mpdiff.data.datasets import builtin_dataset

    ref = tmp_path / "ref.npz"
    assert run_cli("ref", "digits", "--out", ref, "--metrics", "fd_digits", "--no-progress").exit_code == 0
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, image in enumerate(builtin_dataset("digits", "test").images[:40]):
        Image.fromarray(image[0]).save(folder / f"{i:03d}.png")
    shown = run_cli("metrics", "--images", folder, "--ref", ref, "--metrics", "fd_digits", "--no-progress")
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[1].startswith("           for scale: 40 real held-out digits images against the same reference: ")
    assert lines[1].endswith("(mean of 3 draws)")


# ---- 1: threads chosen for the free CPUs; status lines with speed and time left ----------------------

def test_the_default_threads_leave_the_cores_that_others_load(monkeypatch):
    import os

    from mpdiff import threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    for load, expected in ((0.1, 4), (1.4, 3), (2.6, 1), (9.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert threads.default_threads()[0] == expected, load
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert threads.default_threads(local_processes=2)[0] == 2  # torchrun: the CPUs shared among the processes
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # 4 CPUs of 64: a sixteenth of the machine's load is ours
    monkeypatch.setattr(os, "getloadavg", lambda: (32.0, 32.0, 32.0))
    assert threads.default_threads()[0] == 2
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1.5)  # a container's quota: 2 CPUs at most
    assert threads.usable_cpus() == 2


def test_threads_option_and_environment_win(monkeypatch):
    import torch

    from mpdiff import threads

    before = torch.get_num_threads()
    try:
        choice = threads.choose_threads(2)
        assert torch.get_num_threads() == 2 and choice.note() == "2 CPU threads (--threads)"
        assert threads.threads_note() == "2 CPU threads (--threads)"
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert threads.choose_threads().note() == "1 CPU thread (OMP_NUM_THREADS=1)"
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(threads, "default_threads", lambda processes: (1, "2 usable CPUs, load of others 1.2"))
        monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
        limited = threads.choose_threads()
        assert limited.limited and limited.note().startswith("1 CPU thread (2 usable CPUs, load of others 1.2; ")
    finally:
        torch.set_num_threads(before)
    bad = run_cli("generate", "x", "--out", "o", "--threads", "0")
    assert bad.exit_code == 2 and "--threads" in bad.output


def test_status_lines_carry_speed_and_time_left_and_warn_of_a_slowdown_once():
    import types

    from mpdiff.train.loop import Trainer

    said = []
    fake = types.SimpleNamespace(say=said.append, training=types.SimpleNamespace(duration=4096),
                                 expected_ips=400.0, slow_warned=False)
    row = {"nimg": 1024, "loss": 0.25, "img_per_sec": 100.0}
    Trainer.status(fake, row, 4096, first=True)
    assert said == ["status    1,024 of 4,096 images, loss 0.25, 100 img/s, about 31 s left"]
    Trainer.status(fake, dict(row, nimg=2048, img_per_sec=50.0), 4096, first=False)
    assert said[-1].startswith("warning   training now runs at 50 img/s, 8x slower than the 400 img/s measured at its "
                               "start: other processes are probably using the CPU cores (")
    Trainer.status(fake, dict(row, nimg=4096, img_per_sec=40.0), 4096, first=False)
    assert said[-1] == "status    4,096 of 4,096 images, loss 0.25, 40 img/s" and len(said) == 4  # warned once


# ---- 8: the small points ----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_restart_before_the_first_checkpoint_names_the_snapshots_it_will_overwrite(tmp_path):
    import shutil

    from conftest import train_tiny

    run_dir = tmp_path / "run"
    train_tiny(run_dir, duration=128, checkpoint_nimg=128, final_grid=False, slice_nimg=64)
    shutil.rmtree(run_dir / "checkpoints")  # as if killed after its first snapshots, before any checkpoint
    train_tiny(run_dir, duration=128, checkpoint_nimg=128, final_grid=False)
    log = (run_dir / "log.txt").read_text()
    assert "no checkpoint to resume from, so this run starts at 0 images; the 2 EMA snapshot file(s) of an " \
           "earlier attempt" in log and "(up to 64 images)" in log


# ---- 6: evaluation work says how long it will take, once its first batches are timed ----------------

def test_evaluation_work_estimates_the_rest_from_a_timed_batch(monkeypatch):
    from mpdiff.metrics import estimate

    clock = iter([0.0, 10.0, 20.0, 30.0])  # a batch cycle of 10 s for 64 images
    monkeypatch.setattr(estimate.time, "perf_counter", lambda: next(clock))
    said = []
    batches = [list(range(64))] * 4
    assert list(estimate.timed_batches(iter(batches), 50_000, said.append)) == batches
    assert said == ["estimate  about 2 h 10 min for the remaining 49,936 images (6.4 images/s, measured here on a "
                    "batch)"]
    clock = iter([0.0, 0.1, 0.2])
    quick = []
    list(estimate.timed_batches(iter(batches[:3]), 192, quick.append))
    assert quick == []  # under 30 s: not worth a line


def test_a_resumed_run_keeps_the_thread_count_it_started_with(tmp_path):
    # Float sums depend on the thread count (1 and 2 threads give other bits on this CPU), and the default
    # follows the machine's load: a resumed run must not change it, or it would not continue bit for bit.
    import json

    import torch
    from conftest import run_cli, tiny_run_flags

    before = torch.get_num_threads()
    try:
        first = run_cli("train", "--run-dir", "run", *tiny_run_flags(), "--slice", "128", "--threads", "1")
        assert first.exit_code == 0, first.output
        assert json.loads(open("run/config.json").read())["run"]["threads"] == 1
        torch.set_num_threads(2)
        second = run_cli("train", "--run-dir", "run", *tiny_run_flags(), "--slice", "128", env={"OMP_NUM_THREADS": "2"})
        assert second.exit_code == 0, second.output
        assert torch.get_num_threads() == 1 and "kept from when this run started" in second.output
        assert json.loads(open("run/config.json").read())["run"]["threads"] == 1
    finally:
        torch.set_num_threads(before)
