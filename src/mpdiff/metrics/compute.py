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
import math
import os
import zipfile
import zlib

import numpy as np
import torch

from mpdiff.diffusion.generate import MAX_SEEDS
from mpdiff.errors import ConfigError, MpdiffError, first_line
from mpdiff.metrics import digits, dinov2, inception, mnist
from mpdiff.metrics.detectors import FeatureStats, check_images
from mpdiff.metrics.digits import DigitsDetector
from mpdiff.metrics.frechet import check_covariance, frechet_distance
from mpdiff.storage.files import read_bytes, show_path, write_bytes
from mpdiff.storage.tensors import npy_header

METRICS = ("fid", "fd_dinov2", "fd_digits", "fd_mnist")
# The dimension D of each metric's features: its reference statistics are a [D] mean and a [D, D] covariance.
FEATURE_DIMS = {"fid": inception.FEATURE_DIM, "fd_dinov2": dinov2.VIT_L14["width"], "fd_digits": digits.FEATURE_DIM,
                "fd_mnist": mnist.FEATURE_DIM}
REFERENCE_MAX_BYTES = 256 * 2 ** 20  # two 2048-d and 1024-d covariances are ~42 MB
NPY_HEADER_MAX_BYTES = 4096          # an .npy header: numpy pads it to 64 or 128 bytes
SOURCE_MAX_CHARS = 4096              # the dataset `mpdiff ref` records: a name or a path
MIN_IMAGES = 2                       # a covariance needs two images


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
        return inception.InceptionDetector(device=device)
    if metric == "fd_dinov2":
        from mpdiff.metrics.dinov2 import DinoV2Detector  # (the argument `dinov2` is the weights file)

        return DinoV2Detector(path=dinov2, device=device)
    if metric == "fd_digits":
        return DigitsDetector(device=device)
    if metric == "fd_mnist":
        return mnist.MnistDetector(device=device)
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

def check_image_count(count, what):
    """Refuse, in one line naming `what`, fewer images than Fréchet statistics need (a covariance needs two),
    before any detector is loaded or image read."""
    if count < MIN_IMAGES:
        raise ConfigError(f"{what}: {count:,} image{'' if count == 1 else 's'}; Fréchet statistics need at least "
                          f"{MIN_IMAGES} (a covariance is estimated from two images or more; FID uses 50,000)")
    return count


def check_pixels(dataset):
    """Refuse, in one line, a dataset Fréchet statistics cannot be measured on: latents (they are measured on
    pixels) or fewer than two images (:func:`check_image_count`). Returns it."""
    where = show_path(getattr(dataset, "path", None) or dataset.name)
    if getattr(dataset, "latent", False):
        raise ConfigError(f"{where}: holds latents of the Stable Diffusion VAE, not images; Fréchet distances are "
                          f"measured on pixels: use the image dataset the latents were encoded from")
    check_image_count(len(dataset), where)
    return dataset


def metric_seeds(num, first_seed=0):
    """The seeds of `num` generated images from `first_seed` (`mpdiff metrics --net --num --seed`), as a range:
    checked before anything is built, so that a count of 10^10 is refused in one line rather than listed."""
    if not MIN_IMAGES <= num <= MAX_SEEDS:
        raise ConfigError(f"--num must be from {MIN_IMAGES} to {MAX_SEEDS:,} images (the cap on seeds, as for "
                          f"--seeds; a covariance needs {MIN_IMAGES}), got {num:,}")
    if first_seed < 0:
        raise ConfigError(f"--seed must be 0 or more (the first seed), got {first_seed:,}")
    return range(first_seed, first_seed + num)


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

    seeds = list(metric_seeds(num, first_seed) if seeds is None else seeds)
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


