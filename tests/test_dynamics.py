"""Training-dynamics diagnostics (issue 12): what each quantity measures, that measuring changes no
result, the stats rows and TensorBoard scalars of a run, and `mpdiff plot-dynamics`.

The runs are conftest.TINY_RUN (512 images in 8 steps, a stats row every 64 images).
"""

import json
import math
import os

import pytest
import torch
from conftest import ckpt, randomized_network, run_cli, train_tiny
from torch import nn

from mpdiff import build_network
from mpdiff.config import NetworkConfig
from mpdiff.nn.primitives import MPConv
from mpdiff.storage.files import read_jsonl
from mpdiff.storage.tensors import load_tensors
from mpdiff.train import dynamics as dyn
from mpdiff.storage.layout import DYNAMICS_PLOT_FILES
from mpdiff.train.dynamics_plot import per_block


class Toy(nn.Module):
    """The two block dicts the diagnostics rely on, around plain layers; called like a denoiser."""

    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleDict({"first": nn.Linear(6, 5), "second": nn.Linear(5, 4, bias=False)})
        self.dec = nn.ModuleDict({"last": nn.Linear(4, 6)})
        self.gain = nn.Parameter(torch.ones([]))  # a scalar gain: never a layer

    def forward(self, x, sigma, labels=None):
        for block in (*self.enc.values(), *self.dec.values()):
            x = block(x)
        return x * self.gain


def toy_probe(count=10):
    generator = torch.Generator().manual_seed(1)
    return dyn.ProbeBatch(torch.randn([count, 6], generator=generator), torch.ones(count))


# ---- the quantities ---------------------------------------------------------------------------------

def test_a_layer_scaled_by_k_reports_k_times_the_weight_magnitude():
    net = Toy()
    layers = dyn.layer_weights(net)
    assert list(layers) == ["enc.first", "enc.second", "dec.last"]  # no biases, no scalar gain
    before = dyn.weight_rms(layers)
    with torch.no_grad():
        net.enc["second"].weight.mul_(3.0)
    after = dyn.weight_rms(layers)
    assert after["enc.second"] == pytest.approx(3.0 * before["enc.second"], rel=1e-6)
    assert after["enc.first"] == before["enc.first"] and after["dec.last"] == before["dec.last"]
    w = net.dec["last"].weight.detach()
    assert before["dec.last"] == pytest.approx(w.pow(2).mean().sqrt().item(), rel=1e-6)


def test_the_layers_of_the_u_net_belong_to_its_blocks():
    net = randomized_network()
    layers = dyn.layer_weights(net)
    convs = [name for name, m in net.named_modules() if isinstance(m, MPConv)]
    assert len(layers) == len(convs) and all(w.ndim >= 2 for w in layers.values())  # every MPConv, no gain
    blocks = dyn.block_modules(net)
    assert list(blocks)[:2] == ["enc.16x16_conv", "enc.16x16_block0"] and "dec.16x16_block2" in blocks
    inside = {dyn.block_of(name) for name in layers} - {None}
    assert inside == set(blocks)
    assert {name for name in layers if dyn.block_of(name) is None} == {"emb_noise", "emb_label", "out_conv",
                                                                       "logvar_linear"}


def test_relative_update_of_a_hand_set_step():
    w = torch.tensor([[3.0, 4.0]])                    # ||w|| = 5
    assert dyn.relative_updates({"w": w}, {"w": w + torch.tensor([[0.0, 0.5]])}) == {"w": pytest.approx(0.1)}


def test_the_update_of_one_sgd_step_with_a_known_gradient():
    net, lr = Toy(), 0.01
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    watcher = dyn.TrainingDynamics(net, toy_probe(), every=1)
    watcher.watch(optimizer)
    with torch.no_grad():
        net.enc["first"].weight.mul_(2.0)            # before the step: not part of it
    expected = {}
    for name, w in dyn.layer_weights(net).items():
        w.grad = torch.full_like(w, 0.5)
        expected[name] = lr * w.grad.norm().item() / w.detach().norm().item()
    optimizer.step()                                  # dw = -lr * grad
    row = watcher.measure()
    assert row["update"] == {name: pytest.approx(value, rel=1e-3) for name, value in expected.items()}
    assert "update" not in watcher.measure()          # one step only, and the hook is gone
    optimizer.step()
    assert "update" not in watcher.measure()


