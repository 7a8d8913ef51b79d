"""DINOv2 ViT-L/14, the feature network of FD_DINOv2 (SPEC §7.5), and its detector.

FD_DINOv2 is the Fréchet distance between the 1024-d DINOv2 ViT-L/14 features of two image sets, as
EDM2's ``calculate_metrics.py`` computes it: images (uint8, RGB) become float32, are resized to 224x224
with torch's antialiased bicubic filter (still in 0..255), divided by 255, normalised with the ImageNet
mean and std, and the feature is the network's output: the class token after the final LayerNorm.

The network is written here (:class:`DinoV2ViT`) so that no code from elsewhere runs: the official
weights file ``dinov2_vitl14_pretrain.pth`` is read as a plain state_dict (``weights_only``) or as a
safetensors file with the same keys, whose names and shapes the module reproduces, so that it loads
with ``strict=True``. Architecture of the official ViT-L/14 (no register tokens):

* patch embedding: a 14x14 convolution of stride 14 to 1024 channels (``patch_embed.proj``);
* a class token, and learned position embeddings for a 518x518 image (37x37 patches + the class
  token), resampled bicubically to the input's patch grid (see :meth:`DinoV2ViT.position_embedding`);
* 24 pre-norm blocks: LayerNorm -> 16-head attention (qkv with bias) -> LayerScale, and LayerNorm ->
  MLP (1024 -> 4096 -> 1024, exact GELU) -> LayerScale, each added to the residual stream;
* a final LayerNorm; every LayerNorm has eps 1e-6;
* ``mask_token`` (used only in training, by masked-image modelling) is kept so that the keys match.

The weights are not shipped and are never downloaded by mpdiff: see :data:`WEIGHTS_HELP`.
"""

import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from mpdiff.errors import CheckpointError
from mpdiff.metrics.detectors import Detector, check_images
from mpdiff.nn.build import check_state_dict
from mpdiff.storage.files import errors_as, show_path
from mpdiff.storage.tensors import open_safetensors, safe_torch_load

WEIGHTS_ENV = "MPDIFF_DINOV2"
WEIGHTS_FILE = "dinov2_vitl14_pretrain.pth"
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
WEIGHTS_HELP = (f"FD_DINOv2 needs {WEIGHTS_FILE}, the official DINOv2 ViT-L/14 checkpoint of the "
                f"facebookresearch/dinov2 release ({WEIGHTS_URL}): download it on a machine with internet "
                f"access and pass it as --dinov2 PATH or {WEIGHTS_ENV}=PATH")

# The preprocessing of EDM2's FD_DINOv2 ("torch" resize mode, its default).
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The official ViT-L/14: width, depth, heads, patch size and position-embedding grid (518 / 14 = 37).
VIT_L14 = dict(width=1024, depth=24, heads=16, patch=14, grid=37)
LAYER_NORM_EPS = 1e-6
# The official models resample position embeddings with a scale factor of (grid + 0.1) / native grid
# rather than a target size (kept in DINOv2 for compatibility with DINO's weights); no antialiasing.
POS_INTERP_OFFSET = 0.1


