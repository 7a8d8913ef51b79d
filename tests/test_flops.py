"""Parameter and flop counts (paper Table 6, Sec. 7.6) computed on the meta device."""

import math

import pytest
import torch

from mpdiff import PRESETS, build_network
from mpdiff.errors import ConfigError
from mpdiff.nn.flops import (
    FlopCounter,
    build_meta_network,
    count_flops,
    count_params,
    describe_preset,
)
from mpdiff.nn.primitives import MPConv

# Paper Table 6 / SPEC §3.6: (Mparams, Gflops per evaluation).
PUBLISHED = {
    "edm2-img512-xs": (124.71, 45.5),
    "edm2-img512-s": (280.21, 102.2),
    "edm2-img512-m": (497.81, 180.8),
    "edm2-img512-l": (777.50, 282.2),
    "edm2-img512-xl": (1119.28, 405.9),
    "edm2-img512-xxl": (1523.16, 552.1),
    "edm2-img64-s": (280.21, 101.9),
    "edm2-img64-m": (497.81, 180.8),
    "edm2-img64-l": (777.50, 282.1),
    "edm2-img64-xl": (1119.28, 405.9),
}


def test_every_paper_preset_has_its_published_size():
    # The guide sizes of the code release (XXS; XS at 64x64) have no published counts; digits and the
    # CPU recipes are ours.
    assert set(PRESETS) - set(PUBLISHED) == {"edm2-img512-xxs", "edm2-img64-xs", "digits", "cpu32", "cpu64",
                                             "digits-uvit", "uvit-cifar10", "mnist"}


def test_scalelong_cifar10_uvit_has_the_published_size():
    # U-ViT-S/2, the CIFAR-10 network of the U-ViT paper (Table 1 there: 44 M parameters), which
    # ScaleLong's repository trains; plus our 129-parameter uncertainty head.
    result = count_flops(PRESETS["uvit-cifar10"].network)
    assert round(result["params"] / 1e6) == 44 and result["unknown_ops"] == {}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_published_params_and_gflops(name):
    mparams, gflops = PUBLISHED[name]
    result = count_flops(PRESETS[name].network)
    assert abs(result["params"] / 1e6 - mparams) <= 0.01  # exact to the paper's two decimals
    assert result["flops"] / 1e9 == pytest.approx(gflops, rel=0.02)
    assert result["by_op"]["convolution"] > 0.95 * result["flops"]
    assert result["unknown_ops"] == {}  # every op of the network is counted
    assert result["flops"] == pytest.approx(sum(result["by_op"].values()))


def test_xs_matches_reference_tool():
    # NVIDIA's count_flops.py on its own XS network (run on CPU) reports 45,497,836,276 flops;
    # the few hundred left are scalar ops its tracer records on the constant 1/sqrt(fan_in).
    assert abs(count_flops(PRESETS["edm2-img512-xs"].network)["flops"] - 45_497_836_276) < 1000


def test_xxl_breakdown_matches_paper():
    # Sec. 7.6: convolutions 545.5 G, vector norms 1.54 G, matmuls 1.43 G for XXL.
    by_op = count_flops(PRESETS["edm2-img512-xxl"].network)["by_op"]
    assert by_op["convolution"] / 1e9 == pytest.approx(545.5, rel=0.001)
    assert by_op["linalg_vector_norm"] / 1e9 == pytest.approx(1.54, rel=0.01)
    assert (by_op["mm"] + by_op["bmm"]) / 1e9 == pytest.approx(1.43, rel=0.01)


@pytest.mark.parametrize("name", sorted(set(PRESETS) - set(PUBLISHED)))
def test_no_unknown_ops_in_the_other_presets(name):
    result = count_flops(PRESETS[name].network)
    assert result["unknown_ops"] == {}
    assert result["flops"] == pytest.approx(sum(result["by_op"].values()))


def test_count_runs_on_meta_without_materialising():
    net = build_meta_network(PRESETS["edm2-img512-xxl"].network)
    assert all(p.is_meta for p in net.parameters())
    assert all(b.is_meta for b in net.buffers())
    result = count_flops(net)
    assert all(p.is_meta for p in net.parameters())
    assert result["params"] == count_params(net) == sum(p.numel() for p in net.parameters())


def test_real_network_counts_same_and_is_untouched():
    config = PRESETS["digits"].network
    torch.manual_seed(0)
    net = build_network(config).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    real = count_flops(net)
    meta = count_flops(config)
    assert real["flops"] == meta["flops"] and real["params"] == meta["params"]
    assert net.training and all(m.training for m in net.modules())  # modes restored
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def _meta_mpconv(in_channels, out_channels, kernel):
    with torch.device("meta"):
        return MPConv(in_channels, out_channels, kernel).eval()


def test_linear_mpconv_exact_count():
    # Weight normalization of W [4, 8]: norm 32 + eps add 4 + divide 32 + gain scale 32,
    # then the product with x [3, 8]: 3 * 4 outputs x 8 multiply-adds.
    layer = _meta_mpconv(8, 4, [])
    x = torch.zeros(3, 8, device="meta")
    with torch.enable_grad(), FlopCounter() as counter:
        layer(x)
    costly = {op: flops for op, flops in counter.flops.items() if flops}
    assert costly == {"linalg_vector_norm": 32, "add": 4, "div": 32, "mul": 32, "mm": 96}
    assert counter.unknown == {}


