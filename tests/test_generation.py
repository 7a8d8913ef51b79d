"""Samplers (Euler, Heun, churn), guidance and its presets, and streamed, resumable, multi-process
generation (issue 15; SPEC §6)."""

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import randomized_network, snap

import mpdiff.diffusion.generate as generation
from mpdiff.cli import cli
from mpdiff.config import SAMPLING
from mpdiff.diffusion.generate import generate, generate_to_folder, process_batches
from mpdiff.diffusion.guidance import (
    GUIDANCE_PRESETS,
    check_guide,
    get_guidance_preset,
    resolve_guidance,
)
from mpdiff.diffusion.samplers import churn_gamma, nfe, sample_euler, sample_heun
from mpdiff.diffusion.schedules import edm_sigmas
from mpdiff.distributed import Distributed
from mpdiff.errors import ConfigError
from mpdiff.metrics.detectors import FeatureStats
from mpdiff.presets import PRESETS
from mpdiff.storage.network_files import load_network

TIMEOUT = 300


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


# ---- samplers ---------------------------------------------------------------------------------------


def gaussian_error(sampler, num_steps, data_std=0.5, sigma_max=80.0):
    """Relative error of x(0) against the exact probability-flow ODE solution for data ~ N(0, s^2):
    x(0) = x(sigma_max) s / sqrt(s^2 + sigma_max^2) (see test_sampling.heun_error)."""
    start = torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigma_max
    ideal = lambda x, sigma, labels: data_std ** 2 / (data_std ** 2 + sigma.double().reshape(-1, 1) ** 2) * x
    out = sampler(ideal, start, edm_sigmas(num_steps, 0.002, sigma_max, 7.0))
    exact = start * data_std / (data_std ** 2 + sigma_max ** 2) ** 0.5
    return ((out - exact).norm() / exact.norm()).item()


def test_euler_is_first_order_and_heun_second_order_on_gaussian_data():
    # Global error C N^-p: doubling the steps divides it by 2^p. Measured errors at N = 32, 64, 128, 256:
    # Euler 8.8e-2, 4.4e-2, 2.2e-2, 1.1e-2 (ratios 1.99, 1.99, 2.00); Heun 1.6e-2, 3.7e-3, 8.8e-4, 2.1e-4
    # (ratios 4.3, 4.2, 4.2).
    euler = {n: gaussian_error(sample_euler, n) for n in (32, 64, 128, 256)}
    heun = {n: gaussian_error(sample_heun, n) for n in (32, 64, 128, 256)}
    for n in (32, 64, 128):
        assert 1.7 < euler[n] / euler[2 * n] < 2.3, euler
        assert 3.4 < heun[n] / heun[2 * n] < 5.0, heun
    assert euler[256] < 1.2e-2 and heun[256] < 2.5e-4  # both converge to the closed-form answer
    assert all(heun[n] < euler[n] for n in euler)


def test_euler_evaluates_the_denoiser_once_per_step_at_the_scheduled_levels():
    levels = []

    def denoiser(x, sigma, labels):
        levels.append(sigma[0].item())
        return torch.zeros_like(x)

    sigmas = edm_sigmas(7)
    sample_euler(denoiser, torch.randn(2, 3, dtype=torch.float64) * 80, sigmas)
    assert levels == pytest.approx(sigmas[:-1].tolist()) and len(levels) == nfe("euler", 7) == 7
    assert nfe("heun", 32) == 63


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun])
def test_churn_zero_is_the_deterministic_sampler(sampler):
    ideal = lambda x, sigma, labels: 0.25 / (0.25 + sigma.double().reshape(-1, 1) ** 2) * x
    start = torch.randn(3, 5, dtype=torch.float64) * 80
    sigmas = edm_sigmas(12)

    def never(shape):
        raise AssertionError("no churn noise may be drawn")

    plain = sampler(ideal, start, sigmas)
    assert torch.equal(sampler(ideal, start, sigmas, S_churn=0.0, noise_fn=never), plain)
    # Churn outside [S_min, S_max] everywhere: no step is stochastic either.
    assert torch.equal(sampler(ideal, start, sigmas, S_churn=40.0, S_min=100.0, noise_fn=never), plain)
    assert torch.equal(sampler(ideal, start, sigmas, S_churn=40.0, S_max=0.001, noise_fn=never), plain)
    churned = sampler(ideal, start, sigmas, S_churn=40.0, noise_fn=lambda shape: torch.ones(shape))
    assert not torch.equal(churned, plain)


