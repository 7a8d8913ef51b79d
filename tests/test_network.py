"""Config-G U-Net and preconditioning (SPEC §1.1, §3; issue 3)."""

import pytest
import torch

from conftest import tiny_config
from mpdiff import build_network
from mpdiff.checkpoint import load_network, save_network
from mpdiff.compat import infer_config, load_edm2
from mpdiff.networks import Block
from mpdiff.presets import PRESETS


def _randomize_gains(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.copy_(torch.randn([], generator=g))


def _inputs(n=6, res=16, ch=3, label_dim=10):
    sigma = torch.tensor([0.002, 0.02, 0.3, 2.0, 20.0, 80.0])[:n]
    x = torch.randn(n, ch, res, res) * (0.5 + sigma.view(-1, 1, 1, 1))
    labels = torch.nn.functional.one_hot(torch.arange(n) % label_dim, label_dim).float()
    return x, sigma, labels


def test_module_names_match_official_layout():
    net = build_network(PRESETS["edm2-img512-xs"].network, device="meta")
    keys = set(net.state_dict())
    for key in ["unet.enc.64x64_conv.weight", "unet.enc.32x32_down.conv_res0.weight",
                "unet.dec.8x8_in0.attn_qkv.weight", "unet.emb_fourier.freqs", "unet.out_gain",
                "logvar_fourier.phases", "logvar_linear.weight", "unet.dec.64x64_block3.conv_skip.weight"]:
        assert key in keys
    # 16 long skips, 15 attention blocks (SPEC §3.5).
    blocks = [m for m in net.unet.modules() if isinstance(m, Block)]
    assert sum(b.num_heads > 0 for b in blocks) == 15
    assert len(net.unet.enc) == 16


@pytest.mark.parametrize("name,mparams", [("edm2-img512-xs", 124.71), ("edm2-img512-s", 280.21),
                                          ("edm2-img512-m", 497.81), ("edm2-img512-l", 777.50),
                                          ("edm2-img512-xl", 1119.28), ("edm2-img512-xxl", 1523.16)])
def test_parameter_counts_match_paper(name, mparams):
    net = build_network(PRESETS[name].network, device="meta")
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(mparams, abs=0.006)


def test_init_output_is_c_skip_times_x():
    net = build_network(tiny_config())
    x, sigma, labels = _inputs()
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    for mode in (net.train, net.eval):
        mode()
        D = net(x, sigma, labels)
        assert torch.equal(D, c_skip.view(-1, 1, 1, 1) * x)


def test_preconditioning_formulas():
    net = build_network(tiny_config()).eval()
    _randomize_gains(net)
    x, sigma, labels = _inputs()
    seen = {}

    def fake_unet(x_in, c_noise, class_labels):
        seen.update(x_in=x_in, c_noise=c_noise, labels=class_labels)
        return torch.full_like(x_in, 0.5)

    net.unet.forward = fake_unet
    D = net(x, sigma, labels)
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(seen["x_in"], x / (s ** 2 + 0.25).sqrt())
    assert torch.allclose(seen["c_noise"], sigma.log() / 4)
    assert torch.allclose(D, 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / (s ** 2 + 0.25).sqrt() * 0.5)


def test_activations_stay_near_unit_magnitude_at_init():
    # Every block output of a randomly initialised network has RMS near 1 for unit-variance
    # input at every noise level (the point of magnitude preservation).
    config = tiny_config(model_channels=64, channels_per_head=32)
    net = build_network(config).eval()
    rms = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: rms.setdefault(name, []).append(
        out.pow(2).mean().sqrt().item())) for name, m in net.unet.named_modules() if isinstance(m, Block)]
    sigma = torch.tensor([0.01, 0.5, 5.0, 50.0])
    x = torch.randn(4, 3, 16, 16) * (sigma ** 2 + 0.25).sqrt().view(-1, 1, 1, 1)  # c_in * x ~ unit
    with torch.no_grad():
        net(x, sigma, torch.eye(10)[:4])
    for h in hooks:
        h.remove()
    assert len(rms) == len([m for m in net.unet.modules() if isinstance(m, Block)])
    for name, values in rms.items():
        for v in values:
            assert 0.6 < v < 1.6, f"{name}: RMS {v:.3f}"


