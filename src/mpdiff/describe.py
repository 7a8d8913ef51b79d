"""What `mpdiff info` tells about presets and networks: the preset list, the released guided
configurations, and a preset's network, size, compute, recipe and (measured here) speed and memory.
A run's summary describes its network with the same lines (:func:`network_line`).

The command line parses the options and prints these lines; the numbers come from the model itself
(:func:`mpdiff.nn.flops.describe_preset`) and from :mod:`mpdiff.train.measure`.
"""

import dataclasses
import json

from mpdiff.config import SAMPLING, NetworkConfig, network_evaluations
from mpdiff.presets import PRESETS, get_preset, ladder_preset

MIB = 2 ** 20


def preset_lines():
    """One line per preset: its name and description."""
    return [f"{name:20s} {p.description}" for name, p in PRESETS.items()]


def guidance_preset_lines(as_json=False):
    """The released guided configurations (mpdiff generate --guidance-preset), one line each, or as
    one JSON document."""
    from mpdiff.diffusion.guidance import GUIDANCE_PRESETS

    if as_json:
        return [json.dumps({k: dataclasses.asdict(v) for k, v in GUIDANCE_PRESETS.items()}, indent=2)]
    return [p.describe() for p in GUIDANCE_PRESETS.values()]


def preset_description(preset, ladder=None, batch=None, measure=False, **network_changes):
    """The description of preset `preset` (a name) for `mpdiff info`: :func:`~mpdiff.nn.flops.describe_preset`
    of the preset with ablation config `ladder` applied and `network_changes` (e.g. img_resolution; None =
    the preset's); with `batch` or `measure`, also training and sampling measured on this machine at
    `batch` (default: the recipe's) and the default CPU micro-batch, under 'measured'."""
    from mpdiff.nn.flops import describe_preset

    network_changes = {k: v for k, v in network_changes.items() if v is not None}
    if ladder is not None:
        preset = ladder_preset(get_preset(preset), ladder)
    desc = describe_preset(preset, **network_changes)
    if batch is not None or measure:
        from mpdiff.train.measure import choose_micro_batch
        from mpdiff.train.measure import measure as run_measure

        batch = batch or desc["training"]["batch"]
        network = NetworkConfig.from_dict(desc["network"])
        desc["measured"] = dict(batch=batch, **run_measure(network, batch))
        micro, per_image, budget = choose_micro_batch(network, batch)
        desc["measured"]["default_micro_batch"] = dict(micro_batch=micro, activation_bytes_per_image=per_image,
                                                       budget_bytes=budget)
    return desc


def description_json(desc):
    """A description as the JSON document `mpdiff info --json` prints (without the per-op flops)."""
    return json.dumps({k: v for k, v in desc.items() if k != "gflops_by_op"}, indent=2)


def description_lines(desc, as_asked=False):
    """A description as the lines `mpdiff info PRESET` prints; `as_asked`: the image size or width was
    changed from the preset's, so a line says which network was counted."""
    t, c = desc["training"], desc["cadence"]
    net = NetworkConfig.from_dict(NetworkConfig.completed(desc["network"]))
    lines = [
        f"{desc['name']}: {desc['description']}",
        f"  network     {network_line(net)}"
        + ("" if net.skip_scaling == "none" else f"; skips {skip_scaling_summary(net)}"),
        f"  parameters  {desc['params']:,} ({desc['mparams']:.2f} M)",
        f"  compute     {desc['gflops']:.4g} Gflops per network evaluation",
        f"  training    batch {t['batch']}, lr {t['lr']}, decay {t['decay']}, duration {t['duration']:,} images, "
        f"P_mean {t['P_mean']}, P_std {t['P_std']}, dropout {desc['network']['dropout']}",
        f"  cadence     status every {c['status_nimg']:,} images, EMA snapshots every {c['snapshot_nimg']:,}, "
        f"checkpoints every {c['checkpoint_nimg']:,}",
    ]
    if as_asked:
        n = desc["network"]
        lines.append(f"  as asked    {n['img_resolution']}x{n['img_resolution']}x{n['img_channels']}, "
                     f"C0 {n['model_channels']}")
    if "measured" in desc:
        m = desc["measured"]
        evaluations = network_evaluations(SAMPLING.sampler, SAMPLING.check().num_steps)  # what train.measure times
        d = m["default_micro_batch"]
        lines += [
            f"  measured    batch {m['batch']} on this machine ({torch_threads_note()}):",
            f"    training  {m['train']['img_per_sec']:.4g} img/s, {m['train']['working_bytes'] / MIB:,.0f} MiB "
            f"working memory (network {m['network_bytes'] / MIB:,.1f} MiB)",
            f"    sampling  {m['sample']['img_per_sec']:.4g} img/s with {evaluations} evaluations "
            f"per image, {m['sample']['working_bytes'] / MIB:,.0f} MiB working memory",
            f"    training on CPU would use micro-batch {d['micro_batch']} of {m['batch']} by default "
            f"({d['activation_bytes_per_image'] / MIB:.3g} MiB of activations per image, "
            f"{d['budget_bytes'] / 2 ** 30:.3g} GiB budget)",
        ]
    return lines


def network_line(net):
    """What network a NetworkConfig describes, in one line (the run's summary and `mpdiff info`)."""
    if net.backbone == "uvit":
        return (f"UViT, width {net.model_channels}, {net.depth} blocks + middle ({net.depth // 2} long skips), patch "
                f"{net.patch_size} ({(net.img_resolution // net.patch_size) ** 2} patch tokens), "
                f"{net.model_channels // net.channels_per_head} heads")
    levels = [net.img_resolution >> i for i in range(len(net.channel_mult))]
    attention = ", ".join(f"{r}x{r}" for r in levels if r in net.attn_resolutions) or "no level"
    return (f"U-Net (config {net.config}), C0 {net.model_channels}, {len(levels)} levels "
            f"({', '.join(f'{r}x{r}' for r in levels)}), attention at {attention}; "
            f"{len(levels) * (net.num_blocks + 1)} long skips")


def skip_scaling_summary(net, built=None):
    """One line on a network's long-skip scaling (ScaleLong, SPEC §9), e.g. for the run summary.
    `built`: the network of config `net` if the caller has it (on any device), else one is built on meta."""
    from mpdiff.nn.build import build_meta_network

    scaling = (built if built is not None else build_meta_network(net)).backbone.skip_scaling
    if net.skip_scaling in ("cs", "cs-mp"):
        how = "x kappa_i on the skip" if net.skip_scaling == "cs" else "as MP-concatenation balance"
        return (f"{net.skip_scaling}: kappa {net.kappa:g}, rule {net.kappa_rule}, kappa_i (outermost first) "
                f"{', '.join(f'{c:.3g}' for c in scaling.coefficients)} ({how})")
    gates = len(scaling.gates) if scaling.gates is not None else 0
    return f"{net.skip_scaling}: {gates} learned gate{'s' if gates != 1 else ''} for {len(scaling.gate_keys)} long skips"


def torch_threads_note():
    """The CPU threads torch uses here, and whether a CUDA device was left unused."""
    import torch

    return f"{torch.get_num_threads()} CPU threads" + (", CUDA available but not used" if torch.cuda.is_available()
                                                       else "")
