"""Sampling (SPEC §6): the noise schedule, the Heun sampler against a closed-form ODE solution, guidance,
and per-seed generation."""

import math

import numpy as np
import pytest
import torch
from conftest import randomized_network

from mpdiff.diffusion.generate import generate, seed_inputs
from mpdiff.diffusion.guidance import guided
from mpdiff.diffusion.samplers import sample_euler, sample_heun
from mpdiff.diffusion.schedules import edm_sigmas

# ---- noise levels (SPEC §6.1) -------------------------------------------------------------------


def schedule_formula(num_steps, sigma_min, sigma_max, rho):
    """t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, in numpy float64."""
    i = np.arange(num_steps, dtype=np.float64)
    first, last = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (first + i / (num_steps - 1) * (last - first)) ** rho


SCHEDULES = [(0.002, 80.0, 7.0), (0.002, 5.0, 7.0), (0.01, 1.0, 3.0), (0.002, 80.0, 1.0)]


@pytest.mark.parametrize("num_steps", [2, 3, 18, 32, 257])
@pytest.mark.parametrize("sigma_min, sigma_max, rho", SCHEDULES)
def test_edm_sigmas_follow_the_formula_and_end_at_zero(num_steps, sigma_min, sigma_max, rho):
    sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (num_steps + 1,)
    # Both sides evaluate the same float64 expression, with different libraries' pow: a few ulp apart at most.
    np.testing.assert_allclose(sigmas[:-1].numpy(), schedule_formula(num_steps, sigma_min, sigma_max, rho),
                               rtol=1e-13, atol=0)
    assert sigmas[-1].item() == 0.0  # the appended t_N is exactly zero, not a tiny number
    assert bool((sigmas[1:] < sigmas[:-1]).all())  # strictly decreasing, including the last step to 0
    # The endpoints, up to the rounding of the formula: sigma_min is a difference of numbers of size sigma_max
    # (rho = 1: 80 + (0.002 - 80)), so its error is a few ulp of sigma_max. We keep the formula as NVIDIA's
    # sampler evaluates it (no endpoint patching), so that sampling stays bit-identical to the reference.
    assert sigmas[0].item() == pytest.approx(sigma_max, rel=1e-15, abs=0)
    assert sigmas[-2].item() == pytest.approx(sigma_min, rel=0, abs=1e-14 * sigma_max)


def test_edm_sigmas_with_one_step_is_sigma_max_then_zero():
    assert edm_sigmas(1, 0.002, 80.0, 7.0).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError, match="at least 1"):
        edm_sigmas(0)


def test_edm_sigmas_defaults_are_the_papers():
    assert torch.equal(edm_sigmas(), edm_sigmas(32, 0.002, 80.0, 7.0))


# ---- Heun sampler (SPEC §6.2) -------------------------------------------------------------------


class RecordingDenoiser:
    """D(x; sigma) = a fixed function of x and sigma; records every call's (sigma, batch size, dtype)."""

    def __init__(self, function=lambda x, sigma: torch.zeros_like(x)):
        self.function = function
        self.calls = []

    def __call__(self, x, sigma, labels):
        assert sigma.shape == (x.shape[0],) and bool((sigma == sigma[0]).all())
        self.calls.append((sigma[0].item(), x.shape[0], x.dtype, labels))
        return self.function(x, sigma.reshape(-1, *[1] * (x.ndim - 1)))


@pytest.mark.parametrize("num_steps", [1, 2, 5, 32])
def test_heun_evaluates_the_denoiser_2n_minus_1_times_at_the_scheduled_levels(num_steps):
    denoiser = RecordingDenoiser()
    sigmas = edm_sigmas(num_steps)
    labels = torch.eye(3)
    sample_heun(denoiser, torch.randn(3, 2, 4, 4, dtype=torch.float64) * sigmas[0], sigmas, labels)
    assert len(denoiser.calls) == 2 * num_steps - 1  # NFE = 63 for the paper's 32 steps
    # Step i evaluates at t_i, then (except on the last step) corrects at t_{i+1}: t0, t1, t1, t2, ..., t_{N-1}.
    t = sigmas.to(torch.float32).tolist()
    expected = [level for i in range(num_steps - 1) for level in (t[i], t[i + 1])] + [t[num_steps - 1]]
    assert [c[0] for c in denoiser.calls] == expected
    assert all(c[1:3] == (3, torch.float32) and c[3] is labels for c in denoiser.calls)  # float32 in, labels kept


