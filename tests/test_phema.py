"""Power-function EMA and post-hoc reconstruction (SPEC §5, §11 items 6-8)."""

import errno
import math
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import evil_pickle
from scipy.integrate import quad

import mpdiff.ema.reconstruct
from mpdiff.ema.profiles import (
    gamma_to_sigma_rel,
    halflife_to_sigma_rel,
    power_function_beta,
    power_function_inner_product,
    power_function_profile,
    profile_reconstruction_error,
    reconstructed_profile,
    sigma_rel_to_gamma,
    solve_posthoc_coefficients,
)
from mpdiff.ema.reconstruct import _stream_pass, reconstruct, select_inputs
from mpdiff.ema.snapshots import (
    list_snapshots,
    save_ema_snapshots,
    save_snapshot,
    snapshot_name,
)
from mpdiff.ema.trackers import PowerFunctionEMA, TraditionalEMA
from mpdiff.errors import CheckpointError, ConfigError, MpdiffError
from mpdiff.storage.network_files import save_network
from mpdiff.storage.tensors import load_tensors, read_metadata

# ------------------------------------------------------------------------------------------------
# Profile math.


def test_sigma_rel_gamma_round_trip():
    sigma_rel = np.linspace(0.002, 0.288, 301)
    assert np.allclose(gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)), sigma_rel, rtol=1e-9, atol=0)
    gamma = np.geomspace(0.01, 1e4, 101)
    assert np.allclose(sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)), gamma, rtol=1e-9, atol=0)


def test_gamma_table_of_spec():
    table = {0.015: 63.66, 0.034: 26.39, 0.050: 16.97, 0.100: 6.94, 0.130: 4.60, 0.150: 3.56,
             0.200: 1.83, 0.250: 0.72}  # SPEC §5.3
    gamma = sigma_rel_to_gamma(list(table))
    assert np.round(gamma, 2).tolist() == list(table.values())


def test_sigma_rel_to_gamma_broadcasts_and_is_the_largest_root():
    sigma_rel = np.array([[0.05, 0.1, 0.2], [0.01, 0.05, 0.28]])
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma.shape == (2, 3) and gamma[0, 0] == gamma[1, 1]
    c = sigma_rel ** -2
    assert np.allclose(gamma ** 3 + 7 * gamma ** 2 + (16 - c) * gamma + (12 - c), 0, atol=1e-6 * c * gamma)
    assert np.all(gamma > 0)


@pytest.mark.parametrize("bad", [0.0, -0.1, 12 ** -0.5, 0.3, float("nan"), [0.05, 0.5]])
def test_sigma_rel_outside_valid_range_raises(bad):
    with pytest.raises(ConfigError, match="sigma_rel"):
        sigma_rel_to_gamma(bad)


def test_profile_has_unit_mass_and_the_stated_width():
    for sigma_rel in (0.03, 0.1, 0.25):
        t = 3.0e6
        p = lambda tau: power_function_profile(tau, t, sigma_rel)
        mass = quad(p, 0, t, limit=200)[0]
        mean = quad(lambda tau: tau * p(tau), 0, t, limit=200)[0]
        var = quad(lambda tau: (tau - mean) ** 2 * p(tau), 0, t, limit=200)[0]
        assert mass == pytest.approx(1, rel=1e-9)
        assert math.sqrt(var) / t == pytest.approx(sigma_rel, rel=1e-7)
        assert p(0.0) == 0  # no weight on the initial parameters
    assert power_function_profile(2.0, 1.0, 0.1) == 0


def test_first_update_beta_is_zero_and_later_betas_follow_eq_127():
    assert np.all(power_function_beta([0.05, 0.1, 0.2], 2048, 2048) == 0)
    gamma = sigma_rel_to_gamma(0.1)
    assert power_function_beta(0.1, 10 * 2048, 2048) == pytest.approx(0.9 ** (gamma + 1), rel=1e-12)


@pytest.mark.parametrize("t_a, sigma_a, t_b, sigma_b", [
    (1.0, 0.05, 1.0, 0.10), (0.4, 0.10, 1.0, 0.05), (1.0, 0.20, 0.3, 0.03), (0.7, 0.25, 0.7, 0.25)])
def test_inner_product_equals_numerical_integration(t_a, sigma_a, t_b, sigma_b):
    product = lambda tau: (power_function_profile(tau, t_a, sigma_a) *
                           power_function_profile(tau, t_b, sigma_b))
    numeric = quad(product, 0, min(t_a, t_b), limit=500, epsabs=0, epsrel=1e-12)[0]
    closed = power_function_inner_product(t_a, sigma_a, t_b, sigma_b)
    assert closed == pytest.approx(numeric, rel=1e-8)
    assert power_function_inner_product(t_b, sigma_b, t_a, sigma_a) == pytest.approx(closed, rel=1e-12)