def test_conv_mpconv_exact_count():
    # W [5, 3, 3, 3] (135 elements): WN 135 + 5 + 135 + 135; conv: 5*6*6 outputs x 27.
    layer = _meta_mpconv(3, 5, [3, 3])
    x = torch.zeros(1, 3, 6, 6, device="meta")
    with torch.enable_grad(), FlopCounter() as counter:
        layer(x)
    assert sum(counter.flops.values()) == 3 * 135 + 5 + 180 * 27
    assert counter.flops["convolution"] == 180 * 27


def test_weight_normalization_counted_even_without_grad():
    # MPConv caches its normalized weight when autograd is off; the count must not use it.
    config = PRESETS["digits"].network
    with torch.no_grad():
        no_grad = count_flops(config)
    assert no_grad["flops"] == count_flops(config)["flops"]
    assert no_grad["by_op"]["linalg_vector_norm"] > 0


def test_batch_amortizes_weight_normalization():
    config = PRESETS["digits"].network
    single, quad = count_flops(config, batch=1), count_flops(config, batch=4)
    assert quad["by_op"]["convolution"] == pytest.approx(single["by_op"]["convolution"])
    assert quad["by_op"]["linalg_vector_norm"] < single["by_op"]["linalg_vector_norm"]


def test_sdpa_counted_like_matmul_attention():
    config = PRESETS["digits"].network
    fused = count_flops(config.replace(attn_impl="sdpa"))
    assert fused["unknown_ops"] == {}
    assert fused["flops"] == pytest.approx(count_flops(config)["flops"], rel=1e-3)


def test_unknown_op_is_reported():
    x = torch.zeros(4, device="meta")
    with FlopCounter() as counter:
        torch.special.erf(x)
    assert counter.unknown == {"erf": 1}


def test_describe_preset_fields():
    info = describe_preset(PRESETS["digits"])
    assert info["name"] == "digits"
    assert isinstance(info["params"], int)
    assert info["mparams"] == round(info["params"] / 1e6, 2)
    assert math.isfinite(info["gflops"]) and info["gflops"] > 0
    assert info["network"] == PRESETS["digits"].network.to_dict()
    assert info["training"] == PRESETS["digits"].training.to_dict()


def test_describe_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        describe_preset("edm2-img512-xxxl")


def test_guide_presets_of_the_code_release():
    # XXS (ImageNet-512) and XS (ImageNet-64) are the guide networks of the released guided and autoguided
    # models (SPEC §3.6): C0 64 and 128, alpha_ref 0.017 and 0.012, no dropout; 31.31 M and 124.71 M
    # parameters as derived from the topology.
    xxs, xs64 = PRESETS["edm2-img512-xxs"], PRESETS["edm2-img64-xs"]
    assert (xxs.network.model_channels, xxs.training.lr, xxs.network.dropout) == (64, 0.0170, 0.0)
    assert (xs64.network.model_channels, xs64.training.lr, xs64.network.dropout) == (128, 0.0120, 0.0)
    assert xxs.training.duration == 2048 * 2 ** 20 and xs64.training.duration == 1024 * 2 ** 20
    assert xs64.training.P_mean == PRESETS["edm2-img64-s"].training.P_mean  # the ImageNet-64 recipe
    assert round(count_flops(xxs.network)["params"] / 1e6, 2) == 31.31
    assert round(count_flops(xs64.network)["params"] / 1e6, 2) == 124.71


def test_cadences_belong_to_the_preset():
    # The paper's runs: stats every 128 Ki images, EMA snapshots every 8 Mi, checkpoints every 128 Mi (SPEC §5.4).
    # A fixed 16 Ki snapshot cadence would write two snapshots every 8 steps at batch 2048.
    for name, preset in PRESETS.items():
        cadence = preset.cadence
        if name in ("digits", "digits-uvit"):
            assert (cadence.status_nimg, cadence.snapshot_nimg, cadence.checkpoint_nimg) == (16384, 16384, 65536)
        elif name == "uvit-cifar10":  # batch 128: ScaleLong's 500k steps are 64 M images
            assert (cadence.status_nimg, cadence.snapshot_nimg, cadence.checkpoint_nimg) == (2 ** 17, 2 ** 22, 2 ** 24)
        elif name in ("cpu32", "mnist"):
            assert (cadence.status_nimg, cadence.snapshot_nimg, cadence.checkpoint_nimg) == (4096, 4096, 16384)
        elif name == "cpu64":
            assert (cadence.status_nimg, cadence.snapshot_nimg, cadence.checkpoint_nimg) == (2048, 4096, 8192)
        else:
            assert (cadence.status_nimg, cadence.snapshot_nimg, cadence.checkpoint_nimg) == (2 ** 17, 2 ** 23, 2 ** 27)
        for nimg in (cadence.status_nimg, cadence.snapshot_nimg, cadence.checkpoint_nimg):
            assert nimg % preset.training.batch == 0
