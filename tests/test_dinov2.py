"""The DINOv2 ViT-L/14 feature network of FD_DINOv2 and its detector (mpdiff.metrics.dinov2).

No real weights are used: the full ViT-L/14 is only built on the meta device (keys, shapes, parameter
count), and everything that runs uses a small network of the same design. The functional check is
tests/fixtures/dinov2_ref.safetensors (made by tests/fixtures/ref_dinov2.py): facebookresearch/dinov2's own
ViT code, built with the released ViT-L/14's arguments at width 32, depth 2, 4 heads and a 3x3 position
grid, with seeded random weights, its features of fixed inputs, and EDM2's FD_DINOv2 detector
(calculate_metrics.py) run with that small network on fixed uint8 images.
"""

import importlib.util
import json
import pathlib

import pytest
import torch
import torch.nn.functional as F

from mpdiff.errors import MpdiffError
from mpdiff.metrics.dinov2 import (IMAGENET_MEAN, IMAGENET_STD, WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_URL, DinoV2Detector,
                                   DinoV2ViT, load_dinov2, vit_l14)

SMALL = dict(width=64, depth=2, heads=2, patch=14, grid=16)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# The reference network's size in DinoV2ViT's terms (the generator's metadata says the same).
REF_SIZE = dict(width=32, depth=2, heads=4, patch=14, grid=3)
# Everything here is float32 of magnitude <= ~3, and mpdiff computes what the reference computes in the
# same order (measured difference 0.0 on the machine that made the fixture). The tolerance only allows
# for another CPU's float32 kernels (other SIMD widths and summation orders, ~1e-6); the smallest formula
# changes measured against this fixture move the features by 1.5e-4 or more (GELU's tanh approximation
# 3.3e-4, LayerNorm eps 1e-5 instead of 1e-6 1.0e-3, position resampling to a size instead of by the
# scale factor 3.1e-3) and the preprocessed pixels by 0.04 or more.
ATOL = 1e-5


