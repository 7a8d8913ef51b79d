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
from mpdiff.errors import MpdiffError
from mpdiff.metrics.detectors import Detector
from mpdiff.metrics.digits import (
    cached_classifier,
    check_digit_labels,
    default_cache_dir,
    deterministic_cpu,
)
from mpdiff.metrics.frechet import feature_statistics, frechet_distance
from mpdiff.threads import torch_threads


MNIST_SHAPE = (1, 32, 32)


# ---------------------------------------------------------------------------------------------
# The MNIST classifier.

CLASSIFIER_VERSION = 1
CLASSIFIER_SEED = 0
CLASSIFIER_FILE = f"mnist_classifier_v{CLASSIFIER_VERSION}.safetensors"
CLASSIFIER_FORMAT = "mpdiff-mnist-classifier"
# Measured on a busy 2-core VM, one thread: 60 epochs take ~30 s and reach 97.8-98.1% on the
# training split (seeds 0-2); 40 epochs 97.6%, 20 epochs 96.9%. Dropout 0.25 added ~0.3 points.
_TRAIN_EPOCHS = 60
_TRAIN_BATCH = 64
_TRAIN_PEAK_LR = 3e-3
_DROPOUT = 0.25
# Augmentation, per image: rotation up to +-10 degrees, scale 0.9..1.1, shift up to +-2 pixels.
_AUG_DEGREES = 10.0
_AUG_SCALE = 0.1
_AUG_SHIFT = 2.0


FEATURE_DIM = 128  # the MNIST classifier's penultimate layer: fd_mnist's features


