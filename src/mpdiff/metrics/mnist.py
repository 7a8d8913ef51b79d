"""Evaluation of the built-in 32x32 MNIST (``--data mnist``).

The digits evaluation (:mod:`mpdiff.metrics.digits`) has a counterpart here for the 32x32 MNIST
digits of :func:`mpdiff.data.digits.load_builtin_mnist`: a small CNN, :class:`MnistClassifier`,
trained once, deterministically, on the **held-out** split (1,000 images, which no diffusion model
trains on) and cached as safetensors. Its accuracy is measured on the 4,000 training-split images,
which it never saw: 98.1% with the settings below, after ~30 s of training on one busy CPU thread.
For a set of generated digits it gives:

* ``accuracy`` — how often the classifier agrees with the class a sample was conditioned on;
* ``fd`` (metric ``fd_mnist``) — Fréchet distance between the classifier's penultimate features of
  the samples and of the held-out images; ``fd_train`` the same against the 4,000 training images;
  ``fd_real_vs_real`` is the distance of an equally sized subset of real training images to the
  held-out ones, so that the number has a scale.

:class:`MnistDetector` puts the same features behind the :class:`~mpdiff.metrics.detectors.Detector`
interface, next to Inception (``fid``), for :func:`mpdiff.metrics.compute.accumulate`.
"""

import functools
import math
import os
import weakref

import numpy as np
import torch
from torch import nn

from mpdiff.data.pixels import encode_images
from mpdiff.metrics.digits import (
    BuiltinClassifier,
    ClassifierDetector,
    cached_classifier,
    check_digit_labels,
    check_eval_images,
    classifier_accuracy,
    classifier_outputs,
    default_cache_dir,
    fd_scores,
    train_classifier,
)
from mpdiff.metrics.frechet import feature_statistics, frechet_distance


# ---------------------------------------------------------------------------------------------
# The MNIST classifier.

CLASSIFIER_VERSION = 1
CLASSIFIER_SEED = 0
CLASSIFIER_FILE = f"mnist_classifier_v{CLASSIFIER_VERSION}.safetensors"
CLASSIFIER_FORMAT = "mpdiff-mnist-classifier"
# Measured on a busy 2-core VM, one thread: 60 epochs take ~30 s and reach 97.8-98.1% on the
# training split (seeds 0-2); 40 epochs 97.6%, 20 epochs 96.9%. Dropout 0.25 added ~0.3 points.
_TRAIN_EPOCHS = 60  # batches and learning rate: mpdiff.metrics.digits.train_classifier's
_DROPOUT = 0.25
# Augmentation, per image: rotation up to +-10 degrees, scale 0.9..1.1, shift up to +-2 pixels.
_AUG_DEGREES = 10.0
_AUG_SCALE = 0.1
_AUG_SHIFT = 2.0


FEATURE_DIM = 128  # the MNIST classifier's penultimate layer: fd_mnist's features