def test_last_step_is_euler_to_zero_without_a_correction():
    # The last step goes to t_N = 0; a Heun correction there would divide by t_N. Euler from t_{N-1} lands
    # exactly on the denoiser's output: x + (0 - t)(x - D)/t = D. A denoiser with a known constant output
    # shows it (up to float64 rounding of that identity), and no evaluation ever sees sigma = 0.
    target = torch.tensor([[0.25, -1.5, 3.0]])
    denoiser = RecordingDenoiser(lambda x, sigma: target.expand_as(x).to(x.dtype))
    sigmas = edm_sigmas(6)
    out = sample_heun(denoiser, torch.tensor([[10.0, -20.0, 30.0]], dtype=torch.float64) * sigmas[0], sigmas)
    assert out.dtype == torch.float64 and bool(torch.isfinite(out).all())
    assert torch.allclose(out, target.double(), rtol=1e-12, atol=0)
    assert min(c[0] for c in denoiser.calls) == pytest.approx(0.002) and len(denoiser.calls) == 11


def gaussian_denoiser(data_std):
    """The ideal denoiser for data ~ N(0, data_std^2 I): E[y | y + sigma n] = s^2 / (s^2 + sigma^2) x."""
    return RecordingDenoiser(lambda x, sigma: data_std ** 2 / (data_std ** 2 + sigma.double() ** 2) * x)


def heun_error(num_steps, data_std=0.5, sigma_max=80.0):
    """Relative error of the sampler's x(0) against the exact probability-flow ODE solution.

    dx/dsigma = (x - D(x; sigma)) / sigma = x sigma / (s^2 + sigma^2) integrates to
    x(sigma) = x(sigma_max) sqrt((s^2 + sigma^2) / (s^2 + sigma_max^2)), so x(0) = x(sigma_max) s / sqrt(s^2 + sigma_max^2).
    """
    start = torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigma_max
    sigmas = edm_sigmas(num_steps, 0.002, sigma_max, 7.0)
    out = sample_heun(gaussian_denoiser(data_std), start, sigmas)
    exact = start * data_std / math.sqrt(data_std ** 2 + sigma_max ** 2)
    return ((out - exact).norm() / exact.norm()).item()


def test_heun_is_second_order_on_gaussian_data():
    # Heun's global error is C N^-2: doubling the steps must cut it by about 4 (first-order Euler: by 2).
    # Measured here: 4.6 (16 -> 32), 4.3 (32 -> 64), 4.2 (64 -> 128); the ratio tends to 4 as N grows.
    # Two error floors lie far below these errors (>= 9e-4): the last step is Euler from sigma_min = 0.002
    # to 0, which scales x by s^2/(s^2 + sigma_min^2) instead of s/sqrt(s^2 + sigma_min^2), a relative
    # error of sigma_min^2 / (2 s^2) = 8e-6 whatever N; and the denoiser sees x in float32 (~1e-7 per call).
    errors = {n: heun_error(n) for n in (16, 32, 64, 128)}
    for n in (16, 32, 64):
        assert 3 < errors[n] / errors[2 * n] < 5, errors


