"""mpdiff against numbers computed by NVIDIA's own EDM2 code (NVlabs/edm2).

The fixtures (tests/fixtures/edm2_*.safetensors) were written by tests/fixtures/ref_edm2.py, which runs
NVIDIA's networks_edm2.Precond, phema.py, training_loop.py and generate_images.edm_sampler; their
metadata name the commit. These tests need only the fixtures and mpdiff. (tests/test_reference_edm2.py
repeats the network comparison against a live checkout when MPDIFF_EDM2_REF points at one.)

Tolerances, with the differences measured when the fixtures were made (torch 2.13, CPU):
* network outputs: both sides compute in float32 with the same formulas in a different order, so they
  agree to float32 rounding accumulated over ~20 layers: D per image to relative 2e-6 (measured <= 4.5e-7),
  the log-variance to 1e-6 absolute (measured 0), the per-step loss to relative 1e-6 (measured 4e-8);
* weights after the replayed Adam steps: per tensor relative L2 1e-6 (measured 5.3e-8); the steps move
  every tensor by at least 0.6%, so a wrong step is far outside it;
* learning rates and the power-function EMA (phema.py): float64, identical formulas: relative 1e-12
  (measured 0), the post-hoc coefficients to 1e-9 of the largest coefficient (a Gram solve of up to 128
  inputs amplifies rounding by its conditioning; measured 0);
* sampler trajectories with mpdiff's network: the network's float32 rounding (above) carried through 15
  evaluations: relative 2e-6 on every evaluation input and on the final state (measured <= 3.5e-7; 3.7e-7
  against NVIDIA's default float32 state);
* sampler arithmetic alone (NVIDIA's recorded network outputs replayed through mpdiff's sampler): the
  state is float64 on both sides, relative 1e-12 (measured 0.0); guided: mpdiff mixes the two outputs in
  float32, NVIDIA in float64: relative 1e-7 (measured 3.2e-9).
"""

import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mpdiff.diffusion.guidance import guided
from mpdiff.diffusion.loss import edm2_loss
from mpdiff.diffusion.samplers import sample_heun
from mpdiff.diffusion.schedules import edm_sigmas
from mpdiff.ema import profiles
from mpdiff.nn.compat import load_edm2
from mpdiff.nn.fast import accelerate
from mpdiff.train.optim import learning_rate, make_optimizer, set_learning_rate

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _read(name):
    path = FIXTURES / name
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def _network(tensors, prefix, config):
    """mpdiff's network built by its converter from NVIDIA's state_dict stored under `prefix`."""
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return load_edm2(state, use_fp16=False, **config)


