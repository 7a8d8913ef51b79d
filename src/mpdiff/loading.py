"""Finding and loading the network a user points at: a run directory, a network file, or a
plain state_dict in NVIDIA's layout; and the networks a command samples with (the network, its guide
as the guidance options resolve, and the decoder of its output)."""

import os

import torch

from mpdiff.data.latents import network_encoder
from mpdiff.diffusion.guidance import check_guidance, check_guide, resolve_guidance
from mpdiff.ema.snapshots import list_snapshots
from mpdiff.errors import CheckpointError
from mpdiff.nn.compat import load_edm2
from mpdiff.storage.layout import RunLayout
from mpdiff.storage.network_files import load_network
from mpdiff.storage.tensors import safe_torch_load


def resolve_network(source, sigma_rel=None, device="cpu"):
    """Load a network from a run directory, a network/snapshot file, or an official-layout state_dict.

    * run directory: its newest EMA snapshot (or post-hoc reconstruction, if `sigma_rel` names one)
      with the requested sigma_rel (default: the longest tracked profile);
    * ``.safetensors`` network file (snapshot, reconstruction, exported network);
    * ``.pt``/``.pth`` holding a plain state_dict in NVIDIA's layout (loaded with weights_only).
    Returns (net, description).
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        path = _pick_from_run(source, sigma_rel)
        net, _ = load_network(path, device=device)
        return net, path
    if not os.path.exists(source):
        raise CheckpointError(f"{source}: no such run directory or network file")
    if source.endswith((".pt", ".pth", ".pkl", ".pickle")):
        state = safe_torch_load(source)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{source}: expected a state_dict (a dict of tensors)")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{source}: expected a state_dict of tensors, but {str(key)[:80]!r} is a "
                                      f"{type(value).__name__}")
        try:
            return load_edm2(state, device=device).requires_grad_(False), source
        except CheckpointError as e:  # name the file the user gave, not the function
            raise CheckpointError(f"{source}: {str(e).removeprefix('load_edm2: ')}") from None
    net, _ = load_network(source, device=device)
    return net, source


def _pick_from_run(run_dir, sigma_rel):
    candidates = []
    if sigma_rel is not None:
        candidates = [(named.nimg, path) for named, path in RunLayout(run_dir).reconstructions()
                      if abs(named.sigma_rel - sigma_rel) < 5e-4]
    if candidates:
        return max(candidates)[1]
    records = list_snapshots(run_dir)
    tracked = sorted({r.sigma_rel for r in records})
    want = tracked[-1] if sigma_rel is None else sigma_rel
    matching = [r for r in records if abs(r.sigma_rel - want) < 5e-4]
    if not matching:
        raise CheckpointError(f"{run_dir}: no snapshot or reconstruction with sigma_rel {want:.3f} "
                              f"(tracked: {', '.join(f'{s:.3f}' for s in tracked)}); "
                              f"run `mpdiff phema {run_dir} --sigma-rel {want}` first")
    return max(matching, key=lambda r: r.nimg).path


def load_guided(source, sigma_rel=None, guide=None, guidance=None, guide_sigma_rel=None, guidance_preset=None,
                device="cpu"):
    """The networks of a command that samples: (net, guide or None, GuidanceChoice, description lines).

    The guidance preset, strength and EMA lengths resolve as :func:`~mpdiff.diffusion.guidance.resolve_guidance`
    says and are checked before anything is loaded. The guide (a source like `source`) is loaded and
    checked against the network even at w = 1, where it is not evaluated (and None is returned for it).
    """
    choice = check_guidance(resolve_guidance(guidance_preset, guidance, sigma_rel, guide_sigma_rel), guide is not None)
    net, described = resolve_network(source, choice.sigma_rel, device=device)
    lines = [f"network: {described}"]
    guide_net = None
    if guide is not None:
        guide_net, guide_described = resolve_network(guide, choice.guide_sigma_rel, device=device)
        kind = check_guide(net, guide_net, choice.preset.kind if choice.preset else None)
        lines.append(f"guide: {guide_described} ({kind}, w {choice.guidance:g}"
                     f"{'' if choice.guidance != 1 else ': unguided, the guide is not evaluated'})")
        guide_net = guide_net if choice.guidance != 1 else None
    if choice.preset is not None:
        lines.append(f"guidance preset {choice.preset.describe()}")
    return net, guide_net, choice, lines


def network_decoder(net, source, vae, device, lines):
    """The encoder that turns `net`'s output into images (pixels, or latents through the VAE in `vae`,
    default the one the run recorded); a line for latents is added to `lines`."""
    encoder = network_encoder(net, source, vae, device=device)
    if encoder.name != "pixels":
        lines.append(f"decoder: latents decoded with the Stable Diffusion VAE in {encoder.vae_dir} (raw_mean "
                     f"{list(encoder.raw_mean)}, raw_std {list(encoder.raw_std)})")
    return encoder
