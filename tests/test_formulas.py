"""Every equation of SPEC that mpdiff implements, against an independent value (issue 28, point 3).

Each expected value here is a number worked out by hand (written in the comment next to it), a
closed form evaluated in the test, or a transcription of SPEC's formula with its own code, never
mpdiff's output. benchmarks/mutations.py applies small changes to the formulas in src/ (a constant,
a sign, an exponent, an order) and checks that this file fails for each of them.

Sections follow SPEC's numbering. The file runs in a few seconds.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpdiff.diffusion.guidance import guided
from mpdiff.diffusion.loss import edm2_loss, edm_weight, sample_sigma
from mpdiff.diffusion.samplers import churn_gamma, sample_euler, sample_heun
from mpdiff.diffusion.schedules import edm_sigmas
from mpdiff.ema.profiles import (
    gamma_to_sigma_rel,
    power_function_beta,
    power_function_inner_product,
    sigma_rel_to_gamma,
    solve_posthoc_coefficients,
)
from mpdiff.ema.trackers import PowerFunctionEMA, TraditionalEMA
from mpdiff.metrics.frechet import feature_statistics, frechet_distance
from mpdiff.nn.precond import Preconditioner, edm_coefficients
from mpdiff.nn.fast import accelerate, fast_cosine_attention
from mpdiff.nn.primitives import (
    FourierFeatures,
    MPConv,
    MPFourier,
    cosine_attention,
    mp_cat,
    mp_cat_weights,
    mp_silu,
    mp_sum,
    normalize,
)
from mpdiff.nn.skips import SkipGate, mp_balance, skip_coefficients
from mpdiff.train.optim import learning_rate

SQRT2 = math.sqrt(2)


def close(a, b, rel=1e-6, abs=1e-7):
    """Elementwise |a - b| <= abs + rel |b| for tensors, arrays or numbers."""
    a, b = np.asarray(torch.as_tensor(a, dtype=torch.float64)), np.asarray(torch.as_tensor(b, dtype=torch.float64))
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= abs + rel * np.abs(b)))


# ==== §1.1 EDM preconditioning ========================================================================

def test_edm_coefficients_at_hand_computed_levels():
    # sigma_data = 0.5.  sigma = 0.5: total variance 0.5, so c_skip = 0.25 / 0.5 = 0.5,
    # c_out = 0.25 / sqrt(0.5) = 0.3535534, c_in = 1 / sqrt(0.5) = 1.4142136, c_noise = ln(0.5) / 4 = -0.1732868.
    # sigma = 2: total variance 4.25, c_skip = 0.25 / 4.25 = 0.0588235, c_out = 1 / sqrt(4.25) = 0.4850713,
    # c_in = 0.4850713, c_noise = ln(2) / 4 = 0.1732868.
    # sigma = 0.1: total variance 0.26, c_skip = 0.9615385, c_out = 0.05 / 0.5099020 = 0.0980581,
    # c_in = 1.9611614, c_noise = ln(0.1) / 4 = -0.5756463.
    sigma = torch.tensor([0.5, 2.0, 0.1], dtype=torch.float64).reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, 0.5)
    assert close(c_skip.flatten(), [0.5, 0.0588235294, 0.9615384615], rel=1e-9)
    assert close(c_out.flatten(), [0.3535533906, 0.4850712501, 0.0980580676], rel=1e-9)
    assert close(c_in.flatten(), [1.4142135624, 0.4850712501, 1.9611613514], rel=1e-9)
    assert c_noise.shape == (3,) and close(c_noise, [-0.1732867951, 0.1732867951, -0.5756462732], rel=1e-9)


class _ConstantBackbone(torch.nn.Module):
    """F = a fixed value; remembers what it was given."""

    def forward(self, x_in, c_noise, labels):
        self.seen = (x_in, c_noise)
        return torch.full_like(x_in, 0.8)


def test_preconditioner_forms_d_from_the_coefficients():
    # D = c_skip x + c_out F(c_in x). sigma = 2, x = 3, F = 0.8:
    # D = 0.0588235 * 3 + 0.4850713 * 0.8 = 0.1764706 + 0.3880570 = 0.5645276; the backbone gets
    # c_in x = 1.4552138 and c_noise = 0.1732868.
    backbone = _ConstantBackbone()
    net = Preconditioner(backbone, img_resolution=2, img_channels=1, use_fp16=False)
    D, u = net(torch.full([1, 1, 2, 2], 3.0), torch.tensor([2.0]), return_logvar=True)
    assert close(D, torch.full([1, 1, 2, 2], 0.5645276), rel=1e-6)
    assert close(backbone.seen[0], torch.full([1, 1, 2, 2], 1.4552138), rel=1e-6)
    assert close(backbone.seen[1], [0.1732868], rel=1e-6)
    assert u.shape == (1, 1, 1, 1)


# ==== §1.2-1.3 loss and noise levels ===================================================================

def test_edm_weight_hand_values():
    # lambda = (sigma^2 + 0.25) / (0.5 sigma)^2: sigma 0.5 -> 0.5 / 0.0625 = 8; 1 -> 1.25 / 0.25 = 5;
    # 2 -> 4.25 / 1 = 4.25; 0.1 -> 0.26 / 0.0025 = 104.
    assert close(edm_weight(torch.tensor([0.5, 1.0, 2.0, 0.1])), [8.0, 5.0, 4.25, 104.0], rel=1e-6)
    # sigma_data = 1, sigma = 1: 2 / 1 = 2.
    assert close(edm_weight(torch.tensor(1.0), sigma_data=1.0), 2.0)


class _StubDenoiser(torch.nn.Module):
    """Returns a fixed D and log-variance u per sample; records the noisy input."""
    sigma_data = 0.5

    def __init__(self, denoised, logvar):
        super().__init__()
        self.denoised, self.logvar = denoised, logvar

    def forward(self, x, sigma, labels=None, return_logvar=False):
        self.seen = (x, sigma)
        return self.denoised, self.logvar


def test_uncertainty_loss_hand_values():
    # l = (lambda / e^u) (D - y)^2 + u per element.
    # sample 0: sigma 0.5 (lambda 8), u = 0, D - y = 0.5: 8 * 0.25 + 0 = 2.
    # sample 1: sigma 1 (lambda 5), u = ln 2, D - y = -1: 5 / 2 * 1 + 0.6931472 = 3.1931472.
    # sample 2: sigma 2 (lambda 4.25), u = -1, D - y = 2: 4.25 e * 4 - 1 = 46.2108 - 1 = 45.2108.
    y = torch.zeros(3, 1, 1, 2)
    denoised = torch.tensor([0.5, -1.0, 2.0]).reshape(3, 1, 1, 1).expand(3, 1, 1, 2).clone()
    logvar = torch.tensor([0.0, math.log(2), -1.0]).reshape(3, 1, 1, 1)
    net = _StubDenoiser(denoised, logvar)
    noise = torch.tensor([1.0, -2.0]).expand(3, 1, 1, 2).clone()
    loss = edm2_loss(net, y, sigma=torch.tensor([0.5, 1.0, 2.0]), noise=noise)
    expected = torch.tensor([2.0, 3.1931472, 4.25 * math.e * 4 - 1]).reshape(3, 1, 1, 1).expand(3, 1, 1, 2)
    assert close(loss, expected, rel=1e-6)
    # The network saw y + sigma n: sample 2 got (2, -4).
    assert close(net.seen[0][2].flatten(), [2.0, -4.0])
    # Without an uncertainty head (config A): lambda (D - y)^2 = 2, 5, 17.
    plain = edm2_loss(_StubDenoiser(denoised, None), y, sigma=torch.tensor([0.5, 1.0, 2.0]), noise=noise)
    assert close(plain[:, 0, 0, 0], [2.0, 5.0, 17.0], rel=1e-6)


def test_sigma_sampling_is_log_normal_with_p_mean_and_p_std():
    # ln sigma ~ N(P_mean, P_std^2): ln sigma = P_mean + P_std z with z the generator's normal draws.
    z = torch.randn(5, generator=torch.Generator().manual_seed(7))
    sigma = sample_sigma(5, P_mean=-0.4, P_std=1.3, generator=torch.Generator().manual_seed(7))
    assert close(sigma.log(), -0.4 + 1.3 * z, rel=1e-5, abs=1e-6)
    # And as a distribution: 200,000 draws, standard errors 0.003 (mean) and 0.2% (std).
    logs = sample_sigma(200_000, P_mean=-1.2, P_std=0.7, generator=torch.Generator().manual_seed(1)).log()
    assert logs.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert logs.std().item() == pytest.approx(0.7, rel=0.01)


# ==== §1.4 learning rate ===============================================================================

def test_learning_rate_hand_values():
    # alpha = alpha_ref / sqrt(max(t / t_ref, 1)) * min(nimg / rampup, 1), t = nimg / batch.
    kw = dict(lr=0.01, decay=10, rampup_img=10_000)
    # nimg 4000, batch 100: t = 40 = 4 t_ref -> /2; ramp 0.4: 0.01 / 2 * 0.4 = 0.002.
    assert learning_rate(4000, 100, **kw) == pytest.approx(0.002, rel=1e-12)
    # nimg 500: t = 5 < t_ref -> no decay; ramp 0.05: 0.0005.
    assert learning_rate(500, 100, **kw) == pytest.approx(0.0005, rel=1e-12)
    # nimg 90,000: t = 900 = 90 t_ref -> / sqrt(90) = 9.48683298; ramp done: 0.00105409255.
    assert learning_rate(90_000, 100, **kw) == pytest.approx(0.00105409255, rel=1e-8)
    # First step: 0. No ramp-up, no decay: alpha_ref.
    assert learning_rate(0, 100, **kw) == 0.0
    assert learning_rate(123_456, 100, lr=0.02, decay=None, rampup_img=0) == 0.02


# ==== §2 magnitude-preserving primitives ==============================================================

def test_normalize_hand_values():
    # Row [3, 4]: norm 5, K = 2, RMS 3.5355339; out = x / (1e-4 + 3.5355339) = [0.8485050, 1.1313400].
    out = normalize(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    assert close(out, [[3 / 3.5356339, 4 / 3.5356339], [0.0, 2 / (1e-4 + 2 / SQRT2)]], rel=1e-6)
    # A small row shows where eps sits: [3e-4, 4e-4] has RMS 3.5355e-4, out = x / 4.5355339e-4.
    small = normalize(torch.tensor([[3e-4, 4e-4]]))
    assert close(small, [[3e-4 / 4.5355339e-4, 4e-4 / 4.5355339e-4]], rel=1e-5)
    # 4-D rows (K = 4): [1, 1, 1, 1] has RMS 1 -> x / 1.0001.
    assert close(normalize(torch.ones(1, 1, 2, 2)), torch.full([1, 1, 2, 2], 1 / 1.0001), rel=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_pixel_norm_hand_values(channels_last):
    # normalize(x, dim=1) over 2 channels per pixel: pixel (3, 4) -> / (1e-4 + 5 / sqrt(2)),
    # pixel (6, -8) -> / (1e-4 + 10 / sqrt(2)) = / 7.0711678.
    x = torch.tensor([[3.0, 6.0], [4.0, -8.0]]).reshape(1, 2, 1, 2)  # channel 0: (3, 6), channel 1: (4, -8)
    x = x.expand(1, 2, 2, 2).clone()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = normalize(x, dim=1)
    d1, d2 = 1e-4 + 5 / SQRT2, 1e-4 + 10 / SQRT2
    expected = torch.tensor([[3 / d1, 6 / d2], [4 / d1, -8 / d2]]).reshape(1, 2, 1, 2).expand(1, 2, 2, 2)
    assert close(out, expected, rel=1e-6)


def test_mp_silu_hand_values_and_constant():
    # silu(1) = 1 / (1 + e^-1) = 0.7310586; / 0.596 = 1.2266084. silu(-2) = -2 / (1 + e^2) = -0.2384058 -> -0.4000098.
    assert close(mp_silu(torch.tensor([1.0, -2.0, 0.0])), [1.2266084, -0.4000098, 0.0], rel=1e-6)
    # 0.596 is sqrt(E[silu(z)^2]) for z ~ N(0, 1), rounded (SPEC §2.3): Gauss-Hermite quadrature gives 0.59647.
    nodes, weights = np.polynomial.hermite_e.hermegauss(120)
    silu = nodes / (1 + np.exp(-nodes))
    rms = math.sqrt(float(np.sum(weights * silu ** 2) / math.sqrt(2 * math.pi)))
    assert rms == pytest.approx(0.59647, abs=1e-5)
    assert close(mp_silu(torch.tensor([1.0])) * rms, [0.7310586 * rms / 0.596], rel=1e-6)


def test_mp_sum_hand_values():
    # t = 0.3: ((0.7 a + 0.3 b) / sqrt(0.49 + 0.09) = / 0.7615773.
    # a = 1, b = 0 -> 0.9191450; a = 0, b = 1 -> 0.3939193; a = 2, b = -1 -> 1.1 / 0.7615773 = 1.4443707.
    a = torch.tensor([1.0, 0.0, 2.0])
    b = torch.tensor([0.0, 1.0, -1.0])
    assert close(mp_sum(a, b, 0.3), [0.9191450, 0.3939193, 1.4443707], rel=1e-6)
    # t = 0.5: (a + b) / 2 / sqrt(0.5) = (a + b) / sqrt(2).
    assert close(mp_sum(a, b, 0.5), (a + b) / SQRT2, rel=1e-6)


def test_mp_cat_hand_values_with_and_without_autograd():
    # Na = 1, Nb = 4, t = 0.3: C = sqrt(5 / 0.58) = 2.9361011; wa = C 0.7 / 1 = 2.0552708,
    # wb = C 0.3 / 2 = 0.4404152.
    assert mp_cat_weights(1, 4, 0.3) == pytest.approx((2.0552708, 0.4404152), rel=1e-6)
    # Na = Nb: both weights 1 at t = 0.5 (SPEC §2.5); Na = 768, Nb = 576: 0.9354, 1.0801 (SPEC's example).
    assert mp_cat_weights(8, 8, 0.5) == pytest.approx((1.0, 1.0), rel=1e-12)
    assert mp_cat_weights(768, 576, 0.5) == pytest.approx((0.9354143, 1.0801234), rel=1e-6)
    a = torch.ones(2, 1, 3, 3)
    b = torch.ones(2, 4, 3, 3) * -2
    expected = torch.cat([torch.full([2, 1, 3, 3], 2.0552708), torch.full([2, 4, 3, 3], -0.8808304)], dim=1)
    with torch.no_grad():  # the fast path that writes each part into its slice
        assert close(mp_cat(a, b, t=0.3), expected, rel=1e-6)
        cl = mp_cat(a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last),
                    t=0.3)
        assert close(cl, expected, rel=1e-6)
    assert close(mp_cat(a.requires_grad_(), b, t=0.3).detach(), expected, rel=1e-6)


@pytest.mark.parametrize("cls, amplitude", [(MPFourier, SQRT2), (FourierFeatures, 1.0)])
def test_fourier_features_hand_values(cls, amplitude):
    # out = amplitude cos(2 pi (f a + phi)), features (f, phi) = (1/8, 1/6), (1/8, 0), (-1/4, 1/2).
    # a = 1: cos(2 pi 7/24) = cos(105 deg) = -0.2588190, cos(45 deg), cos(2 pi / 4) = 0.
    # a = 0.5: cos(2 pi (1/16 + 1/6)), cos(22.5 deg), cos(2 pi (-1/8 + 1/2)) = cos(135 deg) = -0.7071068.
    layer = cls(3)
    with torch.no_grad():
        layer.freqs.copy_(2 * math.pi * torch.tensor([1 / 8, 1 / 8, -1 / 4]))
        layer.phases.copy_(2 * math.pi * torch.tensor([1 / 6, 0.0, 1 / 2]))
    out = layer(torch.tensor([1.0, 0.5]))
    expected = amplitude * torch.tensor([[-0.2588190, math.cos(math.pi / 4), math.cos(math.pi / 2)],
                                         [math.cos(2 * math.pi * (1 / 16 + 1 / 6)), math.cos(math.pi / 8),
                                          -0.7071068]])
    assert close(out, expected, rel=1e-5, abs=1e-6)


def test_fourier_buffers_are_2pi_normal_frequencies_and_2pi_uniform_phases():
    # freqs = 2 pi N(0, 1), phases = 2 pi U(0, 1), drawn in that order (SPEC §2.6).
    torch.manual_seed(11)
    z, u = torch.randn(16), torch.rand(16)
    torch.manual_seed(11)
    layer = MPFourier(16)
    assert close(layer.freqs, 2 * math.pi * z, rel=1e-6) and close(layer.phases, 2 * math.pi * u, rel=1e-6)


def test_mpconv_effective_weight_and_forced_norm_hand_values():
    # Linear 2 -> 2, W = [[3, 4], [0, 2]], fan_in 2. normalize: rows / (1e-4 + RMS) with RMS 3.5355339, 1.4142136;
    # then x gain / sqrt(2). With gain 1 the rows are ~[0.6, 0.8] and ~[0, 1] (unit L2 norm, SPEC §2.2 step 3).
    layer = MPConv(2, 2, ())
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    r0, r1 = 1e-4 + 5 / SQRT2, 1e-4 + 2 / SQRT2
    unit = torch.tensor([[3 / r0, 4 / r0], [0.0, 2 / r1]])
    layer.eval()
    x = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    with torch.no_grad():
        assert close(layer(x), x @ (unit / SQRT2).T, rel=1e-6)  # ~[[1.4, 1.0], [0.4, -1.0]]
        assert close(layer(x, gain=2.5), 2.5 * x @ (unit / SQRT2).T, rel=1e-6)
        assert close(layer(x)[0], [1.39996, 0.99993], rel=1e-4)
    assert torch.equal(layer.weight, torch.tensor([[3.0, 4.0], [0.0, 2.0]]))  # eval leaves W alone
    # Training mode first writes W <- normalize(W) (forced WN, Eq. 66): rows of norm ~sqrt(2).
    layer.train()
    layer(x)
    assert close(layer.weight.detach(), unit, rel=1e-6)
    # A 3x3 convolution: fan_in = 2 * 9 = 18; "same" padding (k // 2); weight / (1e-4 + RMS) / sqrt(18).
    conv = MPConv(2, 1, (3, 3)).eval()
    with torch.no_grad():
        conv.weight.fill_(2.0)  # RMS 2: normalized to 2 / 2.0001, effective 2 / 2.0001 / sqrt(18) each
        image = torch.ones(1, 2, 3, 3)
        out = conv(image)
    # Centre pixel sees all 18 taps: 18 * 0.2356954 = 4.2425166 (= sqrt(18) / 1.00005); a corner sees 2 x 4.
    tap = 2 / 2.0001 / math.sqrt(18)
    assert out.shape == (1, 1, 3, 3)
    assert close(out[0, 0], [[8 * tap, 12 * tap, 8 * tap], [12 * tap, 18 * tap, 12 * tap],
                             [8 * tap, 12 * tap, 8 * tap]], rel=1e-6)


def _attention_by_hand(qkv, heads):
    """SPEC §2.9 written out with Python loops over heads and queries."""
    n, c3, h, w = qkv.shape
    c = c3 // 3
    ch = c // heads
    per = qkv.double().reshape(n, heads, ch, 3, h * w)
    out = torch.zeros(n, heads, ch, h * w, dtype=torch.float64)
    for b in range(n):
        for head in range(heads):
            q, k, v = (per[b, head, :, j] for j in range(3))  # [ch, pixels]
            q, k, v = (t / (1e-4 + t.norm(dim=0) / math.sqrt(ch)) for t in (q, k, v))
            for p in range(h * w):
                logits = torch.tensor([float(q[:, p] @ k[:, s]) / math.sqrt(ch) for s in range(h * w)])
                weights = torch.exp(logits - logits.max())
                weights = weights / weights.sum()
                out[b, head, :, p] = v @ weights.double()
    return out.reshape(n, c, h, w)


@pytest.mark.parametrize("fast", [False, True], ids=["literal", "fast"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cosine_attention_equals_the_formula_by_hand(layout, fast):
    generator = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 3 * 8, 2, 3, generator=generator) * 4  # 2 heads of 4 channels, 6 pixels
    if layout == "channels_last":
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    out = (fast_cosine_attention if fast else cosine_attention)(qkv, num_heads=2)
    assert close(out, _attention_by_hand(qkv, 2), rel=1e-5, abs=1e-6)


# ==== §5 power-function EMA and post-hoc reconstruction =================================================

def test_sigma_rel_and_gamma_hand_values():
    # sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3))): g = 1 -> sqrt(2 / 36) = 0.2357023;
    # g = 0 -> sqrt(1 / 12) = 0.2886751; g = 2 -> sqrt(3 / 80) = 0.1936492; g = 7 -> sqrt(8 / 810) = 0.0993808.
    assert close(gamma_to_sigma_rel(np.array([1.0, 0.0, 2.0, 7.0])),
                 [0.2357022604, 0.2886751346, 0.1936491673, 0.0993807990], rel=1e-9)
    assert close(sigma_rel_to_gamma(np.array([0.2357022604, 0.1936491673, 0.0993807990])), [1.0, 2.0, 7.0],
                 rel=1e-8)


def test_power_function_beta_hand_values():
    # beta = (1 - dt / t)^(g + 1). g = 1: t = 4, dt = 1 -> 0.75^2 = 0.5625; t = 10, dt = 2 -> 0.8^2 = 0.64.
    # g = 2: t = 3, dt = 1 -> (2/3)^3 = 0.2962963. First update (dt = t): 0.
    s1, s2 = 0.2357022604, 0.1936491673
    assert close(power_function_beta(s1, [4, 10, 7], [1, 2, 7]), [0.5625, 0.64, 0.0], rel=1e-8)
    assert close(power_function_beta(s2, 3, 1), 8 / 27, rel=1e-8)


def test_power_ema_tracker_hand_weights():
    # gamma = 1, one image per update: beta_n = (1 - 1/n)^2. After 3 updates with live values p1, p2, p3:
    # n = 1: p1; n = 2: p1/4 + 3 p2/4; n = 3: 4/9 (p1/4 + 3 p2/4) + 5/9 p3 = (p1 + 3 p2 + 5 p3) / 9,
    # i.e. weights (2k - 1) / n^2, the discrete form of p(tau) = 2 tau / t^2.
    module = torch.nn.Linear(1, 1, bias=False)
    ema = PowerFunctionEMA(module, sigma_rels=[0.2357022604])
    for n, value in enumerate([1.0, 10.0, 100.0], start=1):
        with torch.no_grad():
            module.weight.fill_(value)
        ema.update(n, 1)
    assert ema.averaged_state_dict(0)["weight"].item() == pytest.approx((1 + 30 + 500) / 9, rel=1e-6)


def test_traditional_ema_hand_weights():
    # beta = 0.5^(dt / h), h = min(halflife, 0.09 nimg). Half-life 2 images without ramp-up, one image per
    # update: beta = 0.5^0.5 = 0.7071068. Start at p0 = 0; updates with 1, then 3:
    # 0.7071068 * 0 + 0.2928932 * 1 = 0.2928932; then 0.7071068 * 0.2928932 + 0.2928932 * 3 = 1.0857864.
    module = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = TraditionalEMA(module, halflife_img=2, rampup_ratio=None)
    for n, value in enumerate([1.0, 3.0], start=1):
        with torch.no_grad():
            module.weight.fill_(value)
        ema.update(n, 1)
    assert ema.averaged_state_dict()["weight"].item() == pytest.approx(1.0857864, rel=1e-6)
    # Ramp-up: nimg 100, ratio 0.09 -> h = 9 (< 50): beta for 3 images = 0.5^(3/9) = 0.7937005.
    ramp = TraditionalEMA(module, halflife_img=50, rampup_ratio=0.09)
    assert ramp.current_halflife(100) == pytest.approx(9.0)
    assert 0.5 ** (3 / ramp.current_halflife(100)) == pytest.approx(0.7937005, rel=1e-6)


def _profile(tau, t, gamma):
    return (gamma + 1) * tau ** gamma / t ** (gamma + 1) * (tau <= t)


def _inner_by_quadrature(t_a, g_a, t_b, g_b):
    """Integral of p_a p_b over [0, min(t_a, t_b)] by Gauss-Legendre quadrature: exact for these polynomials."""
    end = min(t_a, t_b)
    nodes, weights = np.polynomial.legendre.leggauss(40)
    tau = (nodes + 1) * end / 2
    return float(np.sum(weights * _profile(tau, t_a, g_a) * _profile(tau, t_b, g_b)) * end / 2)


def test_posthoc_least_squares_by_quadrature():
    # Inputs: profiles with gamma 2 and 6 at t = 50 and 100; target gamma 4 at t = 100. Integer gammas make
    # every product a polynomial, so Gauss-Legendre integrates the Gram matrix exactly.
    gammas_in, times_in = [2.0, 6.0, 2.0, 6.0], [50.0, 50.0, 100.0, 100.0]
    sig = lambda g: math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
    gram = np.array([[_inner_by_quadrature(ta, ga, tb, gb) for tb, gb in zip(times_in, gammas_in)]
                     for ta, ga in zip(times_in, gammas_in)])
    target = np.array([_inner_by_quadrature(ta, ga, 100.0, 4.0) for ta, ga in zip(times_in, gammas_in)])
    x = np.linalg.solve(gram, target)
    x = x / x.sum()
    got = solve_posthoc_coefficients(times_in, [sig(g) for g in gammas_in], 100.0, sig(4.0))
    assert got.shape == (4, 1) and close(got[:, 0], x, rel=1e-7, abs=1e-9)
    # The closed-form inner product (Eq. 151) itself, both orders of the times.
    assert power_function_inner_product(50.0, sig(2.0), 100.0, sig(6.0)) == pytest.approx(
        _inner_by_quadrature(50.0, 2.0, 100.0, 6.0), rel=1e-10)
    assert power_function_inner_product(100.0, sig(6.0), 50.0, sig(2.0)) == pytest.approx(
        _inner_by_quadrature(50.0, 2.0, 100.0, 6.0), rel=1e-10)
    # Hand value: <p(1, g=1), p(1, g=1)> = int 4 tau^2 = 4/3.
    assert power_function_inner_product(1.0, sig(1.0), 1.0, sig(1.0)) == pytest.approx(4 / 3, rel=1e-9)


# ==== §6 sampling ======================================================================================

def test_edm_sigmas_hand_values():
    # rho = 2, sigma_max 4, sigma_min 1, N = 3: roots 2 -> 1, midpoint 1.5, squared 2.25.
    assert close(edm_sigmas(3, 1.0, 4.0, 2.0), [4.0, 2.25, 1.0, 0.0], rel=1e-12)
    # rho = 3, sigma_max 27, sigma_min 1, N = 4: cube roots 3, 7/3, 5/3, 1 -> 12.7037037, 4.6296296, 1.
    assert close(edm_sigmas(4, 1.0, 27.0, 3.0), [27.0, 343 / 27, 125 / 27, 1.0, 0.0], rel=1e-12)


def _gaussian_denoiser(x, sigma, labels):
    """Ideal denoiser for unit-variance Gaussian data: D = x / (1 + sigma^2)."""
    return x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2)


def test_euler_and_heun_steps_hand_values():
    # sigmas [2, 1, 0], x0 = 10, D = x / (1 + sigma^2).
    # Euler: D(10; 2) = 2, d = (10 - 2) / 2 = 4, x1 = 10 - 4 = 6; last step D(6; 1) = 3, d = 3, x = 3.
    # Heun: the same Euler predictor x' = 6, d' = (6 - D(6; 1)) / 1 = 3, x1 = 10 - (4 + 3) / 2 = 6.5;
    # the last step is Euler: D(6.5; 1) = 3.25, x = 3.25.
    sigmas = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    x0 = torch.full([1, 1], 10.0, dtype=torch.float64)
    assert sample_euler(_gaussian_denoiser, x0, sigmas).item() == pytest.approx(3.0, rel=1e-6)
    assert sample_heun(_gaussian_denoiser, x0, sigmas).item() == pytest.approx(3.25, rel=1e-6)
    # Three steps [2, 1, 0.5, 0], Heun: step 1 from 6.5 at 1 to 0.5: D(6.5; 1) = 3.25, d = 3.25,
    # x' = 6.5 - 0.5 * 3.25 = 4.875, D(4.875; 0.5) = 3.9, d' = 0.975 / 0.5 = 1.95,
    # x = 6.5 - 0.5 (3.25 + 1.95) / 2 = 5.2; last: D(5.2; 0.5) = 4.16.
    sigmas3 = torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    assert sample_heun(_gaussian_denoiser, x0, sigmas3).item() == pytest.approx(4.16, rel=1e-6)


def test_churn_hand_values():
    # gamma = min(S_churn / N, sqrt(2) - 1) inside [S_min, S_max], else 0.
    assert churn_gamma(0.4, 2, 1.0) == pytest.approx(0.2)
    assert churn_gamma(10.0, 2, 1.0) == pytest.approx(SQRT2 - 1)
    assert churn_gamma(0.4, 2, 2.0, S_min=0.5, S_max=1.5) == 0.0
    assert churn_gamma(0.4, 2, 0.4, S_min=0.5, S_max=1.5) == 0.0
    assert churn_gamma(0.4, 2, 1.5, S_min=0.5, S_max=1.5) == pytest.approx(0.2)  # both ends inclusive
    assert churn_gamma(0.4, 2, 0.5, S_min=0.5, S_max=1.5) == pytest.approx(0.2)
    assert churn_gamma(0.0, 2, 1.0) == 0.0
    # Euler, sigmas [2, 1, 0], x0 = 10, S_churn 0.4 (gamma 0.2), S_noise 0.5, noise = 1, S_max 1.5 (step 0 skips).
    # Step 0 (no churn): x = 6 (as above). Step 1: t_hat = 1.2, x += sqrt(1.44 - 1) * 0.5 = 0.3316625 -> 6.3316625;
    # D = 6.3316625 / 2.44 = 2.5949436, d = (6.3316625 - 2.5949436) / 1.2 = 3.1139324, x = 6.3316625 - 1.2 d = 2.5949436.
    ones = lambda shape: torch.ones(shape)
    sigmas = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    x0 = torch.full([1, 1], 10.0, dtype=torch.float64)
    out = sample_euler(_gaussian_denoiser, x0, sigmas, S_churn=0.4, S_max=1.5, S_noise=0.5, noise_fn=ones)
    assert out.item() == pytest.approx(6.3316625 / 2.44, rel=1e-6)
    # Heun, churn on both steps, S_churn 10 (clamped: gamma = sqrt(2) - 1), S_noise 1, noise = 1.
    # Step 0: t_hat = 2 sqrt(2) = 2.8284271, x = 10 + sqrt(8 - 4) = 12; D = 12 / 9 = 1.3333333,
    # d = 10.6666667 / 2.8284271 = 3.7712362, x' = 12 + (1 - 2.8284271) d = 5.1045695; D(x'; 1) = 2.5522847,
    # d' = 2.5522847, x = 12 - 1.8284271 (3.7712362 + 2.5522847) / 2 = 12 - 5.7810486 = 6.2189514.
    # Step 1 (last): t_hat = 1.4142136, x += sqrt(2 - 1) = 7.2189514; D = 7.2189514 / 3 = 2.4063171, x = D.
    out = sample_heun(_gaussian_denoiser, x0, sigmas, S_churn=10.0, noise_fn=ones)
    assert out.item() == pytest.approx(7.2189514 / 3, rel=1e-6)


def test_guidance_is_the_lerp_from_guide_to_main():
    # D = w D_main + (1 - w) D_guide: main 2, guide 5, w = 1.5 -> 3 - 2.5 = 0.5; w = 0.25 -> 0.5 + 3.75 = 4.25.
    main = lambda x, s, c: torch.full_like(x, 2.0)
    guide = lambda x, s, c: torch.full_like(x, 5.0)
    x = torch.zeros(1, 2)
    assert close(guided(main, guide, 1.5)(x, None, None), [[0.5, 0.5]])
    assert close(guided(main, guide, 0.25)(x, None, None), [[4.25, 4.25]])


# ==== §7.5 Fréchet distance ============================================================================

def test_frechet_distance_of_commuting_covariances():
    # Sigma1 = Q diag(4, 9) Q^T, Sigma2 = Q diag(1, 16) Q^T share eigenvectors, so sqrtm(S1 S2) = Q diag(2, 12) Q^T:
    # FD = |mu1 - mu2|^2 + (4 + 9) + (1 + 16) - 2 (2 + 12) = 5 + 30 - 28 = 7 for mu1 - mu2 = (1, 2).
    angle = 0.3
    q = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    s1, s2 = q @ np.diag([4.0, 9.0]) @ q.T, q @ np.diag([1.0, 16.0]) @ q.T
    assert frechet_distance([1.0, 2.0], s1, [0.0, 0.0], s2) == pytest.approx(7.0, rel=1e-12)
    # Diagonal 1-D: (mu1 - mu2)^2 + (s1 - s2)^2 = 9 + (2 - 5)^2 = 18.
    assert frechet_distance([3.0], [[4.0]], [0.0], [[25.0]]) == pytest.approx(18.0, rel=1e-12)


def test_feature_statistics_unbiased_hand_values():
    # Features (0, 1), (2, 1), (4, 4): means (2, 2); unbiased covariance: var x = (4 + 0 + 4) / 2 = 4,
    # var y = (1 + 1 + 4) / 2 = 3, cov = (2 + 0 + 4) / 2 = 3.
    mu, sigma = feature_statistics([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    assert close(mu, [2.0, 2.0]) and close(sigma, [[4.0, 3.0], [3.0, 3.0]], rel=1e-12)


# ==== §9 ScaleLong ====================================================================================

def test_skip_coefficients_and_mp_balance_hand_values():
    # kappa_i = kappa^(i - 1), outermost first: 0.5 -> 1, 0.5, 0.25, 0.125.
    assert skip_coefficients(4, 0.5) == pytest.approx((1.0, 0.5, 0.25, 0.125))
    assert skip_coefficients(3, 0.5, "level", [0, 2, 1]) == pytest.approx((1.0, 0.25, 0.5))
    assert skip_coefficients(2, 0.7, "all") == pytest.approx((0.7, 0.7))
    # cs-mp: t_i / (1 - t_i) = kappa t / (1 - t). kappa 0.5, t 0.5 -> odds 0.5 -> t_i = 1/3;
    # kappa 0.25, t 0.3 -> odds 0.25 * 0.3 / 0.7 = 0.1071429 -> t_i = 0.0967742 (= 3 / 31).
    assert mp_balance(0.5, 0.5) == pytest.approx(1 / 3, rel=1e-12)
    assert mp_balance(0.25, 0.3) == pytest.approx(3 / 31, rel=1e-12)


def test_skip_gate_by_hand():
    # zeta(s) = sigmoid(W2 relu(W1 mean_over_features(s) + b1) + b2), reduction 16 (SPEC §9.3).
    gate = SkipGate(32, squeeze_dims=(-1,), make_layer=torch.nn.Linear)
    assert gate.hidden == 2
    with torch.no_grad():  # the second hidden unit is negative for every input below: the ReLU must zero it
        gate.first.bias.copy_(torch.tensor([0.5, -3.0]))
    skip = torch.randn(2, 32, 5, generator=torch.Generator().manual_seed(4))
    w1, b1, w2, b2 = (p.detach() for p in (gate.first.weight, gate.first.bias, gate.second.weight, gate.second.bias))
    pooled = skip.sum(-1) / 5
    before_relu = pooled @ w1.T + b1
    assert bool((before_relu[:, 1] < 0).all()) and bool((before_relu[:, 0] > 0).all())
    coefficient = 1 / (1 + torch.exp(-(before_relu.clamp_min(0) @ w2.T + b2)))
    with torch.no_grad():
        assert close(gate(skip), skip * coefficient[..., None], rel=1e-5, abs=1e-7)


# The digits preset's U-Net (3 levels, 2 blocks each): SPEC §3.5's pairing, written out. Skip i (0-based, the
# paper's i + 1) leaves the i-th encoder module in execution order and joins the decoder block that mirrors it;
# the outermost (the input convolution) joins the last decoder block. CS multiplies it by kappa^i.
DIGITS_SKIPS = [("8x8_conv", "8x8_block2"), ("8x8_block0", "8x8_block1"), ("8x8_block1", "8x8_block0"),
                ("4x4_down", "4x4_block2"), ("4x4_block0", "4x4_block1"), ("4x4_block1", "4x4_block0"),
                ("2x2_down", "2x2_block2"), ("2x2_block0", "2x2_block1"), ("2x2_block1", "2x2_block0")]


def _digits_net(**changes):
    from mpdiff import build_network
    from mpdiff.presets import PRESETS

    torch.manual_seed(0)
    net = build_network(PRESETS["digits"].network.replace(**changes)).eval()
    with torch.no_grad():  # non-zero gains, so that every skip reaches the output
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.3)
    return net


def _capture(modules, pre=False):
    """Hooks recording, per name, each module's output (or, with pre=True, its positional inputs)."""
    seen, handles = {}, []
    for name, module in modules.items():
        if pre:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: seen.__setitem__(name, [a.detach().clone() for a in args])))
        else:
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: seen.__setitem__(name, out.detach().clone())))
    return seen, handles


