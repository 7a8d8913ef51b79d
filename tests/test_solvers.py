"""The multistep solvers (DPM-Solver++ 2M, 3M, 2M SDE, UniPC), NFE counted rather than computed, and the
guidance interval (issue 31; docs/SAMPLING.md)."""

import hashlib
import json
import math
import os

import pytest
import torch
from click.testing import CliRunner
from conftest import randomized_network

from mpdiff.cli import cli
from mpdiff.cli_options import sampling_from
from mpdiff.config import SAMPLER_NAMES, SAMPLING, network_evaluations
from mpdiff.diffusion.generate import generate, generate_batches, generate_to_folder
from mpdiff.diffusion.guidance import (
    GUIDANCE_PRESETS,
    Counted,
    GuidedDenoiser,
    guided,
    resolve_guidance,
    with_preset_interval,
)
from mpdiff.diffusion.samplers import SAMPLERS, difference_weights, psi, sample_dpmpp_2m, sample_dpmpp_3m
from mpdiff.diffusion.schedules import edm_sigmas
from mpdiff.errors import ConfigError

S = 0.5  # the data's standard deviation: data ~ N(0, S^2)


def ideal(x, sigma, labels=None):
    """The exact denoiser of N(0, S^2) data: E[y | y + sigma n] = S^2 / (S^2 + sigma^2) x."""
    return S ** 2 / (S ** 2 + sigma.double().reshape(-1, *[1] * (x.ndim - 1)) ** 2) * x


def zeros(shape):
    return torch.zeros(shape)


def ode_error(name, num_steps, sigma_min=0.002, sigma_max=80.0):
    """Relative error of a sampler on the probability-flow ODE of N(0, S^2) data. The exact flow from
    sigma_max to sigma_min is x(sigma) = x(sigma_max) sqrt((S^2 + sigma^2) / (S^2 + sigma_max^2)); every
    sampler's last step, to sigma = 0, is x = D(x; sigma_min), which is linear here, so the exact answer
    of "the ODE to sigma_min, then that step" is known too, and no error floor of that step hides the
    order (Heun's test in test_sampling compares with x(0) and has one, 8e-6)."""
    start = torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigma_max
    out = SAMPLERS[name](ideal, start, edm_sigmas(num_steps, sigma_min, sigma_max, 7.0), noise_fn=zeros)
    at_min = start * math.sqrt((S ** 2 + sigma_min ** 2) / (S ** 2 + sigma_max ** 2))
    exact = S ** 2 / (S ** 2 + sigma_min ** 2) * at_min
    return ((out - exact).norm() / exact.norm()).item()


# Measured errors at N = 32, 64, 128, 256 (sigma 80 -> 0.002, rho 7):
#   euler    8.8e-2 4.4e-2 2.2e-2 1.1e-2  (ratios 1.99 1.99 2.00)
#   heun     1.6e-2 3.7e-3 8.9e-4 2.2e-4  (4.28 4.13 4.07)
#   dpmpp-2m 1.7e-2 3.8e-3 9.0e-4 2.2e-4  (4.46 4.22 4.10)
#   dpmpp-3m 5.0e-3 5.5e-4 6.4e-5 7.8e-6  (9.05 8.54 8.25)
#   unipc    7.6e-3 8.8e-4 1.1e-4 1.3e-5  (8.62 8.33 8.17)
# The smallest error, 7.8e-6, lies far above the float32 rounding of the denoiser's input (~1e-7).
ORDERS = {"euler": 1, "heun": 2, "dpmpp-2m": 2, "dpmpp-3m": 3, "unipc": 3}


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_each_solver_converges_at_its_order_on_gaussian_data(name):
    # Global error C N^-p: doubling the steps divides it by 2^p, here within 25% (the ratios tend to 2^p
    # from above as N grows). A solver one order lower would show ratios of half of it.
    errors = {n: ode_error(name, n) for n in (32, 64, 128, 256)}
    for n in (32, 64, 128):
        assert 0.8 * 2 ** ORDERS[name] < errors[n] / errors[2 * n] < 1.25 * 2 ** ORDERS[name], errors
    assert errors[256] < 2.5e-2 / 4 ** (ORDERS[name] - 1)