def test_activation_rms_is_the_rms_of_each_block_output():
    net, probe = Toy(), toy_probe()
    with torch.no_grad():
        h1 = net.enc["first"](probe.noisy)
        h2 = net.enc["second"](h1)
        h3 = net.dec["last"](h2)
    expected = {"enc.first": h1, "enc.second": h2, "dec.last": h3}
    for micro_batch in (None, 3):                     # the probe in pieces gives the same RMS
        got = dyn.activation_rms(net, probe, micro_batch=micro_batch)
        assert list(got) == list(expected)
        for name, h in expected.items():
            assert got[name] == pytest.approx(h.pow(2).mean().sqrt().item(), rel=1e-5)


def test_the_probe_leaves_weights_modes_and_the_random_state_unchanged():
    net = randomized_network()                        # N(0, 1) weights: a training-mode call would move them
    net.train()
    net.unet.enc["8x8_block0"].eval()                 # a module's own mode is restored, not just the net's
    modes = {name: m.training for name, m in net.named_modules()}
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.randint(0, 256, [40, 3, 16, 16], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.eye(10)[torch.arange(40) % 10]
    rng = torch.get_rng_state()
    probe = dyn.make_probe(images, labels, P_mean=-0.4, P_std=1.0, seed=3)
    values = dyn.activation_rms(net, probe, micro_batch=16)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    assert all(math.isfinite(v) and v > 0 for v in values.values())
    # The same probe and the same values every time; the probe is of the training noise distribution.
    again = dyn.make_probe(images, labels, P_mean=-0.4, P_std=1.0, seed=3)
    assert torch.equal(again.noisy, probe.noisy) and torch.equal(again.labels, probe.labels)
    assert dyn.activation_rms(net, again, micro_batch=16) == values
    assert len(probe.sigma) == dyn.PROBE_IMAGES and probe.sigma.log().median().item() == pytest.approx(-0.4, abs=0.05)
    # The check has teeth: a training-mode forward does re-normalise the stored weights in place.
    net(probe.noisy[:2], probe.sigma[:2], probe.labels[:2])
    assert not all(torch.equal(weights[k], v) for k, v in net.state_dict().items())


def test_the_rows_of_a_long_run_stay_within_the_budget():
    assert dyn.dynamics_every(64, 512, row_bytes=1000, budget=10_000) == 64          # 8 rows fit
    assert dyn.dynamics_every(64, 512, row_bytes=1000, budget=3_000) == 3 * 64      # every 3rd row
    # The paper's runs: 16,384 stats rows of EDM2-S; their dynamics would need far more than stats.jsonl
    # may hold, so they come in one row of several, within half the limit.
    from mpdiff.presets import PRESETS
    preset = PRESETS["edm2-img512-s"]
    net = build_network(preset.network, device="meta")
    row = dyn.estimated_row_bytes(dyn.block_modules(net), dyn.layer_weights(net))
    every = dyn.dynamics_every(preset.cadence.status_nimg, preset.training.duration, row)
    assert every > preset.cadence.status_nimg and every % preset.cadence.status_nimg == 0
    assert preset.training.duration / every * row <= dyn.ROW_BUDGET_BYTES


# ---- a training run -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """TINY_RUN with dynamics (and TensorBoard events) and without."""
    root = tmp_path_factory.mktemp("dynamics")
    train_tiny(root / "with", tensorboard=True)
    train_tiny(root / "without", dynamics=False)
    return root / "with", root / "without"


@pytest.mark.slow
def test_every_stats_row_carries_the_dynamics_and_the_weights_do_not_change(runs):
    with_dynamics, without = runs
    rows = read_jsonl(with_dynamics / "stats.jsonl")
    assert [r["nimg"] for r in rows] == list(range(64, 513, 64))
    config = NetworkConfig.from_dict(json.loads((with_dynamics / "config.json").read_text())["network"])
    net = build_network(config, device="meta")
    blocks, layers = list(dyn.block_modules(net)), list(dyn.layer_weights(net))
    for row in rows:
        d = row["dynamics"]
        assert list(d["act"]) == blocks and list(d["weight"]) == layers and list(d["update"]) == layers
        assert all(0.1 < v < 10 for v in d["act"].values())
        assert all(v == pytest.approx(1, abs=1e-3) for v in d["weight"].values())  # forced weight norm
        assert d["seconds"] >= 0
    late = rows[-1]["dynamics"]["update"]                                         # Adam moves every layer
    assert all(0 < v < 10 * rows[-1]["lr"] for v in late.values())
    assert not any("dynamics" in r for r in read_jsonl(without / "stats.jsonl"))
    for nimg in (384, 512):
        ref, got = load_tensors(ckpt(without, nimg))[0], load_tensors(ckpt(with_dynamics, nimg))[0]
        assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref), nimg
    assert sorted(os.listdir(with_dynamics / "snapshots")) == sorted(os.listdir(without / "snapshots"))
    for name in os.listdir(without / "snapshots"):
        ref, got = load_tensors(without / "snapshots" / name)[0], load_tensors(with_dynamics / "snapshots" / name)[0]
        assert all(torch.equal(ref[k], got[k]) for k in ref), name