def test_unconditional_and_missing_labels():
    net = build_network(tiny_config(label_dim=0)).eval()
    _randomize_gains(net)
    x, sigma, _ = _inputs()
    with torch.no_grad():
        assert net(x, sigma).shape == x.shape
    cond = build_network(tiny_config()).eval()
    _randomize_gains(cond)
    with torch.no_grad():
        zeros = cond(x, sigma, torch.zeros(6, 10))
        assert torch.equal(cond(x, sigma, None), zeros)  # None = all-zero labels


def test_return_logvar_shape_and_value():
    net = build_network(tiny_config()).eval()
    x, sigma, labels = _inputs()
    with torch.no_grad():
        _, logvar = net(x, sigma, labels, return_logvar=True)
        expected = net.logvar_linear(net.logvar_fourier(sigma.log() / 4)).view(-1, 1, 1, 1)
    assert logvar.shape == (6, 1, 1, 1)
    assert torch.equal(logvar, expected)


def test_sdpa_attention_matches_reference_formula():
    a = build_network(tiny_config(attn_impl="matmul")).eval()
    _randomize_gains(a)
    b = build_network(tiny_config(attn_impl="sdpa")).eval()
    b.load_state_dict(a.state_dict())
    x, sigma, labels = _inputs()
    with torch.no_grad():
        ya, yb = a(x, sigma, labels), b(x, sigma, labels)
    assert ((ya - yb).norm() / ya.norm()).item() < 1e-5


def test_load_edm2_gives_identical_outputs():
    config = tiny_config()
    direct = build_network(config).eval()
    _randomize_gains(direct)
    sd = {k: v.clone() for k, v in direct.state_dict().items()}
    loaded = load_edm2(sd, channels_per_head=16)
    assert loaded.config.to_dict() == config.replace(use_fp16=True).to_dict()
    x, sigma, labels = _inputs()
    with torch.no_grad():
        assert torch.equal(direct(x, sigma, labels), loaded(x, sigma, labels))


def test_infer_config_for_released_sizes():
    for name in ["edm2-img512-xs", "edm2-img512-xxl", "edm2-img64-s"]:
        cfg = PRESETS[name].network
        sd = build_network(cfg, device="meta").state_dict()
        got = infer_config(sd)
        for key in ["img_resolution", "img_channels", "label_dim", "model_channels", "num_blocks"]:
            assert got[key] == getattr(cfg, key)
        assert tuple(got["channel_mult"]) == cfg.channel_mult
        assert tuple(got["attn_resolutions"]) == cfg.attn_resolutions


def test_load_edm2_rejects_bad_state_dicts():
    from mpdiff.errors import CheckpointError
    sd = build_network(tiny_config()).state_dict()
    with pytest.raises(CheckpointError, match="unknown keyword"):
        load_edm2(sd, not_an_option=1)
    bad = dict(sd)
    bad["unet.out_conv.weight"] = torch.zeros(3, 5, 3, 3)
    with pytest.raises(CheckpointError, match="unet.out_conv.weight"):
        load_edm2(bad, channels_per_head=16)
    with pytest.raises(CheckpointError, match="EDM2 layout"):
        load_edm2({"foo": torch.zeros(1)})


def test_network_file_round_trip(tmp_path):
    config = tiny_config()
    net = build_network(config).eval()
    _randomize_gains(net)
    path = tmp_path / "net.safetensors"
    save_network(path, net.state_dict(), config, nimg=1234)
    loaded, meta = load_network(path)
    assert meta["nimg"] == 1234 and meta["network"] == config.to_dict()
    x, sigma, labels = _inputs()
    with torch.no_grad():
        assert torch.equal(net(x, sigma, labels), loaded(x, sigma, labels))
    # A file is plain safetensors: no pickle opcodes anywhere.
    assert b"\x80\x04" not in path.read_bytes()[:8]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda_close_to_fp32():
    net = build_network(tiny_config(use_fp16=True), device="cuda").eval()
    _randomize_gains(net)
    x, sigma, labels = (t.cuda() for t in _inputs())
    with torch.no_grad():
        half = net(x, sigma, labels)
        full = net(x, sigma, labels, force_fp32=True)
    assert half.dtype == torch.float32
    assert ((half - full).norm() / full.norm()).item() < 1e-2
