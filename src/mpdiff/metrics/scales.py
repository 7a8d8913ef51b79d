"""What a Fréchet distance is to be compared with: the distance real images reach against the same
reference statistics (`mpdiff metrics` prints it beside the result, issue 33).

A distance has no absolute scale: it depends on the detector, the reference and, through its bias, on
the number of images. For a reference made from a built-in set (`mpdiff ref digits` or `mpdiff ref
mnist`: every training image), the built-in held-out images are real images the reference has not
seen, so :func:`real_vs_real` measures them against it at the evaluated count (the held-out split's size
at most), in the cheap classifier features (fd_digits, fd_mnist). For FID on MNIST it quotes the
measurement of docs/EVALUATION.md instead (Inception on a CPU costs minutes).
"""

import json

import numpy as np

from mpdiff.metrics import compute  # through the module: a test's patch of make_detector is undone after it

CLASSIFIER_METRICS = {"digits": "fd_digits", "mnist": "fd_mnist"}  # built-in set -> its cheap metric
SUBSETS = 3                     # random held-out subsets averaged when the count is below the split's size
MEASURED = {  # (metric, built-in set): the scale measured once (docs/EVALUATION.md, 2026-12-02, CPU)
    ("fid", "mnist"): "1,000 real held-out MNIST images gave FID 7.6 against the same reference (docs/EVALUATION.md); "
                      "fewer images give a larger figure",
}


def real_vs_real(metric, reference, ref_path, count, seed=0):
    """(value or None, text) of the real-vs-real scale of `metric` against the reference statistics
    `reference` ({metric: (mu, sigma)}) read from `ref_path`, for `count` evaluated images; None when
    none is known."""
    source = compute.reference_source(ref_path)
    if CLASSIFIER_METRICS.get(source) == metric:
        from mpdiff.data.datasets import builtin_dataset

        held_out = builtin_dataset(source, "test").images
        n = max(2, min(count, len(held_out)))
        rng = np.random.default_rng(seed)
        picks = [np.sort(rng.choice(len(held_out), n, replace=False))
                 for _ in range(SUBSETS if n < len(held_out) else 1)]
        detector = compute.make_detector(metric)
        values = [compute.compute_metrics(compute.dataset_batches(held_out[p]), reference, [metric],
                                          detectors=[detector])[metric]
                  for p in picks]
        value = float(np.mean(values))
        return value, (f"{n:,} real held-out {source} images against the same reference: {value:.4f}"
                       + (f" (mean of {len(picks)} draws)" if len(picks) > 1 else ""))
    if (metric, source) in MEASURED:
        return None, MEASURED[(metric, source)]
    return None


def result_lines(result, names, reference, ref_path, evaluations=(), as_json=False):
    """What `mpdiff metrics` prints: each distance with its real-vs-real scale when one is known, the image
    count and the network evaluations per image; or all of it as one JSON object (`real_vs_real`: the
    scales measured here)."""
    scales = {name: real_vs_real(name, reference, ref_path, result["num_images"]) for name in names}
    if as_json:
        known = {name: scale[0] for name, scale in scales.items() if scale and scale[0] is not None}
        return [json.dumps({**result, **({"real_vs_real": known} if known else {})}, indent=2)]
    lines = []
    for name in names:
        lines.append(f"{name:10s} {result[name]:.4f}")
        if scales[name]:
            lines.append(f"{'':10s} for scale: {scales[name][1]}")
    lines.append(f"{'images':10s} {result['num_images']:,}")
    return lines + [f"{name:10s} {result[name]} per image" for name in evaluations]
