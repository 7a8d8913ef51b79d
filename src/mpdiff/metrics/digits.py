"""Evaluation of the built-in digits.

ImageNet models are scored with Inception / DINOv2 features; 8x8 digits are too small for those,
so ``mpdiff eval`` on the built-in dataset uses a small CNN trained once on the train split
(cached as safetensors) and reports, for a set of generated digits:

* ``accuracy`` — how often the classifier agrees with the class a sample was conditioned on;
* ``fd`` — Fréchet distance between classifier features of the samples and of the 360 held-out
  real digits, next to ``fd_real_vs_real``, the same distance for real train digits, so that the
  number has a scale;
* ``near_copies`` — samples closer (pixel L2) to some training image than almost every real
  unseen digit is, so that memorisation is not mistaken for quality.
"""

import contextlib
import logging
import os
import time

import numpy as np
import torch
from torch import nn

from mpdiff.data.pixels import encode_images
from mpdiff.errors import CheckpointError, DatasetError, MpdiffError, first_line
from mpdiff.metrics.detectors import Detector
from mpdiff.metrics.frechet import feature_statistics, frechet_distance
from mpdiff.storage.tensors import load_tensors, save_tensors
from mpdiff.threads import torch_threads

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The digit classifier.

CLASSIFIER_VERSION = 1
CLASSIFIER_SEED = 0
CLASSIFIER_FILE = f"digit_classifier_v{CLASSIFIER_VERSION}.safetensors"
_TRAIN_EPOCHS = 20
_TRAIN_BATCH = 64
_TRAIN_PEAK_LR = 3e-3


FEATURE_DIM = 64  # the digits classifier's penultimate layer: fd_digits' features


class BuiltinClassifier(nn.Module):
    """What the built-in classifiers share. Inputs are float in [-1, 1] (uint8 tensors are converted,
    x/127.5 - 1). `features` returns the penultimate layer `fc` before its ReLU, the space the Fréchet
    distance is measured in: after the ReLU many units are always zero (a third of the digits
    classifier's), which makes the covariance singular. The class `head` follows the ReLU (and `dropout`,
    in training only). :func:`cached_classifier` records `unseen_accuracy` (on images it never saw),
    `trained_now` (trained by this call, not read from the cache) and `cache_path`."""

    unseen_accuracy, trained_now, cache_path, dropout = None, False, None, 0.0

    def forward(self, x):
        return self.head(nn.functional.dropout(torch.relu(self.features(x)), self.dropout, self.training))


class DigitClassifier(BuiltinClassifier):
    """Two 3x3 convolutions, a 2x2 max-pool and two linear layers, for 8x8 grayscale digits."""

    def __init__(self,
        width           = 32,   # Channels of the first convolution (the second has twice as many).
        feature_dim     = FEATURE_DIM,  # Size of the penultimate layer (the FD feature space).
        num_classes     = 10,   # Digits 0..9.
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x):
        if x.dtype == torch.uint8:
            x = encode_images(x)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


