"""Training: one run, in pieces that each read in one sitting.

* :mod:`~mpdiff.train.run` — resolve a preset + overrides against the dataset; the resume contract.
* :mod:`~mpdiff.train.state` — what is trained: network, Adam, EMA trackers, counters.
* :mod:`~mpdiff.train.step` — one optimizer step; :mod:`~mpdiff.train.data_order` — which images it sees.
* :mod:`~mpdiff.train.optim` — Adam and the learning-rate schedule.
* :mod:`~mpdiff.train.checkpoint` — the state as a file and back.
* :mod:`~mpdiff.train.report` — log, stats and progress; :mod:`~mpdiff.train.precision` — CUDA numerics.
* :mod:`~mpdiff.train.loop` — the loop that drives them, and :func:`~mpdiff.train.loop.train`.
* :mod:`~mpdiff.train.measure` — speed and memory of a network on this machine.
"""
