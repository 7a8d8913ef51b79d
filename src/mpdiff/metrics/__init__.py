"""Metrics: judging generated images.

* :mod:`~mpdiff.metrics.frechet` — the Fréchet distance between feature statistics.
* :mod:`~mpdiff.metrics.digits` — the built-in dataset's classifier and its evaluation.
* :mod:`~mpdiff.metrics.ema_sweep` — reconstruct, sample and evaluate a range of EMA lengths.
"""