@contextlib.contextmanager
def deterministic_cpu(seed):
    """Seed torch, force deterministic kernels and one thread; restore all of it afterwards."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]), torch_threads(1):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)


def train_classifier(build, images, labels, seed, epochs, augment):
    """Train `build()` on uint8 `images` [N, 1, H, W] with class `labels` (CPU, one thread, deterministic: Adam
    with a one-cycle schedule, each batch passed through `augment(x, generator)`); eval mode on return."""
    images, labels = encode_images(torch.from_numpy(images)), torch.from_numpy(labels)
    steps_per_epoch = -(-len(images) // _TRAIN_BATCH)
    with deterministic_cpu(seed):
        net = build()
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
    return net.eval().requires_grad_(False)


def _shift(x, generator):
    """The batch shifted by up to one pixel in x and y (digits are not centred exactly)."""
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return nn.functional.pad(x, (1, 1, 1, 1), value=-1)[:, :, dy:dy + 8, dx:dx + 8]


def train_digit_classifier(seed=CLASSIFIER_SEED, epochs=_TRAIN_EPOCHS):
    """Train a DigitClassifier on the train split only (:func:`train_classifier`); eval mode on return.

    Augmentation (:func:`_shift`) raised held-out accuracy slightly in trials (98.1% -> 98.9% at 15 epochs).
    """
    from mpdiff.data.digits import load_builtin_digits

    digits = load_builtin_digits()
    net = train_classifier(DigitClassifier, digits["train_images"], digits["train_labels"], seed, epochs, _shift)
    net.unseen_accuracy = classifier_accuracy(net, digits["test_images"], digits["test_labels"])
    return net


def default_cache_dir():
    """`$MPDIFF_CACHE` if set, else ~/.cache/mpdiff."""
    return os.environ.get("MPDIFF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mpdiff")


def load_digit_classifier(cache_dir=None):
    """The digit classifier in eval mode: from the cache, or trained once and cached (:func:`cached_classifier`)."""
    return cached_classifier(
        os.path.join(os.fspath(cache_dir or default_cache_dir()), CLASSIFIER_FILE), DigitClassifier,
        train_digit_classifier, "mpdiff-digit-classifier", CLASSIFIER_VERSION, "digit", "held-out accuracy",
        dict(train_seed=CLASSIFIER_SEED, train_epochs=_TRAIN_EPOCHS))


def cached_classifier(path, build, train, fmt, version, what, accuracy_name, metadata):
    """A built-in classifier in eval mode, from its cache file `path` or trained by `train()` and cached.

    `build()` makes an untrained network of the right shape; the file's metadata must name format
    `fmt` and `version`. A missing, damaged or outdated file is retrained and overwritten (`what`
    names the classifier in the log, `accuracy_name` its recorded accuracy); a file that cannot be
    written only costs retraining next time. `metadata` is stored with the weights.
    """
    if os.path.exists(path):
        try:
            net = _read_classifier(path, build, fmt, version, what)
            net.cache_path = path
            return net
        except CheckpointError as e:
            log.warning("%s classifier cache unusable, retraining and overwriting it: %s", what, e)
    start = time.perf_counter()
    net = train()
    seconds = time.perf_counter() - start
    log.info("trained the %s classifier in %.1f s: %s %.2f%%", what, seconds, accuracy_name, 100 * net.unseen_accuracy)
    net.trained_now = True
    net.cache_path = path
    try:
        save_tensors(path, net.state_dict(), dict(format=fmt, version=version, accuracy=net.unseen_accuracy,
                                                  **metadata, train_seconds=round(seconds, 2)))
    except MpdiffError as e:
        log.warning("could not cache the %s classifier (it will be retrained next time): %s", what, e)
    return net


def _read_classifier(path, build, fmt, version, what):
    tensors, meta = load_tensors(path)
    if meta.get("format") != fmt or meta.get("version") != version:
        raise CheckpointError(f"{path}: not a version-{version} {what} classifier")
    net = build()
    try:
        net.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the classifier ({first_line(e)})") from None
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise CheckpointError(f"{path}: weights contain non-finite values")
    net.eval().requires_grad_(False)
    net.unseen_accuracy = float(meta.get("accuracy", float("nan")))
    return net


@torch.no_grad()
def classifier_outputs(classifier, images, batch_size=500):
    """(features float64 [N, D], predicted classes int64 [N]) of uint8 images [N, 1, H, W], in one pass of
    the network per batch, on one thread."""
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


def classifier_accuracy(classifier, images, labels):
    _, predicted = classifier_outputs(classifier, images)
    return float(np.mean(predicted == np.asarray(labels)))


class ClassifierDetector(Detector):
    """A built-in classifier's penultimate features (`side` x `side` grayscale digits only); subclasses set
    `name`, `metric`, `side` and `load()`, which reads or trains the classifier."""

    def __init__(self, classifier=None, device="cpu"):
        super().__init__(device)
        self.classifier = (classifier or self.load()).to(self.device)
        self.feature_dim = self.classifier.fc.out_features

    def preprocess(self, images):
        if tuple(images.shape[1:]) != (1, self.side, self.side):
            raise MpdiffError(f"{self.metric} measures {self.side}x{self.side} grayscale digits [N, 1, {self.side}, "
                              f"{self.side}], got images of shape {list(images.shape[1:])}")
        return images.to(self.device)

    def embed(self, inputs):
        return self.classifier.features(inputs)


class DigitsDetector(ClassifierDetector):
    """The built-in digits classifier's penultimate features, for ``fd_digits`` (8x8 grayscale images only)."""

    name, metric, side = "digits", "fd_digits", 8

    def load(self):
        return load_digit_classifier()


