"""ScaleLong: scaled long skip connections (CS, CS-MP, LS) on the U-Net and the UViT backbone (SPEC §9).

Everything here uses the digits preset's network (8x8x1, 10 classes) or a small UViT built from it
(32 wide, depth 4, patch 2: 18 tokens); each test takes well under a few seconds.
"""

import contextlib
import json
import math

import pytest
import torch
from conftest import run_cli
from torch import nn

from mpdiff import build_network
from mpdiff.config import RunOptions
from mpdiff.diffusion.loss import edm2_loss
from mpdiff.errors import ConfigError
from mpdiff.loading import resolve_network
from mpdiff.nn.flops import count_flops, count_params, describe_preset
from mpdiff.nn.primitives import mp_cat, mp_cat_weights
from mpdiff.nn.skips import (
    GATE_REDUCTION,
    KAPPA_RULES,
    MODES,
    SkipGate,
    SkipScaling,
    check_skip_options,
    mp_balance,
    skip_coefficients,
)
from mpdiff.nn.unet import UNet
from mpdiff.nn.uvit import UViT
from mpdiff.presets import PRESETS
from mpdiff.storage.network_files import load_network, save_network

DIGITS = PRESETS["digits"].network
UVIT = {"backbone": "uvit", "model_channels": 32, "depth": 4, "patch_size": 2, "channels_per_head": 16}
UVIT_TOKENS = 2 + (8 // 2) ** 2  # noise + class token, 4x4 patches


def _inputs(n=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=generator)
    sigma = torch.tensor([0.3, 2.0, 0.05, 10.0])[:n]
    labels = torch.eye(10)[torch.arange(n) % 10]
    return x, sigma, labels


def _live(net):
    """Give the scalar gains (config G's output and embedding gains start at zero, making F = 0 and
    the output independent of every skip) fixed nonzero values; returns `net`."""
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.3)
    return net


def _build(**changes):
    return _live(build_network(DIGITS.replace(**changes)))


@contextlib.contextmanager
def _recording(scaling):
    """Record (skip in, index, skip out) of every call of a SkipScaling module."""
    calls = []

    def hook(module, args, output):
        skip, index = args
        calls.append((skip.detach().clone(), index, output.detach().clone()))

    handle = scaling.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


@contextlib.contextmanager
def _decoder_inputs(unet):
    """For every long skip i: the encoder output (source), the main path entering the join (the output
    of the decoder module just before the target) and the tensor the target block receives."""
    names = list(unet.dec)
    seen = {"enc": {}, "dec_out": {}, "dec_in": {}}
    handles = []
    for skip in unet.skips:
        handles.append(unet.enc[skip.source].register_forward_hook(
            lambda m, a, out, name=skip.source: seen["enc"].__setitem__(name, out.detach().clone())))
        before = names[names.index(skip.target) - 1]
        handles.append(unet.dec[before].register_forward_hook(
            lambda m, a, out, name=before: seen["dec_out"].__setitem__(name, out.detach().clone())))
        handles.append(unet.dec[skip.target].register_forward_pre_hook(
            lambda m, a, name=skip.target: seen["dec_in"].__setitem__(name, a[0].detach().clone())))
    try:
        yield seen, names
    finally:
        for handle in handles:
            handle.remove()


# ---- constant scaling (CS) ------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["C", "G"])
def test_cs_scales_the_ith_skip_by_kappa_to_the_i_minus_1(config):
    net = _build(config=config, skip_scaling="cs", kappa=0.7)
    scaling, skips = net.unet.skip_scaling, net.unet.skips
    assert len(skips) == 9 and [s.index for s in skips] == list(range(9))
    assert scaling.coefficients == tuple(0.7 ** i for i in range(9)) and scaling.coefficients[0] == 1.0
    with _recording(scaling) as calls, torch.no_grad():
        net(*_inputs())
    assert sorted(index for _, index, _ in calls) == list(range(len(skips)))  # each skip once
    for skip, index, out in calls:
        assert skip.shape[1] == skips[index].channels
        assert torch.equal(out, skip * 0.7 ** index), index
    outermost = next(c for c in calls if c[1] == 0)
    assert torch.equal(outermost[2], outermost[0])  # i = 1: unscaled