def test_churn_raises_the_level_as_edm_algorithm_2_says():
    # gamma = min(S_churn / N, sqrt(2) - 1) inside [S_min, S_max]; the step starts from t_hat = t (1 + gamma)
    # after adding noise of std sqrt(t_hat^2 - t^2) S_noise, which a denoiser returning 0 and an Euler step
    # to t_next show exactly: x_next = (x + sqrt(t_hat^2 - t^2) S_noise eps) t_next / t_hat.
    assert churn_gamma(10, 40, 1.0) == pytest.approx(0.25)
    assert churn_gamma(1000, 40, 1.0) == pytest.approx(2 ** 0.5 - 1)
    assert churn_gamma(10, 40, 1.0, S_min=2.0) == 0 and churn_gamma(10, 40, 3.0, S_max=2.0) == 0
    sigmas = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    steps = []
    out = sample_euler(lambda x, sigma, labels: torch.zeros_like(x), torch.full([1, 1], 3.0, dtype=torch.float64),
                       sigmas, S_churn=0.5, S_noise=0.5, noise_fn=lambda shape: torch.ones(shape),
                       callback=steps.append)
    t_hat = 2.0 * 1.25
    first = (3.0 + (t_hat ** 2 - 4.0) ** 0.5 * 0.5) * 1.0 / t_hat
    assert steps[0].sigma == pytest.approx(t_hat) and steps[0].x.item() == pytest.approx(first)
    assert steps[1].sigma == pytest.approx(1.25) and out.item() == pytest.approx(0.0)


@pytest.fixture(scope="module")
def tiny_net():
    return randomized_network(label_dim=10).eval()


def test_stochastic_generation_is_per_seed_and_differs_from_the_deterministic(tiny_net):
    kwargs = dict(sampler="heun", num_steps=3, progress=False, S_churn=30.0)
    together, _ = generate(tiny_net, [4, 8, 1], batch_size=3, **kwargs)
    moved, _ = generate(tiny_net, [1, 4, 8, 9], batch_size=3, **kwargs)
    assert torch.equal(together, moved[[1, 2, 0]])  # churn noise comes from each seed's own stream
    plain, _ = generate(tiny_net, [4, 8, 1], batch_size=3, sampler="heun", num_steps=3, progress=False)
    assert torch.equal(generate(tiny_net, [4, 8, 1], batch_size=3, sampler="heun", num_steps=3, progress=False,
                                S_churn=0.0)[0], plain)
    assert (together - plain).abs().max() > 1e-3


def test_bf16_sampling_evaluates_the_low_noise_levels_in_float32(tiny_net):
    # bf16 cannot resolve the noise of c_in x at low sigma (docs/SAMPLING.md): there the network runs in float32.
    from mpdiff.nn.fast import accelerate
    from mpdiff.nn.runtime import BF16_FLOAT32_BELOW, low_noise_float32, precision_of

    net = accelerate(tiny_net)
    shape = (3, net.img_channels, net.img_resolution, net.img_resolution)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    labels = torch.eye(10)[[1, 4, 7]]
    with torch.no_grad():
        exact = {s: net(x, torch.full([3], s), labels) for s in (0.002, 0.5, BF16_FLOAT32_BELOW, 1.5, 80.0)}
        assert low_noise_float32(net, net) is net  # float32: nothing to do
        with precision_of("bf16", net):
            denoise = low_noise_float32(net, net)
            for s, d in exact.items():
                plain = net(x, torch.full([3], s), labels)
                assert torch.equal(denoise(x, torch.full([3], s), labels), d if s <= BF16_FLOAT32_BELOW else plain)
                assert not torch.equal(plain, d)  # bf16 does differ, so the equalities above say something
    seen = []
    hook = net.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (float(args[1].max()), kwargs.get("force_fp32", False))), with_kwargs=True)
    try:
        generate(net, [0, 1], num_steps=6, progress=False, precision="bf16")
    finally:
        hook.remove()
    assert len(seen) == 6 and [f for _, f in seen] == [s <= BF16_FLOAT32_BELOW for s, _ in seen]
    assert 0 < sum(f for _, f in seen) < 6


