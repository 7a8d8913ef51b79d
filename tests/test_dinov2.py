"""The DINOv2 ViT-L/14 feature network of FD_DINOv2 and its detector (mpdiff.metrics.dinov2).

No real weights are used: the full ViT-L/14 is only built on the meta device (keys, shapes, parameter
count), and everything that runs uses a small random network of the same design.
"""

import pytest
import torch
import torch.nn.functional as F

from mpdiff.errors import MpdiffError
from mpdiff.metrics.dinov2 import (IMAGENET_MEAN, IMAGENET_STD, WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_URL, DinoV2Detector,
                                   DinoV2ViT, load_dinov2, vit_l14)

SMALL = dict(width=64, depth=2, heads=2, patch=14, grid=16)


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