def _reference_fixture():
    from safetensors import safe_open

    with safe_open(str(FIXTURES / "dinov2_ref.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _generator_module():
    """tests/fixtures/ref_dinov2.py, for its image patterns (it imports no reference code at import time)."""
    spec = importlib.util.spec_from_file_location("ref_dinov2", FIXTURES / "ref_dinov2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference_network(tmp_path):
    """Our DinoV2ViT with the fixture's weights, read by load_dinov2 from a .pth file of the reference's
    state_dict, as the released dinov2_vitl14_pretrain.pth is read."""
    tensors, metadata = _reference_fixture()
    assert json.loads(metadata["mpdiff_config"]) == REF_SIZE
    state = {k[len("ref."):]: v for k, v in tensors.items() if k.startswith("ref.")}
    torch.save(state, tmp_path / "small_pretrain.pth")
    return load_dinov2(tmp_path / "small_pretrain.pth", build=lambda: DinoV2ViT(**REF_SIZE)), tensors


def _assert_close(actual, expected, atol=ATOL):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    difference = (actual - expected).abs().max().item()
    assert difference <= atol, f"max |difference| {difference:.3g} > {atol:g}"


def small_net():
    return DinoV2ViT(**SMALL).eval()


def build_small():
    return DinoV2ViT(**SMALL)


def test_vit_l14_has_the_official_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        net = vit_l14()
    state = net.state_dict()
    # Per block: 2 LayerNorms (2 * 2 * 1024), qkv (1024 * 3072 + 3072), proj (1024 * 1024 + 1024),
    # fc1 (1024 * 4096 + 4096), fc2 (4096 * 1024 + 1024), 2 LayerScales (2 * 1024) = 12,598,272; times 24,
    # plus patch_embed (1024 * 3 * 14 * 14 + 1024), cls_token (1024), pos_embed (1370 * 1024),
    # mask_token (1024) and the final norm (2 * 1024) = 304,368,640 (DINOv2's "300 M" / "0.3B").
    assert sum(p.numel() for p in net.parameters()) == 304_368_640
    assert len(state) == 3 + 2 + 24 * 14 + 2 and not list(net.buffers())
    expected = {
        "cls_token": (1, 1, 1024), "pos_embed": (1, 1370, 1024), "mask_token": (1, 1024),
        "patch_embed.proj.weight": (1024, 3, 14, 14), "patch_embed.proj.bias": (1024,),
        "blocks.0.norm1.weight": (1024,), "blocks.0.attn.qkv.weight": (3072, 1024), "blocks.0.attn.qkv.bias": (3072,),
        "blocks.0.attn.proj.weight": (1024, 1024), "blocks.0.ls1.gamma": (1024,), "blocks.11.norm2.bias": (1024,),
        "blocks.11.mlp.fc1.weight": (4096, 1024), "blocks.11.mlp.fc2.weight": (1024, 4096),
        "blocks.23.ls2.gamma": (1024,), "norm.weight": (1024,), "norm.bias": (1024,),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert "blocks.24.norm1.weight" not in state and "register_tokens" not in state
    assert net.label == "ViT-L/14" and net.blocks[0].norm1.eps == 1e-6 and net.norm.eps == 1e-6


def test_small_detector_runs_end_to_end_on_any_size_and_channel_count():
    det = DinoV2Detector(network=small_net())
    assert (det.name, det.metric, det.feature_dim) == ("dinov2", "fd_dinov2", 64)
    rgb = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    gray = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    for images in (rgb, gray):
        feats = det.features(images)
        assert feats.shape == (len(images), 64) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert not torch.allclose(det.features(rgb)[0], det.features(rgb)[1])
    assert torch.equal(det.features(gray), det.features(gray.expand(-1, 3, -1, -1).contiguous()))
    with pytest.raises(MpdiffError, match="uint8"):
        det.features(rgb.float())


@pytest.mark.parametrize("value", [0, 37, 128, 255])
def test_preprocess_of_a_constant_gray_image_is_the_normalised_value(value):
    x = DinoV2Detector(network=small_net()).preprocess(torch.full((1, 1, 30, 50), value, dtype=torch.uint8))
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    for c in range(3):
        expected = (value / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(x[0, c], torch.full_like(x[0, c], expected), atol=1e-5)


def test_preprocess_is_edm2s_antialiased_bicubic_resize_then_normalisation():
    det = DinoV2Detector(network=small_net())
    images = torch.randint(0, 256, (2, 3, 448, 300), dtype=torch.uint8)
    # EDM2 (calculate_metrics.py, resize_mode='torch'): float32, interpolate (align_corners not given, so
    # False) on 0..255 values, then /255, then (x - mean) / std.
    resized = F.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.equal(det.preprocess(images), (resized / 255 - mean) / std)
    aliased = F.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=False)
    assert (det.preprocess(images) - (aliased / 255 - mean) / std).abs().max() > 0.1  # antialias matters here
    gray = images[:, :1]
    assert torch.equal(det.preprocess(gray), det.preprocess(gray.expand(-1, 3, -1, -1)))


def test_position_embedding_is_kept_at_the_native_grid_and_resampled_by_scale_factor_otherwise():
    net = small_net()
    assert net.position_embedding(16, 16) is net.pos_embed
    resampled = net.position_embedding(5, 7)
    assert resampled.shape == (1, 1 + 5 * 7, 64)
    assert torch.equal(resampled[:, 0], net.pos_embed[:, 0])
    grid = net.pos_embed[:, 1:].reshape(1, 16, 16, 64).permute(0, 3, 1, 2)
    by_scale = F.interpolate(grid, scale_factor=(5.1 / 16, 7.1 / 16), mode="bicubic", antialias=False)
    assert torch.equal(resampled[:, 1:], by_scale.permute(0, 2, 3, 1).reshape(1, 35, 64))
    by_size = F.interpolate(grid, size=(5, 7), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 35, 64)
    assert not torch.allclose(resampled[:, 1:], by_size, atol=1e-3)  # the 0.1 offset changes the sample points
    with torch.no_grad():
        assert net(torch.randn(2, 3, 5 * 14, 7 * 14)).shape == (2, 64)
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 64)
        with pytest.raises(ValueError, match="patches"):
            net(torch.randn(1, 3, 30, 28))


def test_load_dinov2_says_which_file_is_needed(monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    for path in (None, tmp_path / "nowhere.pth"):
        with pytest.raises(MpdiffError) as info:
            load_dinov2(path)
        message = str(info.value)
        assert "\n" not in message
        for needed in (WEIGHTS_FILE, WEIGHTS_URL, WEIGHTS_ENV, "--dinov2"):
            assert needed in message
    assert "nowhere.pth" in message
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "absent.pth"))
    with pytest.raises(MpdiffError, match="absent.pth: file not found"):
        DinoV2Detector()


def test_load_dinov2_refuses_a_checkpoint_that_does_not_match(tmp_path):
    state = small_net().state_dict()
    del state["blocks.1.ls2.gamma"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(MpdiffError) as info:
        load_dinov2(tmp_path / "cut.pth", build=build_small)
    assert "cut.pth" in str(info.value) and "blocks.1.ls2.gamma" in str(info.value) and "\n" not in str(info.value)

    torch.save(DinoV2ViT(**{**SMALL, "width": 32}).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(MpdiffError, match=r"narrow.pth: not the weights of the DINOv2 ViT \(width 64.*has shape"):
        load_dinov2(tmp_path / "narrow.pth", build=build_small)

    torch.save({**small_net().state_dict(), "register_tokens": torch.zeros(1, 4, 64)}, tmp_path / "reg.pth")
    with pytest.raises(MpdiffError, match="reg.pth: .*register tokens"):
        load_dinov2(tmp_path / "reg.pth", build=build_small)

    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(MpdiffError, match="list.pth: holds a list"):
        load_dinov2(tmp_path / "list.pth", build=build_small)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_dinov2_reads_a_matching_checkpoint(tmp_path, monkeypatch, suffix):
    from safetensors.torch import save_file

    net = small_net()
    path = tmp_path / f"small{suffix}"
    if suffix == ".pth":
        torch.save(net.state_dict(), path)
        monkeypatch.setenv(WEIGHTS_ENV, str(path))
        loaded = load_dinov2(build=build_small)  # the path from $MPDIFF_DINOV2
    else:
        save_file(net.state_dict(), str(path), metadata={"format": "pt"})  # metadata as other tools write it
        loaded = load_dinov2(path, build=build_small)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(DinoV2Detector(network=loaded).features(images), DinoV2Detector(network=net).features(images))


@pytest.mark.parametrize("name", ["28x28", "28x42", "42x42", "56x42"])
def test_features_equal_facebookresearch_dinov2s_vit_with_the_same_weights(tmp_path, name):
    # 42x42 is the 3x3 grid the position table was stored for (no resampling); 28x28 and 28x42 resample it
    # down (square and not), 56x42 up and not square, as FD_DINOv2 resamples the released 37x37 to 16x16.
    net, ref = _reference_network(tmp_path)
    x = ref[f"input.{name}"]
    with torch.no_grad():
        tokens = net.tokens(x)
        features = net(x)
    _assert_close(features, ref[f"feature.{name}"])  # the class token after the final LayerNorm
    _assert_close(tokens[:, 1:], ref[f"tokens.{name}"])  # and the patch tokens, row-major
    assert ref[f"feature.{name}"].abs().max() > 1  # a feature that is there, not a degenerate one


@pytest.mark.parametrize("rows, cols", [(16, 16), (2, 3)])
def test_position_embedding_resampling_equals_the_references(tmp_path, rows, cols):
    # 16x16 is the grid of a 224x224 input (FD_DINOv2); the table is stored for 3x3.
    net, ref = _reference_network(tmp_path)
    with torch.no_grad():
        _assert_close(net.position_embedding(rows, cols), ref[f"pos.{rows}x{cols}"], atol=1e-6)


@pytest.mark.parametrize("name", ["small", "large"])
def test_detector_equals_edm2s_fd_dinov2_detector_with_the_same_network(tmp_path, name):
    # EDM2's DINOv2Detector.__call__ (resize_mode 'torch') ran with the small reference network in place of
    # the hub's ViT-L/14; "small" is upsampled to 224x224, "large" (300x260) downsampled, where the
    # antialiasing filter matters. Its preprocessed input is compared on a grid of pixels and by its
    # per-channel means, so a preprocessing error is seen apart from the network.
    net, ref = _reference_network(tmp_path)
    generator = _generator_module()
    images = generator.pattern_images(*generator.IMAGES[name])
    assert torch.equal(generator.image_checksum(images), ref[f"images_checksum.{name}"])  # the same images
    det = DinoV2Detector(network=net)
    x = det.preprocess(images)
    assert x.shape == (len(images), 3, 224, 224)
    _assert_close(x[:, :, 3::8, 5::8], ref[f"preprocessed.{name}"])
    _assert_close(x.double().mean(dim=(2, 3)).float(), ref[f"preprocessed_mean.{name}"], atol=1e-6)
    _assert_close(det.features(images), ref[f"edm2.{name}"])