def test_sampling_config_refuses_what_no_sampler_can_use():
    # the default: DPM-Solver++(2M) in 25 steps; heun alone is EDM2's sampler, 32 steps (63 NFE)
    assert SAMPLING.sampler == "dpmpp-2m" and SAMPLING.num_steps is None and SAMPLING.check().num_steps == 25
    assert SAMPLING.check().check() == SAMPLING.check()
    assert SAMPLING.replace(sampler="heun").check().num_steps == 32
    assert SAMPLING.replace(sampler="heun", num_steps=7).check().num_steps == 7
    for bad, field in [(dict(sampler="rk4"), "sampler"), (dict(num_steps=0), "num_steps"),
                       (dict(S_churn=float("nan")), "S_churn"), (dict(sigma_min=90.0), "sigma_min"),
                       (dict(S_noise=-1.0), "S_noise"), (dict(S_max=-1.0), "S_max")]:
        with pytest.raises(ConfigError) as e:
            SAMPLING.replace(**bad).check()
        assert field in e.value.fields
    with pytest.raises(TypeError):
        generation.sampling_config(None, num_stepz=3)  # a misspelt keyword is an error, not ignored


# ---- guidance ----------------------------------------------------------------------------------------


class Known(torch.nn.Module):
    """A 'network' whose denoised output is a known function: a * x + b * (class index + 1)."""

    def __init__(self, a, b, label_dim=10):
        super().__init__()
        self.a, self.b, self.label_dim = a, b, label_dim
        self.img_channels, self.img_resolution = 1, 4
        self.calls = 0

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        cls = labels.argmax(1).to(x) + 1 if labels is not None and self.label_dim else torch.zeros(len(x)).to(x)
        return self.a * x + self.b * cls.reshape(-1, 1, 1, 1)


def test_guided_generation_is_the_stated_mixture_and_strength_one_is_unguided():
    net, guide = Known(0.5, 1.0), Known(0.25, 0.0, label_dim=0)
    seeds, kw = [3, 1, 4], dict(num_steps=1, progress=False)  # one Euler step from 80 to 0: x(0) = D(x; 80)
    unguided, classes = generate(net, seeds, **kw)
    same, _ = generate(net, seeds, guide=guide, guidance=1.0, **kw)
    assert torch.equal(same, unguided) and guide.calls == 0  # w = 1: the guide is never evaluated
    w = 2.5
    mixed, _ = generate(net, seeds, guide=guide, guidance=w, **kw)
    noise = generation.seed_inputs(seeds, (1, 4, 4), 10)[0] * 80
    cls = torch.tensor(classes, dtype=torch.float32).reshape(-1, 1, 1, 1) + 1
    expected = (0.25 * noise) + w * ((0.5 * noise + cls) - 0.25 * noise)  # D_guide + w (D_net - D_guide)
    assert torch.allclose(mixed, expected, rtol=1e-5, atol=1e-4) and guide.calls == 1


def test_check_guide_tells_cfg_from_autoguidance_and_refuses_misfits():
    cond, uncond = Known(1, 0, 10), Known(1, 0, 0)
    assert check_guide(cond, uncond) == "cfg" and check_guide(cond, Known(1, 0, 10)) == "autoguidance"
    assert check_guide(uncond, Known(1, 0, 0)) == "autoguidance"
    with pytest.raises(ConfigError, match="has 7 classes, the network 10"):
        check_guide(cond, Known(1, 0, 7))
    with pytest.raises(ConfigError, match="needs an unconditional guide"):
        check_guide(cond, Known(1, 0, 10), kind="cfg")
    other = Known(1, 0, 0)
    other.img_resolution = 8
    with pytest.raises(ConfigError, match="makes 1x8x8 images, the network 1x4x4"):
        check_guide(cond, other)


def test_guidance_presets_are_the_released_ones():
    # EDM2's 20 released configurations, and the guidance-interval paper's 4 (tests/test_solvers.py).
    assert len(GUIDANCE_PRESETS) == 24 and sum(p.interval is not None for p in GUIDANCE_PRESETS.values()) == 4
    for p in GUIDANCE_PRESETS.values():  # every network a preset names is one of our size presets
        assert p.net.preset in PRESETS and p.guide.preset in PRESETS
        assert p.kind in ("cfg", "autoguidance") and p.metric in ("fid", "fd_dinov2")
        if p.kind == "cfg":  # EDM2: the XS unconditional guide at the main network's EMA length
            assert p.guide.preset.endswith("-xs") and not p.guide.conditional and p.guide.sigma_rel == p.net.sigma_rel
        else:  # autoguidance: a shorter run of a smaller network, same conditioning, its own EMA length
            assert p.guide.kimg < p.net.kimg and p.guide.conditional == p.net.conditional
    s = get_guidance_preset("edm2-img512-s-autog-fid")  # SPEC §6.5, first row
    assert (s.net.preset, s.net.kimg, s.net.sigma_rel, s.guide.preset, s.guide.kimg, s.guide.sigma_rel, s.guidance,
            s.result) == ("edm2-img512-s", 2147483, 0.070, "edm2-img512-xs", 134217, 0.125, 2.10, 1.34)
    xxl = get_guidance_preset("edm2-img512-xxl-guid-fid")  # SPEC §3.7: XXL 1.81 (0.015, 1.2)
    assert (xxl.net.sigma_rel, xxl.guidance, xxl.result, xxl.net.kimg) == (0.015, 1.2, 1.81, 939524)
    with pytest.raises(ConfigError, match="'nope' is unknown"):
        get_guidance_preset("nope")