def test_inner_product_is_overflow_safe_and_scales_as_one_over_time():
    small = power_function_inner_product(1.0, 0.01, 3.0, 0.012)
    large = power_function_inner_product(1e12, 0.01, 3e12, 0.012)  # t^gamma would overflow (gamma ~ 150)
    assert np.isfinite(large) and large > 0
    assert large * 1e12 == pytest.approx(small, rel=1e-10)


def _two_profile_inputs(num_times, t_end=1.0):
    times = np.arange(1, num_times + 1) * t_end / num_times
    return np.repeat(times, 2), np.tile([0.05, 0.10], num_times)


def test_coefficients_sum_to_one_and_have_shape_inputs_by_outputs():
    in_t, in_sigma_rel = _two_profile_inputs(12, t_end=12 * 8 * 2 ** 20)
    coefficients = solve_posthoc_coefficients(in_t, in_sigma_rel, in_t[-1], [0.02, 0.07, 0.15, 0.25])
    assert coefficients.shape == (24, 4)
    assert np.allclose(coefficients.sum(axis=0), 1, rtol=0, atol=1e-12)


def test_reconstructing_a_tracked_profile_gives_one_hot_coefficients():
    in_t, in_sigma_rel = _two_profile_inputs(10, t_end=10 * 4096)
    coefficients = solve_posthoc_coefficients(in_t, in_sigma_rel, in_t[-1], [0.05, 0.10])
    expected = np.zeros((20, 2))
    expected[18, 0] = expected[19, 1] = 1
    assert np.allclose(coefficients, expected, atol=1e-6)


def test_reconstruction_error_of_a_synthetic_target_falls_with_snapshot_count():
    errors = []
    for num_times in (4, 8, 16, 32, 64):
        in_t, in_sigma_rel = _two_profile_inputs(num_times)
        errors.append(profile_reconstruction_error(in_t, in_sigma_rel, 1.0, 0.07)[1])
    assert all(b < 0.5 * a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3


def test_reconstructed_profile_matches_target_between_snapshot_times():
    in_t, in_sigma_rel = _two_profile_inputs(64)
    coefficients = solve_posthoc_coefficients(in_t, in_sigma_rel, 1.0, 0.13)[:, 0]
    tau = np.linspace(0.01, 0.99, 50) + 0.5 / 64  # away from the jumps at snapshot times
    approx = reconstructed_profile(tau, in_t, in_sigma_rel, coefficients)
    target = power_function_profile(tau, 1.0, 0.13)
    assert np.max(np.abs(approx - target)) < 0.02 * target.max()


# ------------------------------------------------------------------------------------------------
# Half-life conversion (traditional EMA).


def test_halflife_conversion_approaches_the_small_halflife_formula():
    t = 2147.5  # config A: 50 Mimg half-life after 2147.5 Mimg (SPEC §5.2)
    assert halflife_to_sigma_rel(50, t) == pytest.approx(50 / (t * math.log(2)), rel=1e-9)
    assert round(float(halflife_to_sigma_rel(50, t)), 4) == 0.0336
    ratio = halflife_to_sigma_rel(np.array([1e-6, 1e-3, 1e-2]), 1.0) / (np.array([1e-6, 1e-3, 1e-2]) / math.log(2))
    assert np.allclose(ratio, 1, rtol=1e-9)
    # Not the approximation once the mass on the initial weights matters.
    assert halflife_to_sigma_rel(0.5, 1.0) < 0.6 * 0.5 / math.log(2)


@pytest.mark.parametrize("halflife_steps", [20, 300])
def test_halflife_conversion_matches_a_tracked_traditional_ema(halflife_steps):
    """The exact conversion (truncated exponential + mass on theta(0)) is the width a tracker really has."""
    steps, batch = 1000, 4
    weights = _response_weights(lambda module: TraditionalEMA(module, halflife_steps * batch, rampup_ratio=None),
                                steps, batch, every=1, include_initial=True)
    tau = np.arange(steps + 1) / steps
    mean = np.sum(weights * tau)
    sigma_rel = math.sqrt(np.sum(weights * (tau - mean) ** 2))
    assert weights.sum() == pytest.approx(1, abs=1e-5)
    assert sigma_rel == pytest.approx(float(halflife_to_sigma_rel(halflife_steps, steps)), rel=5e-3)


# ------------------------------------------------------------------------------------------------
# Trackers.


class _Vector(torch.nn.Module):
    """A module whose only parameter is a vector, plus a buffer, to drive trackers with any trajectory."""

    def __init__(self, size):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(size))
        self.register_buffer("counter", torch.zeros(()))


def _response_weights(make_tracker, steps, batch, every, include_initial=False, naive_delta=False):
    """Weights a tracker gives to the weights of each step: drive theta(step k) = e_k (one-hot)."""
    module = _Vector(steps + 1)
    with torch.no_grad():
        module.theta[0] = 1  # theta(0): the initial weights
    tracker = make_tracker(module)
    for step in range(1, steps + 1):
        with torch.no_grad():
            module.theta.zero_()
            module.theta[step] = 1
        if step % every == 0:
            tracker.update(step * batch, batch if naive_delta else every * batch)
    weights = tracker.averaged_state_dict()["theta"].double().numpy()
    return weights if include_initial else weights[1:]


