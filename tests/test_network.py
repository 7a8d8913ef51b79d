"""Config-G U-Net and preconditioning (SPEC §1.1, §3; issue 3)."""

import json
import pickle
import zipfile

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open

from mpdiff import build_network
from mpdiff.nn.compat import infer_config, load_edm2
from mpdiff.nn.layout import unet_layout
from mpdiff.nn.precond import Preconditioner, edm_coefficients
from mpdiff.nn.primitives import mp_cat_weights
from mpdiff.nn.unet import Block
from mpdiff.presets import PRESETS
from mpdiff.storage.network_files import load_network, save_network


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


# SPEC §3.5 for size S (C0 = 192): encoder (name, in, out, attention) and decoder
# (name, main-path in, skip in, out, attention, index of the encoder module whose output is the skip).
_S_ENCODER = [
    ("64x64_conv", 5, 192, False), ("64x64_block0", 192, 192, False), ("64x64_block1", 192, 192, False),
    ("64x64_block2", 192, 192, False), ("32x32_down", 192, 192, False), ("32x32_block0", 192, 384, False),
    ("32x32_block1", 384, 384, False), ("32x32_block2", 384, 384, False), ("16x16_down", 384, 384, False),
    ("16x16_block0", 384, 576, True), ("16x16_block1", 576, 576, True), ("16x16_block2", 576, 576, True),
    ("8x8_down", 576, 576, False), ("8x8_block0", 576, 768, True), ("8x8_block1", 768, 768, True),
    ("8x8_block2", 768, 768, True),
]
_S_DECODER = [
    ("8x8_in0", 768, 0, 768, True, None), ("8x8_in1", 768, 0, 768, False, None),
    ("8x8_block0", 768, 768, 768, True, 15), ("8x8_block1", 768, 768, 768, True, 14),
    ("8x8_block2", 768, 768, 768, True, 13), ("8x8_block3", 768, 576, 768, True, 12),
    ("16x16_up", 768, 0, 768, False, None),
    ("16x16_block0", 768, 576, 576, True, 11), ("16x16_block1", 576, 576, 576, True, 10),
    ("16x16_block2", 576, 576, 576, True, 9), ("16x16_block3", 576, 384, 576, True, 8),
    ("32x32_up", 576, 0, 576, False, None),
    ("32x32_block0", 576, 384, 384, False, 7), ("32x32_block1", 384, 384, 384, False, 6),
    ("32x32_block2", 384, 384, 384, False, 5), ("32x32_block3", 384, 192, 384, False, 4),
    ("64x64_up", 384, 0, 384, False, None),
    ("64x64_block0", 384, 192, 192, False, 3), ("64x64_block1", 192, 192, 192, False, 2),
    ("64x64_block2", 192, 192, 192, False, 1), ("64x64_block3", 192, 192, 192, False, 0),
]


def _layout_of(config):
    return unet_layout(config.img_resolution, config.img_channels, config.model_channels, config.channel_mult,
                       config.num_blocks, config.attn_resolutions)


def test_layout_of_img512_s_matches_spec_and_state_dict():
    config = PRESETS["edm2-img512-s"].network
    layout = _layout_of(config)
    enc_names = [name for name, *_ in _S_ENCODER]
    assert [(s.name, s.in_channels, s.out_channels, s.attention) for s in layout.encoder] == _S_ENCODER
    assert [(s.name, s.in_channels, s.out_channels, s.attention, s.skip_from) for s in layout.decoder] == [
        (name, main + skip, out, attn, None if src is None else enc_names[src])
        for name, main, skip, out, attn, src in _S_DECODER]
    assert [s.resample for s in layout.encoder if s.resample != "keep"] == ["down"] * 3
    assert [s.name for s in layout.decoder if s.resample == "up"] == ["16x16_up", "32x32_up", "64x64_up"]

    # The state_dict of a real build has the same modules in the same order.
    with torch.device("meta"):
        net = build_network(config, device="meta")
    for part, specs in (("enc", layout.encoder), ("dec", layout.decoder)):
        prefixes = []
        for key in net.state_dict():
            fields = key.split(".")
            if fields[:2] == ["unet", part] and fields[2] not in prefixes:
                prefixes.append(fields[2])
        assert prefixes == [s.name for s in specs]
    assert net.unet.layout == layout


def test_long_skips_are_last_in_first_out():
    for config in (tiny_config(), PRESETS["edm2-img512-xs"].network, PRESETS["digits"].network):
        layout = _layout_of(config)
        skips = layout.skips
        # Every encoder output is one skip; the outermost skip leaves first and arrives last.
        assert [s.index for s in skips] == list(range(len(layout.encoder)))
        assert [s.source for s in skips] == [e.name for e in layout.encoder]
        takers = [d.name for d in layout.decoder if d.skip_from is not None]
        assert [s.target for s in skips] == takers[::-1]
        widths = {e.name: e.out_channels for e in layout.encoder}
        assert all(s.channels == widths[s.source] for s in skips)


