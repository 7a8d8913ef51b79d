"""Fréchet-distance metrics of image sets: reference statistics and streamed evaluation (SPEC §7.5).

Metric names and their detectors (:mod:`mpdiff.metrics.detectors`):

* ``fid``: Inception-v3 pool features (2048-d), :mod:`mpdiff.metrics.inception`;
* ``fd_dinov2``: DINOv2 ViT-L/14 class features (1024-d), :mod:`mpdiff.metrics.dinov2`;
* ``fd_digits``: the built-in digits classifier's features (64-d; 8x8 grayscale only);
* ``fd_mnist``: the built-in MNIST classifier's features (128-d; 32x32 grayscale only),
  :mod:`mpdiff.metrics.mnist`.

Images arrive in batches (uint8 [N, C, H, W]) from a dataset, a folder of samples, or a network that
generates them on the fly; each batch goes through every detector and only the detectors' running
float64 statistics are kept (:class:`~mpdiff.metrics.detectors.FeatureStats`), so memory does not
grow with the number of images. A reference file (``mpdiff ref``) is an ``.npz`` with
``<metric>_mu``, ``<metric>_sigma`` and ``<metric>_count`` per metric; EDM's FID reference files
(``mu``, ``sigma``) are read as ``fid``.
"""

import io
import os
import zipfile

import numpy as np
import torch

from mpdiff.errors import ConfigError, MpdiffError
from mpdiff.metrics.detectors import Detector, FeatureStats, check_images
from mpdiff.metrics.frechet import frechet_distance
from mpdiff.storage.files import read_bytes, show_path, write_bytes

METRICS = ("fid", "fd_dinov2", "fd_digits", "fd_mnist")
REFERENCE_MAX_BYTES = 256 * 2 ** 20  # two 2048-d and 1024-d covariances are ~42 MB


class DigitsDetector(Detector):
    """The built-in digits classifier's penultimate features (8x8 grayscale images only)."""

    name = "digits"
    metric = "fd_digits"

    def __init__(self, classifier=None, device="cpu"):
        super().__init__(device)
        from mpdiff.metrics.digits import load_digit_classifier

        self.classifier = (classifier or load_digit_classifier()).to(self.device)
        self.feature_dim = self.classifier.fc.out_features

    def preprocess(self, images):
        if tuple(images.shape[1:]) != (1, 8, 8):
            raise MpdiffError(f"fd_digits measures 8x8 grayscale digits, got images of shape {list(images.shape[1:])}")
        return images.to(self.device)

    def embed(self, inputs):
        return self.classifier.features(inputs)