@pytest.mark.parametrize("rule", ["level", "all"])
def test_cs_kappa_rules_level_and_all(rule):
    net = _build(config="C", skip_scaling="cs", kappa=0.7, kappa_rule=rule)
    skips = net.unet.skips
    expected = {s.index: 0.7 ** s.level if rule == "level" else 0.7 for s in skips}
    assert sorted({s.level for s in skips}) == [0, 1, 2]  # the rules differ from 'skip' here
    with _recording(net.unet.skip_scaling) as calls, torch.no_grad():
        net(*_inputs())
    assert sorted(index for _, index, _ in calls) == list(range(len(skips)))
    for skip, index, out in calls:
        assert torch.equal(out, skip * expected[index]), index
    assert skip_coefficients(3, 0.5, "level", [2, 0, 1]) == (0.25, 1.0, 0.5)
    assert skip_coefficients(3, 0.5, "all") == (0.5, 0.5, 0.5)
    assert skip_coefficients(3, 0.5, "skip") == (1.0, 0.5, 0.25)


def test_cs_join_concatenates_the_scaled_skip_in_config_c():
    net = _build(config="C", skip_scaling="cs", kappa=0.7)
    unet = net.unet
    specs = {spec.name: spec for spec in unet.layout.decoder}
    with _decoder_inputs(unet) as (seen, names), torch.no_grad():
        net(*_inputs())
    for skip in unet.skips:
        joined = seen["dec_in"][skip.target]
        main = seen["dec_out"][names[names.index(skip.target) - 1]]
        encoded = seen["enc"][skip.source]
        assert joined.shape[1] == main.shape[1] + skip.channels == specs[skip.target].in_channels
        assert torch.equal(joined[:, -skip.channels:], encoded * 0.7 ** skip.index), skip
        assert torch.equal(joined[:, :-skip.channels], main), skip  # plain concatenation, main path first


# ---- 'none' and 'cs' add nothing ----------------------------------------------------------------------

@pytest.mark.parametrize("config", ["C", "G"])
def test_none_and_cs_add_no_parameters_and_kappa_1_changes_nothing(config):
    def seeded(**changes):
        torch.manual_seed(5)
        return _build(config=config, **changes)

    default, none = seeded(), seeded(skip_scaling="none")
    cs1, cs_half = seeded(skip_scaling="cs", kappa=1.0), seeded(skip_scaling="cs", kappa=0.5)
    reference = default.state_dict()
    assert not any("skip_scaling" in key for key in reference)
    for net in (none, cs1, cs_half):
        state = net.state_dict()
        assert list(state) == list(reference)
        assert all(torch.equal(state[key], reference[key]) for key in reference)
        assert count_params(net) == count_params(default)
    with torch.no_grad():
        inputs = _inputs(4)
        out = default(*inputs)
        assert torch.equal(none(*inputs), out)
        assert torch.equal(cs1(*inputs), out)  # kappa = 1: bit-identical
        assert not torch.allclose(cs_half(*inputs), out, rtol=1e-3, atol=1e-4)  # the skips matter


# ---- magnitude-preserving constant scaling (CS-MP, config G) --------------------------------------------

def test_mp_balance_keeps_unit_magnitude_and_gives_the_ratio_kappa():
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(8, 48, 16, 16, generator=generator)   # main path, 48 channels
    b = torch.randn(8, 80, 16, 16, generator=generator)   # skip, 80 channels
    for t in (0.5, 0.3):
        for k in (0.9, 0.5, 0.2):
            ti = mp_balance(k, t)
            assert ti / (1 - ti) == pytest.approx(k * t / (1 - t), rel=1e-12)
    assert mp_balance(1.0, 0.5) == 0.5
    for k in (1.0, 0.7, 0.3):
        ti = mp_balance(k, 0.5)
        out = mp_cat(a, b, t=ti)
        assert out.square().mean().sqrt().item() == pytest.approx(1.0, abs=0.02)
        raw = mp_cat(a, k * b, t=0.5)  # cs then the plain MP concatenation
        factor = out[:, :48].norm() / raw[:, :48].norm()
        torch.testing.assert_close(out, raw * factor, rtol=1e-5, atol=1e-6)
        scale_a, scale_b = mp_cat_weights(48, 80, ti)
        assert (scale_b * math.sqrt(80)) / (scale_a * math.sqrt(48)) == pytest.approx(k, rel=1e-12)
    # Without the rebalance, a small kappa shrinks the concatenated tensor: RMS sqrt((1 + k^2) / 2).
    assert mp_cat(a, 0.3 * b, t=0.5).square().mean().sqrt().item() == pytest.approx(math.sqrt(1.09 / 2), abs=0.02)