def _closed_form_average(trajectory, step_times, sigma_rel, t_end):
    """Integral of the power profile at t_end against theta(tau) = trajectory[k] on (step_times[k-1], step_times[k]]."""
    starts = np.concatenate([[0.0], step_times[:-1]])
    profile = lambda tau: float(power_function_profile(tau, t_end, sigma_rel))
    masses = np.array([quad(profile, a, b, epsabs=0, epsrel=1e-11)[0] for a, b in zip(starts, step_times)])
    return masses @ trajectory


@pytest.mark.parametrize("every", [1, 4])
def test_power_ema_tracker_equals_closed_form_average(every):
    """SPEC §11 item 8: updates every step and every 4 steps (4x the images per update) are both exact."""
    steps, batch, size = 64, 32, 5
    rng = np.random.default_rng(0)
    trajectory = np.cumsum(rng.normal(size=(steps, size)), axis=0) + 3 * np.sin(np.arange(steps) / 7)[:, None]
    module = _Vector(size)
    tracker = PowerFunctionEMA(module, sigma_rels=(0.05, 0.10, 0.2))
    for step in range(1, steps + 1):
        with torch.no_grad():
            module.theta.copy_(torch.from_numpy(trajectory[step - 1]))
        if step % every == 0:
            tracker.update(step * batch, every * batch)
    seen = trajectory[every - 1::every]                      # the weights the tracker saw ...
    seen_times = np.arange(every, steps + 1, every) * batch  # ... each held over the images since the last update
    for index, sigma_rel in enumerate(tracker.sigma_rels):
        expected = _closed_form_average(seen, seen_times.astype(np.float64), sigma_rel, steps * batch)
        got = tracker.averaged_state_dict(index)["theta"].double().numpy()
        assert np.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_spaced_updates_keep_the_profile_width_while_per_step_decay_widens_it():
    """Update every 4 steps with beta from the images since the last update: the width stays sigma_rel.
    Reusing the per-step beta at each spaced update (the common mistake) makes the average much longer."""
    steps, batch, sigma_rel = 512, 16, 0.05
    tau = np.arange(1, steps + 1) / steps

    def width(weights):
        mean = np.sum(weights * tau)
        return math.sqrt(np.sum(weights * (tau - mean) ** 2))

    make = lambda module: PowerFunctionEMA(module, sigma_rels=[sigma_rel])
    every_step = width(_response_weights(make, steps, batch, every=1))
    spaced = width(_response_weights(make, steps, batch, every=4))
    naive = width(_response_weights(make, steps, batch, every=4, naive_delta=True))
    assert every_step == pytest.approx(sigma_rel, rel=0.02)
    assert spaced == pytest.approx(sigma_rel, rel=0.03)
    assert naive > 1.5 * sigma_rel


def test_first_tracker_update_copies_the_live_weights():
    module = torch.nn.Linear(3, 2)
    tracker = PowerFunctionEMA(module)
    with torch.no_grad():
        module.weight.add_(1.0)
    tracker.update(64, 64)
    for index in range(2):
        assert torch.equal(tracker.averaged_state_dict(index)["weight"], module.weight.detach())


def test_traditional_ema_beta_uses_images_since_last_update_and_rampup():
    module = _Vector(1)
    tracker = TraditionalEMA(module, halflife_img=1000, rampup_ratio=0.09)
    expected = 0.0
    for step, nimg in enumerate([100, 400, 20000, 30000], start=1):
        delta = nimg - ([0, 100, 400, 20000][step - 1])
        with torch.no_grad():
            module.theta.fill_(float(step))
        tracker.update(nimg, delta)
        beta = 0.5 ** (delta / min(1000, 0.09 * nimg))
        expected = beta * expected + (1 - beta) * step
    assert tracker.averaged_state_dict()["theta"].item() == pytest.approx(expected, rel=1e-6)
    assert tracker.current_halflife(100) == pytest.approx(9.0) and tracker.current_halflife(1e9) == 1000


def test_traditional_ema_is_the_same_with_spaced_updates_without_rampup():
    make = lambda module: TraditionalEMA(module, halflife_img=40 * 8, rampup_ratio=None)
    every_step = _response_weights(make, 200, 8, every=1, include_initial=True)
    spaced = _response_weights(make, 200, 8, every=4, include_initial=True)
    assert spaced[0] == pytest.approx(every_step[0], rel=1e-5)  # same mass left on theta(0)
    # A spaced update gives step 4j the weight that every-step updates spread over steps 4j-3 .. 4j.
    assert np.allclose(spaced[4::4], every_step[1:].reshape(-1, 4).sum(axis=1), rtol=1e-5, atol=1e-7)