def _digits_inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 8, 8, generator=generator), torch.tensor([0.3, 2.0]), torch.eye(10)[:2]


@pytest.mark.parametrize("config", ["C", "G"])
def test_unet_cs_gives_the_ith_skip_from_outside_kappa_to_the_i_minus_1(config):
    kappa = 0.5
    net = _digits_net(config=config, skip_scaling="cs", kappa=kappa)
    unet = net.unet
    enc_out, enc_handles = _capture(unet.enc)
    dec_in, dec_handles = _capture(unet.dec, pre=True)
    with torch.no_grad():
        net(*_digits_inputs())
    for h in enc_handles + dec_handles:
        h.remove()
    assert len(DIGITS_SKIPS) == len(unet.enc)
    for i, (source, target) in enumerate(DIGITS_SKIPS):
        skip = enc_out[source]
        joined = dec_in[target][0]
        width = skip.shape[1]
        main = joined.shape[1] - width
        # Config C concatenates plainly; G's MP-Cat at t = 0.5 weighs the skip by C t / sqrt(Nb),
        # C = sqrt((Na + Nb) / 0.5): sqrt(2 (Na + Nb)) * 0.5 / sqrt(Nb) = sqrt((Na + Nb) / (2 Nb)).
        weight = 1.0 if config == "C" else math.sqrt((main + width) / (2 * width))
        assert close(joined[:, main:], weight * kappa ** i * skip, rel=1e-5, abs=1e-6), (i, source, target)