def test_resolve_guidance_explicit_values_win_and_the_guide_follows_the_network():
    assert resolve_guidance() == resolve_guidance(None, None, None, None)
    plain = resolve_guidance(guidance=2.0, sigma_rel=0.1)
    assert (plain.guidance, plain.sigma_rel, plain.guide_sigma_rel) == (2.0, 0.1, 0.1)  # EDM2: same EMA length
    own = resolve_guidance(guidance=2.0, sigma_rel=0.1, guide_sigma_rel=0.05)
    assert own.guide_sigma_rel == 0.05
    preset = resolve_guidance("edm2-img512-s-autog-fid")
    assert (preset.guidance, preset.sigma_rel, preset.guide_sigma_rel) == (2.10, 0.070, 0.125)
    mixed = resolve_guidance("edm2-img512-s-autog-fid", guidance=1.5, guide_sigma_rel=0.2)
    assert (mixed.guidance, mixed.sigma_rel, mixed.guide_sigma_rel) == (1.5, 0.070, 0.2)


def test_the_guides_own_ema_length_is_used(partial_run, tmp_path):
    # The guide is a run directory with EMA lengths 0.050 and 0.100: --guide-sigma-rel picks the guide's,
    # --sigma-rel the network's. The images equal those made by hand from exactly those two snapshots.
    out = tmp_path / "guided"
    result = run_cli("generate", partial_run, "--guide", partial_run, "--sigma-rel", "0.1", "--guide-sigma-rel",
                     "0.05", "--guidance", "2", "--seeds", "0-3", "--steps", "2", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"guide: {snap(partial_run, 256, 0.05)}" in result.stderr
    assert f"network: {snap(partial_run, 256, 0.1)}" in result.stderr
    net, _ = load_network(snap(partial_run, 256, 0.1))
    guide, _ = load_network(snap(partial_run, 256, 0.05))
    by_hand = tmp_path / "by_hand"
    generate_to_folder(net, range(4), by_hand, guide=guide, guidance=2.0, num_steps=2, progress=False)
    assert digests(out) == digests(by_hand)
    # The other EMA length would have given other images (compared before rounding to 8 bits: this short
    # run's two snapshots are close).
    with_own, _ = generate(net, range(4), guide=guide, guidance=2.0, num_steps=2, progress=False)
    with_other, _ = generate(net, range(4), guide=net, guidance=2.0, num_steps=2, progress=False)
    assert not torch.equal(with_own, with_other)


def test_generate_refuses_a_guide_that_does_not_fit(partial_run, other_run, tmp_path):
    result = run_cli("generate", partial_run, "--guidance", "2", "--seeds", "0-1", "--out", tmp_path / "o")
    assert result.exit_code == 1 and "--guidance 2 needs a --guide network" in result.stderr
    result = run_cli("generate", partial_run, "--guide", partial_run, "--guidance-preset", "edm2-img512-s-guid-fid",
                     "--seeds", "0-1", "--out", tmp_path / "o", "--no-progress")
    assert result.exit_code == 1 and "error: " in result.stderr
    assert not (tmp_path / "o").exists()


# ---- streamed, resumable generation into a folder -------------------------------------------------------


def digests(folder):
    import hashlib

    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_folder_images_are_those_of_generate_and_subdirs_follow_edm2(tiny_net, tmp_path):
    from mpdiff.data.datasets import load_dataset
    from mpdiff.data.pixels import decode_images

    seeds = [5, 999, 1000, 2001]
    flat = generate_to_folder(tiny_net, seeds, tmp_path / "flat", num_steps=2, batch_size=3, progress=False)
    nested = generate_to_folder(tiny_net, seeds, tmp_path / "nested", num_steps=2, batch_size=3, progress=False,
                                subdirs=True)
    assert sorted(digests(nested)) == ["000000/000005.png", "000000/000999.png", "001000/001000.png",
                                       "002000/002001.png", "dataset.json"]
    images, classes = generate(tiny_net, seeds, num_steps=2, batch_size=3, progress=False)
    for folder in (flat, nested):
        ds = load_dataset(folder)
        assert len(ds) == 4 and list(ds.labels.argmax(1) if ds.labels.ndim == 2 else ds.labels) == classes
        assert np.array_equal(np.asarray(ds.images), decode_images(images).numpy())
    assert os.path.exists(f"{flat}-grid.png") and not any(n.startswith(".") for n in os.listdir(tmp_path))


def test_generation_memory_does_not_grow_with_the_number_of_images(monkeypatch, tmp_path):
    # 300 images in batches of 25: at no point are more than two batches of images alive (the one being
    # written and, at most, the one just finished), i.e. the bound is 2 x 25 x 3 x 8 x 8 x 4 bytes of
    # float32 images, whatever the count. The folder holds every image.
    from conftest import tiny_config
    from mpdiff.nn.build import build_network

    net = build_network(tiny_config(img_resolution=8, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                                    attn_resolutions=(), label_dim=0))
    alive, peak = [], [0]
    real = generation.generate_batches

    def watched(*args, **kwargs):
        for batch in real(*args, **kwargs):
            alive.append(weakref.ref(batch.images))
            gc.collect()
            peak[0] = max(peak[0], sum(ref() is not None for ref in alive))
            yield batch
            del batch

    monkeypatch.setattr(generation, "generate_batches", watched)
    generate_to_folder(net, range(300), tmp_path / "many", num_steps=1, batch_size=25, progress=False)
    assert len(alive) == 12 and len(os.listdir(tmp_path / "many")) == 301
    bound_bytes = 2 * 25 * 3 * 8 * 8 * 4
    assert peak[0] <= 2 and peak[0] * 25 * 3 * 8 * 8 * 4 <= bound_bytes


def test_a_resume_with_other_settings_is_refused_naming_them(tiny_net, tmp_path, monkeypatch):
    import mpdiff.storage.samples as samples

    real, calls = samples.save_png, []

    def dies(path, image):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(path)
        real(path, image)

    monkeypatch.setattr(samples, "save_png", dies)
    with pytest.raises(KeyboardInterrupt):
        generate_to_folder(tiny_net, range(8), tmp_path / "out", num_steps=2, batch_size=2, progress=False)
    monkeypatch.setattr(samples, "save_png", real)
    with pytest.raises(ConfigError) as e:
        generate_to_folder(tiny_net, range(8), tmp_path / "out", num_steps=3, batch_size=2, progress=False)
    assert "holds an unfinished generation with other settings (settings.sampling.num_steps: 2 -> 3)" in str(e.value)
    # Another batch size is the same generation (images do not depend on it): resumed and completed.
    generate_to_folder(tiny_net, range(8), tmp_path / "out", num_steps=2, batch_size=4, progress=False)
    assert len(os.listdir(tmp_path / "out")) == 9 and not (tmp_path / ".out.generating").exists()


def _wait_for(predicate, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_killed_generation_resumes_without_redoing_finished_seeds(partial_run, tmp_path):
    # A real process, killed with SIGKILL (no clean-up) once some images exist; the same command again
    # completes the folder, keeps the images already written (same files, untouched), and the result is
    # bit for bit the folder of an uninterrupted run.
    args = [sys.executable, "-m", "mpdiff", "generate", str(partial_run), "--seeds", "0-59", "--batch", "4",
            "--steps", "16", "--no-progress"]
    partial = tmp_path / ".killed.generating"
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        assert _wait_for(lambda: partial.exists() and len([n for n in os.listdir(partial) if n.endswith(".png")]) >= 8,
                         TIMEOUT), proc.stderr.read().decode() if proc.poll() is not None else "no images in time"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {n: os.stat(partial / n) for n in os.listdir(partial) if n.endswith(".png")}
    assert 8 <= len(before) < 60 and not (tmp_path / "killed").exists()
    # The restart and the uninterrupted run need no process of their own: the same command, in this one.
    resumed = run_cli(*args[3:], "--out", tmp_path / "killed")
    assert resumed.exit_code == 0, resumed.output
    assert f"{len(before)} of 60 images of this process already written" in resumed.stderr
    for name, st in before.items():
        now = os.stat(tmp_path / "killed" / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name  # not made again
    whole = run_cli(*args[3:], "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    assert digests(tmp_path / "killed") == digests(tmp_path / "whole")


# ---- several processes -------------------------------------------------------------------------------------


def test_batches_are_dealt_out_whole_to_the_processes():
    items = list(range(10))
    shares = [process_batches(items, 3, Distributed(rank=r, world_size=3)) for r in range(3)]
    assert shares == [[[0, 1, 2], [9]], [[3, 4, 5]], [[6, 7, 8]]]
    assert process_batches(items, 4, Distributed.single()) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


class ThreadWorld:
    """Processes simulated by threads: all_sum sums the tensors every thread brings."""

    def __init__(self, size):
        self.size, self.barrier_ = size, threading.Barrier(size)
        self.slots = [None] * size

    def member(self, rank):
        world = self

        class Member(Distributed):
            def all_sum(self, tensor):
                world.slots[rank] = tensor.clone()
                world.barrier_.wait()
                total = sum(world.slots)
                world.barrier_.wait()
                tensor.copy_(total)
                return tensor

        return Member(rank=rank, world_size=world.size)


def test_feature_statistics_combine_across_processes_exactly():
    rng = np.random.default_rng(0)
    features = rng.normal(1000.0, 0.01, size=(301, 5))  # a large mean against a small spread
    one = FeatureStats(5).add(features[:100]).add(features[100:])
    parts = [features[:7], features[7:150], features[150:], features[:0]]  # one process has none
    stats = [FeatureStats(5).add(p) for p in parts]
    world = ThreadWorld(4)
    threads = [threading.Thread(target=s.all_reduce, args=(world.member(r),)) for r, s in enumerate(stats)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mu, sigma = one.mean_cov()
    exact_mu, exact_sigma = features.mean(0), np.cov(features, rowvar=False)
    for s in stats:
        m, c = s.mean_cov()
        assert s.count == 301
        np.testing.assert_allclose(m, exact_mu, rtol=1e-14)
        np.testing.assert_allclose(c, exact_sigma, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(c, sigma, rtol=1e-9, atol=1e-15)


def _ends(stderr):
    """The start and the end of a failed torchrun's stderr: the rank's own error comes first, torchrun's
    summary last (a SIGABRT seen once under load showed only the summary)."""
    text = stderr.decode(errors="replace")
    return text if len(text) <= 6000 else text[:3000] + "\n[...]\n" + text[-3000:]


def test_two_process_generation_and_metrics_equal_one_process(partial_run, tmp_path):
    # One process: this one (the command through click's runner); two: torchrun's.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["generate", str(partial_run), "--seeds", "0-10", "--batch", "3", "--steps", "2", "--no-progress",
              "--class", "4", "--sampler", "heun", "--churn", "5"]
    one = run_cli(*common, "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    # "--" ends torchrun's own options: without it, Python's argparse takes "--num" for an abbreviation of
    # torchrun's "--numa-binding" (an error) although it follows the module name.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run([*torchrun, "-m", "mpdiff", "--", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, timeout=TIMEOUT, env=env)
    assert two.returncode == 0, _ends(two.stderr)
    assert digests(tmp_path / "one") == digests(tmp_path / "two") and len(digests(tmp_path / "two")) == 12
    assert open(str(tmp_path / "one") + "-grid.png", "rb").read() == open(str(tmp_path / "two") + "-grid.png", "rb").read()

    ref = tmp_path / "ref.npz"
    made = run_cli("ref", "digits", "--out", ref, "--metrics", "fd_digits", "--no-progress")
    assert made.exit_code == 0, made.output
    metrics = ["metrics", "--net", str(partial_run), "--ref", str(ref), "--metrics", "fd_digits", "--num", "20",
               "--batch", "6", "--steps", "2", "--json", "--no-progress"]
    single = run_cli(*metrics)
    split = subprocess.run([*torchrun, "-m", "mpdiff", "--", *metrics], capture_output=True, timeout=TIMEOUT, env=env)
    assert single.exit_code == 0 and split.returncode == 0, (single.output, _ends(split.stderr))
    a, b = json.loads(single.stdout), json.loads(split.stdout)  # only process 0 prints
    assert a["num_images"] == b["num_images"] == 20
    assert b["fd_digits"] == pytest.approx(a["fd_digits"], rel=1e-9)