# ---------------------------------------------------------------------------------------------
# Evaluation of generated digits.

# A sample is a near copy when its nearest training image is closer than this percentile of the
# held-out real digits' nearest-training-image distances: only 1% of real digits the model never
# saw are that close, so a much larger fraction of samples points at memorisation.
NEAR_COPY_PERCENTILE = 1.0

# Real-vs-real FD is averaged over this many train subsets: one subset of 360 varies by ~20%.
REFERENCE_SUBSETS = 10


def nearest_neighbour_distances(queries, references, chunk=4096):
    """Pixel-space L2 distance (float64, 0..255 units) from each query to its nearest reference."""
    queries = np.asarray(queries, np.float64).reshape(len(queries), -1)
    references = np.asarray(references, np.float64).reshape(len(references), -1)
    ref_sq = np.einsum("ij,ij->i", references, references)
    out = np.empty(len(queries))
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        d2 = np.einsum("ij,ij->i", q, q)[:, None] + ref_sq[None, :] - 2 * q @ references.T
        out[start:start + chunk] = np.sqrt(np.maximum(d2.min(axis=1), 0))
    return out


def fd_scores(sample_features, held_out_features, train_features, subsets, seed):
    """`fd`, the Fréchet distance of the samples' features to the held-out real images', and its scale: FD's
    bias grows as the count shrinks, so `fd_real_vs_real` is that of as many real train images (the mean over
    `subsets` random subsets chosen by `seed`; one when that is all of them), and its spread,
    `fd_real_vs_real_std`, how much `fd` itself varies with the draw of samples."""
    held_out_stats = feature_statistics(held_out_features)
    count = min(len(sample_features), len(train_features))
    rng = np.random.default_rng(seed)
    picks = [rng.choice(len(train_features), count, replace=False)
             for _ in range(subsets if count < len(train_features) else 1)]
    real = [frechet_distance(*feature_statistics(train_features[p]), *held_out_stats) for p in picks]
    return {"fd": frechet_distance(*feature_statistics(sample_features), *held_out_stats),
            "fd_real_vs_real": float(np.mean(real)), "fd_real_vs_real_std": float(np.std(real)),
            "fd_reference_count": count, "fd_held_out_count": len(held_out_features)}


def evaluate_digits(images, labels=None, classifier=None, seed=0):
    """Score generated digits (uint8 [N, 1, 8, 8]) against the built-in dataset; returns a dict.

    `labels` are the classes the samples were conditioned on (None for unconditional samples). The
    real-vs-real scale (:func:`fd_scores`) is that of n = min(N, 1437) train digits against the same 360
    held-out digits, over REFERENCE_SUBSETS random subsets chosen by `seed`.
    """
    from mpdiff.data.digits import load_builtin_digits

    images = check_eval_images(images, 8, "digits")
    labels = check_digit_labels(labels, len(images))
    classifier = classifier if classifier is not None else load_digit_classifier()
    digits = load_builtin_digits()
    train, held_out = digits["train_images"], digits["test_images"]

    sample_features, predicted = classifier_outputs(classifier, images)
    held_out_features, held_out_predicted = classifier_outputs(classifier, held_out)
    train_features, _ = classifier_outputs(classifier, train)

    sample_nn = nearest_neighbour_distances(images, train)
    held_out_nn = nearest_neighbour_distances(held_out, train)
    threshold = float(np.percentile(held_out_nn, NEAR_COPY_PERCENTILE))
    near_copies = int(np.sum(sample_nn < threshold))
    held_out_near = int(np.sum(held_out_nn < threshold))

    return dict(
        num_samples=len(images),
        accuracy=None if labels is None else float(np.mean(predicted == labels)),
        **fd_scores(sample_features, held_out_features, train_features, REFERENCE_SUBSETS, seed),
        near_copies=near_copies,
        near_copies_fraction=near_copies / len(images),
        near_copy_threshold=threshold,
        near_copy_percentile=NEAR_COPY_PERCENTILE,
        near_copies_held_out=held_out_near,
        near_copies_held_out_fraction=held_out_near / len(held_out),
        median_nn_distance=float(np.median(sample_nn)),
        median_nn_distance_held_out=float(np.median(held_out_nn)),
        classifier_test_accuracy=float(np.mean(held_out_predicted == digits["test_labels"])),
    )