class _PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens [N, rows * cols, width], row-major."""

    def __init__(self, patch, width, channels=3):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % self.patch or w % self.patch:
            raise ValueError(f"input of {h}x{w} pixels is not a whole number of {self.patch}x{self.patch} patches")
        return self.proj(x).flatten(2).transpose(1, 2)


class _SelfAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width, bias=True)

    def forward(self, x):
        n, tokens, width = x.shape
        # qkv's output features are ordered (q|k|v, head, channel).
        q, k, v = self.qkv(x).view(n, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head width)) v
        return self.proj(out.transpose(1, 2).reshape(n, tokens, width))


class _LayerScale(nn.Module):
    """Per-channel gain on a residual branch (the official models start it at 1.0)."""

    def __init__(self, width, init=1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), float(init)))

    def forward(self, x):
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = _SelfAttention(width, heads)
        self.ls1 = _LayerScale(width)
        self.norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(width, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, width)))
        self.ls2 = _LayerScale(width)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2ViT(nn.Module):
    """A DINOv2 vision transformer (no register tokens) whose state_dict keys are the official ones.

    `grid` is the side of the square patch grid the position embeddings were learned for (37 for the
    official 518x518 models); inputs of any size that is a multiple of `patch` are accepted. The output
    of :meth:`forward` is the class token after the final LayerNorm, [N, width].
    """

    def __init__(self, width=1024, depth=24, heads=16, patch=14, grid=37, mlp_ratio=4.0, channels=3):
        super().__init__()
        self.width, self.depth, self.heads, self.patch, self.grid = width, depth, heads, patch, grid
        self.patch_embed = _PatchEmbed(patch, width, channels)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.mask_token = nn.Parameter(torch.zeros(1, width))
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        # Weights are meant to be loaded; this only makes a random instance (for tests) non-degenerate.
        # Not on the meta device (load_dinov2 builds there): it holds no values, and normal_ there goes
        # through torch._refs, whose first use imports torch._dynamo (~4 s).
        if self.pos_embed.device.type != "meta":
            with torch.no_grad():
                for p in (self.cls_token, self.pos_embed, self.mask_token):
                    p.normal_(std=0.02)

    @property
    def label(self):
        """'ViT-L/14' for the official size, else the configuration in words."""
        if dict(width=self.width, depth=self.depth, heads=self.heads, patch=self.patch, grid=self.grid) == VIT_L14:
            return "ViT-L/14"
        return (f"ViT (width {self.width}, depth {self.depth}, {self.heads} heads, patch {self.patch}, "
                f"{self.grid}x{self.grid} position grid)")

    def position_embedding(self, rows, cols):
        """Position embeddings [1, 1 + rows * cols, width] for a rows x cols patch grid.

        As the official models compute them: unchanged when the grid has the learned number of patches
        and the input is square; otherwise the patch embeddings, as a grid x grid image, are resampled
        in float32 by bicubic interpolation (align_corners=False, no antialiasing) with the scale factors
        ((rows + 0.1) / grid, (cols + 0.1) / grid). Since torch computes source coordinates from the scale
        factors it is given, this is not the same as asking for a rows x cols output.
        """
        table = self.pos_embed
        if rows * cols == self.grid * self.grid and rows == cols:
            return table
        dim = table.shape[-1]
        patches = table[:, 1:].float().reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        scale = ((rows + POS_INTERP_OFFSET) / self.grid, (cols + POS_INTERP_OFFSET) / self.grid)
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
        if tuple(patches.shape[-2:]) != (rows, cols):  # floor(grid * scale) is rows for any sane size
            raise RuntimeError(f"position embeddings resampled to {tuple(patches.shape[-2:])}, expected {(rows, cols)}")
        patches = patches.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
        return torch.cat([table[:, :1].float(), patches], dim=1).to(table.dtype)

    def tokens(self, x):
        """All tokens after the final LayerNorm, [N, 1 + patches, width]; the class token first."""
        rows, cols = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + self.position_embedding(rows, cols).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x):
        return self.tokens(x)[:, 0]


def vit_l14():
    """The official DINOv2 ViT-L/14 (304,368,640 parameters; its weights must be loaded)."""
    return DinoV2ViT(**VIT_L14)


def weights_path(path=None):
    """The DINOv2 weights file: `path`, else $MPDIFF_DINOV2; MpdiffError saying what is needed if neither."""
    path = path if path not in (None, "") else os.environ.get(WEIGHTS_ENV) or None
    if path is None:
        raise CheckpointError(WEIGHTS_HELP)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{show_path(path)}: file not found; {WEIGHTS_HELP}")
    return path


def load_dinov2(path=None, device="cpu", build=vit_l14):
    """The DINOv2 network with weights read from `path` (or $MPDIFF_DINOV2), in eval mode, on `device`.

    `path` is the official ``dinov2_vitl14_pretrain.pth`` (read with ``torch.load(weights_only=True)``:
    tensors only, no code) or a ``.safetensors`` file with the same keys. `build` makes the network the
    file must match exactly (keys, shapes, finite values); it defaults to :func:`vit_l14` and exists so
    that tests can use a small configuration. Problems raise CheckpointError (an MpdiffError), one line.
    """
    path = weights_path(path)
    if path.lower().endswith(".safetensors"):
        tensors = _read_safetensors(path)
    else:
        tensors = safe_torch_load(path)
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{show_path(path)}: holds a {type(tensors).__name__}, expected a state_dict "
                              f"(a dict of tensors); {WEIGHTS_HELP}")
    odd = next((k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise CheckpointError(f"{show_path(path)}: entry {str(odd)[:60]!r} is not a named tensor, expected a "
                              f"state_dict of tensors")
    with torch.device("meta"):
        net = build()
    if "register_tokens" in tensors:
        raise CheckpointError(f"{show_path(path)}: weights of a DINOv2 model with register tokens, expected the "
                              f"{net.label} without registers ({WEIGHTS_FILE} for FD_DINOv2)")
    check_state_dict(net.state_dict(), tensors, f"{show_path(path)}: not the weights of the DINOv2 {net.label}")
    net.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True, assign=True)
    return net.to(device).eval().requires_grad_(False)


def _read_safetensors(path):
    """All tensors of a safetensors file, whatever its metadata (files converted elsewhere carry their own)."""
    with errors_as(CheckpointError, f"{show_path(path)}: not a readable safetensors file"), \
            open_safetensors(path, what="DINOv2 weights file") as f:
        return {name: f.get_tensor(name) for name in f.offset_keys()}


class DinoV2Detector(Detector):
    """FD_DINOv2's detector: EDM2's preprocessing and the DINOv2 class-token feature.

    Give it a network (tests use a small random :class:`DinoV2ViT`), or a weights path, or neither to
    read $MPDIFF_DINOV2. feature_dim follows the network's width (1024 for ViT-L/14).
    """

    name = "dinov2"
    metric = "fd_dinov2"
    feature_dim = VIT_L14["width"]

    def __init__(self, network=None, path=None, device="cpu"):
        super().__init__(device)
        if network is None:
            network = load_dinov2(path, device=self.device)
        self.network = network.to(self.device).eval().requires_grad_(False)
        self.feature_dim = int(network.width)
        self.mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images):
        """uint8 [N, 1|3, H, W] -> normalised float32 [N, 3, 224, 224], in EDM2's order of operations.

        Grayscale is replicated to RGB first; the resize is torch's bicubic with antialias (align_corners
        left at its default, False) on values in 0..255, without clamping the filter's overshoot; then
        /255 and (x - mean) / std per channel.
        """
        x = check_images(images).to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x.to(torch.float32), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
        x = x / 255
        return (x - self.mean) / self.std

    def embed(self, inputs):
        return self.network(inputs)