def test_every_sampler_has_an_order_test():
    assert set(ORDERS) | {"dpmpp-2m-sde"} == set(SAMPLERS) == set(SAMPLER_NAMES)


def sde_moments(num_steps, sigma_min=0.002, sigma_max=80.0):
    """Relative errors of the SDE solver's mean and variance of x(0) given x(sigma_max), both exact here.

    The reverse SDE dx = 2 (D - x) dlambda + sigma sqrt(2 dlambda) n of N(0, S^2) data is linear: given
    x(sigma_max) = m0, x(sigma) is Gaussian with mean m0 (S^2 + sigma^2) / (S^2 + sigma_max^2) and
    variance (S^2 + sigma^2) - (S^2 + sigma^2)^2 / (S^2 + sigma_max^2). The solver is linear in its
    start and noises: its mean is its output without noise, its variance the sum of squares of the
    outputs for each step's noise alone (one batch row per step: noise_fn's k-th call is 1 in row k)."""
    sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, 7.0)
    mean = SAMPLERS["dpmpp-2m-sde"](ideal, torch.full([1, 1], sigma_max, dtype=torch.float64), sigmas,
                                    noise_fn=zeros).item()
    calls = []

    def one_noise_at_a_time(shape):
        z = torch.zeros(shape)
        z[len(calls), 0] = 1
        calls.append(shape)
        return z

    rows = SAMPLERS["dpmpp-2m-sde"](ideal, torch.zeros([num_steps - 1, 1], dtype=torch.float64), sigmas,
                                    noise_fn=one_noise_at_a_time)
    assert len(calls) == num_steps - 1  # fresh noise on every step but the last, to sigma = 0
    last = S ** 2 / (S ** 2 + sigma_min ** 2)  # the last step, x = D(x; sigma_min)
    exact_mean = sigma_max * (S ** 2 + sigma_min ** 2) / (S ** 2 + sigma_max ** 2) * last
    var = (S ** 2 + sigma_min ** 2) - (S ** 2 + sigma_min ** 2) ** 2 / (S ** 2 + sigma_max ** 2)
    exact_var = var * last ** 2
    return abs(mean - exact_mean) / exact_mean, abs((rows ** 2).sum().item() - exact_var) / exact_var


def test_the_sde_solver_is_second_order_in_the_variance_and_exact_in_the_mean():
    # Measured variance errors at N = 32, 64, 128, 256: 9.1e-2, 2.0e-2, 4.8e-3, 1.2e-3 (ratios 4.44, 4.23,
    # 4.11); without the 2M term (first order) they are 3.0e-1, 1.7e-1, 9.0e-2, 4.6e-2 (ratios ~1.8-1.9).
    # The mean is exact up to float32 rounding (~2e-8): along the mean trajectory D is constant for
    # Gaussian data, and the first-order step with constant D is the exact solution.
    results = {n: sde_moments(n) for n in (32, 64, 128, 256)}
    for n in (32, 64, 128):
        assert 3.2 < results[n][1] / results[2 * n][1] < 5.0, results
    assert all(mean < 1e-6 for mean, _ in results.values()) and results[256][1] < 2e-3


# ---- the formulas, step by step ------------------------------------------------------------------------