class MnistClassifier(nn.Module):
    """Three 3x3 convolutions, each followed by ReLU and a 2x2 max-pool (32 -> 16 -> 8 -> 4), then a
    linear layer (the features) and the class head, for 32x32 grayscale digits.

    Inputs are float in [-1, 1] (uint8 tensors are converted, x/127.5 - 1). `features` returns the
    penultimate layer before its ReLU, the space the Fréchet distance is measured in (after the ReLU
    many units are always zero, which makes the covariance singular).
    """

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
        self.unseen_accuracy = None   # Accuracy on images it never saw (the training split: it trains on the
                                      # held-out split), recorded when trained.
        self.trained_now = False    # True if this call trained it, False if read from the cache.
        self.cache_path = None

    def features(self, x):
        if x.dtype == torch.uint8:
            x = encode_images(x)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = nn.functional.max_pool2d(torch.relu(conv(x)), 2)
        x = nn.functional.dropout(x.flatten(1), self.dropout, self.training)
        return self.fc(x)

    def forward(self, x):
        h = nn.functional.dropout(torch.relu(self.features(x)), self.dropout, self.training)
        return self.head(h)


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
    """Train an MnistClassifier on the held-out split only (CPU, one thread, deterministic); eval mode
    on return, with `unseen_accuracy` measured on the 4,000 training-split images it never saw."""
    parts = mnist_splits()
    images = encode_images(torch.from_numpy(parts["test_images"]))
    labels = torch.from_numpy(parts["test_labels"])
    steps_per_epoch = -(-len(images) // _TRAIN_BATCH)
    with deterministic_cpu(seed):
        net = MnistClassifier()
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(net.parameters(), lr=_TRAIN_PEAK_LR)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, _TRAIN_PEAK_LR, total_steps=epochs * steps_per_epoch)
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images), _TRAIN_BATCH):
                batch = order[start:start + _TRAIN_BATCH]
                loss = nn.functional.cross_entropy(net(augment(images[batch], generator)), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    net.eval().requires_grad_(False)
    _, predicted = classifier_outputs(net, parts["train_images"])
    net.unseen_accuracy = float(np.mean(predicted == parts["train_labels"]))
    return net


def load_mnist_classifier(cache_dir=None):
    """The MNIST classifier in eval mode: read from the cache (:func:`default_cache_dir`), or trained
    once and cached. A missing, damaged or outdated cache file is retrained and overwritten; a cache
    directory that cannot be written only costs retraining next time."""
    return cached_classifier(
        os.path.join(os.fspath(cache_dir or default_cache_dir()), CLASSIFIER_FILE), MnistClassifier,
        train_mnist_classifier, CLASSIFIER_FORMAT, CLASSIFIER_VERSION, "MNIST", "accuracy on the training split",
        {"accuracy_on": "train split (4000 images, unseen; trained on the 1000 held-out)",
         "train_seed": CLASSIFIER_SEED, "train_epochs": _TRAIN_EPOCHS})


@torch.no_grad()
def classifier_outputs(classifier, images, batch_size=500):
    """(features float64 [N, D], predicted classes int64 [N]) of uint8 images [N, 1, 32, 32], in one
    pass of the network per batch, on one thread."""
    images = torch.as_tensor(np.asarray(images))
    features, predicted = [], []
    with torch_threads(1):
        for start in range(0, len(images), batch_size):
            f = classifier.features(images[start:start + batch_size])
            features.append(f.double())
            predicted.append(classifier.head(torch.relu(f)).argmax(dim=1))
    if not features:
        return np.zeros((0, classifier.fc.out_features)), np.zeros(0, np.int64)
    return torch.cat(features).numpy(), torch.cat(predicted).numpy()


class MnistDetector(Detector):
    """The MNIST classifier's penultimate features, for ``fd_mnist`` (32x32 grayscale images only)."""

    name = "mnist"
    metric = "fd_mnist"

    def __init__(self, classifier=None, device="cpu"):
        super().__init__(device)
        self.classifier = (classifier or load_mnist_classifier()).to(self.device)
        self.feature_dim = self.classifier.fc.out_features

    def preprocess(self, images):
        if tuple(images.shape[1:]) != MNIST_SHAPE:
            raise MpdiffError(f"fd_mnist measures 32x32 grayscale digits [N, 1, 32, 32], got images of shape "
                              f"{list(images.shape[1:])}")
        return images.to(self.device)

    def embed(self, inputs):
        return self.classifier.features(inputs)


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

    `labels` are the classes the samples were conditioned on (None for unconditional samples). FD's
    bias grows as the sample count shrinks, so the real-vs-real scale uses the same count:
    n = min(N, 4000) training images against the 1,000 held-out ones, averaged over REFERENCE_SUBSETS
    random subsets (chosen by `seed`; one when n is the whole split). Note that the classifier was
    trained on the held-out images, so even real training images are some way from them: compare
    `fd` with `fd_real_vs_real`, not with zero.
    """
    images = _check_mnist_images(images)
    labels = check_digit_labels(labels, len(images))
    classifier = classifier if classifier is not None else load_mnist_classifier()
    parts = mnist_splits()

    sample_features, predicted = classifier_outputs(classifier, images)
    real = real_outputs(classifier)
    (held_out_features, _), (train_features, train_predicted) = real["held_out"], real["train"]
    held_out_stats = feature_statistics(held_out_features)
    sample_stats = feature_statistics(sample_features)
    reference_count = min(len(images), len(train_features))
    rng = np.random.default_rng(seed)
    subsets = [rng.choice(len(train_features), reference_count, replace=False)
               for _ in range(REFERENCE_SUBSETS if reference_count < len(train_features) else 1)]
    real_vs_real = [frechet_distance(*feature_statistics(train_features[s]), *held_out_stats) for s in subsets]
    return {
        "num_samples": len(images),
        "accuracy": None if labels is None else float(np.mean(predicted == labels)),
        "fd": frechet_distance(*sample_stats, *held_out_stats),
        "fd_train": frechet_distance(*sample_stats, *feature_statistics(train_features)),
        "fd_real_vs_real": float(np.mean(real_vs_real)),
        "fd_real_vs_real_std": float(np.std(real_vs_real)),
        "fd_reference_count": reference_count,
        "fd_held_out_count": len(held_out_features),
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


def _check_mnist_images(images):
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise MpdiffError(f"images: expected uint8 pixels (0..255), got {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != MNIST_SHAPE:
        raise MpdiffError(f"images: the MNIST evaluation needs 32x32 grayscale images [N, 1, 32, 32], got shape "
                          f"{images.shape}")
    if len(images) < 2:
        raise MpdiffError(f"images: need at least 2 samples for a Fréchet distance, got {len(images)}")
    return images