def parse_metrics(text):
    """'fid,fd_dinov2' -> ('fid', 'fd_dinov2'); ConfigError naming an unknown metric."""
    names = tuple(dict.fromkeys(part.strip() for part in str(text).split(",") if part.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}")
    return names


def make_detector(metric, device="cpu", dinov2=None):
    """The detector of a metric name. Weights come from local files only (see each module)."""
    if metric == "fid":
        from mpdiff.metrics.inception import InceptionDetector

        return InceptionDetector(device=device)
    if metric == "fd_dinov2":
        from mpdiff.metrics.dinov2 import DinoV2Detector

        return DinoV2Detector(path=dinov2, device=device)
    if metric == "fd_digits":
        return DigitsDetector(device=device)
    if metric == "fd_mnist":
        from mpdiff.metrics.mnist import MnistDetector

        return MnistDetector(device=device)
    raise ConfigError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def accumulate(batches, detectors, progress=None):
    """{metric: FeatureStats} over every batch of uint8 images; batches are dropped after use."""
    stats = {d.metric: FeatureStats(d.feature_dim) for d in detectors}
    for images in batches:
        images = check_images(images)
        for detector in detectors:
            stats[detector.metric].add(detector.features(images))
        if progress is not None:
            progress(len(images))
    return stats


# ------------------------------------------------------------------------------------ image sources

def check_pixels(dataset):
    """Refuse, in one line, a dataset of latents where Fréchet distances need pixels. Returns it."""
    if getattr(dataset, "latent", False):
        from mpdiff.errors import ConfigError
        from mpdiff.storage.files import show_path

        where = show_path(getattr(dataset, "path", None) or dataset.name)
        raise ConfigError(f"{where}: holds latents of the Stable Diffusion VAE, not images; Fréchet distances are "
                          f"measured on pixels: use the image dataset the latents were encoded from")
    return dataset


def dataset_batches(images, batch_size=64):
    """uint8 tensors [b, C, H, W] of a dataset or of an in-memory uint8 array or tensor [N, C, H, W].

    A dataset (anything with ``batches``, e.g. :func:`mpdiff.data.datasets.open_dataset`'s) is streamed:
    a folder or ZIP is read and decoded one batch at a time, so memory does not grow with its size."""
    if hasattr(images, "batches"):
        check_pixels(images)
        for batch in images.batches(batch_size):
            yield torch.as_tensor(batch)
        return
    for start in range(0, len(images), batch_size):
        yield torch.as_tensor(np.asarray(images[start:start + batch_size]))


def network_batches(net, num=None, batch_size=None, first_seed=0, num_steps=None, device="cpu", seeds=None,
                    sampling=None, guide=None, guidance=1.0, encoder=None, evaluations=None):
    """Generated images as uint8, one batch at a time: seeds first_seed .. first_seed + num - 1 (or the
    list `seeds`), random classes per seed as `mpdiff generate` draws them, the sampler of `sampling`
    (num_steps and batch_size, when given, replace its own; without `sampling`, batches of 64) and
    optional guidance. Nothing but the current batch is kept.
    `encoder` decodes each batch (default pixels; a latent network's LatentEncoder runs the VAE decoder,
    so that the metrics see pixels).
    `evaluations`: a dict that receives the network evaluations per image, as counted
    ({"nfe": ..., "guide_nfe": ...}; :class:`mpdiff.diffusion.generate.Batch`)."""
    from mpdiff.data.pixels import PixelEncoder
    from mpdiff.diffusion.generate import generate_batches, sampling_config

    seeds = list(range(first_seed, first_seed + num)) if seeds is None else list(seeds)
    if batch_size is None and sampling is None:
        batch_size = 64
    overrides = {**({"batch_size": batch_size} if batch_size else {}), **({"num_steps": num_steps} if num_steps else {})}
    sampling = sampling_config(sampling, **overrides)
    for batch in generate_batches(net, seeds, sampling=sampling, guide=guide, guidance=guidance, device=device):
        if evaluations is not None:
            evaluations.update(batch.evaluations)
        yield (encoder or PixelEncoder()).decode(batch.images)


# ------------------------------------------------------------------------------------ reference files

def save_reference(path, stats, source="", keep=None):
    """Write {metric: FeatureStats} as a reference .npz (atomically). `keep`: arrays of an existing file
    (:func:`reference_arrays`) written beside them, for `mpdiff ref --add`."""
    arrays = {**(keep or {}), "source": np.array(str(source))}
    for metric, s in stats.items():
        mu, sigma = s.mean_cov()
        arrays.update({f"{metric}_mu": mu, f"{metric}_sigma": sigma, f"{metric}_count": np.array(s.count)})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())
    return path


def reference_arrays(path):
    """Every array of a reference .npz, by name, as stored (no check of what they hold)."""
    data = read_bytes(path, REFERENCE_MAX_BYTES, what="reference statistics")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise MpdiffError(f"{show_path(path)}: not a readable .npz of reference statistics ({e})") from None


def reference_source(path):
    """The dataset a reference .npz was computed from, as `mpdiff ref` recorded it ('mnist', a path), or None."""
    try:
        source = reference_arrays(path).get("source")
    except MpdiffError:
        return None
    return str(source) if source is not None and source.ndim == 0 and str(source) else None


def reference_counts(arrays):
    """{metric: image count} of the metrics a reference's arrays hold (EDM's FID file: count unknown, None)."""
    counts = {m: int(arrays[f"{m}_count"]) if f"{m}_count" in arrays else None
              for m in METRICS if f"{m}_mu" in arrays}
    if "mu" in arrays:
        counts.setdefault("fid", None)
    return counts


def missing_metrics_message(path, missing, reference, source=None):
    """The refusal of a reference file `path` ({metric: ...} `reference`) that lacks `missing`, with the
    command that adds them and keeps the others (`source`: the dataset, when the file does not record it)."""
    source = reference_source(path) or source or "DATASET"
    return (f"{show_path(path)}: the reference statistics have no {', '.join(missing)} (they hold "
            f"{', '.join(reference)}); add them, keeping the others, with: mpdiff ref {source} --out "
            f"{show_path(path)} --metrics {','.join(missing)} --add")