def test_psi_is_the_integral_of_the_step_against_e_to_the_minus_lambda():
    for h in (1e-3, 0.05, 0.3, 0.99, 1.0, 2.5, 9.0):
        for k in range(4):
            n = 20000  # midpoint rule of integral_0^h e^-(h-u) u^k / k! du
            u = (torch.arange(n, dtype=torch.float64) + 0.5) * h / n
            quad = (torch.exp(-(h - u)) * u ** k / math.factorial(k)).sum().item() * h / n
            assert psi(k, h) == pytest.approx(quad, rel=1e-7), (k, h)
    assert psi(0, 0.7) == pytest.approx(-math.expm1(-0.7), rel=1e-15)
    assert psi(2, 1e-4) == pytest.approx(1e-12 / 6, rel=1e-4)  # h^3/6 for small h, no cancellation


def test_difference_weights_integrate_a_polynomial_exactly():
    # sum_m c_m (D_m - D_i) = integral_0^h e^-(h-u) (D(lambda_i + u) - D_i) du for D a polynomial of degree K
    h, offsets = 0.4, [-0.7, -1.9]
    c = difference_weights(h, offsets)
    poly = lambda u: 0.3 * u - 1.1 * u ** 2  # noqa: E731  (D - D_i, degree 2)
    assert sum(cm * poly(r * h) for cm, r in zip(c, offsets)) == pytest.approx(0.3 * psi(1, h) - 2.2 * psi(2, h),
                                                                               rel=1e-12)


def sigma_only(values):
    """A 'denoiser' whose output depends on sigma alone: D = values(lambda) with lambda = -log sigma."""
    return lambda x, sigma, labels: torch.full(x.shape, values(-math.log(sigma[0].item())), dtype=torch.float64)


def exact_flow(x, lam_from, lam_to, values, n=200000):
    """x(lam_to) of dx/dlambda = D(lambda) - x, by the midpoint rule of its integral."""
    h = lam_to - lam_from
    u = (torch.arange(n, dtype=torch.float64) + 0.5) * h / n
    return math.exp(-h) * x + (torch.exp(-(h - u)) * values(lam_from + u)).sum().item() * h / n


def test_dpmpp_2m_is_the_papers_formula():
    # Two steps by hand (Lu et al. 2022, Algorithm 2): the first is DPM-Solver++1 (DDIM),
    # x1 = (s1/s0) x0 + (1 - e^-h1) D0; the second x2 = (s2/s1) x1 + (1 - e^-h2) ((1 + 1/(2r)) D1 - D0/(2r)),
    # r = h1/h2. The denoiser sees float32 levels, so the hand computation uses the same rounding.
    sigmas = torch.tensor([10.0, 3.0, 0.5], dtype=torch.float64)
    values = lambda lam: 0.25 + 0.5 * lam  # noqa: E731
    s = [float(torch.tensor(v, dtype=torch.float32)) for v in sigmas.tolist()]
    lam = [-math.log(v) for v in sigmas.tolist()]
    d = [values(-math.log(v)) for v in s[:2]]
    x0 = 7.0
    h1, h2 = lam[1] - lam[0], lam[2] - lam[1]
    x1 = sigmas[1].item() / sigmas[0].item() * x0 + -math.expm1(-h1) * d[0]
    r = h1 / h2
    x2 = sigmas[2].item() / sigmas[1].item() * x1 + -math.expm1(-h2) * ((1 + 1 / (2 * r)) * d[1] - d[0] / (2 * r))
    out = sample_dpmpp_2m(sigma_only(values), torch.full([1, 1], x0, dtype=torch.float64), sigmas)
    assert out.item() == pytest.approx(x2, rel=1e-12)