def test_uvit_cs_gives_the_innermost_skip_the_highest_power():
    # UViT, depth 6: encoder blocks 0, 1, 2, the middle block, decoder blocks 0, 1, 2. Decoder block j takes
    # encoder block 2 - j's output (last in, first out); skip i = encoder block i (0 = outermost) is scaled by
    # kappa^i, so decoder block 0 (right after the middle block) multiplies by kappa^2, block 2 by 1 (SPEC §9.2).
    kappa = 0.5
    net = _digits_net(backbone="uvit", model_channels=32, depth=6, patch_size=2, channels_per_head=16,
                      skip_scaling="cs", kappa=kappa)
    uvit = net.unet
    enc_out, enc_handles = _capture(uvit.enc)
    dec_in, dec_handles = _capture({k: v for k, v in uvit.dec.items() if k != "mid"}, pre=True)
    with torch.no_grad():
        net(*_digits_inputs())
    for h in enc_handles + dec_handles:
        h.remove()
    for j, (source, power) in enumerate([("block2", 2), ("block1", 1), ("block0", 0)]):
        assert close(dec_in[f"block{j}"][1], kappa ** power * enc_out[source], rel=1e-6, abs=1e-7), j


# ==== §2-3 config G's network, written out by hand ======================================================
# The digits preset's U-Net (8x8x1, widths 32/64/64, 2 blocks per level, attention at 4x4, 64 channels per
# head), computed from its weights with SPEC §2-3's formulas in float64: every constant of G (mp_silu's 0.596,
# the 0.3 residual and attention balances, the 0.5 label and skip balances, sqrt(label_dim), c = 1 + linear,
# the ones channel, the pixel norm at encoder entry, the gains) is written here, not read from mpdiff.