def test_tracker_state_dict_round_trip_through_torch_save(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    tracker = PowerFunctionEMA(module, sigma_rels=(0.05, 0.1))
    for step in range(1, 6):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        tracker.update(step * 10, 10)
    torch.save(tracker.state_dict(), tmp_path / "ema.pt")
    state = torch.load(tmp_path / "ema.pt", weights_only=True)
    other = PowerFunctionEMA(module, sigma_rels=(0.2,))
    other.load_state_dict(state)
    assert other.sigma_rels == (0.05, 0.1) and other.nimg == 50
    for a, b in zip(tracker.averages, other.averages):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    traditional = TraditionalEMA(module, halflife_img=20)
    traditional.update(10, 10)
    restored = TraditionalEMA(module, halflife_img=1)
    restored.load_state_dict(traditional.state_dict())
    assert restored.halflife_img == 20 and torch.equal(restored.averaged_state_dict()["0.weight"],
                                                        traditional.averaged_state_dict()["0.weight"])
    with pytest.raises(CheckpointError, match="do not match"):
        PowerFunctionEMA(torch.nn.Linear(4, 8)).load_state_dict(state)


def test_averaged_state_dict_has_buffers_and_copy_to_loads_it():
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    tracker = PowerFunctionEMA(module, sigma_rels=(0.05, 0.1))
    tracker.update(8, 8)
    with torch.no_grad():
        module[0].weight.add_(1)
        module[1].running_mean.fill_(3)
    tracker.update(16, 8)
    state = tracker.averaged_state_dict(0.1)
    assert set(state) == set(module.state_dict())
    assert torch.equal(state["1.running_mean"], module[1].running_mean)  # buffers from the live module
    assert not torch.equal(state["0.weight"], module[0].weight)           # parameters averaged
    fresh = tracker.copy_to(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)), 1)
    assert torch.equal(fresh[0].weight, state["0.weight"])
    with pytest.raises(ConfigError, match="not tracked"):
        tracker.averaged_state_dict(0.07)


# ------------------------------------------------------------------------------------------------
# Snapshots and reconstruction.


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 5)
        self.register_buffer("freqs", torch.randn(7))        # like MPFourier: fixed, never trained
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))


CONFIG = {"kind": "tiny-test-module", "width": 5}


def _make_run(run_dir, num_times=6, batch=16, every=2, sigma_rels=(0.05, 0.10), extra=(), dtype="float32"):
    """Train nothing, just walk the weights; snapshots of `sigma_rels` every `every` steps + trackers of `extra`."""
    torch.manual_seed(1)
    module = _Tiny()
    tracker = PowerFunctionEMA(module, sigma_rels)
    tracked = PowerFunctionEMA(module, extra) if extra else None
    snapshot_dir = os.path.join(run_dir, "snapshots")
    for step in range(1, num_times * every + 1):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.1 * torch.randn_like(p) + 0.05)
            module.steps += 1
        tracker.update(step * batch, batch)
        if tracked is not None:
            tracked.update(step * batch, batch)
        if step % every == 0:
            save_ema_snapshots(tracker, snapshot_dir, CONFIG, step=step, batch_size=batch, dtype=dtype)
    return module, tracker, tracked


def test_snapshot_files_are_network_files_listed_in_order(tmp_path):
    _make_run(tmp_path, num_times=3)
    records = list_snapshots(tmp_path)
    assert [(r.nimg, r.sigma_rel) for r in records] == [(n, s) for n in (32, 64, 96) for s in (0.05, 0.1)]
    assert os.path.basename(records[0].path) == "ema-000000000032-0.050.safetensors"
    assert list_snapshots(tmp_path / "snapshots") == records
    meta = read_metadata(records[-1].path)
    assert meta["kind"] == "ema-snapshot" and meta["network"] == CONFIG
    assert (meta["nimg"], meta["step"], meta["batch_size"]) == (96, 6, 16)
    assert records[0].signature == (("freqs", (7,)), ("linear.bias", (5,)), ("linear.weight", (5, 6)),
                                    ("steps", ()))


# Every way a run's snapshots can be unusable. Each case breaks a fresh 3-time run (snapshots at 32, 64 and 96
# images, sigma_rel 0.05 and 0.10) and returns the path the one-line error must start with; the first
# snapshot, ema-000000000032-0.050, is the reference the others must match.
def _snapshot(run_dir, nimg, sigma_rel):
    return os.path.join(run_dir, "snapshots", snapshot_name(nimg, sigma_rel))


def _overwrite(path, change):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(change(data))
    return path


def _resave(run_dir, state=None, config=CONFIG, dtype="float32", nimg=96, sigma_rel=0.05):
    path = _snapshot(run_dir, nimg, sigma_rel)
    save_snapshot(path, _Tiny().state_dict() if state is None else state, nimg, sigma_rel, 6, 16, config, dtype=dtype)
    return path


def _with_tensor_changed(change):
    state = _Tiny().state_dict()
    change(state)
    return state