@pytest.mark.slow
def test_the_dynamics_are_tensorboard_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs[0] / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("dynamics/act/enc.8x8_block0", "dynamics/weight/enc.8x8_block0.conv_res0",
                "dynamics/update/dec.8x8_block2.conv_res1", "dynamics/act/dec.8x8_block2"):
        assert tag in tags
        assert [e.step for e in events.Scalars(tag)] == list(range(64, 513, 64))
    rows = read_jsonl(runs[0] / "stats.jsonl")
    first = events.Scalars("dynamics/act/enc.8x8_block0")[0].value
    assert first == pytest.approx(rows[0]["dynamics"]["act"]["enc.8x8_block0"], rel=1e-6)


@pytest.mark.slow
def test_a_run_resumed_with_dynamics_switched_on_matches_bit_for_bit(runs, tmp_path):
    # --dynamics is a runtime option: the first half without, the second with; the weights and the
    # dynamics of the second half equal those of the uninterrupted run.
    d = tmp_path / "sliced"
    train_tiny(d, dynamics=False, slice_nimg=256)
    train_tiny(d, slice_nimg=256)
    ref, got = load_tensors(ckpt(runs[0], 512))[0], load_tensors(ckpt(d, 512))[0]
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    rows = {r["nimg"]: r for r in read_jsonl(d / "stats.jsonl")}
    assert [n for n, r in rows.items() if "dynamics" in r] == [320, 384, 448, 512]
    for r in read_jsonl(runs[0] / "stats.jsonl"):
        if r["nimg"] > 256:
            mine = rows[r["nimg"]]["dynamics"]
            assert all(mine[k] == r["dynamics"][k] for k in ("act", "weight", "update")), r["nimg"]


@pytest.mark.slow
def test_a_run_over_the_budget_says_which_rows_carry_dynamics(tmp_path, monkeypatch):
    # 8 rows of 1000 bytes against a budget of 3000: dynamics in every 3rd row, and in the invocation's last.
    monkeypatch.setattr(dyn, "estimated_row_bytes", lambda blocks, layers, skips=0: 1000)
    monkeypatch.setattr(dyn, "ROW_BUDGET_BYTES", 3000)
    d = tmp_path / "run"
    assert train_tiny(d, slice_nimg=256).dynamics.every == 192
    rows = read_jsonl(d / "stats.jsonl")
    assert [r["nimg"] for r in rows] == [64, 128, 192, 256]
    assert [r["nimg"] for r in rows if "dynamics" in r] == [192, 256]
    assert all("update" in r["dynamics"] for r in rows if "dynamics" in r)
    assert "dynamics  in one stats row of every 3 (every 192 images)" in (d / "log.txt").read_text()


# ---- mpdiff plot-dynamics -------------------------------------------------------------------------------

@pytest.mark.slow
def test_plot_dynamics_writes_the_pngs_and_names_them(runs, tmp_path):
    result = run_cli("plot-dynamics", runs[0], "--out", tmp_path / "figures")
    assert result.exit_code == 0, result.output
    printed = result.stdout.splitlines()
    assert printed == [str(tmp_path / "figures" / name) for name in DYNAMICS_PLOT_FILES]  # skips, stability too
    for path in printed:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000
    assert not [n for n in os.listdir(tmp_path / "figures") if n.endswith(".tmp")]
    default = run_cli("plot-dynamics", runs[0])
    assert default.exit_code == 0, default.output
    assert default.stdout.splitlines() == [str(runs[0] / "plots" / name) for name in DYNAMICS_PLOT_FILES]