def reference_member_limit(name):
    """The bytes that the member `name` of a reference .npz may unpack to, or None for a name that reference
    statistics never hold: an .npy header and a float64 [D] mean, [D, D] covariance or count, D being the
    metric's feature dimension (:data:`FEATURE_DIMS`), or the recorded source."""
    key = name[:-len(".npy")] if name.endswith(".npy") else None
    if key == "source":
        return NPY_HEADER_MAX_BYTES + 4 * SOURCE_MAX_CHARS  # numpy stores text as 4 bytes a character
    metric, part = ("fid", key) if key in ("mu", "sigma") else (key or "").rpartition("_")[::2]
    if metric not in FEATURE_DIMS or part not in ("mu", "sigma", "count"):
        return None
    dim = FEATURE_DIMS[metric]
    return NPY_HEADER_MAX_BYTES + 8 * {"mu": dim, "sigma": dim * dim, "count": 1}[part]


def check_reference_member(where, archive, info):
    """Refuse, from the zip directory and the member's .npy header and before anything is unpacked, a member
    of a reference .npz that reference statistics never hold or that unpacks to more than they need: a small
    file can hold a deflated array of gigabytes, which np.load would allocate before any check."""
    name = info.filename
    limit = reference_member_limit(name)
    if limit is None:
        raise MpdiffError(f"{where}: holds {name[:60]!r}, which reference statistics do not (they hold <metric>_mu, "
                          f"<metric>_sigma, <metric>_count and source; EDM's files mu and sigma)")
    if info.file_size > limit:
        raise MpdiffError(f"{where}: {name[:60]} unpacks to {info.file_size:,} bytes, more than the {limit:,} that "
                          f"reference statistics need (a [D] mean and a [D, D] covariance, D = the metric's features)")
    if info.flag_bits & 0x1:
        raise MpdiffError(f"{where}: {name[:60]} is encrypted; numpy never writes encrypted members")
    with archive.open(info) as f:
        shape, dtype = npy_header(f)
    if math.prod(shape) * dtype.itemsize > info.file_size:  # np.load allocates what the header says, then reads
        raise MpdiffError(f"{where}: {name[:60]} declares a {dtype} array of shape {list(shape)}, more than its "
                          f"{info.file_size:,} bytes hold")


def reference_arrays(path):
    """Every array of a reference .npz, by name, as stored (their values are checked by :func:`load_reference`).

    Memory is bounded before anything is unpacked: the file is at most REFERENCE_MAX_BYTES, and each member
    is checked from the zip directory and its .npy header (:func:`check_reference_member`)."""
    data = read_bytes(path, REFERENCE_MAX_BYTES, what="reference statistics")
    where = show_path(path)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                check_reference_member(where, archive, info)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, NotImplementedError,
            RuntimeError) as e:  # RuntimeError: zipfile's "encrypted"; NotImplementedError: a compression it lacks
        raise MpdiffError(f"{where}: not a readable .npz of reference statistics ({first_line(e)})") from None


def reference_source(path):
    """The dataset a reference .npz was computed from, as `mpdiff ref` recorded it ('mnist', a path), or None."""
    try:
        source = reference_arrays(path).get("source")
    except MpdiffError:
        return None
    return str(source) if source is not None and source.ndim == 0 and str(source) else None


def reference_counts(arrays, path=None):
    """{metric: image count} of the metrics a reference's arrays hold (EDM's FID file: count unknown, None);
    MpdiffError naming `path` for a count that is not one whole number."""
    counts = {}
    for m in (m for m in METRICS if f"{m}_mu" in arrays):
        count = arrays.get(f"{m}_count")
        if count is not None and (count.shape != () or count.dtype.kind not in "iu" or count < 0):
            raise MpdiffError(f"{show_path(path or 'reference statistics')}: {m}_count is {count.dtype} "
                              f"{list(count.shape)}, not a count of images")
        counts[m] = None if count is None else int(count)
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
    kept = {m: c for m, c in reference_counts(arrays, path).items() if m not in metrics}
    wrong = {m: c for m, c in kept.items() if c is not None and c != count}
    if wrong:
        metric, theirs = next(iter(wrong.items()))
        raise ConfigError(f"{show_path(path)}: its {metric} statistics are of {theirs:,} images, {source} has "
                          f"{count:,}; --add adds statistics of the same images (or write a new --out)")
    dropped = {f"{m}_{part}" for m in metrics for part in ("mu", "sigma", "count")} | {"source"}
    if "fid" in metrics:
        dropped |= {"mu", "sigma"}  # EDM's FID file's names
    return {k: v for k, v in arrays.items() if k not in dropped}, tuple(kept)