def format_report(result):
    """A short multi-line summary of :func:`evaluate_digits`' result."""
    r = result
    lines = [f"digits evaluation of {r['num_samples']} samples"]
    if r.get("accuracy") is not None:
        lines.append(f"  class accuracy      {100 * r['accuracy']:6.2f}%  (classifier agrees with the conditioning label)")
    lines.append(f"  FD vs held-out      {r['fd']:8.3f}  (real train digits, same count {r['fd_reference_count']}: "
                 f"{r['fd_real_vs_real']:.3f} ± {r['fd_real_vs_real_std']:.3f})")
    lines.append(f"  near copies         {r['near_copies']} ({100 * r['near_copies_fraction']:.1f}%)  "
                 f"(nearest train image closer than L2 {r['near_copy_threshold']:.1f}; "
                 f"held-out real: {r['near_copies_held_out']} ({100 * r['near_copies_held_out_fraction']:.1f}%))")
    lines.append(f"  median NN distance  {r['median_nn_distance']:8.1f}  (held-out real: {r['median_nn_distance_held_out']:.1f})")
    lines.append(f"  classifier accuracy on held-out real digits {100 * r['classifier_test_accuracy']:.2f}%")
    return "\n".join(lines)


def check_eval_images(images, side, what):
    """uint8 [N >= 2, 1, side, side] as a numpy array, else one MpdiffError line (`what`: the evaluation)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise MpdiffError(f"images: expected uint8 pixels (0..255), got {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (1, side, side):
        raise MpdiffError(f"images: the {what} evaluation needs {side}x{side} grayscale images [N, 1, {side}, {side}], "
                          f"got shape {images.shape}")
    if len(images) < 2:
        raise MpdiffError(f"images: need at least 2 samples for a Fréchet distance, got {len(images)}")
    return images


def check_digit_labels(labels, count):
    if labels is None:
        return None
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise MpdiffError(f"labels: expected {count} integer class labels, got shape {labels.shape} ({labels.dtype})")
    if labels.min() < 0 or labels.max() > 9:
        raise MpdiffError(f"labels: digit classes are 0..9, got values {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Reading generated samples back.


def load_image_folder_for_eval(path):
    """(uint8 [N, 1, 8, 8], int64 labels [N] or None) from a folder or ZIP of PNGs, e.g. as
    `mpdiff generate` writes them (with `dataset.json`: `{"labels": [["000000.png", 3], ...]}`).

    Read with :func:`mpdiff.data.datasets.open_dataset` and then decoded whole (``load``, as
    :func:`~mpdiff.data.datasets.load_dataset` does), so images come sorted by path and every file
    problem is reported the same way; here only the digits' 8x8 grayscale format is added, checked
    from the first image before anything is decoded.
    """
    from mpdiff.data.datasets import open_dataset

    ds = open_dataset(os.fspath(path))
    if ds.channels != 1 or ds.resolution != 8:
        raise DatasetError(f"{path}: mpdiff eval scores the built-in sets only (8x8 grayscale digits, 32x32 "
                           f"grayscale MNIST), got {ds.resolution}x{ds.resolution} with {ds.channels} "
                           f"channel{'s' if ds.channels != 1 else ''}; for other images use mpdiff metrics --images "
                           f"{path} --ref REF.npz (FID, with reference statistics from mpdiff ref: docs/EVALUATION.md)")
    ds = ds.load()
    return ds.images, ds.labels
