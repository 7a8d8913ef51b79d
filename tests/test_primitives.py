"""Each MP primitive keeps unit expected magnitude (SPEC §2, §11 items 1-3)."""

import math

import pytest
import torch

from mpdiff.nn.primitives import (
    MPConv,
    MPFourier,
    clip_activations,
    cosine_attention,
    mp_cat,
    mp_cat_weights,
    mp_silu,
    mp_sum,
    normalize,
    resample,
)

# Statistical tolerance: with >= 1e5 unit-variance samples the RMS estimate has a relative
# standard error below 0.5%; we allow 3% (or 5% where the layer mixes fewer elements).
TOL = 0.03


def rms(x):
    return x.pow(2).mean().sqrt().item()


@pytest.mark.parametrize("shape", [(7, 3), (5, 4, 3, 3), (2, 1000), (3, 16, 8, 8)])
def test_normalize_gives_unit_rms_rows(shape):
    x = torch.randn(shape) * 17 + 3
    y = normalize(x)
    row_rms = y.flatten(1).pow(2).mean(1).sqrt()
    assert torch.allclose(row_rms, torch.ones_like(row_rms), atol=1e-3)


def test_normalize_eps_is_added_to_rms_not_norm():
    x = torch.zeros(1, 4)
    x[0, 0] = 2.0  # norm 2, rms 1 over K=4
    assert torch.allclose(normalize(x, eps=0.5), x / (0.5 + 1.0))


def test_normalize_over_channels_is_pixel_norm():
    # normalize(x, dim=1) is the pixel norm of the encoder blocks (Eq. 30-31): unit RMS over the
    # channels of every pixel, each pixel scaled on its own.
    x = torch.randn(2, 32, 5, 5) * torch.rand(2, 1, 5, 5) * 10
    y = normalize(x, dim=1)
    per_pixel = y.pow(2).mean(1).sqrt()
    assert torch.allclose(per_pixel, torch.ones_like(per_pixel), atol=1e-3)
    ratio = y / x
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5)


def test_mp_silu_unit_magnitude():
    assert rms(mp_silu(torch.randn(400_000))) == pytest.approx(1.0, rel=TOL)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9])
def test_mp_sum_unit_magnitude(t):
    a, b = torch.randn(200_000), torch.randn(200_000)
    assert rms(mp_sum(a, b, t)) == pytest.approx(1.0, rel=TOL)
    assert torch.allclose(mp_sum(a, b, t), ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t ** 2), atol=1e-6)


def test_mp_cat_unit_magnitude_and_equal_energy():
    a, b = torch.randn(64, 768, 4, 4), torch.randn(64, 576, 4, 4)
    y = mp_cat(a, b, t=0.5)
    assert rms(y) == pytest.approx(1.0, rel=TOL)
    energy_a = y[:, :768].pow(2).sum().item()
    energy_b = y[:, 768:].pow(2).sum().item()
    assert energy_a == pytest.approx(energy_b, rel=TOL)
    wa, wb = mp_cat_weights(768, 576, 0.5)  # SPEC §2.5 worked example
    assert (wa, wb) == pytest.approx((0.9354, 1.0801), abs=1e-4)


def test_mp_fourier_unit_magnitude_and_buffers():
    f = MPFourier(256)
    assert {n for n, _ in f.named_buffers()} == {"freqs", "phases"}
    assert not list(f.parameters())
    y = f(torch.randn(2000))
    assert y.shape == (2000, 256)
    assert rms(y) == pytest.approx(1.0, rel=TOL)


def test_resample_down_is_average_pool_and_up_is_nearest():
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(resample(x, "down"), torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)
    assert torch.allclose(resample(x, "up"), torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    assert resample(x, "keep") is x
    # Nearest up-sampling preserves magnitude exactly.
    assert rms(resample(x, "up")) == pytest.approx(rms(x), rel=1e-6)


def test_clip_activations():
    x = torch.tensor([-1000.0, 0.5, 300.0])
    assert clip_activations(x, 256).tolist() == [-256.0, 0.5, 256.0]
    y = torch.tensor([1e6])
    assert clip_activations(y, None).item() == 1e6


@pytest.mark.parametrize("kernel,shape", [([], (4096, 256)), ([3, 3], (32, 64, 16, 16)), ([1, 1], (32, 64, 16, 16))])
def test_mpconv_unit_output_and_forced_weight_norm(kernel, shape):
    layer = MPConv(shape[1], 96, kernel)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(96, *([1] * (layer.weight.ndim - 1))) * 10)  # uneven norms
    layer.train()
    rms_before = layer.weight.detach().flatten(1).pow(2).mean(1).sqrt()
    y = layer(torch.randn(shape))
    # After a training-mode forward every row has L2 norm sqrt(fan_in) up to the eps of
    # normalize(): exactly sqrt(fan_in) * r / (r + 1e-4) for a row of prior RMS r (to 1e-5).
    norms = layer.weight.flatten(1).norm(dim=1)
    expected = math.sqrt(layer.fan_in) * rms_before / (rms_before + 1e-4)
    assert torch.allclose(norms, expected, rtol=1e-5)
    # From then on rows sit at the fixed point sqrt(fan_in) * (1 - 1e-4), uniformly.
    layer(torch.randn(shape))
    norms = layer.weight.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, math.sqrt(layer.fan_in) * (1 - 1e-4)), rtol=1e-5)
    assert rms(y) == pytest.approx(1.0, rel=0.05)


