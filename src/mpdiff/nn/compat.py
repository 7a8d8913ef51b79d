"""Compatibility with NVIDIA's released EDM2 networks.

The released networks are Python pickles (which run code when loaded); mpdiff never unpickles.
Export a plain state_dict once with NVIDIA's own code (docs/COMPATIBILITY.md), then build our
network from it with :func:`load_edm2`. Our module and tensor names equal the official ones.
"""

import torch

from mpdiff.config import NetworkConfig
from mpdiff.errors import CheckpointError, first_line
from mpdiff.nn.build import build_meta_network, build_network, check_network_memory, check_state_dict

# Official Precond/UNet/Block keyword -> our NetworkConfig field (identical names today). The released
# networks are config G, so the ablation config is no keyword here.
_OFFICIAL_KEYWORDS = {f for f in NetworkConfig.__dataclass_fields__} - {"config"}


def infer_config(state_dict):
    """Infer the constructor keywords of an official-layout state_dict from tensor shapes."""
    sd = state_dict
    try:
        first = next(k for k in sd if k.startswith("unet.enc.") and k.endswith("_conv.weight"))
    except StopIteration:
        raise CheckpointError("state_dict is not in the EDM2 layout (no unet.enc.*_conv.weight)") from None
    res = int(first.split(".")[2].split("x")[0])
    w = sd[first]
    model_channels, img_channels = w.shape[0], w.shape[1] - 1
    levels = sorted({int(k.split(".")[2].split("x")[0]) for k in sd if k.startswith("unet.enc.")}, reverse=True)
    channel_mult, num_blocks = [], 0
    for r in levels:
        blocks = sorted({k.split(".")[2] for k in sd if k.startswith(f"unet.enc.{r}x{r}_block")})
        num_blocks = max(num_blocks, len(blocks))
        channel_mult.append(sd[f"unet.enc.{r}x{r}_block0.conv_res1.weight"].shape[0] // model_channels)
    attn = sorted({int(k.split(".")[2].split("x")[0]) for k in sd
                   if k.startswith("unet.enc.") and ".attn_qkv." in k}, reverse=True)
    label_dim = sd["unet.emb_label.weight"].shape[1] if "unet.emb_label.weight" in sd else 0
    noise_ch = sd["unet.emb_fourier.freqs"].shape[0]
    emb_ch = sd["unet.emb_noise.weight"].shape[0]
    return dict(img_resolution=res, img_channels=img_channels, label_dim=label_dim,
                model_channels=model_channels, channel_mult=channel_mult, num_blocks=num_blocks,
                attn_resolutions=attn,
                channel_mult_noise=None if noise_ch == model_channels * channel_mult[0] else noise_ch // model_channels,
                channel_mult_emb=None if emb_ch == model_channels * max(channel_mult) else emb_ch // model_channels,
                logvar_channels=sd["logvar_fourier.freqs"].shape[0])


def load_edm2(state_dict, device="cpu", **kwargs):
    """Build a :class:`~mpdiff.nn.precond.Precond` from an official-layout EDM2 state_dict.

    Keyword arguments are the official constructor keywords (img_resolution, img_channels,
    label_dim, model_channels, channel_mult, num_blocks, attn_resolutions, dropout,
    label_balance, concat_balance, ...). Those not given are inferred from tensor shapes, so
    ``load_edm2(sd)`` works for the released presets. Returns the network in eval mode.
    """
    unknown = sorted(set(kwargs) - _OFFICIAL_KEYWORDS)
    if unknown:
        raise CheckpointError(f"load_edm2: unknown keyword(s) {', '.join(unknown)}")
    bad_keys = [k for k in state_dict if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"load_edm2: state_dict keys must be tensor names, found {str(bad_keys[0])[:40]!r}")
    sd = {k: torch.as_tensor(v) for k, v in state_dict.items()}
    try:  # shapes come from a file: whatever they are, the result is a network or one line
        config = dict(infer_config(sd), **kwargs)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(f"load_edm2: state_dict is not in the EDM2 layout ({type(e).__name__}: "
                              f"{first_line(e, 120)})") from None
    config = NetworkConfig.from_dict(config, source="load_edm2")
    try:  # shapes only, before any memory: a forged file could describe an enormous network
        expected = build_meta_network(config).state_dict()
    except (TypeError, ValueError, RuntimeError, ArithmeticError, IndexError, KeyError) as e:
        raise CheckpointError(f"load_edm2: the inferred network cannot be built ({first_line(e, 120)})") from None
    check_network_memory(expected, "load_edm2")
    check_state_dict(expected, sd, f"load_edm2: state_dict does not match the network built from "
                                   f"{config.to_dict()}")
    net = build_network(config, device="cpu")
    net.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()})
    net.config = config
    return net.to(device).eval()
