"""EMA and post-hoc EMA.

* :mod:`~mpdiff.ema.profiles` — the pure float64 math (power profiles, half-lives, least squares).
* :mod:`~mpdiff.ema.trackers` — PowerFunctionEMA and TraditionalEMA (state only).
* :mod:`~mpdiff.ema.snapshots` — snapshot files: writing and listing them.
* :mod:`~mpdiff.ema.reconstruct` — the streaming post-hoc reconstruction.
* :mod:`~mpdiff.ema.plots` — a target profile against its reconstruction.
"""