def test_mpconv_gradient_is_orthogonal_to_weight_rows():
    layer = MPConv(64, 32, [3, 3]).train()
    x = torch.randn(8, 64, 8, 8)
    layer(x).pow(2).sum().backward()
    w = layer.weight.detach().flatten(1)
    g = layer.weight.grad.flatten(1)
    cos = (w * g).sum(1) / (w.norm(dim=1) * g.norm(dim=1))
    assert cos.abs().max().item() < 1e-4


def test_mpconv_follows_every_change_of_its_weights_and_caches_only_inside_frozen_weights():
    from mpdiff.nn.fast import FastMPConv, accelerate, frozen_weights

    assert not hasattr(MPConv(4, 4, [1, 1]), "fixed")  # the literal layer has no cache at all
    layer = accelerate(MPConv(16, 8, [3, 3]))
    assert type(layer) is FastMPConv
    gain = torch.nn.Parameter(torch.tensor(0.7))
    x = torch.randn(2, 16, 6, 6)
    layer.eval()
    with torch.no_grad():
        first = layer(x, gain=gain)
    expected = torch.nn.functional.conv2d(x, layer.effective_weight(gain.detach()), padding=1)
    assert torch.allclose(first, expected, atol=1e-6)
    # Outside frozen_weights every call sees the weights as they are now, whichever way they were written:
    # in place, through .data (which bumps no version counter: several EMA libraries write so), or loaded.
    for write in (lambda w: w.mul_(-1), lambda w: w.data.mul_(-1), lambda w: w.data.copy_(-w.data)):
        with torch.no_grad():
            before = layer(x, gain=gain)
            write(layer.weight)
            assert torch.equal(layer(x, gain=gain), -before)
    with torch.no_grad():
        gain.data.fill_(0.2)
        assert torch.allclose(layer(x, gain=gain), 0.2 / 0.7 * first * (-1) ** 3, atol=1e-5)
    # Inside, each (gain, dtype) is computed once and reused, bit-identical to the uncached call.
    with torch.no_grad():
        plain = layer(x, gain=gain)
        with frozen_weights(layer):
            assert torch.equal(layer(x, gain=gain), plain) and len(layer.fixed) == 1
            assert torch.equal(layer(x, gain=gain), plain) and len(layer.fixed) == 1
            layer(x)
            assert len(layer.fixed) == 2
        assert layer.fixed is None
    # With autograd on, even inside the scope, the weight keeps its gradient path (nothing cached is used).
    with frozen_weights(layer):
        layer(x, gain=gain).sum().backward()
    assert layer.weight.grad is not None and gain.grad is not None
    # Eval mode leaves the stored weight untouched (EMA weights are re-normalized on use).
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer(x)
    assert torch.equal(before, layer.weight)


def _reference_attention(qkv, heads):
    # Direct transcription of SPEC §2.9 with explicit loops over heads.
    n, c3, h, w = qkv.shape
    c = c3 // 3
    ch = c // heads
    y = qkv.reshape(n, heads, ch, 3, h * w)
    out = torch.empty(n, heads, ch, h * w)
    for i in range(heads):
        q, k, v = (y[:, i, :, j] for j in range(3))
        q, k, v = (t / (1e-4 + t.norm(dim=1, keepdim=True) / math.sqrt(ch)) for t in (q, k, v))
        logits = torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(ch)
        out[:, i] = torch.einsum("nqk,nck->ncq", logits.softmax(-1), v)
    return out.reshape(n, c, h, w)


@pytest.mark.parametrize("impl", ["matmul", "sdpa"])
def test_cosine_attention_matches_formula(impl):
    qkv = torch.randn(2, 3 * 48, 4, 4) * 3
    out = cosine_attention(qkv, num_heads=3, impl=impl)
    assert torch.allclose(out, _reference_attention(qkv, 3), rtol=1e-5, atol=1e-6)


def test_cosine_attention_logits_are_bounded():
    # Scaling q/k by huge factors cannot sharpen the attention (cosine similarity).
    qkv = torch.randn(1, 3 * 64, 4, 4)
    base = cosine_attention(qkv, 1)
    scaled = qkv.clone().reshape(1, 1, 64, 3, 16)
    scaled[:, :, :, :2] *= 1000
    assert torch.allclose(cosine_attention(scaled.reshape(1, 192, 4, 4), 1), base, atol=2e-3)