def test_dpmpp_3m_integrates_a_quadratic_data_prediction_exactly():
    # From its third step on, 3M interpolates D through three evaluations: a D that is a quadratic in lambda
    # is integrated exactly (up to the float32 levels the denoiser sees). The first two steps are first and
    # second order: their error is what remains, so the comparison starts from the exact state after them.
    values = lambda lam: 0.3 - 0.8 * lam + 0.45 * lam ** 2  # noqa: E731  (also takes a tensor)
    sigmas = torch.tensor([4.0, 2.0, 1.2, 0.7, 0.3, 0.1], dtype=torch.float64)
    steps = []
    sample_dpmpp_3m(sigma_only(values), torch.full([1, 1], 2.0, dtype=torch.float64), sigmas, callback=steps.append)
    lam = [-math.log(v) for v in sigmas.tolist()]
    for i in range(2, 5):
        start = steps[i - 1].x.item()
        # D as the solver sees it: the quadratic through its float32 levels, exact in between.
        exact = exact_flow(start, lam[i], lam[i + 1], values)
        assert steps[i].x.item() == pytest.approx(exact, rel=2e-6, abs=2e-6), i
    # The first step is first order: off by the first-order term, clearly.
    assert abs(steps[0].x.item() - exact_flow(2.0, lam[0], lam[1], values)) > 1e-3


# ---- NFE: counted, and what the configuration says ---------------------------------------------------------


class Known(torch.nn.Module):
    """A network with a known output a x + b (class + 1) that counts its calls (the guide of tests)."""

    def __init__(self, a, b, label_dim=10):
        super().__init__()
        self.a, self.b, self.label_dim = a, b, label_dim
        self.img_channels, self.img_resolution = 1, 4
        self.levels = []

    def forward(self, x, sigma, labels=None):
        self.levels.append(sigma[0].item())
        cls = labels.argmax(1).to(x) + 1 if labels is not None and self.label_dim else torch.zeros(len(x)).to(x)
        return self.a * x + self.b * cls.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("num_steps", [1, 2, 7])
def test_generation_counts_the_evaluations_of_every_sampler(name, num_steps):
    net = Known(0.5, 0.1)
    batches = list(generate_batches(net, range(5), sampler=name, num_steps=num_steps, batch_size=2))
    assert [len(b.seeds) for b in batches] == [2, 2, 1]
    calls_per_batch = len(net.levels) / len(batches)
    for batch in batches:  # each call evaluates every image of its batch once
        assert batch.evaluations == {"nfe": calls_per_batch, "guide_nfe": 0}
        assert batch.evaluations["nfe"] == network_evaluations(name, num_steps)


def test_counted_counts_calls_and_passes_them_through():
    counted = Counted(lambda x, sigma, labels: x + 1)
    assert counted(torch.ones(2), None, None).tolist() == [2.0, 2.0] and counted.calls == 1


def test_nfe_budget_chooses_the_steps():
    heun = SAMPLING.replace(sampler="heun")
    assert heun.with_nfe(63).num_steps == 32 and heun.with_nfe(25).num_steps == 13
    assert heun.with_nfe(24).num_steps == 12  # Heun's NFE is odd: 23 within a budget of 24
    assert SAMPLING.with_nfe(25).num_steps == 25  # the default sampler, one evaluation per step
    for name in SAMPLER_NAMES:
        sampling = SAMPLING.replace(sampler=name).with_nfe(15)
        assert network_evaluations(name, sampling.num_steps) <= 15
        assert network_evaluations(name, sampling.num_steps + 1) > 15
    with pytest.raises(ConfigError) as e:
        SAMPLING.with_nfe(0)
    assert e.value.fields == ("nfe",)
    values = dict(sampler="unipc", num_steps=None, nfe=10)
    assert sampling_from(values).num_steps == 10 and sampling_from(values).sampler == "unipc"
    with pytest.raises(ConfigError, match="one of --steps and --nfe"):
        sampling_from(dict(values, num_steps=4))