SNAPSHOT_LISTING_ERRORS = {
    "no such directory": (lambda run, marker: os.path.join(run, "nowhere"),
                          "no such directory; expected a run directory with snapshots/ in it"),
    "no snapshots": (lambda run, marker: [os.remove(p) for p in _all_snapshots(run)] and os.path.join(run, "snapshots"),
                     "no EMA snapshots (ema-*.safetensors) found"),
    "a folder without snapshots": (lambda run, marker: shutil.rmtree(os.path.join(run, "snapshots")) or run,
                                   "no EMA snapshots (ema-*.safetensors) found"),
    "another architecture": (lambda run, marker: _resave(run, config=dict(CONFIG, width=7)),
                             "network config differs from "),
    "a tensor added": (lambda run, marker: _resave(run, _with_tensor_changed(lambda s: s.update(extra=torch.zeros(2)))),
                       "tensor names/shapes differ from "),
    "a tensor missing": (lambda run, marker: _resave(run, _with_tensor_changed(lambda s: s.pop("linear.bias"))),
                         "tensor names/shapes differ from "),
    "a tensor of another shape": (lambda run, marker: _resave(run, _with_tensor_changed(
        lambda s: s.update({"linear.bias": torch.zeros(6)}))), "tensor names/shapes differ from "),
    "float16": (lambda run, marker: _resave(run, dtype="float16"), "stored as float16 but "),
    "bfloat16": (lambda run, marker: _resave(run, dtype="bfloat16"), "stored as bfloat16 but "),
    "truncated": (lambda run, marker: _overwrite(_snapshot(run, 64, 0.1), lambda d: d[: len(d) // 2]),
                  "unreadable or damaged snapshot ("),
    "tail cut": (lambda run, marker: _overwrite(_snapshot(run, 64, 0.1), lambda d: d[:-20]),
                 "unreadable or damaged snapshot ("),
    "extended": (lambda run, marker: _overwrite(_snapshot(run, 64, 0.05), lambda d: d + b"\0" * 8),
                 "unreadable or damaged snapshot ("),
    "garbled header": (lambda run, marker: _overwrite(_snapshot(run, 64, 0.05), lambda d: d[:8] + b"\xff" * (len(d) - 8)),
                       "unreadable or damaged snapshot ("),
    "impossible header length": (lambda run, marker: _overwrite(_snapshot(run, 64, 0.05),
                                                                lambda d: (10 ** 12).to_bytes(8, "little") + d[8:]),
                                 "unreadable or damaged snapshot ("),
    "unknown dtype": (lambda run, marker: _overwrite(_snapshot(run, 64, 0.05), lambda d: d.replace(b'"F32"', b'"Q32"', 1)),
                      "unreadable or damaged snapshot ("),
    "zero bytes": (lambda run, marker: _overwrite(_snapshot(run, 64, 0.05), lambda d: b""),
                   "unreadable or damaged snapshot ("),
    "a pickle": (lambda run, marker: _overwrite(_snapshot(run, 64, 0.05), lambda d: evil_pickle(marker)),
                 "unreadable or damaged snapshot ("),
    "name and metadata disagree": (lambda run, marker: shutil.move(_snapshot(run, 64, 0.1), _snapshot(run, 128, 0.1)),
                                   "file name does not match its metadata (nimg=64, sigma_rel=0.1)"),
    "a network file that is not a snapshot": (
        lambda run, marker: save_network(_snapshot(run, 96, 0.05), _Tiny().state_dict(), CONFIG, nimg=96,
                                         sigma_rel=0.05) or _snapshot(run, 96, 0.05),
        "not an mpdiff EMA snapshot (format "),
}


def _all_snapshots(run_dir):
    return [os.path.join(run_dir, "snapshots", name) for name in os.listdir(os.path.join(run_dir, "snapshots"))]


@pytest.mark.parametrize("case", SNAPSHOT_LISTING_ERRORS)
def test_unusable_snapshots_are_refused_naming_the_file(tmp_path, case):
    run_dir = os.fspath(tmp_path / "run")
    _make_run(run_dir, num_times=3)
    marker = tmp_path / "MARKER"
    damage, expect = SNAPSHOT_LISTING_ERRORS[case]
    named = os.fspath(damage(run_dir, marker))
    source = named if case == "no such directory" else run_dir
    messages = []
    for attempt in (lambda: list_snapshots(source), lambda: reconstruct(source, [0.07], progress=False)):
        with pytest.raises(CheckpointError) as info:
            attempt()
        messages.append(str(info.value))
    assert messages[0] == messages[1]  # reconstruct lists the snapshots first, with the same error
    assert messages[0].startswith(f"{named}: ") and expect in messages[0] and "\n" not in messages[0], messages[0]
    assert not os.path.exists(os.path.join(run_dir, "phema")) and not marker.exists()


def test_files_with_names_that_are_not_ours_are_not_snapshots(tmp_path):
    # Only names mpdiff writes (ema-<12-digit nimg>-<3-decimal sigma_rel>.safetensors) are snapshots, so a
    # user's copy next to them is neither read nor mistaken for a second snapshot of the same time.
    _make_run(tmp_path, num_times=3)
    before = list_snapshots(tmp_path)
    first = _snapshot(tmp_path, 64, 0.05)
    for stray in ("-copy.safetensors", " (copy).safetensors", ".safetensors.bak"):
        shutil.copy(first, first.replace(".safetensors", stray))
    assert list_snapshots(tmp_path) == before


def test_reconstructing_a_tracked_profile_returns_the_stored_average(tmp_path):
    module, tracker, _ = _make_run(tmp_path, num_times=8)
    paths = reconstruct(tmp_path, [0.10, 0.05], progress=False)
    assert [os.path.basename(p) for p in paths] == ["phema-000000000256-0.050.safetensors",
                                                    "phema-000000000256-0.100.safetensors"]
    assert os.path.dirname(paths[0]) == os.path.join(str(tmp_path), "phema")
    for path, sigma_rel in zip(paths, (0.05, 0.10)):
        tensors, meta = load_tensors(path)
        stored = tracker.averaged_state_dict(sigma_rel)
        assert torch.allclose(tensors["linear.weight"], stored["linear.weight"], atol=1e-5)
        assert torch.equal(tensors["freqs"], module.freqs)                   # identical in all inputs: copied
        assert tensors["steps"].item() == 16                                  # integer: from the latest input
        assert meta["kind"] == "phema-reconstruction" and meta["nimg"] == 256 and meta["sigma_rel"] == sigma_rel
        assert meta["network"] == CONFIG and len(meta["coefficients"]) == 16
        assert sum(meta["coefficients"]) == pytest.approx(1, abs=1e-9)
        assert max(meta["coefficients"]) == pytest.approx(1, abs=1e-5)


def test_reconstruction_of_an_untracked_profile_matches_a_tracker(tmp_path):
    module, _, tracked = _make_run(tmp_path, num_times=24, every=2, extra=(0.07, 0.2))
    out = tmp_path / "out"
    one_pass = reconstruct(tmp_path, [0.07, 0.2], out_dir=out, progress=False)
    for path, sigma_rel in zip(one_pass, (0.07, 0.2)):
        tensors = load_tensors(path)[0]
        want = tracked.averaged_state_dict(sigma_rel)["linear.weight"]
        assert torch.allclose(tensors["linear.weight"], want, rtol=0, atol=2e-3 * want.abs().max().item())
        assert torch.equal(tensors["freqs"], module.freqs)  # buffers copied, not re-summed with rounding
    # One output per pass gives the same files as both in one pass.
    separate = reconstruct(tmp_path, [0.07, 0.2], out_dir=tmp_path / "out1", batch_outputs=1, progress=False)
    for a, b in zip(one_pass, separate):
        assert torch.equal(load_tensors(a)[0]["linear.weight"], load_tensors(b)[0]["linear.weight"])


def test_reconstruction_at_an_earlier_time_uses_only_earlier_snapshots(tmp_path):
    _make_run(tmp_path, num_times=6)
    [path] = reconstruct(tmp_path, 0.08, at_nimg=96, dtype="float16", progress=False)
    tensors, meta = load_tensors(path)
    assert meta["nimg"] == 96 and os.path.basename(path) == "phema-000000000096-0.080.safetensors"
    assert meta["inputs"] == [snapshot_name(n, s) for n in (32, 64, 96) for s in (0.05, 0.1)]
    assert tensors["linear.weight"].dtype == torch.float16


OUT_OF_RANGE = "is outside the valid range (0, 0.2887) of the power-function EMA"


@pytest.mark.parametrize("kwargs, expect", [
    (dict(sigma_rels=0.0), f"sigma_rel 0 {OUT_OF_RANGE}"),
    (dict(sigma_rels=-0.1), f"sigma_rel -0.1 {OUT_OF_RANGE}"),
    (dict(sigma_rels=12 ** -0.5), f"sigma_rel 0.288675 {OUT_OF_RANGE}"),  # the limit itself: gamma = -1
    (dict(sigma_rels=0.2887), f"sigma_rel 0.2887 {OUT_OF_RANGE}"),
    (dict(sigma_rels=0.29), f"sigma_rel 0.29 {OUT_OF_RANGE}"),
    (dict(sigma_rels=0.3), f"sigma_rel 0.3 {OUT_OF_RANGE}"),
    (dict(sigma_rels=0.5), f"sigma_rel 0.5 {OUT_OF_RANGE}"),
    (dict(sigma_rels=float("nan")), f"sigma_rel nan {OUT_OF_RANGE}"),
    (dict(sigma_rels=float("inf")), f"sigma_rel inf {OUT_OF_RANGE}"),
    (dict(sigma_rels=[0.1, 0.0]), f"sigma_rel 0 {OUT_OF_RANGE}"),
    (dict(sigma_rels=[]), "no target sigma_rel given"),
    (dict(sigma_rels=[0.0701, 0.0704]), "two EMA lengths round to 0.070; file names keep 3 decimals"),
    (dict(sigma_rels=0.1, at_nimg=97), "reconstruction time 97 images must be an integer in (0, 96] (the last "
                                       "snapshot time)"),
    (dict(sigma_rels=0.1, at_nimg=10 ** 12), "reconstruction time 1000000000000 images must be an integer in (0, 96]"),
    (dict(sigma_rels=0.1, at_nimg=0), "reconstruction time 0 images must be an integer in (0, 96]"),
    (dict(sigma_rels=0.1, at_nimg=-64), "reconstruction time -64 images must be an integer in (0, 96]"),
    (dict(sigma_rels=0.1, at_nimg=64.5), "reconstruction time 64.5 images must be an integer in (0, 96]"),
    (dict(sigma_rels=0.1, at_nimg=True), "reconstruction time True images must be an integer in (0, 96]"),
    (dict(sigma_rels=0.1, at_nimg=50), "reconstruction time 50 images is not a snapshot time; the nearest are 32 and 64"),
    (dict(sigma_rels=0.1, at_nimg=10), "reconstruction time 10 images is not a snapshot time; the nearest are 32"),
    (dict(sigma_rels=0.1, dtype="float64"), "output dtype 'float64' is not one of float32, float16, bfloat16"),
    (dict(sigma_rels=0.1, batch_outputs=0), "batch_outputs must be >= 1, got 0"),
], ids=lambda value: None if isinstance(value, dict) else value[:40])
def test_reconstruct_rejects_bad_targets(tmp_path, kwargs, expect):
    _make_run(tmp_path, num_times=3)
    with pytest.raises(ConfigError) as info:
        reconstruct(tmp_path, progress=False, **kwargs)
    assert expect in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert not (tmp_path / "phema").exists()


def _write_varied_snapshots(run_dir, dtype, num_times=5):
    """Snapshots holding every kind of tensor reconstruct must treat differently (see the test below)."""
    generator = torch.Generator().manual_seed(3)
    frozen = torch.randn(6, 4, generator=generator)
    shared_head = torch.randn(12, generator=generator)
    for time_index in range(1, num_times + 1):
        for sigma_rel in (0.05, 0.10):
            state = {
                "w": torch.randn(7, 5, generator=generator),                    # trained: averaged
                "frozen": frozen,                                               # same in all: copied
                "mask": torch.tensor([0.0, -math.inf, 1.0]),                    # copied: mixing infs gives nan
                "partly": torch.cat([shared_head, torch.randn(20, generator=generator)]),  # same at first only
                "scale": torch.randn((), generator=generator),                  # 0-dim
                "empty": torch.zeros(0, 3),
                "steps": torch.tensor(time_index * 10, dtype=torch.int64),      # integer: latest
            }
            save_snapshot(os.path.join(run_dir, "snapshots", snapshot_name(time_index * 64, sigma_rel)),
                                state, time_index * 64, sigma_rel, step=time_index, batch_size=64,
                                network_config=CONFIG, dtype=dtype)


def _float64_reconstruction(run_dir, sigma_rels):
    """sum_i x_ij theta_i in float64, straight from the snapshot files: what reconstruct must write."""
    inputs = list_snapshots(run_dir)
    x = solve_posthoc_coefficients([r.nimg for r in inputs], [r.sigma_rel for r in inputs],
                                         inputs[-1].nimg, sigma_rels)
    thetas = [load_tensors(r.path)[0] for r in inputs]
    return [{key: sum(float(x[i, j]) * theta[key].double() for i, theta in enumerate(thetas))
             for key in ("w", "partly", "scale")} for j in range(len(sigma_rels))], thetas


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_streaming_reconstruction_equals_the_float64_sum_of_the_snapshots(tmp_path, monkeypatch, dtype):
    _write_varied_snapshots(tmp_path, dtype)
    targets = [0.03, 0.07, 0.2]
    want, thetas = _float64_reconstruction(tmp_path, targets)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        default = reconstruct(tmp_path, targets, out_dir=tmp_path / "default", progress=False)
        assert torch.get_num_threads() == 2  # set to 1 for the pass only
    finally:
        torch.set_num_threads(threads)
    # Ranges of 8 bytes (every tensor read in many pieces, "partly" identical in its first pieces only),
    # most inputs reopened for every read, and one target per pass.
    monkeypatch.setattr(mpdiff.ema.reconstruct, "_MIN_READ_BYTES", 8)
    monkeypatch.setattr(mpdiff.ema.reconstruct, "_MAX_READ_BYTES", 8)
    monkeypatch.setattr(mpdiff.ema.reconstruct, "_MAX_OPEN_INPUTS", 3)
    pieces = reconstruct(tmp_path, targets, out_dir=tmp_path / "pieces", batch_outputs=1, progress=True)
    for j, (a, b) in enumerate(zip(default, pieces)):
        tensors, meta = load_tensors(a)
        other, other_meta = load_tensors(b)
        assert meta == other_meta and set(tensors) == set(other) == set(thetas[0])
        for key in tensors:  # chunking, grouping and file handling change nothing, bit for bit
            assert torch.equal(tensors[key], other[key]), key
        for key, value in want[j].items():  # float64 accumulation: within a float32 rounding of the exact sum
            assert tensors[key].dtype == torch.float32
            assert torch.allclose(tensors[key].double(), value, rtol=0, atol=2e-7 * value.abs().max().item()), key
        assert torch.equal(tensors["frozen"], thetas[0]["frozen"].float())
        assert torch.equal(tensors["mask"], thetas[0]["mask"].float())
        assert tensors["steps"].item() == 50 and tensors["empty"].shape == (0, 3)


def test_reconstruct_names_a_snapshot_damaged_after_listing(tmp_path, monkeypatch):
    _make_run(tmp_path, num_times=4)
    victim = tmp_path / "snapshots" / "ema-000000000064-0.100.safetensors"
    intact = victim.read_bytes()
    real_select, real_pass = select_inputs, _stream_pass

    def damage_then(real):
        def wrapper(*args, **kwargs):
            victim.write_bytes(intact[:-20])
            return real(*args, **kwargs)
        return wrapper

    for name, real in (("select_inputs", real_select), ("_stream_pass", real_pass)):  # header, then data
        victim.write_bytes(intact)
        monkeypatch.setattr(mpdiff.ema.reconstruct, name, damage_then(real))
        with pytest.raises(CheckpointError, match="damaged snapshot") as info:
            reconstruct(tmp_path, [0.07, 0.12], progress=False)
        assert victim.name in str(info.value) and "\n" not in str(info.value)
        assert not (tmp_path / "phema").exists() or not os.listdir(tmp_path / "phema")
        monkeypatch.undo()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to tell which file is fsync'ed")
def test_disk_full_while_finishing_one_output_names_it_and_leaves_no_temporaries(tmp_path, monkeypatch):
    _make_run(tmp_path, num_times=4)
    real_fsync = os.fsync

    def fsync(fd):
        if "0.120.safetensors" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(MpdiffError) as info:
        reconstruct(tmp_path, [0.07, 0.12, 0.2], progress=False)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "phema" / "phema-000000000128-0.120.safetensors"))
    assert "disk full" in message and "\n" not in message
    assert sorted(os.listdir(tmp_path / "phema")) == ["phema-000000000128-0.070.safetensors",
                                                      "phema-000000000128-0.200.safetensors"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_streamed_output_files_hold_what_save_network_writes(tmp_path, dtype):
    from safetensors import safe_open

    _make_run(tmp_path, num_times=3)
    [path] = reconstruct(tmp_path, 0.07, dtype=dtype, progress=False)
    tensors, meta = load_tensors(path)  # safetensors' own loader accepts the file
    assert int.from_bytes(open(path, "rb").read(8), "little") % 8 == 0  # tensor data aligned as safetensors does
    assert tensors["linear.weight"].dtype == tensors["freqs"].dtype == getattr(torch, dtype)
    assert tensors["steps"].dtype == torch.int64 and tensors["steps"].item() == 6
    extra = {key: value for key, value in meta.items() if key not in ("format", "network", "dtype")}
    save_network(tmp_path / "saved.safetensors", tensors, CONFIG, dtype=dtype, **extra)
    assert load_tensors(tmp_path / "saved.safetensors")[1] == meta
    raw_meta = []
    for file in (path, tmp_path / "saved.safetensors"):  # the metadata strings themselves, as other tools see them
        with safe_open(file, framework="pt") as f:
            raw_meta.append(f.metadata())
    assert raw_meta[0] == raw_meta[1]
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temporaries left


def test_plot_ema_profile_writes_a_png_with_small_error_for_dense_snapshots(tmp_path):
    pytest.importorskip("matplotlib")
    from mpdiff.ema.plots import plot_ema_profile

    _make_run(tmp_path / "sparse", num_times=3)
    _make_run(tmp_path / "dense", num_times=24)
    sparse_path, sparse_error = plot_ema_profile(tmp_path / "sparse", 0.07)
    dense_path, dense_error = plot_ema_profile(tmp_path / "dense", 0.07, out_path=tmp_path / "p.png")
    assert open(sparse_path, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.exists(dense_path)
    assert os.path.dirname(sparse_path) == os.path.join(str(tmp_path / "sparse"), "phema")
    assert dense_error < 0.5 * sparse_error


def test_targets_the_snapshots_cannot_reproduce_are_named(partial_run):
    # Four snapshot times reproduce a 0.07 profile well, and a very short one (0.01) badly: that one is named
    # with its relative L2 profile error, so `mpdiff phema` can warn instead of writing it silently.
    from mpdiff.ema.reconstruct import PROFILE_ERROR_WARNING, poorly_reconstructed

    named = poorly_reconstructed(partial_run, [0.01, 0.07])
    assert [value for value, _ in named] == [0.01] and named[0][1] > PROFILE_ERROR_WARNING
