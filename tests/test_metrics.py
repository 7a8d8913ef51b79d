"""Fréchet distance, the cached digit classifier and the digits evaluation (SPEC §7.5, §11 item 11)."""

import copy
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import mpdiff.metrics.digits
from mpdiff.data.digits import load_builtin_digits
from mpdiff.errors import DatasetError, MpdiffError
from mpdiff.metrics.digits import (
    CLASSIFIER_FILE,
    CLASSIFIER_VERSION,
    classifier_accuracy,
    evaluate_digits,
    format_report,
    load_digit_classifier,
    load_image_folder_for_eval,
    train_digit_classifier,
)
from mpdiff.metrics.frechet import feature_statistics, frechet_distance

# ---- Fréchet distance -------------------------------------------------------------------------

def _random_covariance(rng, dim, samples=None):
    a = rng.standard_normal((samples or 2 * dim, dim))
    return a.T @ a / len(a)


def _frechet_by_eigen(mu1, sigma1, mu2, sigma2):
    """Independent reference: Tr sqrtm(S1 S2) = sum sqrt(eig(S1^½ S2 S1^½)), all symmetric PSD."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def test_frechet_of_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(32), _random_covariance(rng, 32)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    # For diagonal covariances FD = |mu1 - mu2|² + sum (s1 - s2)² with s the standard deviations.
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    std1, std2 = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((std1 - std2) ** 2)
    got = frechet_distance(mu1, np.diag(std1**2), mu2, np.diag(std2**2))
    assert got == pytest.approx(expected, rel=1e-8)  # observed 4e-9: float64 rounding of 2048-d products


def test_frechet_matches_eigendecomposition_reference_on_random_data():
    rng = np.random.default_rng(2)
    f1 = rng.standard_normal((500, 24)) @ rng.standard_normal((24, 24))
    f2 = rng.standard_normal((400, 24)) @ rng.standard_normal((24, 24)) + 0.5
    stats1, stats2 = feature_statistics(f1), feature_statistics(f2)
    expected = _frechet_by_eigen(*stats1, *stats2)
    assert frechet_distance(*stats1, *stats2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(*stats2, *stats1) == pytest.approx(expected, rel=1e-8)


def test_frechet_is_finite_and_close_for_rank_deficient_covariances():
    # Fewer samples than dimensions: singular covariances, where plain sqrtm is unreliable.
    rng = np.random.default_rng(3)
    stats1 = feature_statistics(rng.standard_normal((6, 16)))
    stats2 = feature_statistics(rng.standard_normal((9, 16)) + 1)
    got = frechet_distance(*stats1, *stats2)
    assert np.isfinite(got)
    assert got == pytest.approx(_frechet_by_eigen(*stats1, *stats2), rel=1e-3)


def test_feature_statistics_are_float64_with_unbiased_covariance():
    rng = np.random.default_rng(4)
    features = rng.standard_normal((7, 3)).astype(np.float32)
    mu, sigma = feature_statistics(features)
    centred = features.astype(np.float64) - features.astype(np.float64).mean(0)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, centred.T @ centred / (7 - 1), rtol=1e-12)
    with pytest.raises(ValueError):
        feature_statistics(features[:1])
    with pytest.raises(ValueError):
        frechet_distance(mu, sigma, mu[:2], sigma[:2, :2])


# ---- the digit classifier ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    """(cache dir, classifier) trained once for this module, through MPDIFF_CACHE."""
    cache_dir = tmp_path_factory.mktemp("mpdiff-cache")
    session_cache = os.environ["MPDIFF_CACHE"]  # conftest: the session's temporary cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPDIFF_CACHE", str(cache_dir))
        classifier = load_digit_classifier()
    if not os.path.exists(os.path.join(session_cache, CLASSIFIER_FILE)):  # saves the commands' eval a retraining
        os.makedirs(session_cache, exist_ok=True)
        shutil.copy(classifier.cache_path, session_cache)
    return cache_dir, classifier


@pytest.fixture(scope="module")
def classifier(classifier_cache):
    return classifier_cache[1]


@pytest.fixture(scope="module")
def digits():
    return load_builtin_digits()


def test_classifier_is_trained_once_and_accurate_on_held_out(classifier_cache, digits):
    cache_dir, net = classifier_cache
    assert net.trained_now
    assert net.cache_path == os.path.join(str(cache_dir), CLASSIFIER_FILE)
    assert not net.training
    accuracy = classifier_accuracy(net, digits["test_images"], digits["test_labels"])
    assert accuracy >= 0.95
    assert net.unseen_accuracy == pytest.approx(accuracy)
    features = net.features(torch.from_numpy(digits["test_images"][:5]))
    assert features.shape == (5, 64)
    assert net(torch.from_numpy(digits["test_images"][:5])).shape == (5, 10)


def test_classifier_cache_is_reused_without_retraining(classifier_cache, monkeypatch):
    cache_dir, net = classifier_cache
    path = net.cache_path
    mtime = os.stat(path).st_mtime_ns
    monkeypatch.setenv("MPDIFF_CACHE", str(cache_dir))
    monkeypatch.setattr(mpdiff.metrics.digits, "train_digit_classifier", lambda: pytest.fail("retrained despite a cache"))
    again = load_digit_classifier()
    assert not again.trained_now
    assert os.stat(path).st_mtime_ns == mtime
    assert again.unseen_accuracy == pytest.approx(net.unseen_accuracy)
    for key, value in net.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shapes"])
def test_damaged_classifier_cache_is_retrained_and_replaced(classifier, tmp_path, monkeypatch, caplog, damage):
    path = tmp_path / CLASSIFIER_FILE
    good = open(classifier.cache_path, "rb").read()
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        from mpdiff.storage.tensors import save_tensors
        save_tensors(path, {"fc.weight": torch.zeros(3, 3)}, dict(format="mpdiff-digit-classifier",
                                                                  version=CLASSIFIER_VERSION))
    calls = []
    monkeypatch.setattr(mpdiff.metrics.digits, "train_digit_classifier", lambda: calls.append(1) or copy.deepcopy(classifier))
    with caplog.at_level(logging.WARNING, logger="mpdiff.metrics"):
        net = load_digit_classifier(cache_dir=tmp_path)
    assert calls == [1] and net.trained_now
    assert "retraining" in caplog.text
    reread = load_digit_classifier(cache_dir=tmp_path)  # the file is whole again
    assert not reread.trained_now
    assert torch.equal(reread.fc.weight, classifier.fc.weight)


def test_unwritable_cache_still_gives_a_classifier(classifier, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("cache dir cannot be created under a file")
    monkeypatch.setattr(mpdiff.metrics.digits, "train_digit_classifier", lambda: copy.deepcopy(classifier))
    with caplog.at_level(logging.WARNING, logger="mpdiff.metrics"):
        net = load_digit_classifier(cache_dir=blocker / "cache")
    assert net.trained_now and "could not cache" in caplog.text


def test_classifier_training_is_deterministic_and_leaves_global_state_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    first = train_digit_classifier(epochs=1)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    second = train_digit_classifier(epochs=1)
    for key, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], value)


# ---- evaluate_digits ----------------------------------------------------------------------------

def test_held_out_real_digits_score_as_real(classifier, digits):
    result = evaluate_digits(digits["test_images"], digits["test_labels"], classifier=classifier)
    assert result["num_samples"] == 360
    assert result["accuracy"] >= 0.95
    assert result["classifier_test_accuracy"] >= 0.95
    assert result["fd"] < 1e-6  # the samples are the reference set itself
    assert 0 < result["fd_real_vs_real"] < 50 and result["fd_reference_count"] == 360
    # Real unseen digits fall below the near-copy threshold about NEAR_COPY_PERCENTILE % of the time.
    assert result["near_copies"] == result["near_copies_held_out"] <= 0.02 * 360
    assert result["near_copy_threshold"] > 0


def test_copies_of_training_digits_are_all_near_copies(classifier, digits):
    images, labels = digits["train_images"][::4], digits["train_labels"][::4]
    result = evaluate_digits(images, labels, classifier=classifier)
    assert result["near_copies"] == len(images) and result["near_copies_fraction"] == 1.0
    assert result["median_nn_distance"] == pytest.approx(0, abs=1e-4)
    assert result["accuracy"] >= 0.95  # the classifier cannot tell copies from quality: near_copies can


def test_noise_scores_badly(classifier, digits):
    noise = np.random.default_rng(0).integers(0, 256, (360, 1, 8, 8), dtype=np.uint8)
    result = evaluate_digits(noise, digits["test_labels"], classifier=classifier)
    assert result["accuracy"] < 0.3
    assert result["fd"] > 5 * result["fd_real_vs_real"]
    assert result["near_copies"] == 0


def test_evaluation_is_deterministic_and_reports_without_labels(classifier, digits):
    images = digits["test_images"][:50]
    first = evaluate_digits(images, classifier=classifier, seed=3)
    assert first == evaluate_digits(torch.from_numpy(images), classifier=classifier, seed=3)
    assert first["accuracy"] is None and first["fd_reference_count"] == 50
    assert first["fd_real_vs_real_std"] > 0  # several reference subsets were drawn
    report = format_report(first)
    assert "50 samples" in report and "class accuracy" not in report
    assert f"{first['fd']:.3f}" in report and f"{first['fd_real_vs_real']:.3f}" in report
    labelled = format_report(evaluate_digits(images, digits["test_labels"][:50], classifier=classifier))
    assert "class accuracy" in labelled


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((4, 1, 8, 8), np.float32), None, "uint8"),
    (np.zeros((4, 3, 8, 8), np.uint8), None, "8x8 grayscale"),
    (np.zeros((4, 1, 16, 16), np.uint8), None, "8x8 grayscale"),
    (np.zeros((1, 1, 8, 8), np.uint8), None, "at least 2"),
    (np.zeros((4, 1, 8, 8), np.uint8), [0, 1, 2], "4 integer class labels"),
    (np.zeros((4, 1, 8, 8), np.uint8), [0, 1, 2, 10], "0..9"),
])
def test_evaluate_rejects_bad_inputs_clearly(classifier, images, labels, message):
    with pytest.raises(MpdiffError, match=message):
        evaluate_digits(images, labels, classifier=classifier)


# ---- reading generated samples ----------------------------------------------------------------

def _write_pngs(folder, images, labels=None, mode="L"):
    folder.mkdir()
    names = []
    for i, image in enumerate(images):
        name = f"{i:06d}.png"
        Image.fromarray(image[0]).convert(mode).save(folder / name)
        names.append(name)
    if labels is not None:
        (folder / "dataset.json").write_text(json.dumps({"labels": [[n, int(c)] for n, c in zip(names, labels)]}))


def test_image_folder_round_trip_with_labels(digits, tmp_path):
    images, labels = digits["test_images"][:12], digits["test_labels"][:12]
    _write_pngs(tmp_path / "samples", images, labels)
    got_images, got_labels = load_image_folder_for_eval(tmp_path / "samples")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    _write_pngs(tmp_path / "unlabelled", images)
    got_images, got_labels = load_image_folder_for_eval(tmp_path / "unlabelled")
    np.testing.assert_array_equal(got_images, images)
    assert got_labels is None


def test_image_folder_of_wrong_format_is_refused(digits, tmp_path):
    _write_pngs(tmp_path / "rgb", digits["test_images"][:3], mode="RGB")
    with pytest.raises(DatasetError, match="8x8 grayscale"):
        load_image_folder_for_eval(tmp_path / "rgb")
    big = np.zeros((3, 1, 16, 16), np.uint8)
    _write_pngs(tmp_path / "big", big)
    with pytest.raises(DatasetError, match="8x8 grayscale"):
        load_image_folder_for_eval(tmp_path / "big")


# ---- streaming statistics and the Fréchet distance at detector sizes (issue 14) ------------------------

def test_streaming_statistics_equal_the_batch_statistics_whatever_the_chunks():
    from mpdiff.metrics.detectors import FeatureStats

    rng = np.random.default_rng(4)
    features = rng.standard_normal((1000, 12)) @ rng.standard_normal((12, 12)) + 1e4  # a large common offset
    mu, sigma = feature_statistics(features)
    stats = FeatureStats(12)
    for chunk in np.array_split(features, [1, 7, 300, 301, 999]):   # uneven chunks, one of a single row
        stats.add(chunk)
    got_mu, got_sigma = stats.mean_cov()
    assert stats.count == 1000
    np.testing.assert_allclose(got_mu, mu, rtol=1e-12)
    np.testing.assert_allclose(got_sigma, sigma, rtol=1e-9, atol=1e-9 * np.abs(sigma).max())
    with pytest.raises(ValueError):
        stats.add(np.zeros((3, 5)))


def test_frechet_of_sampled_gaussians_approaches_the_known_distance():
    # Two Gaussians with commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    from mpdiff.metrics.detectors import FeatureStats

    rng = np.random.default_rng(5)
    dim = 16
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    a, b = rng.uniform(0.5, 2, dim), rng.uniform(0.5, 2, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T) == pytest.approx(expected, rel=1e-10)
    stats = [FeatureStats(dim), FeatureStats(dim)]
    for _ in range(20):  # 200k samples each, streamed
        stats[0].add(rng.standard_normal((10_000, dim)) * np.sqrt(a) @ q.T + mu1)
        stats[1].add(rng.standard_normal((10_000, dim)) * np.sqrt(b) @ q.T + mu2)
    assert frechet_distance(*stats[0].mean_cov(), *stats[1].mean_cov()) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("dim", [1024, 2048])
def test_frechet_is_exact_for_rank_deficient_covariances_at_detector_sizes(dim):
    # Covariances of rank dim/4 and dim/2 in a shared random basis: the closed form holds exactly,
    # and a general sqrtm of their singular product would be unreliable.
    rng = np.random.default_rng(dim)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    a, b = rng.uniform(0.1, 3, dim), rng.uniform(0.1, 3, dim)
    a[dim // 4:] = 0
    b[: dim // 2] = 0
    mu1, mu2 = rng.standard_normal(dim), np.zeros(dim)
    expected = np.sum(mu1 ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)  # observed 4e-9: float64 rounding of 2048-d products
