"""UViT: a vision transformer with U-Net-style long skips, the backbone of ScaleLong's experiments
(Bao et al., "All are Worth Words", CVPR 2023; SPEC §9.4).

The image is cut into patches; the tokens are the patches, one token for the noise level and, for a
class-conditional network, one for the class. A learned position embedding is added, then
``depth / 2`` transformer blocks (``enc``), a middle block and ``depth / 2`` more (``dec``). Every
encoder block's output is a long skip: the decoder block at the mirrored depth concatenates it to its
input and projects 2D -> D with a linear layer before attending. The patch tokens are then projected
back to pixels, reassembled, and a 3x3 convolution gives the output.

Blocks are pre-norm (LayerNorm, multi-head attention without qkv bias, LayerNorm, GELU MLP, each
added to the residual stream). Initialisation as in the reference: every linear layer's weight from
a normal distribution truncated to +-2 with standard deviation 0.02, biases zero, LayerNorm affine
at identity, the position embedding like the linear weights, the convolutions PyTorch's default,
the class vectors N(0, 1) (an embedding table). ScaleLong's learnable gates (``ls`` modes) are
created after that pass, with PyTorch's default linear init, as in the reference.

Two deviations from the reference, both forced by running inside EDM's framework (SPEC §1.1): the
network is F of the preconditioning (it receives c_in x and c_noise = ln(sigma) / 4, and its output
is scaled by c_out), not a noise predictor; and the noise-level token is a random-Fourier embedding
of c_noise (as configs C-F use, SPEC §4.5) instead of a sinusoidal embedding of an integer timestep
in 0..999, which has no counterpart for continuous sigma. The network computes in float32 whatever
``use_fp16`` says.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mpdiff.config import require
from mpdiff.nn.layout import LongSkip
from mpdiff.nn.primitives import FourierFeatures
from mpdiff.nn.skips import SkipGate, SkipScaling, check_skip_options, skip_coefficients

INIT_STD = 0.02  # weights of linear layers and the position embedding (truncated normal)


class Attention(nn.Module):
    """Multi-head scaled dot-product self-attention over tokens [N, L, D] (no qkv bias)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.proj(mixed.transpose(1, 2).reshape(n, length, width))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block; with `takes_skip`, a long skip is fused first by Linear(2D -> D)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, takes_skip: bool = False):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.skip_linear = nn.Linear(2 * width, width) if takes_skip else None
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """The raw network F(x, noise_labels, class_labels) as a UViT (SPEC §9.4).

    Args:
        img_resolution, img_channels: input size (square, divisible by `patch_size`).
        label_dim: number of classes; 0 makes the network unconditional (no class token).
        model_channels: token width D.
        depth: transformer blocks besides the middle one; depth / 2 before it (each a long skip) and
            depth / 2 after. Must be even.
        patch_size: patch side in pixels.
        channels_per_head: attention head width; heads = D / channels_per_head.
        mlp_ratio: MLP hidden width over D.
        skip_scaling, kappa, kappa_rule: ScaleLong's long-skip scaling (:mod:`mpdiff.nn.skips`). A gate
            squeezes a skip over its features and gives one coefficient per token, shared by all skips
            in 'ls' mode (the skips all have the same shape), as in the reference.

    ``enc`` and ``dec`` are ModuleDicts of blocks in forward order (``dec`` starts with the middle
    block), ``skips`` lists the long skips outermost first, like the U-Net's.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, model_channels: int = 512,
                 depth: int = 12, patch_size: int = 2, channels_per_head: int = 64, mlp_ratio: float = 4.0,
                 skip_scaling: str = "none", kappa: float = 0.5, kappa_rule: str = "skip"):
        super().__init__()
        require(depth >= 2 and depth % 2 == 0, f"{{depth}} of a UViT must be a positive even number, got {depth}",
                "depth")
        require(patch_size >= 1 and img_resolution % patch_size == 0,
                f"{{patch_size}} {patch_size} does not divide the image resolution {img_resolution}", "patch_size")
        require(channels_per_head >= 1 and model_channels % channels_per_head == 0, f"{{model_channels}} "
                f"{model_channels} of a UViT must be a multiple of channels_per_head {channels_per_head}",
                "model_channels")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.patch_size = patch_size
        width = model_channels
        heads = width // channels_per_head
        half = depth // 2
        self.num_patches = (img_resolution // patch_size) ** 2
        self.extra_tokens = 1 + bool(label_dim)  # noise level, class

        self.patch_embed = nn.Conv2d(img_channels, width, kernel_size=patch_size, stride=patch_size)
        self.noise_features = FourierFeatures(width)
        self.label_embed = nn.Parameter(torch.randn(label_dim, width)) if label_dim else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extra_tokens + self.num_patches, width))
        self.enc = nn.ModuleDict({f"block{i}": TransformerBlock(width, heads, mlp_ratio) for i in range(half)})
        self.dec = nn.ModuleDict({"mid": TransformerBlock(width, heads, mlp_ratio)})
        for i in range(half):
            self.dec[f"block{i}"] = TransformerBlock(width, heads, mlp_ratio, takes_skip=True)
        self.out_norm = nn.LayerNorm(width)
        self.out_linear = nn.Linear(width, patch_size ** 2 * img_channels)
        self.out_conv = nn.Conv2d(img_channels, img_channels, kernel_size=3, padding=1)
        self._init_weights()

        # Decoder block j (0 right after the middle) takes encoder block half - 1 - j's output: LIFO.
        self._skips = tuple(LongSkip(i, f"block{i}", f"block{half - 1 - i}", width) for i in range(half))
        check_skip_options(skip_scaling, kappa, kappa_rule, half, mp_concat=False, backbone="UViT")
        tokens = self.extra_tokens + self.num_patches
        keys = ["all" if skip_scaling == "ls" else f"skip{i}" for i in range(half)]
        self.skip_scaling = SkipScaling(
            skip_scaling, skip_coefficients(half, kappa, kappa_rule, [0] * half), keys,
            lambda index: SkipGate(tokens, squeeze_dims=(-1,), make_layer=nn.Linear))

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def skips(self):
        """The long skips (:class:`~mpdiff.nn.layout.LongSkip`), outermost first (level 0: one resolution)."""
        return self._skips

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, patches, p * p * C] -> [N, C, H, W]: patches row-major, pixels within a patch row-major,
        channels last (the layout of ScaleLong's unpatchify)."""
        n = x.shape[0]
        p, c = self.patch_size, self.img_channels
        side = self.img_resolution // p
        x = x.reshape(n, side, side, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, side * p, side * p)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        x = x.to(self.pos_embed.dtype)
        tokens = [self.noise_features(noise_labels.to(x.dtype))[:, None]]
        if self.label_embed is not None:
            labels = class_labels.to(x.dtype).expand(x.shape[0], -1) if class_labels is not None else \
                x.new_zeros([x.shape[0], self.label_dim])
            tokens.append((labels @ self.label_embed)[:, None])
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([*tokens, patches], dim=1) + self.pos_embed

        waiting = []
        for block in self.enc.values():
            h = block(h)
            waiting.append(h)
        h = self.dec["mid"](h)
        for j in range(len(self._skips)):
            index = len(self._skips) - 1 - j
            h = self.dec[f"block{j}"](h, self.skip_scaling(waiting.pop(), index))
        h = self.out_linear(self.out_norm(h))[:, self.extra_tokens:]
        return self.out_conv(self.unpatchify(h))

    def extra_repr(self) -> str:
        return f"tokens={self.extra_tokens}+{self.num_patches}, patch={self.patch_size}, res={self.img_resolution}"

