"""Finding and loading the network a user points at: a run directory, a network file, one of NVIDIA's
release pickles, or a plain state_dict in NVIDIA's layout; and the networks a command samples with (the
network, its guide as the guidance options resolve, and the decoder of its output)."""

import math
import os

import torch

from mpdiff.config import require
from mpdiff.data.latents import ENCODER_NAME, LATENT_CHANNELS, RAW_MEAN, RAW_STD, SCALE, network_encoder
from mpdiff.diffusion.guidance import (check_guidance, check_guide, get_guidance_preset, resolve_guidance,
                                      with_preset_interval)
from mpdiff.ema.snapshots import list_snapshots
from mpdiff.errors import CheckpointError, ConfigError
from mpdiff.nn.compat import load_edm2
from mpdiff.storage.edm2_pickle import is_release_pickle, read_edm2_pickle
from mpdiff.storage.files import show_path, write_destination
from mpdiff.storage.layout import RunLayout
from mpdiff.storage.network_files import load_network, save_network
from mpdiff.storage.tensors import safe_torch_load

RELEASES_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/"  # where NVIDIA publishes them


def resolve_network(source, sigma_rel=None, device="cpu"):
    """Load a network from a run directory, a network/snapshot file, or an official-layout state_dict.

    * run directory: its newest EMA snapshot (or post-hoc reconstruction, if `sigma_rel` names one)
      with the requested sigma_rel (default: the longest tracked profile);
    * ``.safetensors`` network file (snapshot, reconstruction, exported or converted network);
    * ``.pkl`` of NVIDIA's releases (read by :func:`~mpdiff.storage.edm2_pickle.read_edm2_pickle`, which
      runs nothing of the file);
    * ``.pt``/``.pth`` holding a plain state_dict in NVIDIA's layout (loaded with weights_only).
    Returns (net, description). A network that comes with a description of its encoder (a release
    pickle's, a converted file's) carries it as ``net.encoder_description`` (see :func:`sampling_networks`).
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        path = _pick_from_run(source, sigma_rel)
        net, _ = load_network(path, device=device)
        return net, path
    if not os.path.exists(source):
        raise CheckpointError(f"{source}: no such run directory or network file")
    if is_release_pickle(source):
        release = read_edm2_pickle(source, device=device)
        release.net.encoder_description = release_encoder(release.encoder)
        return release.net.requires_grad_(False), source
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
    net, meta = load_network(source, device=device)
    if isinstance(meta.get("encoder"), dict):
        net.encoder_description = meta["encoder"]
    return net, source


def release_encoder(encoder):
    """Our description of the encoder a release pickle records (None: pixels, as NVIDIA's generator
    assumes): ``{'name': 'pixels'}``, or the latent encoder with the release's constants.

    NVIDIA's VAE encoder stores per-channel ``scale = final_std / raw_std`` and ``bias = final_mean -
    raw_mean * scale`` (float32) and decodes ``(x - bias) / scale``; :class:`~mpdiff.data.latents.LatentEncoder`
    decodes ``x * raw_std / 0.5 + raw_mean``. With its constructor's values (the recorded ones, else its
    defaults, which are SPEC §7.1's) when they give the stored scale and bias, else with the constants
    that the stored scale and bias imply (raw_std = 0.5 / scale, raw_mean = -bias / scale)."""
    if encoder is None or encoder.get("class_name") == "StandardRGBEncoder":
        return {"name": "pixels"}
    given = encoder.get("init_kwargs") or {}
    scale, bias = ([v] * LATENT_CHANNELS if len(v) == 1 else v for v in (encoder["scale"], encoder["bias"]))
    try:
        raw_mean, raw_std = given.get("raw_mean", RAW_MEAN), given.get("raw_std", RAW_STD)
        final_mean, final_std = float(given.get("final_mean", 0.0)), float(given.get("final_std", SCALE))
        std = [float(s) * SCALE / final_std for s in raw_std]   # = raw_std for EDM2's final_std 0.5
        mean = [float(m) - final_mean * float(s) / final_std for m, s in zip(raw_mean, raw_std)]
        agrees = len(std) == len(mean) == len(scale) == len(bias) and all(
            math.isclose(SCALE / s, c, rel_tol=1e-5) and math.isclose(-m * SCALE / s, b, rel_tol=1e-5, abs_tol=1e-6)
            for m, s, c, b in zip(mean, std, scale, bias))
    except (TypeError, ValueError, ZeroDivisionError):
        agrees = False
    if not agrees:
        std = [SCALE / c if c else math.inf for c in scale]
        mean = [-b / c if c else math.inf for b, c in zip(bias, scale)]
    return {"name": ENCODER_NAME, "raw_mean": mean, "raw_std": std, "vae_name": encoder.get("vae_name"),
            "release": {k: encoder[k] for k in ("scale", "bias")}}


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


def sampling_networks(source, sampling, sigma_rel=None, guide=None, guidance=None, guide_sigma_rel=None,
                      guidance_preset=None, vae=None, device="cpu", say=None):
    """What a command samples with: (net, guide or None, GuidanceChoice, decoder, sampling).

    The guidance preset, strength and EMA lengths resolve as :func:`~mpdiff.diffusion.guidance.resolve_guidance`
    says and are checked before anything is loaded. The guide (a source like `source`) is loaded and
    checked against the network even at w = 1, where it is not evaluated (and None is returned for it).
    The decoder turns the network's output into images: pixels, or latents through the VAE in `vae`
    (default: the one the run recorded), with the constants the network's file or run records. `sampling`
    comes back with the guidance preset's interval (:func:`~mpdiff.diffusion.guidance.with_preset_interval`).
    `say(line)` hears what was loaded.
    """
    choice = check_guidance(resolve_guidance(guidance_preset, guidance, sigma_rel, guide_sigma_rel), guide is not None)
    net, described = resolve_network(source, choice.sigma_rel, device=device)
    lines = [f"network: {described}", f"sampler: {sampling.sampler}, {sampling.check().num_steps} steps"]
    guide_net = None
    if guide is not None:
        guide_net, guide_described = resolve_network(guide, choice.guide_sigma_rel, device=device)
        kind = check_guide(net, guide_net, choice.preset.kind if choice.preset else None)
        lines.append(f"guide: {guide_described} ({kind}, w {choice.guidance:g}"
                     f"{'' if choice.guidance != 1 else ': unguided, the guide is not evaluated'})")
        guide_net = guide_net if choice.guidance != 1 else None
    if choice.preset is not None:
        lines.append(f"guidance preset {choice.preset.describe()}")
    decoder = network_encoder(net, source, vae, device=device, recorded=getattr(net, "encoder_description", None))
    if decoder.name != "pixels":
        lines.append(f"decoder: latents decoded with the Stable Diffusion VAE in {decoder.vae_dir} (raw_mean "
                     f"{list(decoder.raw_mean)}, raw_std {list(decoder.raw_std)})")
    for line in lines if say is not None else ():
        say(line)
    return net, guide_net, choice, decoder, with_preset_interval(sampling, choice)


def network_sources(source, guide, net_dir, guidance_preset, source_name="SOURCE"):
    """(network, guide) of a command: as given, or with `net_dir` a guidance preset's two released pickles in
    that folder (downloaded from NVIDIA under their release names). ConfigError for a missing network or
    file, or for a `net_dir` given with a source, a guide or no preset."""
    if net_dir is None:
        require(source is not None, f"give {source_name} (a run directory or network file), or {{net_dir}} with "
                f"{{guidance_preset}}", "net_dir", "guidance_preset")
        return source, guide
    require(source is None and guide is None, f"{{net_dir}} takes the network and its guide from the folder; give "
            f"no {source_name if source is not None else '{guide}'} with it", "net_dir", "guide")
    require(guidance_preset is not None, "{net_dir} needs a {guidance_preset}, which names the two files to take "
            "from it", "net_dir", "guidance_preset")
    preset = get_guidance_preset(guidance_preset)
    require(os.path.isdir(net_dir), f"{{net_dir}} {show_path(net_dir)}: no such folder", "net_dir")
    paths = [os.path.join(net_dir, n.release_file) for n in (preset.net, preset.guide)]
    missing = [os.path.basename(p) for p in paths if not os.path.exists(p)]
    require(not missing, f"{{net_dir}} {show_path(net_dir)} lacks {' and '.join(missing)}, the released "
            f"{'networks' if len(missing) > 1 else 'network'} of {preset.name}; download "
            f"{'them' if len(missing) > 1 else 'it'} from {RELEASES_URL}", "net_dir")
    return paths[0], paths[1]


def convert_network(source, dest, dtype=None):
    """Write the network of `source` (a release pickle, a state_dict in NVIDIA's layout, any network file)
    as our network file `dest`, once, so that later loads read safetensors. Floating tensors are stored
    as `dtype` (default: as in a release pickle, float16 for NVIDIA's releases, else float32). The
    metadata keeps what the source says beside the network: a release's encoder (as ours describes it,
    ``encoder``, and as recorded, ``edm2_encoder``), its constructor keywords, loss and dataset.
    Returns (net, metadata written)."""
    source, dest = os.fspath(source), os.fspath(dest)
    if not dest.endswith(".safetensors"):
        raise ConfigError(f"{show_path(dest)}: a network file's name ends in .safetensors (mpdiff reads the others "
                          f"as what their names say)")
    write_destination(dest)  # before reading a large file: a refused destination costs nothing
    metadata = {"converted_from": os.path.basename(source)}
    if os.path.isfile(source) and is_release_pickle(source):
        release = read_edm2_pickle(source)
        net, encoder = release.net, release_encoder(release.encoder)
        metadata.update({k: v for k, v in release.metadata().items() if k not in ("format", "network")})
        stored = release.stored_dtype
    else:
        net, _ = resolve_network(source)
        encoder, stored = getattr(net, "encoder_description", None), None
    if encoder is not None:
        metadata["encoder"] = encoder
    dtype = dtype or (stored if stored in ("float16", "bfloat16") else "float32")
    save_network(dest, net.state_dict(), net.config, dtype=dtype, **metadata)
    return net, dict(metadata, dtype=dtype)