def check_reference_has(path, reference, metrics, source=None):
    """Refuse a reference (`reference` read from `path`) that lacks some of `metrics`, naming the command that
    adds them (:func:`missing_metrics_message`)."""
    missing = [m for m in metrics if m not in reference]
    if missing:
        raise ConfigError(missing_metrics_message(path, missing, reference, source))


def kept_for_adding(path, source, count, metrics):
    """(arrays, kept metric names) of an existing reference file that `mpdiff ref --add` keeps beside the
    statistics of `metrics` it computes anew from `source` (`count` images): every other metric. Refused
    when those were computed from another number of images, or from another built-in set. ({}, ()) when
    `path` does not exist."""
    if not os.path.lexists(path):
        return {}, ()
    arrays = reference_arrays(path)
    recorded = reference_source(path)
    builtin = ("digits", "mnist")
    if recorded is not None and recorded != str(source) and (recorded in builtin or str(source) in builtin):
        raise ConfigError(f"{show_path(path)} holds statistics of {recorded}, not {source}; --add adds statistics "
                          f"of the same images (or write a new --out)")
    kept = {m: c for m, c in reference_counts(arrays).items() if m not in metrics}
    wrong = {m: c for m, c in kept.items() if c is not None and c != count}
    if wrong:
        metric, theirs = next(iter(wrong.items()))
        raise ConfigError(f"{show_path(path)}: its {metric} statistics are of {theirs:,} images, {source} has "
                          f"{count:,}; --add adds statistics of the same images (or write a new --out)")
    dropped = {f"{m}_{part}" for m in metrics for part in ("mu", "sigma", "count")} | {"source"}
    if "fid" in metrics:
        dropped |= {"mu", "sigma"}  # EDM's FID file's names
    return {k: v for k, v in arrays.items() if k not in dropped}, tuple(kept)


def load_reference(path):
    """{metric: (mu, sigma)} of a reference .npz (ours, or EDM's FID file with 'mu' and 'sigma')."""
    arrays = reference_arrays(path)
    found = {}
    if "mu" in arrays and "sigma" in arrays:
        found["fid"] = (arrays["mu"], arrays["sigma"])
    for metric in METRICS:
        if f"{metric}_mu" in arrays and f"{metric}_sigma" in arrays:
            found[metric] = (arrays[f"{metric}_mu"], arrays[f"{metric}_sigma"])
    for metric, (mu, sigma) in found.items():
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise MpdiffError(f"{show_path(path)}: {metric} statistics have shapes {list(mu.shape)} / {list(sigma.shape)} "
                              f"or non-finite values")
    if not found:
        raise MpdiffError(f"{show_path(path)}: no statistics in it (expected <metric>_mu / <metric>_sigma, or mu / sigma)")
    return found


def compute_metrics(batches, reference, metrics, device="cpu", dinov2=None, detectors=None, progress=None,
                    dist=None):
    """{metric: Fréchet distance to the reference, 'num_images': count} for images streamed from `batches`.

    `reference` is {metric: (mu, sigma)} (:func:`load_reference`); every asked metric must be in it.
    `dist` (:class:`mpdiff.distributed.Distributed`): each process streams its own share of the images;
    their statistics are combined before the distances, which every process returns.
    """
    missing = [m for m in metrics if m not in reference]
    if missing:
        raise MpdiffError(f"the reference statistics have no {', '.join(missing)}; they hold {', '.join(reference)}")
    detectors = detectors or [make_detector(m, device=device, dinov2=dinov2) for m in metrics]
    stats = accumulate(batches, detectors, progress)
    if dist is not None:
        for s in stats.values():
            s.all_reduce(dist)
    result = {}
    for metric in metrics:
        mu, sigma = stats[metric].mean_cov()
        result[metric] = frechet_distance(mu, sigma, *reference[metric])
    result["num_images"] = next(iter(stats.values())).count
    return result


def default_reference_name(dataset):
    return os.path.splitext(os.path.basename(os.path.normpath(str(dataset))))[0] + "-ref.npz"