def _relative(a, b):
    """Per-image relative L2 difference of `a` from the reference `b` (first dimension = images)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (a - b).norm(dim=1) / b.norm(dim=1)


@pytest.fixture(scope="module")
def precond():
    return _read("edm2_precond.safetensors")


@pytest.fixture(scope="module")
def sampler():
    return _read("edm2_sampler.safetensors")


@pytest.fixture(scope="module")
def phema():
    return _read("edm2_phema.safetensors")[0]


# ---- the network ---------------------------------------------------------------------------------

def _check_outputs(net, t, which):
    net.eval()
    with torch.no_grad():
        denoised, logvar = net(t["x"], t["sigma"], t["labels"], return_logvar=True)
    # Float32 rounding (module docstring); every sigma of 0.002 .. 80 separately.
    assert _relative(denoised, t[f"D_{which}"]).max().item() <= 2e-6
    assert (logvar - t[f"logvar_{which}"]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("literal", [False, True], ids=["fast", "literal"])
@pytest.mark.parametrize("which", ["init", "trained"])
def test_network_D_and_logvar_at_every_sigma(precond, which, literal):
    """NVIDIA's initial weights, and its weights after the four training steps, loaded by our converter:
    D and u(sigma) at sigma 0.002 .. 80. `literal`: the network as built (the per-head attention, the
    resampling convolution, config G's constants where they stand); else its fast twin (mpdiff.nn.fast)."""
    t, meta = precond
    gains = [v.item() for k, v in t.items() if k.startswith(which + ".") and v.ndim == 0]
    assert len(gains) == 11 and min(gains) >= 0.2  # nonzero gains: every branch contributes
    assert t["sigma"].min().item() == pytest.approx(0.002) and t["sigma"].max().item() == 80
    net = _network(t, which + ".", json.loads(meta["config"]))
    _check_outputs(net if literal else accelerate(net), t, which)


def test_replayed_adam_steps_give_nvidia_weights_and_outputs(precond):
    t, meta = precond
    net = _network(t, "init.", json.loads(meta["config"]))
    schedule = json.loads(meta["lr_schedule"])  # NVIDIA's learning_rate_schedule keywords
    batch, steps = int(meta["train_batch"]), int(meta["train_steps"])
    assert json.loads(meta["optimizer_kwargs"])["betas"] == [0.9, 0.99]  # NVIDIA's loop; ours by default
    optimizer = make_optimizer(net.parameters())
    for step in range(steps):
        lr = learning_rate(step * batch, batch, lr=schedule["ref_lr"], decay=schedule["ref_batches"],
                           rampup_img=schedule["rampup_Mimg"] * 1e6)
        assert lr == pytest.approx(t["train_lr"][step].item(), rel=1e-12, abs=0)
        net.train()
        optimizer.zero_grad(set_to_none=True)
        loss = edm2_loss(net, t["train_images"], t["train_labels"], sigma=t["train_sigma"][step],
                         noise=t["train_noise"][step])
        assert loss.double().sum().item() / batch == pytest.approx(t["train_loss"][step].item(), rel=1e-6)
        loss.sum().mul(1 / batch).backward()
        set_learning_rate(optimizer, lr)
        optimizer.step()
    ours = net.state_dict()
    trained = {k[len("trained."):]: v for k, v in t.items() if k.startswith("trained.")}
    assert set(ours) == set(trained)
    for name, reference in trained.items():
        moved = (reference - t["init." + name]).norm() / reference.norm()
        if "fourier" not in name:  # the Fourier frequencies and phases are buffers, not trained
            assert moved.item() > 5e-3, name  # the replay is not trivially close to the start
        assert ((ours[name] - reference).norm() / reference.norm()).item() <= 1e-6, name
    _check_outputs(net, t, "trained")


def test_learning_rate_schedule_equals_nvidias(precond):
    t, meta = precond
    schedule = json.loads(meta["lr_schedule"])
    for i, (nimg, batch) in enumerate(zip(t["lr_grid_nimg"].tolist(), t["lr_grid_batch"].tolist())):
        nimg, batch = int(nimg), int(batch)
        # mpdiff's defaults against NVIDIA's defaults (ref_lr 0.01, 70k batches, 10 Mimg warm-up)
        assert learning_rate(nimg, batch) == pytest.approx(t["lr_grid_default"][i].item(), rel=1e-12, abs=0)
        replay = learning_rate(nimg, batch, lr=schedule["ref_lr"], decay=schedule["ref_batches"],
                               rampup_img=schedule["rampup_Mimg"] * 1e6)
        assert replay == pytest.approx(t["lr_grid_replay"][i].item(), rel=1e-12, abs=0)


# ---- power-function EMA ----------------------------------------------------------------------------

def _np(t, key):
    return t[key].numpy()


def test_power_function_ema_conversions_and_beta(phema):
    t = phema
    # float64, identical formulas: relative 1e-12
    np.testing.assert_allclose(profiles.sigma_rel_to_gamma(_np(t, "std")), _np(t, "std_to_exp"), rtol=1e-12)
    np.testing.assert_allclose(profiles.gamma_to_sigma_rel(_np(t, "std_to_exp")), _np(t, "exp_to_std"),
                               rtol=1e-12)
    beta = profiles.power_function_beta(_np(t, "std")[:, None], _np(t, "beta_t_next")[None],
                                        _np(t, "beta_t_delta")[None])
    np.testing.assert_allclose(beta, _np(t, "beta"), rtol=1e-12, atol=0)
    assert (_np(t, "beta")[:, 0] == 0).all() and 0.9999 < _np(t, "beta").max() < 1  # first update; long runs
    ofs, std = _np(t, "corr_ofs"), _np(t, "corr_std")
    np.testing.assert_allclose(profiles.power_function_inner_product(ofs[:, None], std[:, None], ofs[None],
                                                                      std[None]),
                               _np(t, "correlation"), rtol=1e-12, atol=0)


@pytest.mark.parametrize("layout", ["realistic", "long", "single", "uneven"])
def test_posthoc_coefficients(phema, layout):
    t = phema
    inputs = [_np(t, f"coef_{layout}_{k}") for k in ("in_ofs", "in_std", "out_ofs", "out_std")]
    reference = _np(t, f"coef_{layout}")
    ours = profiles.solve_posthoc_coefficients(*inputs)
    assert ours.shape == reference.shape
    # float64 Gram solve: 1e-9 of each output's largest coefficient
    assert (np.abs(ours - reference) <= 1e-9 * np.abs(reference).max(axis=0)).all()


# ---- the sampler -----------------------------------------------------------------------------------

def _sampler_setup(sampler):
    t, meta = sampler
    config = json.loads(meta["config"])
    schedule = json.loads(meta["schedule"])
    sigmas = edm_sigmas(**schedule)
    return t, meta, config, sigmas


def _run(t, meta, name, denoise, sigmas):
    """Our Heun sampler on the fixture's noise and labels with `name`'s settings; returns the final state."""
    options = {}
    churned = name in ("churn", "churn_cap")
    if churned:
        noise_log = list(t[f"{name}_eps"])
        options = json.loads(meta[name])  # churn_cap: S_churn only, the rest left at our defaults
        options["noise_fn"] = lambda shape: noise_log.pop(0)
    x = t["noise"].double() * sigmas[0]
    with torch.no_grad():
        out = sample_heun(denoise, x, sigmas, t["labels"], **options)
    if churned:  # as many churn draws as NVIDIA's sampler made: 4 of the 8 steps lie in [S_min, S_max]; all 8
        assert len(t[f"{name}_eps"]) == {"churn": 4, "churn_cap": 8}[name] and noise_log == []
    return out


def _recording(net, calls):
    def denoise(x, sigma, labels):
        calls.append((x.clone(), sigma.clone()))
        return net(x, sigma, labels)
    return denoise


def _guidance(meta, name):
    return json.loads(meta["guidance"]) if name == "guided" else 1.0


@pytest.mark.parametrize("name", ["heun", "churn", "guided"])
def test_sampler_with_our_network_follows_nvidias_trajectory(sampler, name):
    t, meta, config, sigmas = _sampler_setup(sampler)
    net, guide = _network(t, "net.", config), _network(t, "gnet.", config)
    calls = []
    out = _run(t, meta, name, guided(_recording(net, calls), guide, _guidance(meta, name)), sigmas)
    # every evaluation: same level (float32, what the network sees) and input to float32 rounding
    assert len(calls) == len(t[f"{name}_calls_t"]) == 15
    for (x, sigma), ref_x, ref_t in zip(calls, t[f"{name}_calls_x"], t[f"{name}_calls_t"]):
        assert torch.equal(sigma, torch.full_like(sigma, ref_t.float().item()))
        assert _relative(x, ref_x).max().item() <= 2e-6
    assert _relative(out, t[f"{name}_out"]).max().item() <= 2e-6


@pytest.mark.parametrize("name", ["heun_f32", "churn_cap"])
def test_sampler_final_state_with_our_network(sampler, name):
    """heun_f32: NVIDIA's edm_sampler in its default float32 state, ours in float64 (the network sees float32
    in both); churn_cap: churn capped at gamma = sqrt(2) - 1 on every step. Final states only."""
    t, meta, config, sigmas = _sampler_setup(sampler)
    out = _run(t, meta, "heun" if name == "heun_f32" else name, _network(t, "net.", config), sigmas)
    assert _relative(out, t[f"{name}_out"]).max().item() <= 2e-6


@pytest.mark.parametrize("name", ["heun", "churn", "guided"])
def test_sampler_arithmetic_on_nvidias_network_outputs(sampler, name):
    """NVIDIA's recorded network outputs replayed through our sampler: what is left is the sampler's own
    arithmetic (schedule, churn, Euler step, Heun correction, guidance mix)."""
    t, meta, config, sigmas = _sampler_setup(sampler)
    calls = []

    def replay(key):
        outputs = list(t[key])

        def denoise(x, sigma, labels):
            return outputs.pop(0)  # the outputs in the order NVIDIA's sampler asked for them
        return denoise, outputs

    main, main_left = replay(f"{name}_calls_D")
    guide, guide_left = replay("guided_calls_gD") if name == "guided" else (None, [])
    out = _run(t, meta, name, guided(_recording(main, calls), guide, _guidance(meta, name)), sigmas)
    assert main_left == [] and guide_left == []
    # float64 on both sides: 1e-12 (measured 0.0). Guided: each mixed output rounded to float32 here, kept in
    # float64 there: 1e-7 (measured 3.2e-9), and the float32 inputs may then round one ulp apart: 3e-7
    # (measured 1.1e-7; unguided 0.0, allowed 1e-7 for the same reason).
    tol_out, tol_x = (1e-7, 3e-7) if name == "guided" else (1e-12, 1e-7)
    for (x, sigma), ref_x, ref_t in zip(calls, t[f"{name}_calls_x"], t[f"{name}_calls_t"]):
        assert torch.equal(sigma, torch.full_like(sigma, ref_t.float().item()))
        assert _relative(x, ref_x).max().item() <= tol_x
    assert _relative(out, t[f"{name}_out"]).max().item() <= tol_out