def load_reference(path, metrics=None, source=None):
    """{metric: (mu, sigma)} of a reference .npz (ours, or EDM's FID file with 'mu' and 'sigma').

    With `metrics`, it must hold each (else the refusal names the command that adds them; `source`: the
    dataset, when the file does not record it), and their statistics are checked (:func:`check_statistics`);
    without, every one it holds is. Before any network is loaded or image made."""
    arrays = reference_arrays(path)
    found = {}
    if "mu" in arrays and "sigma" in arrays:
        found["fid"] = (arrays["mu"], arrays["sigma"])
    for metric in METRICS:
        if f"{metric}_mu" in arrays and f"{metric}_sigma" in arrays:
            found[metric] = (arrays[f"{metric}_mu"], arrays[f"{metric}_sigma"])
    if not found:
        raise MpdiffError(f"{show_path(path)}: no statistics in it (expected <metric>_mu / <metric>_sigma, or mu / sigma)")
    if metrics is not None:
        check_reference_has(path, found, metrics, source)
    reference_counts(arrays, path)
    for metric in found if metrics is None else metrics:
        check_statistics(path, metric, *found[metric])
    return found


def check_statistics(path, metric, mu, sigma):
    """Refuse, in one line naming `path`, reference statistics that are not a [D] mean and a [D, D] covariance
    of real numbers (finite, symmetric, positive semi-definite), D being the metric's feature dimension."""
    where, dim = show_path(path), FEATURE_DIMS.get(metric)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise MpdiffError(f"{where}: {metric} statistics have shapes {list(mu.shape)} / {list(sigma.shape)}; expected "
                          f"a mean [D] and a covariance [D, D]" + (f" ({metric}: D = {dim})" if dim else ""))
    if mu.dtype.kind != "f" or sigma.dtype.kind != "f":
        raise MpdiffError(f"{where}: {metric} statistics are {mu.dtype} / {sigma.dtype}, not floating-point numbers")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise MpdiffError(f"{where}: {metric} statistics hold NaN or infinity (non-finite values)")
    try:
        check_covariance(np.asarray(sigma, np.float64), f"its {metric}_sigma")
    except ValueError as e:
        raise MpdiffError(f"{where}: {e}") from None


def check_reference_dims(reference, detectors, path=None):
    """Refuse, in one line, reference statistics whose dimension is not the dimension of their detector's
    features (a reference made by another detector): found before any image is made or read, not after."""
    for detector in detectors:
        if detector.metric in reference and len(reference[detector.metric][0]) != detector.feature_dim:
            dim, source = len(reference[detector.metric][0]), (path and reference_source(path)) or "DATASET"
            raise MpdiffError(f"{show_path(path or 'the reference statistics')}: its {detector.metric} statistics are of "
                              f"{dim}-dimensional features, but {detector.metric} measures {detector.feature_dim} "
                              f"({detector.name} features); make them with: mpdiff ref {source} --metrics "
                              f"{detector.metric}")


def reference_detectors(path, reference, metrics, device="cpu", dinov2=None):
    """The detectors of `metrics`, with the reference statistics (`reference` read from `path`) checked
    against their feature dimensions (:func:`check_reference_dims`): before any image is made or read."""
    detectors = [make_detector(m, device=device, dinov2=dinov2) for m in metrics]
    check_reference_dims(reference, detectors, path)
    return detectors


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
    check_reference_dims(reference, detectors)  # before the first batch is drawn
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