def test_churn_is_for_euler_and_heun_and_the_interval_must_be_an_interval():
    assert SAMPLING.replace(sampler="heun", S_churn=5.0).check().S_churn == 5.0
    for name in ("dpmpp-2m", "dpmpp-2m-sde", "unipc"):
        with pytest.raises(ConfigError) as e:
            SAMPLING.replace(sampler=name, S_churn=5.0).check()
        assert e.value.fields == ("S_churn", "sampler")
        with pytest.raises(ValueError, match="takes none"):
            SAMPLERS[name](ideal, torch.ones(1, 1), edm_sigmas(3), S_churn=5.0)
    for bad in ((2.0, 1.0), (-1.0, 1.0), (0.0, float("inf")), (float("nan"), 1.0)):
        with pytest.raises(ConfigError) as e:
            SAMPLING.replace(guidance_interval=bad).check()
        assert e.value.fields == ("guidance_interval",)
    assert SAMPLING.replace(guidance_interval=(0.28, 2.9)).check().guidance_interval == (0.28, 2.9)


# ---- the guidance interval ---------------------------------------------------------------------------------


def test_outside_the_interval_the_network_alone_inside_the_guided_mixture():
    net, guide = Known(0.5, 1.0), Known(0.25, 0.0, label_dim=0)
    x, labels = torch.randn(3, 1, 4, 4), torch.eye(10)[[1, 4, 7]]
    denoise = guided(net, guide, 2.5, interval=(0.3, 2.0))
    assert isinstance(denoise, GuidedDenoiser)
    plain = guided(net, guide, 2.5)
    for sigma, inside in ((0.3, False), (0.31, True), (2.0, True), (2.01, False), (80.0, False), (0.002, False)):
        level = torch.full([3], sigma)
        guide.levels.clear()
        step = denoise.for_step(sigma)
        out = step(x, level, labels)
        if inside:  # exactly the guided denoiser
            assert torch.equal(out, plain(x, level, labels)) and len(guide.levels) == 2
        else:  # exactly the network, and the guide is not evaluated
            assert torch.equal(out, net(x, level, labels)) and guide.levels == []
        assert torch.equal(denoise(x, level, labels), out)  # called directly: by its own level
    # Rows at different levels (called directly, not by a sampler): each by its own.
    level = torch.tensor([0.1, 1.0, 5.0])
    mixed = denoise(x, level, labels)
    assert torch.equal(mixed[1], plain(x, level, labels)[1]) and torch.equal(mixed[0], net(x, level, labels)[0])
    assert torch.equal(mixed[2], net(x, level, labels)[2])
    guide.levels.clear()  # w = 1: no mixture and no guide, whatever the interval
    assert not isinstance(guided(net, guide, 1.0, interval=(0.3, 2.0)), GuidedDenoiser)
    assert torch.equal(guided(net, guide, 1.0, interval=(0.3, 2.0))(x, level, labels), net(x, level, labels))
    assert guide.levels == []


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_guides_only_the_steps_that_start_inside_the_interval(name):
    # 10 steps: levels 80, 42.4, 21.1, 9.72, 4.07, 1.50, 0.470, 0.117, 0.020, 0.002. Guided: 4.07, 1.50, 0.470.
    net, guide = Known(0.5, 1.0), Known(0.25, 0.0, label_dim=0)
    sigmas = edm_sigmas(10)
    lo, hi = 0.3, 5.0
    inside = [i for i in range(10) if lo < sigmas[i].item() <= hi]
    assert inside == [4, 5, 6]
    batch = next(generate_batches(net, range(3), sampler=name, num_steps=10, batch_size=3, guide=guide,
                                  guidance=2.0, guidance_interval=(lo, hi)))
    per_step = 2 if name == "heun" else 1  # Heun's correction is part of its step: guided with it
    assert batch.evaluations == {"nfe": network_evaluations(name, 10), "guide_nfe": per_step * len(inside)}
    assert len(guide.levels) == per_step * len(inside)
    # The guide saw the levels of those steps only (Heun: each step's start and end).
    t = sigmas.to(torch.float32).tolist()
    expected = [v for i in inside for v in ((t[i], t[i + 1]) if name == "heun" else (t[i],))]
    assert guide.levels == pytest.approx(expected)
    # Without an interval every step is guided; outside it the images are those of the unguided network.
    everywhere = next(generate_batches(net, range(3), sampler=name, num_steps=10, batch_size=3, guide=guide,
                                       guidance=2.0))
    assert everywhere.evaluations["guide_nfe"] == network_evaluations(name, 10)
    nowhere = next(generate_batches(net, range(3), sampler=name, num_steps=10, batch_size=3, guide=guide,
                                    guidance=2.0, guidance_interval=(100.0, 200.0)))
    alone = next(generate_batches(net, range(3), sampler=name, num_steps=10, batch_size=3))
    assert nowhere.evaluations["guide_nfe"] == 0 and torch.equal(nowhere.images, alone.images)


