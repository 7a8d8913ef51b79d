"""Diffusion: the EDM formulation around a network.

* :mod:`~mpdiff.diffusion.loss` — noise-level distribution and the learned-uncertainty loss.
* :mod:`~mpdiff.diffusion.schedules` — noise levels for sampling.
* :mod:`~mpdiff.diffusion.samplers` — ODE solvers with one signature.
* :mod:`~mpdiff.diffusion.guidance` — guided denoisers (CFG, autoguidance).
* :mod:`~mpdiff.diffusion.generate` — per-seed generation in batches, and writing a sample folder.
"""
