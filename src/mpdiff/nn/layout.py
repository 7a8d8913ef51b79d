"""The U-Net's topology as data: an ordered list of block specs and the long skips joining them.

:func:`unet_layout` turns the few numbers of a :class:`~mpdiff.config.NetworkConfig` (resolution,
widths per level, blocks per level, attention resolutions) into the encoder and decoder as plain
:class:`BlockSpec` records, in execution order (SPEC §3.5). :class:`~mpdiff.nn.unet.UNet` only
instantiates them. Every ablation config A-G shares this topology (SPEC §4.3); what differs inside
the blocks is :mod:`mpdiff.nn.ladder`'s business, and a skip-scaling rule acts on :attr:`UNetLayout.skips`.

Spec names are the ModuleDict keys of the released networks (``16x16_block0``, ``8x8_in1``,
``32x32_up``, ...), hence the state_dict keys of every network file.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

# Kinds of spec: the input convolution (a bare 3x3 MPConv) and the two Block flavors.
STEM, ENCODER, DECODER = "conv", "enc", "dec"


@dataclass(frozen=True)
class BlockSpec:
    """One module of the encoder or decoder.

    name: key in the UNet's ``enc`` / ``dec`` ModuleDict, ``<res>x<res>_<role>``.
    kind: ``'conv'`` (the input 3x3 convolution), ``'enc'`` or ``'dec'`` (Block flavor).
    in_channels: width the module receives; for a decoder block that takes a long skip, the main
        path plus the skip (they are concatenated first).
    out_channels: width it produces.
    resample: ``'keep'``, ``'down'`` or ``'up'``, applied first on the main path.
    attention: whether the block ends with self-attention.
    skip_from: name of the encoder module whose output is concatenated to the input, or None.
    """
    name: str
    kind: str
    in_channels: int
    out_channels: int
    resample: str = "keep"
    attention: bool = False
    skip_from: Optional[str] = None


@dataclass(frozen=True)
class LongSkip:
    """A long skip connection: the output of encoder module `source` joins decoder block `target`.

    index: 0 for the outermost skip (the input convolution to the last decoder block), counting
        inwards. channels: width of the skip tensor. level: resolution level of the skip tensor
        (0 = full resolution, 1 = half, ...).
    """
    index: int
    source: str
    target: str
    channels: int
    level: int = 0


@dataclass(frozen=True)
class UNetLayout:
    """Encoder and decoder specs in execution order."""
    encoder: Tuple[BlockSpec, ...]
    decoder: Tuple[BlockSpec, ...]

    @property
    def skips(self) -> Tuple[LongSkip, ...]:
        """Every long skip, outermost first. Each encoder output feeds exactly one decoder block."""
        widths, levels, level = {}, {}, 0
        for spec in self.encoder:
            level += spec.resample == "down"
            widths[spec.name], levels[spec.name] = spec.out_channels, level
        consumers = [spec for spec in reversed(self.decoder) if spec.skip_from is not None]
        return tuple(LongSkip(i, spec.skip_from, spec.name, widths[spec.skip_from], levels[spec.skip_from])
                     for i, spec in enumerate(consumers))

    @property
    def out_channels(self) -> int:
        """Width that reaches the output convolution."""
        return self.decoder[-1].out_channels


def unet_layout(img_resolution: int, img_channels: int, model_channels: int, channel_mult: Sequence[int],
                num_blocks: int, attn_resolutions: Sequence[int], ones_channel: bool = True) -> UNetLayout:
    """Describe the U-Net (SPEC §3.5); `ones_channel` widens the input by a constant-one channel (SPEC §2.15).

    Level i works at resolution img_resolution / 2^i with width model_channels * channel_mult[i].
    Encoder: the input conv (level 0) or a down-sampling block (deeper levels), then `num_blocks`
    blocks. Decoder, deepest level first: two blocks without skips (the first with attention) at
    the bottom, an up-sampling block elsewhere, then `num_blocks + 1` blocks, each taking one long
    skip. Every encoder output is a skip and they are consumed last-in, first-out.
    """
    levels = [(img_resolution >> i, model_channels * mult) for i, mult in enumerate(channel_mult)]
    encoder, decoder = [], []

    width = img_channels + int(ones_channel)
    for depth, (res, level_width) in enumerate(levels):
        if depth == 0:
            encoder.append(BlockSpec(_key(res, "conv"), STEM, width, level_width))
        else:
            encoder.append(BlockSpec(_key(res, "down"), ENCODER, width, width, resample="down"))
        for i in range(num_blocks):
            encoder.append(BlockSpec(_key(res, f"block{i}"), ENCODER, encoder[-1].out_channels, level_width,
                                     attention=res in attn_resolutions))
        width = level_width

    pending = list(encoder)  # skips not yet consumed; the deepest is on top
    for depth in reversed(range(len(levels))):
        res, level_width = levels[depth]
        if depth == len(levels) - 1:
            decoder.append(BlockSpec(_key(res, "in0"), DECODER, width, width, attention=True))
            decoder.append(BlockSpec(_key(res, "in1"), DECODER, width, width))
        else:
            decoder.append(BlockSpec(_key(res, "up"), DECODER, width, width, resample="up"))
        for i in range(num_blocks + 1):
            skip = pending.pop()
            decoder.append(BlockSpec(_key(res, f"block{i}"), DECODER, width + skip.out_channels, level_width,
                                     attention=res in attn_resolutions, skip_from=skip.name))
            width = level_width
    return UNetLayout(tuple(encoder), tuple(decoder))


def _key(res: int, role: str) -> str:
    return f"{res}x{res}_{role}"