def test_the_interval_presets_guide_the_papers_steps():
    # Kynkäänniemi et al. 2024, Table 1 and Sec. 4.1, with EDM2's 32 steps: S-FID (0.28, 2.90] is steps
    # 15-21, XXL-FID (0.19, 1.61] steps 17-22 ("6 of the 32 steps"), FD_DINOv2 (0.60, 5.00] steps 13-19.
    sigmas = edm_sigmas(32).tolist()
    steps = {name: [i for i in range(32) if p.interval[0] < sigmas[i] <= p.interval[1]]
             for name, p in GUIDANCE_PRESETS.items() if p.interval is not None}
    assert steps == {"edm2-img512-s-guid-interval-fid": list(range(15, 22)),
                     "edm2-img512-s-guid-interval-dino": list(range(13, 20)),
                     "edm2-img512-xxl-guid-interval-fid": list(range(17, 23)),
                     "edm2-img512-xxl-guid-interval-dino": list(range(13, 20))}
    published = {"edm2-img512-s-guid-interval-fid": (2.1, 1.68, (0.28, 2.90)),
                 "edm2-img512-s-guid-interval-dino": (3.2, 46.25, (0.60, 5.00)),
                 "edm2-img512-xxl-guid-interval-fid": (2.0, 1.40, (0.19, 1.61)),
                 "edm2-img512-xxl-guid-interval-dino": (2.9, 29.16, (0.60, 5.00))}
    for name, (w, result, printed) in published.items():
        p = GUIDANCE_PRESETS[name]
        assert (p.kind, p.guidance, p.result) == ("cfg", w, result)
        assert tuple(round(v, 2) for v in p.interval) == printed  # the paper's numbers, to its 2 decimals
    # A preset's interval applies when the generation is guided and no other is given.
    choice = resolve_guidance("edm2-img512-s-guid-interval-fid")
    assert with_preset_interval(SAMPLING, choice).guidance_interval == (0.2831, 2.902)
    given = SAMPLING.replace(guidance_interval=(1.0, 2.0))
    assert with_preset_interval(given, choice) is given
    assert with_preset_interval(SAMPLING, resolve_guidance("edm2-img512-s-guid-fid")) is SAMPLING
    assert with_preset_interval(SAMPLING, resolve_guidance("edm2-img512-s-guid-interval-fid", guidance=1.0)) is SAMPLING


# ---- stochastic solvers: per seed, and resumable ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_net():
    return randomized_network(label_dim=10).eval()


def test_the_sde_solver_draws_each_seeds_noise_from_its_own_stream(tiny_net):
    kwargs = dict(num_steps=4, progress=False, sampler="dpmpp-2m-sde", batch_size=3)
    together, _ = generate(tiny_net, [4, 8, 1], **kwargs)
    moved, _ = generate(tiny_net, [1, 4, 8, 9], **kwargs)
    assert torch.equal(together, moved[[1, 2, 0]])  # same batch size, other neighbours: bit for bit
    again, _ = generate(tiny_net, [4, 8, 1], **kwargs)
    assert torch.equal(together, again)
    deterministic, _ = generate(tiny_net, [4, 8, 1], **dict(kwargs, sampler="dpmpp-2m"))
    assert (together - deterministic).abs().max() > 1e-3
    quieter, _ = generate(tiny_net, [4, 8, 1], **dict(kwargs, S_noise=0.5))
    assert not torch.equal(quieter, together)