@pytest.mark.slow
def test_plot_dynamics_of_a_run_without_them_is_one_line(runs):
    result = run_cli("plot-dynamics", runs[1])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [(f"error: {runs[1] / 'stats.jsonl'}: no stats row holds training "
                                           f"dynamics; train with --dynamics (the default) to record them")]
    assert not os.path.exists(runs[1] / "plots")
    missing = run_cli("plot-dynamics", runs[1] / "nowhere")
    assert missing.exit_code == 1 and missing.stderr.strip() == f"error: {runs[1] / 'nowhere'}: not a directory; " \
                                                                 f"expected a run directory"


def test_blocks_average_their_layers():
    values = {"enc.a.conv0": 1.0, "enc.a.conv1": 3.0, "enc.b": 5.0, "out_conv": 7.0, "dec.c.x": float("nan")}
    got = per_block(values)
    assert got["enc.a"] == 2.0 and got["enc.b"] == 5.0 and "out_conv" not in got and math.isnan(got["dec.c"])


# ---- ScaleLong's stability measurements (issue 13) ----------------------------------------------------

class Tripler(nn.Module):
    """A backbone F(u) = 3u: its sensitivity to any input perturbation is exactly 3."""

    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleDict()
        self.dec = nn.ModuleDict()

    def forward(self, x, noise_labels, class_labels):
        return 3 * x


def test_sensitivity_is_the_output_change_over_the_input_change():
    from mpdiff.nn.precond import Preconditioner

    net = Preconditioner(Tripler(), img_resolution=8, img_channels=1)
    images = torch.randint(0, 256, [20, 1, 8, 8], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    probe = dyn.make_probe(images, None, P_mean=-0.4, P_std=1.0, seed=0)
    got = dyn.probe_statistics(net, probe, micro_batch=7)
    assert got["sensitivity"] == pytest.approx(3.0, rel=1e-5)
    assert got["skip_in"] == {} and got["skip_out"] == {}     # a backbone without long skips
    # And a real network (config C: G's zero output gain would make F = 0 at init): finite, positive,
    # the same on a second call (the perturbation has its own generator).
    real = build_network(NetworkConfig(img_resolution=8, img_channels=1, label_dim=0, model_channels=8,
                                       channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), config="C"))
    first = dyn.probe_statistics(real, probe)["sensitivity"]
    assert math.isfinite(first) and first > 0 and dyn.probe_statistics(real, probe)["sensitivity"] == first


@pytest.mark.parametrize("mode", ["none", "cs"])
def test_skip_rms_before_and_after_scaling(mode):
    config = NetworkConfig(img_resolution=8, img_channels=1, label_dim=0, model_channels=8, channel_mult=(1, 2),
                           num_blocks=1, attn_resolutions=(), skip_scaling=mode, kappa=0.5)
    net = build_network(config)
    images = torch.randint(0, 256, [12, 1, 8, 8], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    probe = dyn.make_probe(images, None, P_mean=-0.4, P_std=1.0, seed=0)
    got = dyn.probe_statistics(net, probe, sensitivity=False)
    skips = net.unet.skips
    assert list(got["skip_in"]) == list(got["skip_out"]) == [f"skip{s.index}" for s in skips]
    for skip in skips:
        name = f"skip{skip.index}"
        factor = 0.5 ** skip.index if mode == "cs" else 1.0   # cs: kappa^(i-1), outermost unscaled
        assert got["skip_out"][name] == pytest.approx(factor * got["skip_in"][name], rel=1e-5)
    assert "sensitivity" not in got


def test_stats_rows_carry_the_gradient_norm_and_the_dynamics(tmp_path):
    # The norm itself: tests/test_loss.py::test_clean_gradients_zeroes_nonfinite_entries_and_measures_the_cleaned_norm
    train_tiny(tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "stats.jsonl")
    assert all(0 < r["grad_norm"] <= r["grad_norm_max"] for r in rows)
    assert all("sensitivity" in r["dynamics"] and r["dynamics"]["skip_in"] for r in rows if "dynamics" in r)