def test_declared_skips_are_what_forward_concatenates():
    net = build_network(tiny_config()).eval()
    _randomize_gains(net)
    unet = net.unet
    enc_out, dec_in = {}, {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: enc_out.__setitem__(name, out.clone()))
             for name, m in unet.enc.items()]
    hooks += [m.register_forward_pre_hook(lambda mod, args, name=name: dec_in.__setitem__(name, args[0].clone()))
              for name, m in unet.dec.items()]
    with torch.no_grad():
        net(*_inputs())
    for h in hooks:
        h.remove()

    # Find, for every decoder module, which encoder output (if any) fills its trailing channels,
    # scaled by mp_cat's skip factor.
    used = []
    for target, x in dec_in.items():
        matches = []
        for source, skip in enc_out.items():
            main = x.shape[1] - skip.shape[1]
            if main > 0 and skip.shape[2:] == x.shape[2:]:
                scale = mp_cat_weights(main, skip.shape[1], unet.concat_balance)[1]
                if torch.equal(x[:, main:], scale * skip):
                    matches.append(source)
        assert len(matches) <= 1, (target, matches)
        used += [(matches[0], target)] if matches else []
    assert used[::-1] == [(s.source, s.target) for s in unet.skips]
    assert len(used) == len(unet.enc)


def test_init_output_is_c_skip_times_x():
    net = build_network(tiny_config())
    x, sigma, labels = _inputs()
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    for mode in (net.train, net.eval):
        mode()
        D = net(x, sigma, labels)
        assert torch.equal(D, c_skip.view(-1, 1, 1, 1) * x)


class _RecordingBackbone(torch.nn.Module):
    """Stands in for the U-Net: remembers its inputs and returns a constant F."""

    def __init__(self, value=0.5):
        super().__init__()
        self.value = value
        self.seen = {}

    def forward(self, x_in, c_noise, class_labels):
        self.seen.update(x_in=x_in, c_noise=c_noise, labels=class_labels)
        return torch.full_like(x_in, self.value)


def test_preconditioning_formulas():
    # Any backbone F(x, noise_labels, class_labels) can be preconditioned (Eq. 4-8).
    backbone = _RecordingBackbone(0.5)
    net = Preconditioner(backbone, img_resolution=16, img_channels=3, label_dim=10, use_fp16=False)
    x, sigma, labels = _inputs()
    D = net(x, sigma, labels)
    s = sigma.view(-1, 1, 1, 1)
    seen = backbone.seen
    assert torch.allclose(seen["x_in"], x / (s ** 2 + 0.25).sqrt())
    assert torch.allclose(seen["c_noise"], sigma.log() / 4)
    assert torch.equal(seen["labels"], labels)
    assert torch.allclose(D, 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / (s ** 2 + 0.25).sqrt() * 0.5)
    assert net.backbone is backbone and list(net.state_dict()) == ["logvar_fourier.freqs", "logvar_fourier.phases",
                                                                   "logvar_linear.weight"]


def test_edm_coefficients_limits():
    sigma_data = 0.5
    c_skip, c_out, c_in, c_noise = edm_coefficients(torch.tensor([1e-4, 0.5, 1e4]), sigma_data)
    # sigma -> 0: D = x; sigma -> inf: D = sigma_data * F; at sigma = sigma_data both weigh equally.
    assert c_skip[0] == pytest.approx(1.0) and c_out[0] == pytest.approx(1e-4, rel=1e-3)
    assert c_skip[2] == pytest.approx(0.0, abs=1e-8) and c_out[2] == pytest.approx(sigma_data, rel=1e-6)
    assert c_skip[1] == pytest.approx(0.5) and c_out[1] == pytest.approx(sigma_data / 2 ** 0.5)
    # c_in gives the backbone unit-variance input: Var[c_in (y + n)] = c_in^2 (sigma_data^2 + sigma^2) = 1.
    assert torch.allclose(c_in ** 2 * (sigma_data ** 2 + torch.tensor([1e-4, 0.5, 1e4]) ** 2), torch.ones(3))
    assert torch.allclose(c_noise, torch.tensor([1e-4, 0.5, 1e4]).log() / 4)


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
    # The file is plain safetensors: an 8-byte little-endian header length, a JSON header, and a data
    # section that the header's offsets tile exactly. Nothing in it is a pickle or a torch zip archive.
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    state = net.state_dict()
    assert set(entries) == set(state)
    spans = sorted(tuple(e["data_offsets"]) for e in entries.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - header_len
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for key, entry in entries.items():
        assert entry["dtype"] == "F32" and entry["shape"] == list(state[key].shape)
        assert entry["data_offsets"][1] - entry["data_offsets"][0] == 4 * state[key].numel()
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["nimg"]) == 1234
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), state[key])
    assert not zipfile.is_zipfile(path)
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(raw)


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