def digests(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.mark.parametrize("name", ["dpmpp-2m-sde", "unipc"])
def test_a_killed_stochastic_generation_resumes_to_the_same_images(tiny_net, tmp_path, monkeypatch, name):
    # The generation dies after 3 images (batches of 2: the second batch is cut short); the same call
    # again makes only the missing images, and the folder is bit for bit that of an uninterrupted run,
    # dataset.json (with its NFE record) included.
    import mpdiff.storage.samples as samples

    real, written = samples.save_png, []

    def dies(path, image):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(path)
        real(path, image)

    kwargs = dict(num_steps=4, batch_size=2, progress=False, sampler=name)
    monkeypatch.setattr(samples, "save_png", dies)
    with pytest.raises(KeyboardInterrupt):
        generate_to_folder(tiny_net, range(7), tmp_path / "resumed", **kwargs)
    monkeypatch.setattr(samples, "save_png", real)
    manifest = json.loads((tmp_path / ".resumed.generating" / ".generation.json").read_text())
    assert manifest["evaluations"] == {"nfe": 4, "guide_nfe": 0}  # recorded before the first image
    lines = []
    generate_to_folder(tiny_net, range(7), tmp_path / "resumed", log=lines.append, **kwargs)
    generate_to_folder(tiny_net, range(7), tmp_path / "whole", **kwargs)
    assert digests(tmp_path / "resumed") == digests(tmp_path / "whole") and len(digests(tmp_path / "whole")) == 8
    assert lines[-1] == "NFE per image: 4"
    meta = json.loads((tmp_path / "whole" / "dataset.json").read_text())
    assert meta["generation"]["nfe"] == 4 and meta["generation"]["guide_nfe"] == 0
    assert meta["generation"]["settings"]["sampling"]["sampler"] == name
    assert "guidance_interval" not in meta["generation"]["settings"]["sampling"]  # unguided: not a setting


# ---- the command line ----------------------------------------------------------------------------------------


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def test_generate_and_metrics_print_and_record_the_counted_nfe(partial_run, tmp_path):
    out = tmp_path / "out"
    result = run_cli("generate", partial_run, "--seeds", "0-3", "--sampler", "dpmpp-3m", "--nfe", "5", "--out", out,
                     "--guide", partial_run, "--guidance", "2", "--guidance-interval", "0.5,10", "--no-progress")
    assert result.exit_code == 0, result.output
    # 5 steps: 80, 17.5, 2.52, 0.170, 0.002; guided: 2.52 only.
    assert "NFE per image: 5 (the guide evaluated in 1 of them: 6 network evaluations)" in result.stderr
    meta = json.loads((out / "dataset.json").read_text())["generation"]
    assert (meta["nfe"], meta["guide_nfe"]) == (5, 1)
    assert meta["settings"]["sampling"]["guidance_interval"] == [0.5, 10.0]
    assert meta["settings"]["sampling"]["num_steps"] == 5
    refused = run_cli("generate", partial_run, "--seeds", "0-3", "--steps", "4", "--nfe", "5", "--out",
                      tmp_path / "no", "--no-progress")
    assert refused.exit_code == 1 and "give one of --steps and --nfe" in refused.stderr
    ref = tmp_path / "ref.npz"
    assert run_cli("ref", "digits", "--out", ref, "--metrics", "fd_digits", "--no-progress").exit_code == 0
    metrics = run_cli("metrics", "--net", partial_run, "--ref", ref, "--metrics", "fd_digits", "--num", "4",
                      "--batch", "4", "--sampler", "heun", "--nfe", "5", "--json", "--no-progress")
    assert metrics.exit_code == 0, metrics.output
    assert json.loads(metrics.stdout)["nfe"] == 5 and json.loads(metrics.stdout)["guide_nfe"] == 0