class MnistClassifier(BuiltinClassifier):
    """Three 3x3 convolutions, each followed by ReLU and a 2x2 max-pool (32 -> 16 -> 8 -> 4), then a
    linear layer (the features) and the class head, for 32x32 grayscale digits. Its `unseen_accuracy` is
    on the training split: it trains on the held-out split."""

    def __init__(self,
        width           = 16,       # Channels of the first convolution (then 2x and 4x).
        feature_dim     = FEATURE_DIM,  # Size of the penultimate layer (the FD feature space).
        num_classes     = 10,       # Digits 0..9.
        dropout         = _DROPOUT, # Before the feature layer and before the head, in training only.
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.fc = nn.Linear(4 * width * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.dropout = dropout

    def features(self, x):
        if x.dtype == torch.uint8:
            x = encode_images(x)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = nn.functional.max_pool2d(torch.relu(conv(x)), 2)
        x = nn.functional.dropout(x.flatten(1), self.dropout, self.training)
        return self.fc(x)


def augment(x, generator):
    """A random affine transform per image of x (float [N, 1, H, W] in [-1, 1]; background -1)."""
    n, size = len(x), x.shape[-1]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(_AUG_DEGREES)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * _AUG_SCALE
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * _AUG_SHIFT / size)  # grid units: 2 / size per pixel
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return nn.functional.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


@functools.lru_cache(maxsize=1)
def mnist_splits():
    """:func:`mpdiff.data.digits.load_builtin_mnist`, read once per process (shared: do not modify)."""
    from mpdiff.data.digits import load_builtin_mnist

    return load_builtin_mnist()


def train_mnist_classifier(seed=CLASSIFIER_SEED, epochs=_TRAIN_EPOCHS):
    """Train an MnistClassifier on the held-out split only (:func:`~mpdiff.metrics.digits.train_classifier`,
    with :func:`augment`); eval mode on return, with `unseen_accuracy` measured on the 4,000 training-split
    images it never saw."""
    parts = mnist_splits()
    net = train_classifier(MnistClassifier, parts["test_images"], parts["test_labels"], seed, epochs, augment)
    net.unseen_accuracy = classifier_accuracy(net, parts["train_images"], parts["train_labels"])
    return net


def load_mnist_classifier(cache_dir=None):
    """The MNIST classifier in eval mode: read from the cache (:func:`default_cache_dir`), or trained
    once and cached (:func:`~mpdiff.metrics.digits.cached_classifier`)."""
    return cached_classifier(
        os.path.join(os.fspath(cache_dir or default_cache_dir()), CLASSIFIER_FILE), MnistClassifier,
        train_mnist_classifier, CLASSIFIER_FORMAT, CLASSIFIER_VERSION, "MNIST", "accuracy on the training split",
        {"accuracy_on": "train split (4000 images, unseen; trained on the 1000 held-out)",
         "train_seed": CLASSIFIER_SEED, "train_epochs": _TRAIN_EPOCHS})


class MnistDetector(ClassifierDetector):
    """The MNIST classifier's penultimate features, for ``fd_mnist`` (32x32 grayscale images only)."""

    name, metric, side = "mnist", "fd_mnist", 32

    def load(self):
        return load_mnist_classifier()


# ---------------------------------------------------------------------------------------------
# Evaluation of generated digits.

# Real-vs-real FD is averaged over this many random train subsets of the samples' size.
REFERENCE_SUBSETS = 5

# classifier -> (parameter versions, its outputs on the real images): evaluating many sets of samples
# with one classifier computes the 5,000 real images' features once. An in-place change of the weights
# (load_state_dict, an optimizer step) bumps the parameters' versions and so invalidates the entry.
_REAL_OUTPUTS = weakref.WeakKeyDictionary()


def real_outputs(classifier):
    """{'held_out' | 'train': (features float64 [N, D], predicted classes [N])} of the real images."""
    versions = tuple(p._version for p in classifier.parameters())
    cached = _REAL_OUTPUTS.get(classifier)
    if cached is None or cached[0] != versions:
        parts = mnist_splits()
        cached = versions, {"held_out": classifier_outputs(classifier, parts["test_images"]),
                            "train": classifier_outputs(classifier, parts["train_images"])}
        _REAL_OUTPUTS[classifier] = cached
    return cached[1]


def evaluate_mnist(images, labels=None, classifier=None, seed=0):
    """Score generated 32x32 digits (uint8 [N, 1, 32, 32]) against the built-in MNIST; returns a dict.

    `labels` are the classes the samples were conditioned on (None for unconditional samples). The
    real-vs-real scale (:func:`~mpdiff.metrics.digits.fd_scores`) is that of n = min(N, 4000) training
    images against the 1,000 held-out ones, over REFERENCE_SUBSETS random subsets chosen by `seed`. The
    classifier was trained on the held-out images, so even real training images are some way from them:
    compare `fd` with `fd_real_vs_real`, not with zero.
    """
    images = check_eval_images(images, 32, "MNIST")
    labels = check_digit_labels(labels, len(images))
    classifier = classifier if classifier is not None else load_mnist_classifier()
    parts = mnist_splits()

    sample_features, predicted = classifier_outputs(classifier, images)
    real = real_outputs(classifier)
    (held_out_features, _), (train_features, train_predicted) = real["held_out"], real["train"]
    return {
        "num_samples": len(images),
        "accuracy": None if labels is None else float(np.mean(predicted == labels)),
        **fd_scores(sample_features, held_out_features, train_features, REFERENCE_SUBSETS, seed),
        "fd_train": frechet_distance(*feature_statistics(sample_features), *feature_statistics(train_features)),
        "classifier_accuracy": float(np.mean(train_predicted == parts["train_labels"])),
    }


def format_mnist_report(result):
    """A short multi-line summary of :func:`evaluate_mnist`'s result."""
    r = result
    lines = [f"MNIST evaluation of {r['num_samples']} samples"]
    if r.get("accuracy") is not None:
        lines.append(f"  class accuracy   {100 * r['accuracy']:6.2f}%  (classifier agrees with the conditioning label)")
    lines.append(f"  FD vs held-out   {r['fd']:8.3f}  (real training images, same count {r['fd_reference_count']}: "
                 f"{r['fd_real_vs_real']:.3f} ± {r['fd_real_vs_real_std']:.3f})")
    lines.append(f"  FD vs training   {r['fd_train']:8.3f}")
    lines.append(f"  classifier accuracy on the (unseen) training split {100 * r['classifier_accuracy']:.2f}%")
    return "\n".join(lines)