def test_cs_mp_leaves_the_skip_and_rebalances_the_concatenation():
    net = _build(config="G", skip_scaling="cs-mp", kappa=0.7)
    unet = net.unet
    scaling = unet.skip_scaling
    assert unet.concat_balance == 0.5
    for skip in unet.skips:
        assert scaling.balance(skip.index, 0.5) == mp_balance(0.7 ** skip.index, 0.5)
    assert scaling.balance(0, 0.5) == 0.5 and scaling.balance(3, 0.5) < scaling.balance(1, 0.5) < 0.5
    with _recording(scaling) as calls, _decoder_inputs(unet) as (seen, names), torch.no_grad():
        net(*_inputs())
    assert sorted(index for _, index, _ in calls) == list(range(len(unet.skips)))
    for skip, index, out in calls:
        assert torch.equal(out, skip), index  # cs-mp does not scale the skip itself
    for skip in unet.skips:
        joined = seen["dec_in"][skip.target]
        main = seen["dec_out"][names[names.index(skip.target) - 1]]
        expected = mp_cat(main, seen["enc"][skip.source], t=mp_balance(0.7 ** skip.index, 0.5))
        torch.testing.assert_close(joined, expected, rtol=1e-6, atol=1e-6)


# ---- learned scaling (LS) -----------------------------------------------------------------------------