def _conv_by_hand(layer, x, gain=1.0):
    """MPConv: W / (1e-4 + RMS of its row) * gain / sqrt(fan_in); linear or 'same' convolution."""
    w = layer.weight.detach().double()
    rms = w.flatten(1).pow(2).mean(1).sqrt().reshape(-1, *[1] * (w.ndim - 1))
    w = w / (1e-4 + rms) * gain / math.sqrt(w[0].numel())
    return x @ w.T if w.ndim == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)


def _silu_by_hand(x):
    return x * torch.sigmoid(x) / 0.596


def _sum_by_hand(a, b, t):
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t ** 2)


def _cat_by_hand(a, b, t=0.5):
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([c * (1 - t) / math.sqrt(na) * a, c * t / math.sqrt(nb) * b], dim=1)


def _attention_einsum(qkv, heads):
    n, c3, h, w = qkv.shape
    ch = c3 // 3 // heads
    q, k, v = qkv.reshape(n, heads, ch, 3, h * w).unbind(3)
    q, k, v = (t / (1e-4 + t.pow(2).mean(2, keepdim=True).sqrt()) for t in (q, k, v))
    weights = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(ch)).softmax(-1)
    return torch.einsum("nhqk,nhck->nhcq", weights, v).reshape(n, c3 // 3, h, w)


def _block_by_hand(block, x, emb, kind, resample):
    """SPEC §3.3."""
    if resample == "down":
        x = F.avg_pool2d(x, 2)
    elif resample == "up":
        x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    if kind == "enc":
        if block.conv_skip is not None:
            x = _conv_by_hand(block.conv_skip, x)
        x = x / (1e-4 + x.pow(2).mean(1, keepdim=True).sqrt())  # pixel norm
    y = _conv_by_hand(block.conv_res0, _silu_by_hand(x))
    c = _conv_by_hand(block.emb_linear, emb, gain=float(block.emb_gain)) + 1
    y = _conv_by_hand(block.conv_res1, _silu_by_hand(y * c[:, :, None, None]))
    if kind == "dec" and block.conv_skip is not None:
        x = _conv_by_hand(block.conv_skip, x)
    x = _sum_by_hand(x, y, 0.3)
    if block.attn_qkv is not None:
        heads = block.attn_qkv.weight.shape[0] // 3 // 64
        mixed = _attention_einsum(_conv_by_hand(block.attn_qkv, x), heads)
        x = _sum_by_hand(x, _conv_by_hand(block.attn_proj, mixed), 0.3)
    return x.clamp(-256, 256)


DIGITS_ENCODER = [("8x8_conv", None), ("8x8_block0", "keep"), ("8x8_block1", "keep"), ("4x4_down", "down"),
                  ("4x4_block0", "keep"), ("4x4_block1", "keep"), ("2x2_down", "down"), ("2x2_block0", "keep"),
                  ("2x2_block1", "keep")]
# (name, resampling, takes a skip)
DIGITS_DECODER = [("2x2_in0", "keep", False), ("2x2_in1", "keep", False)] + \
    [(f"2x2_block{i}", "keep", True) for i in range(3)] + [("4x4_up", "up", False)] + \
    [(f"4x4_block{i}", "keep", True) for i in range(3)] + [("8x8_up", "up", False)] + \
    [(f"8x8_block{i}", "keep", True) for i in range(3)]


def _digits_denoiser_by_hand(net, x, sigma, labels):
    unet = net.unet
    s = sigma.double().reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in = 0.25 / (s ** 2 + 0.25), s * 0.5 / (s ** 2 + 0.25).sqrt(), 1 / (s ** 2 + 0.25).sqrt()
    c_noise = sigma.double().log() / 4
    fourier = SQRT2 * torch.cos(torch.outer(c_noise, unet.emb_fourier.freqs.double()) + unet.emb_fourier.phases.double())
    e = _conv_by_hand(unet.emb_noise, fourier)
    e = _sum_by_hand(e, _conv_by_hand(unet.emb_label, labels.double() * math.sqrt(labels.shape[1])), 0.5)
    emb = _silu_by_hand(e)
    h = torch.cat([c_in * x.double(), torch.ones_like(x, dtype=torch.float64)], dim=1)
    skips = []
    for name, resample in DIGITS_ENCODER:
        block = unet.enc[name]
        h = _conv_by_hand(block, h) if resample is None else _block_by_hand(block, h, emb, "enc", resample)
        skips.append(h)
    for name, resample, takes_skip in DIGITS_DECODER:
        if takes_skip:
            h = _cat_by_hand(h, skips.pop(), 0.5)
        h = _block_by_hand(unet.dec[name], h, emb, "dec", resample)
    raw = _conv_by_hand(unet.out_conv, h, gain=float(unet.out_gain))
    return c_skip * x.double() + c_out * raw


@pytest.mark.parametrize("pixel_major", [None, True, False], ids=["literal", "fast-channels-last", "fast"])
def test_config_g_denoiser_equals_the_spec_by_hand(pixel_major):
    net = _digits_net() if pixel_major is None else accelerate(_digits_net())
    with torch.no_grad():  # distinct gains: a swapped gain would show
        net.unet.out_gain.fill_(0.7)
        for i, block in enumerate([*net.unet.enc.values(), *net.unet.dec.values()]):
            if getattr(block, "emb_gain", None) is not None:
                block.emb_gain.fill_(0.2 + 0.05 * i)
    if pixel_major is not None:
        net.unet.pixel_major = pixel_major
    x, sigma, labels = _digits_inputs()
    x = x * 1.5
    with torch.no_grad():
        ours = net(x, sigma, labels)
        by_hand = _digits_denoiser_by_hand(net, x, sigma, labels)
    # float32 against float64 through 22 layers: measured 2e-7 of the output's scale; bound 1e-5.
    scale = by_hand.abs().max().item()
    assert (ours.double() - by_hand).abs().max().item() < 1e-5 * scale
    # Not c_skip x alone: the network's part is a sizeable share of D.
    assert (by_hand - 0.25 / (sigma.double().reshape(-1, 1, 1, 1) ** 2 + 0.25) * x.double()).abs().max() > 0.05 * scale