def test_heun_with_the_papers_32_steps_solves_the_gaussian_ode_to_2_percent():
    # The error at the paper's N = 32 (sigma 80 -> 0.002, rho 7, s = sigma_data = 0.5) is 1.57e-2: the EDM
    # schedule's steps near sigma ~ s, where x bends, are coarse for this stiff 1-D problem. The bound 2e-2
    # is that plus ~25% margin (the arithmetic is float64 except for float32 denoiser inputs, so the number
    # is reproducible to ~1e-6 across platforms). Broken samplers measure far above it at N = 32: Euler
    # only (no correction) 8.8e-2, the end slope alone instead of the average 1.3e-1, the correction
    # evaluated at t_i instead of t_{i+1} 6.4e-1.
    assert heun_error(32) < 2e-2
    # Other data scales: measured 1.9e-2 (s = 0.25), 1.3e-2 (1.0), 1.0e-2 (2.0).
    for data_std in (0.25, 1.0, 2.0):
        assert heun_error(32, data_std) < 2.5e-2


def test_heun_returns_float64_and_leaves_the_start_untouched():
    start = torch.randn(2, 3, dtype=torch.float64) * 80
    before = start.clone()
    out = sample_heun(gaussian_denoiser(0.5), start, edm_sigmas(4))
    assert out.dtype == torch.float64 and torch.equal(start, before)


# ---- guidance (SPEC §6.4) -------------------------------------------------------------------------


class ConstantDenoiser:
    def __init__(self, value):
        self.value = value
        self.calls = []

    def __call__(self, x, sigma, labels):
        self.calls.append((x, sigma, labels))
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("guide_value", [None, -3.0])
def test_guidance_one_returns_the_main_networks_output_without_evaluating_the_guide(guide_value):
    net = ConstantDenoiser(0.7)
    guide = None if guide_value is None else ConstantDenoiser(guide_value)
    x, sigma, labels = torch.randn(2, 3), torch.tensor([1.0, 2.0]), torch.eye(2)
    out = guided(net, guide, 1.0)(x, sigma, labels)
    assert torch.equal(out, torch.full_like(x, 0.7))
    assert guide is None or guide.calls == []
    assert net.calls[0][0] is x and net.calls[0][1] is sigma and net.calls[0][2] is labels
    assert torch.equal(guided(net, None, 2.5)(x, sigma, labels), out)  # no guide: w is ignored


@pytest.mark.parametrize("w", [0.0, 0.25, 0.5, 1.5, 2.0, 2.45, -1.0])
def test_guidance_extrapolates_from_the_guide_through_the_main_network(w):
    net, guide = ConstantDenoiser(0.7), ConstantDenoiser(-3.0)
    x, sigma, labels = torch.randn(2, 3), torch.tensor([1.0, 2.0]), torch.eye(2)
    out = guided(net, guide, w)(x, sigma, labels)
    # D = D_guide + w (D_net - D_guide) (Eq. 152-153); float32 lerp may round differently from this form.
    assert torch.allclose(out, torch.full_like(x, -3.0 + w * (0.7 + 3.0)), rtol=1e-6, atol=1e-6)
    for calls in (net.calls, guide.calls):  # both see the same input, noise level and labels
        assert len(calls) == 1 and calls[0][0] is x and calls[0][1] is sigma and calls[0][2] is labels


def test_guidance_mixes_per_element_outputs():
    main = lambda x, sigma, labels: x * 2
    guide = lambda x, sigma, labels: x - 1
    x = torch.randn(4, 5)
    assert torch.allclose(guided(main, guide, 3.0)(x, None, None), (x - 1) + 3.0 * (2 * x - (x - 1)), atol=1e-6)


# ---- generation: an image depends only on its seed and class (SPEC §6.6) ---------------------------


def test_seed_inputs_depend_only_on_the_seed():
    shape = (3, 4, 4)
    alone = {s: seed_inputs([s], shape, num_classes=10) for s in (3, 7, 11)}
    noise, labels, classes = seed_inputs([11, 3, 7], shape, num_classes=10)
    for row, seed in enumerate([11, 3, 7]):
        assert torch.equal(noise[row], alone[seed][0][0])
        assert classes[row] == alone[seed][2][0] and torch.equal(labels[row], alone[seed][1][0])
    assert torch.equal(labels, torch.nn.functional.one_hot(torch.tensor(classes), 10).float())
    assert not torch.equal(alone[3][0], alone[7][0])
    # Seeds are taken mod 2^32 (SPEC §6.6).
    assert torch.equal(seed_inputs([2 ** 32 + 3], shape, 10)[0], alone[3][0])