def test_uvit_ls_has_one_token_gate_shared_by_all_skips():
    net = _build(**UVIT, skip_scaling="ls")
    uvit = net.unet
    assert isinstance(uvit, UViT) and len(uvit.skips) == 2
    scaling = uvit.skip_scaling
    assert list(scaling.gates) == ["all"]
    gate = scaling.gates["all"]
    assert all(scaling.gate(s.index) is gate for s in uvit.skips)
    L, hidden = UVIT_TOKENS, UVIT_TOKENS // GATE_REDUCTION
    assert isinstance(gate, SkipGate) and gate.squeeze_dims == (-1,) and gate.hidden == hidden == 1
    assert isinstance(gate.first, nn.Linear) and (gate.first.in_features, gate.first.out_features) == (L, hidden)
    assert isinstance(gate.second, nn.Linear) and (gate.second.in_features, gate.second.out_features) == (hidden, L)
    assert gate.first.bias is not None and gate.second.bias is not None
    # Created after the UViT's init pass: PyTorch's default (uniform) init, not zero biases.
    assert gate.second.bias.abs().sum() > 0 and gate.first.weight.std() > 0.05
    assert {k for k in net.state_dict() if "skip_scaling" in k} == {
        f"unet.skip_scaling.gates.all.{layer}.{p}" for layer in ("first", "second") for p in ("weight", "bias")}

    skip = torch.randn(3, L, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        c = gate.coefficients(skip)
        by_hand = torch.sigmoid(gate.second(torch.relu(gate.first(skip.mean(-1)))))[..., None]
        assert c.shape == (3, L, 1) and bool(((c > 0) & (c < 1)).all())
        torch.testing.assert_close(c, by_hand, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(scaling(skip, 1), skip * by_hand, rtol=1e-6, atol=1e-7)
    # In the network: every skip [N, L, D] goes through the gate.
    with _recording(scaling) as calls, torch.no_grad():
        net(*_inputs(3))
    assert sorted(index for _, index, _ in calls) == [0, 1]
    for s, index, out in calls:
        assert s.shape == (3, L, 32)
        torch.testing.assert_close(out, s * gate.coefficients(s), rtol=1e-6, atol=1e-7)


def test_uvit_ls_nonshared_has_one_gate_per_skip():
    scaling = _build(**dict(UVIT, depth=6), skip_scaling="ls-nonshared").unet.skip_scaling
    assert list(scaling.gates) == ["skip0", "skip1", "skip2"]
    gates = [scaling.gate(i) for i in range(3)]
    assert len({id(g) for g in gates}) == 3 and all(g is scaling.gates[f"skip{i}"] for i, g in enumerate(gates))


@pytest.mark.parametrize("config", ["C", "G"])
def test_unet_ls_shares_a_gate_per_width(config):
    unet = _build(config=config, skip_scaling="ls").unet
    scaling = unet.skip_scaling
    widths = sorted({s.channels for s in unet.skips})
    assert widths == [32, 64] and sorted(scaling.gates) == [f"width{w}" for w in widths]
    for skip in unet.skips:
        gate = scaling.gate(skip.index)
        assert gate is scaling.gates[f"width{skip.channels}"]
        assert gate.width == skip.channels and gate.hidden == max(1, skip.channels // 16)
        assert gate.squeeze_dims == (2, 3)
        assert tuple(gate.first.weight.shape[:2]) == (gate.hidden, skip.channels)
        assert tuple(gate.second.weight.shape[:2]) == (skip.channels, gate.hidden)
        # ScaleLong's layers in every config: plain linear layers with biases (no dead bottleneck).
        assert isinstance(gate.first, nn.Linear) and gate.first.bias is not None
        assert isinstance(gate.second, nn.Linear) and gate.second.bias is not None
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        c = scaling.gates["width64"].coefficients(x)
    assert c.shape == (2, 64, 1, 1) and bool(((c > 0) & (c < 1)).all())

    nonshared = _build(config=config, skip_scaling="ls-nonshared").unet.skip_scaling
    assert sorted(nonshared.gates, key=lambda k: int(k[4:])) == [f"skip{s.index}" for s in unet.skips]
    assert len({id(nonshared.gate(s.index)) for s in unet.skips}) == len(unet.skips)
    # Narrow skips still get a one-unit bottleneck.
    narrow = _build(model_channels=8, skip_scaling="ls").unet.skip_scaling
    assert sorted((g.width, g.hidden) for g in narrow.gates.values()) == [(8, 1), (16, 1)]
    assert SkipGate(40, (2, 3), nn.Linear).hidden == 2 and SkipGate(15, (2, 3), nn.Linear).hidden == 1


@pytest.mark.parametrize("changes", [dict(UVIT, skip_scaling="ls"), dict(UVIT, skip_scaling="ls-nonshared"),
                                     {"config": "G", "skip_scaling": "ls"},
                                     {"config": "G", "skip_scaling": "ls-nonshared"},
                                     {"config": "C", "skip_scaling": "ls"}],
                         ids=["uvit-ls", "uvit-nonshared", "unet-G-ls", "unet-G-nonshared", "unet-C-ls"])
def test_ls_gates_receive_gradients_and_train(changes):
    """One training step reaches every gate: every parameter of a bottleneck unit that is active (ReLU
    input > 0) for some sample gets a nonzero gradient, and Adam moves it. A unit that is off for every
    sample gets no gradient into its input weights (the U-Net's gates of configs C-G have no biases, so
    a whole gate can start that way: its coefficients then stay at sigmoid(0) = 1/2)."""
    net = _build(**changes).train()
    gates = net.unet.skip_scaling.gates
    active = {}  # gate key -> [hidden] bool: the unit's ReLU passes something for some sample

    def record(module, args, out, key):
        on = (out.detach() > 0).reshape(out.shape[0], -1).any(0)
        active[key] = on | active.get(key, torch.zeros_like(on))

    handles = [gate.first.register_forward_hook(lambda m, a, o, key=key: record(m, a, o, key))
               for key, gate in gates.items()]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(8, 1, 8, 8, generator=generator) * 0.5
    sigma = torch.exp(torch.randn(8, generator=generator) * 1.2 - 0.8)
    noise = torch.randn(8, 1, 8, 8, generator=generator)
    labels = torch.eye(10)[torch.arange(8)]
    loss = edm2_loss(net, images, labels, sigma=sigma, noise=noise).sum() / 8
    loss.backward()
    for handle in handles:
        handle.remove()
    assert sorted(active) == sorted(gates)  # every gate was used
    assert sum(int(on.sum()) for on in active.values()) > 0
    moving = []  # (parameter, mask of the entries that must move)
    for key, gate in gates.items():
        on = active[key]
        first, second = gate.first, gate.second
        assert first.weight.grad is not None and second.weight.grad is not None, key
        expected = {id(first.weight): on[:, None].expand_as(first.weight.grad.reshape(len(on), -1)),
                    id(second.weight): on[None, :].expand_as(second.weight.grad.reshape(-1, len(on)))}
        if getattr(first, "bias", None) is not None:
            expected[id(first.bias)] = on
            expected[id(second.bias)] = torch.ones_like(second.bias, dtype=torch.bool) if on.any() else \
                torch.zeros_like(second.bias, dtype=torch.bool)
        for p in gate.parameters():
            mask = expected[id(p)]
            grad = p.grad.reshape(mask.shape)
            assert torch.isfinite(grad).all(), key
            assert bool((grad[mask] != 0).all()), (key, "an active unit got no gradient")
            if p is first.weight:  # (the second layer's rows are weight-normalized in G: all entries couple)
                assert bool((grad[~mask] == 0).all()), (key, "a unit off for every sample got a gradient")
            moving.append((p, mask, p.detach().clone().reshape(mask.shape)))
    optimizer.step()
    for p, mask, before in moving:
        after = p.detach().reshape(mask.shape)
        assert bool((after[mask] != before[mask]).all())


# ---- the UViT end to end ------------------------------------------------------------------------------

def test_unpatchify_layout_pixel_by_pixel():
    # Token t = row * side + col holds patch (row, col); entry (py * p + px) * C + ch of it is pixel
    # (row * p + py, col * p + px) of channel ch. Checked entry by entry, not through an inverse.
    for channels, patch in ((1, 2), (3, 2), (3, 4), (2, 1)):
        uvit = UViT(img_resolution=8, img_channels=channels, label_dim=0, model_channels=16, depth=2,
                    patch_size=patch, channels_per_head=8)
        side = 8 // patch
        tokens = torch.randn(2, side * side, patch * patch * channels)
        image = uvit.unpatchify(tokens)
        assert image.shape == (2, channels, 8, 8)
        for row, col, py, px, ch in ((side - 1, min(1, side - 1), patch - 1, 0, channels - 1), (0, 0, 0, 0, 0),
                                     (min(1, side - 1), side - 1, 0, patch - 1, 0)):
            token = tokens[:, row * side + col, (py * patch + px) * channels + ch]
            assert torch.equal(image[:, ch, row * patch + py, col * patch + px], token)


def test_uvit_trains_samples_saves_reloads_and_is_counted(tmp_path, monkeypatch):
    from mpdiff.train.loop import train

    network = dict(UVIT, skip_scaling="ls")
    run_dir = tmp_path / "run"
    options = RunOptions(run_dir=str(run_dir), progress=False, tensorboard=False, grid_steps=2)
    trainer = train("digits", options, network=network, training={"batch": 32, "duration": 64},
                    cadence={"status_nimg": 32, "snapshot_nimg": 32, "checkpoint_nimg": 64, "sample_nimg": 32})
    assert trainer.nimg == 64
    assert "training complete at 64 images" in (run_dir / "log.txt").read_text()
    config = json.loads((run_dir / "config.json").read_text())["network"]
    assert {k: config[k] for k in network} == network
    assert (run_dir / "samples" / "grid-final.png").stat().st_size > 0
    assert (run_dir / "checkpoints" / "training-state-000000000064.safetensors").exists()

    trained = trainer.state.net.eval()
    assert isinstance(trained.unet, UViT) and list(trained.unet.skip_scaling.gates) == ["all"]
    inputs = _inputs(3)
    with torch.no_grad():
        expected = trained(*inputs)
    save_network(tmp_path / "net.safetensors", trained.state_dict(), trainer.resolved.network, nimg=64)
    for source in (tmp_path / "net.safetensors", run_dir):  # a network file, a run's newest snapshot
        net, _ = resolve_network(source)
        assert isinstance(net.unet, UViT) and net.unet.skip_scaling.mode == "ls"
        assert list(net.state_dict()) == list(trained.state_dict())
    net, _ = load_network(tmp_path / "net.safetensors")
    with torch.no_grad():
        assert torch.equal(net(*inputs), expected)
    assert torch.isfinite(expected).all()
    result = run_cli("generate", run_dir, "--seeds", "0-3", "--steps", "2", "--out", tmp_path / "out",
                     "--no-progress")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 4

    params = sum(p.numel() for p in trained.parameters())
    assert count_params(trained) == params
    counted = count_flops(trained)
    assert counted["params"] == params and counted["flops"] > 0
    described = describe_preset(PRESETS["digits"], **network)
    assert described["params"] == params and described["gflops"] > 0
    assert described["network"]["backbone"] == "uvit"
    # `mpdiff info` of a preset with this network.
    import dataclasses
    preset = dataclasses.replace(PRESETS["digits"], name="test-uvit", network=DIGITS.replace(**network))
    monkeypatch.setitem(PRESETS, "test-uvit", preset)
    result = run_cli("info", "test-uvit", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["params"] == params and info["gflops"] > 0


# ---- refusals -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message, field", [
    (dict(UVIT, skip_scaling="cs-mp"), r"cs-mp .*UViT joins its skips without one", "skip_scaling"),
    ({"config": "C", "skip_scaling": "cs-mp"}, r"cs-mp .*config C\) joins its skips without one", "skip_scaling"),
    ({"config": "F", "skip_scaling": "cs-mp"}, r"cs-mp .*config F\)", "skip_scaling"),
    ({"skip_scaling": "foo"}, r"^skip_scaling 'foo' is not one of none, cs, cs-mp, ls, ls-nonshared", "skip_scaling"),
    (dict(UVIT, skip_scaling="foo"), r"^skip_scaling 'foo' is not one of", "skip_scaling"),
    ({"skip_scaling": "cs", "kappa_rule": "pixel"}, r"^kappa_rule 'pixel' is not one of skip, level, all",
     "kappa_rule"),
    ({"skip_scaling": "cs", "kappa": 0.0}, r"^kappa must be in \(0, 1\] for constant skip scaling, got 0", "kappa"),
    ({"skip_scaling": "cs", "kappa": 1.5}, r"^kappa must be in \(0, 1\] .*got 1.5", "kappa"),
    ({"skip_scaling": "cs", "kappa": -0.5}, r"^kappa must be in \(0, 1\]", "kappa"),
    ({"skip_scaling": "cs", "kappa": float("nan")}, r"^kappa must be finite", "kappa"),  # in any mode
    ({"skip_scaling": "cs-mp", "kappa": 0.0}, r"^kappa must be in \(0, 1\]", "kappa"),
    (dict(UVIT, skip_scaling="cs", kappa=2.0), r"^kappa must be in \(0, 1\]", "kappa"),
    (dict(UVIT, config="C"), r"^config 'C': the ablation configs A-F are U-Net variants", "config"),
    (dict(UVIT, depth=3), r"^depth of a UViT must be a positive even number, got 3", "depth"),
    (dict(UVIT, depth=0), r"^depth of a UViT must be a positive even number, got 0", "depth"),
    (dict(UVIT, patch_size=3), r"^patch_size 3 does not divide the image resolution 8", "patch_size"),
    (dict(UVIT, channels_per_head=12), r"^model_channels 32 of a UViT must be a multiple", "model_channels"),
    ({"backbone": "vit"}, r"^backbone 'vit' is not one of unet, uvit", "backbone"),
])
def test_refused_options_name_the_problem(changes, message, field):
    with pytest.raises(ConfigError, match=message) as error:
        build_network(DIGITS.replace(**changes))
    assert field in error.value.fields


def test_accepted_edge_options():
    build_network(DIGITS.replace(config="G", skip_scaling="cs-mp", kappa=1.0))
    build_network(DIGITS.replace(**UVIT, skip_scaling="cs", kappa=1.0, kappa_rule="level"))
    build_network(DIGITS.replace(config="A", skip_scaling="ls-nonshared", kappa=7.0))  # kappa unused by ls
    assert MODES == ("none", "cs", "cs-mp", "ls", "ls-nonshared") and KAPPA_RULES == ("skip", "level", "all")
    check_skip_options("none", 99.0, "skip", 0, mp_concat=False, backbone="UNet")  # 'none' needs no skips
    with pytest.raises(ConfigError, match="has no long skip connections"):
        check_skip_options("cs", 0.5, "skip", 0, mp_concat=True, backbone="thing")
    assert isinstance(UNet(8, 1, 0, model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(),
                           skip_scaling="cs").skip_scaling, SkipScaling)


def test_refusal_on_the_command_line_names_the_flag(tmp_path):
    result = run_cli("train", "--backbone", "uvit", "--channels", "64", "--depth", "4", "--skip-scaling", "cs-mp",
                     "--run-dir", tmp_path / "run", "--batch", "32", "--duration", "64", "--no-progress")
    assert result.exit_code == 1
    assert "--skip-scaling" in result.output and "cs-mp" in result.output
    assert not (tmp_path / "run" / "config.json").exists()


def test_refused_network_options_leave_no_run_directory(tmp_path):
    from conftest import run_cli

    for flags in (["--skip-scaling", "cs-mp", "--config", "C"], ["--preset", "digits-uvit", "--depth", "3"],
                  ["--skip-scaling", "cs", "--kappa", "0"]):
        run_dir = tmp_path / "run"
        result = run_cli("train", *flags, "--run-dir", run_dir, "--duration", "256")
        assert result.exit_code != 0 and result.output.startswith("error: --"), result.output
        assert not run_dir.exists()