def test_seed_inputs_fixed_classes_keep_the_noise():
    shape = (1, 8, 8)
    random_noise, _, random_classes = seed_inputs([0, 1, 2], shape, num_classes=10)
    noise, labels, classes = seed_inputs([0, 1, 2], shape, num_classes=10, class_idx=4)
    assert classes == [4, 4, 4] and torch.equal(labels.argmax(1), torch.tensor([4, 4, 4]))
    assert torch.equal(noise, random_noise)  # the class draw is made either way: same stream after it
    per_seed = seed_inputs([0, 1, 2], shape, num_classes=10, class_idx=[9, None, 2])[2]
    assert per_seed == [9, random_classes[1], 2]
    noise, labels, classes = seed_inputs([0, 1], shape)  # unconditional
    assert labels is None and classes == [None, None] and noise.dtype == torch.float32


@pytest.fixture(scope="module")
def tiny_net():
    return randomized_network(label_dim=10).eval()  # non-zero output gain: labels and input matter


def test_generated_images_do_not_depend_on_position_or_batch_size(tiny_net):
    kwargs = dict(num_steps=3, progress=False)
    together, classes = generate(tiny_net, [5, 9, 2], batch_size=3, **kwargs)
    shuffled, shuffled_classes = generate(tiny_net, [2, 5, 9, 13], batch_size=3, **kwargs)  # [2, 5, 9] + [13]
    one_by_one, one_by_one_classes = generate(tiny_net, [5, 9, 2], batch_size=1, **kwargs)
    assert classes == one_by_one_classes == [shuffled_classes[i] for i in (1, 2, 0)]
    assert together.shape == (3, 3, 16, 16) and together.dtype == torch.float32
    assert not torch.equal(together[0], together[1])
    # Same batch size, other places and neighbours: bit for bit the same images.
    assert torch.equal(together, shuffled[[1, 2, 0]])
    # Another batch size: the same inputs (seed_inputs above), but on CPU oneDNN's convolutions and the
    # GEMMs pick their blocking by batch size, so the network's float32 sums round differently (~2e-6 per
    # evaluation). Measured: 5e-6 of the images' largest value after 3 steps; the bound is 20x that. A
    # batch-dependent input (noise or class drawn from a shared stream) changes images by O(1).
    scale = together.abs().max().item()
    assert (one_by_one - together).abs().max().item() <= 1e-4 * scale


def test_generated_image_depends_on_its_class(tiny_net):
    kwargs = dict(num_steps=2, progress=False, batch_size=2)
    seven, classes = generate(tiny_net, [5, 6], class_idx=7, **kwargs)
    mixed, mixed_classes = generate(tiny_net, [5, 6], class_idx=[7, 1], **kwargs)
    assert classes == [7, 7] and mixed_classes == [7, 1]
    assert torch.equal(seven[0], mixed[0]) and not torch.equal(seven[1], mixed[1])


def test_the_callback_sees_every_step():
    # Progress (and anything else that watches sampling) hears about every step, not only whole batches,
    # with the levels of the step and the denoiser's estimate (a preview of the image).
    seen = []
    sigmas = edm_sigmas(5)
    for sampler in (sample_heun, sample_euler):
        seen.clear()
        sampler(lambda x, sigma, labels: x * 0 + 0.5, torch.ones(2, 1, 2, 2) * 80, sigmas, callback=seen.append)
        assert [s.index for s in seen] == list(range(5))
        assert [s.sigma for s in seen] == pytest.approx(sigmas[:-1].tolist())
        assert [s.sigma_next for s in seen] == pytest.approx(sigmas[1:].tolist())
        assert all(s.x.shape == (2, 1, 2, 2) and bool((s.denoised == 0.5).all()) for s in seen)
