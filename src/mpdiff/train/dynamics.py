"""Training-dynamics diagnostics cheap enough to leave on (SPEC §10.1-10.2, §10.4; paper Figs. 3 and 15),
measured at the stats rows of a run from its live network (docs/TRAINING.md, docs/SCALELONG.md):

* ``act``: RMS of each block's output (the modules of ``unet.enc`` and ``unet.dec``, through forward
  hooks) on a fixed probe batch: the same images, noise levels and noise at every row;
* ``weight``: RMS of each layer's stored weight; ``update``: ||w_after - w_before|| / ||w_before|| of the
  optimizer step that ends on the row (the effective learning rate, SPEC §10.2);
* ``skip_in`` / ``skip_out``: RMS of every long skip (``skip<i>``, 0 the outermost) as the encoder made it
  and after the backbone's skip scaling;
* ``sensitivity``: RMS(F(u + delta) - F(u)) / RMS(delta), u = c_in x the backbone's input on the probe and
  delta = :data:`SENSITIVITY_EPS` times unit Gaussian noise.

None of it changes training: the probe draws from its own generator, runs without autograd in eval mode,
restores every module's mode and the global random state; the update is measured on a copy. The gradient
norm is in every stats row already (it comes free with the step).
"""

import dataclasses
import json
import math
import time

import torch

from mpdiff.data.pixels import PixelEncoder
from mpdiff.storage.files import JSON_MAX_BYTES
from mpdiff.train.data_order import derived_seed

PROBE_IMAGES = 32               # probe batch size (fewer if the dataset is smaller)
SIGNIFICANT_DIGITS = 4          # values as written into stats.jsonl
ROW_BUDGET_BYTES = JSON_MAX_BYTES // 2  # all dynamics of a run together; stats.jsonl is read whole on resume
SIDES = ("enc", "dec")          # the U-Net's block dicts, in forward order
SENSITIVITY_EPS = 1e-2          # RMS of the input perturbation of the sensitivity measurement


# ----------------------------------------------------------------------------------------- math

def rms(x):
    """sqrt(mean(x^2)) as a float32 0-d tensor, computed in float32 without a copy of `x`."""
    return torch.linalg.vector_norm(x.detach(), dtype=torch.float32) / math.sqrt(max(x.numel(), 1))


def weight_rms(weights):
    """{layer: RMS of its stored weight} for {layer: tensor}."""
    return _floats({name: rms(w) for name, w in weights.items()})


def relative_updates(before, after):
    """{layer: ||after - before|| / ||before||} for two {layer: tensor} (inf or NaN where ||before|| = 0)."""
    sizes = {}
    for name, old in before.items():
        step = torch.linalg.vector_norm(after[name].detach().float() - old.float())
        sizes[name] = step / torch.linalg.vector_norm(old.float())
    return _floats(sizes)


def probe_sigmas(count, P_mean, P_std):
    """`count` noise levels at evenly spaced quantiles of the training distribution
    ln(sigma) ~ N(P_mean, P_std^2) (Eq. 16): spread over it, and drawn without any random number."""
    quantiles = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    return (P_mean + P_std * torch.special.ndtri(quantiles)).exp().to(torch.float32)


def _floats(tensors):
    """{name: 0-d tensor} -> {name: float}, with one device-to-host copy for all of them."""
    if not tensors:
        return {}
    values = torch.stack([t.reshape(()).float() for t in tensors.values()]).tolist()
    return dict(zip(tensors, values))


# ------------------------------------------------------------------------------------ the network

def block_modules(net):
    """{'enc.<name>' | 'dec.<name>': module} of the U-Net's encoder and decoder blocks, in forward order.
    `net` is a preconditioned network (its backbone is ``net.backbone``) or the backbone itself."""
    backbone = getattr(net, "backbone", net)
    return {f"{side}.{name}": module for side in SIDES for name, module in getattr(backbone, side).items()}


def block_of(layer):
    """The block a layer name belongs to ('enc.16x16_block0.conv_res0' -> 'enc.16x16_block0'), or None."""
    parts = layer.split(".")
    return ".".join(parts[:2]) if parts[0] in SIDES and len(parts) >= 2 else None


def layer_weights(net):
    """{layer name: weight parameter} of every layer of `net`.

    A layer's weight is every parameter with at least 2 dimensions: the weights of convolutions and
    linear layers (MPConv's of both kinds), not biases nor scalar gains. Names are parameter names
    relative to the backbone (``unet.``) without a trailing '.weight', so that a layer's name starts
    with its block's: 'enc.16x16_block0.conv_res0', 'out_conv', 'logvar_linear'.
    """
    layers = {}
    for name, param in net.named_parameters():
        if param.ndim >= 2:
            short = name.removesuffix(".weight").removeprefix("unet.")
            layers[short if short not in layers else name] = param
    return layers


# ----------------------------------------------------------------------------------- the probe

@dataclasses.dataclass
class ProbeBatch:
    """Fixed inputs of the activation probe: noisy images y + n, their noise levels and labels."""
    noisy: torch.Tensor                 # [N, C, H, W] float32
    sigma: torch.Tensor                 # [N] float32
    labels: torch.Tensor = None         # [N, classes] one-hot, or None


def make_probe(images, labels, P_mean, P_std, seed, count=PROBE_IMAGES, device="cpu", encoder=None):
    """The probe batch of a run: `count` dataset images (uint8 [N, C, H, W], or latents) drawn once with a
    private generator seeded by (`seed`, 'dynamics'), encoded by `encoder` (default pixels; a latent
    encoder draws its sample noise from the same generator), noise levels at quantiles of the training
    distribution and unit noise from the same generator. Nothing here touches the global random state."""
    generator = torch.Generator().manual_seed(derived_seed(seed, "dynamics"))
    count = min(count, len(images))
    indices = torch.randperm(len(images), generator=generator)[:count]
    clean = (encoder or PixelEncoder()).encode(images[indices], generator=generator)
    noise = torch.randn(clean.shape, generator=generator)
    sigma = probe_sigmas(count, P_mean, P_std)
    noisy = clean + noise * sigma.reshape(-1, 1, 1, 1)
    chosen = None if labels is None else labels[indices].to(device)
    return ProbeBatch(noisy.to(device), sigma.to(device), chosen)


def activation_rms(net, probe, micro_batch=None):
    """{block: RMS of its output over the whole probe batch}, from forward hooks on the U-Net's blocks.

    Runs without autograd in eval mode, `micro_batch` images at a time; every module's mode and the
    global random state (CPU, and the probe's CUDA device) are restored afterwards.
    """
    return probe_statistics(net, probe, micro_batch, sensitivity=False)["act"]


def probe_statistics(net, probe, micro_batch=None, sensitivity=True):
    """{'act': {block: RMS}, 'skip_in' / 'skip_out': {'skip<i>': RMS}, 'sensitivity': float} on the probe.

    One pass over the probe batch with forward hooks on the blocks and on the backbone's
    ``skip_scaling`` (backbones without long skips give empty skip dicts), then, with `sensitivity`
    and a preconditioned `net` (one with a ``net.backbone``), the backbone evaluated at c_in x and
    at c_in x + delta. Same guarantees as :func:`activation_rms`.
    """
    from mpdiff.nn.precond import edm_coefficients

    blocks = block_modules(net)
    backbone = getattr(net, "backbone", net)
    sensitivity = sensitivity and backbone is not net
    scaling = getattr(backbone, "skip_scaling", None)
    device = probe.noisy.device
    sums = {}
    counts = {}

    def accumulate(name, tensor):
        sums[name] = sums.get(name, 0.0) + torch.linalg.vector_norm(tensor.detach(), dtype=torch.float32).double() ** 2
        counts[name] = counts.get(name, 0) + tensor.numel()

    def hook_for(name):
        def record(module, args, output):
            accumulate(name, output[0] if isinstance(output, (tuple, list)) else output)
        return record

    def record_skip(module, args, output):
        skip, index = args[0], args[1]
        accumulate(("skip_in", f"skip{index}"), skip)
        accumulate(("skip_out", f"skip{index}"), output)

    modes = {module: module.training for module in net.modules()}
    handles = [module.register_forward_hook(hook_for(name)) for name, module in blocks.items()]
    if scaling is not None:
        handles.append(scaling.register_forward_hook(record_skip))
    step = micro_batch or len(probe.noisy)
    moved = torch.zeros((), dtype=torch.float64, device=device)
    pushed = torch.zeros((), dtype=torch.float64, device=device)  # ||delta||^2 over the probe
    generator = torch.Generator(device=device).manual_seed(derived_seed(0, "sensitivity"))
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            net.eval()
            for start in range(0, len(probe.noisy), step):
                part = slice(start, start + step)
                labels = None if probe.labels is None else probe.labels[part]
                net(probe.noisy[part], probe.sigma[part], labels)
            for handle in handles:
                handle.remove()
            handles = []
            if sensitivity:
                sigma_data = net.sigma_data
                for start in range(0, len(probe.noisy), step):
                    part = slice(start, start + step)
                    sigma = probe.sigma[part].reshape(-1, *[1] * (probe.noisy.ndim - 1))
                    _, _, c_in, c_noise = edm_coefficients(sigma, sigma_data)
                    labels = None if probe.labels is None else net._labels(probe.labels[part], device)
                    u = c_in * probe.noisy[part]
                    delta = SENSITIVITY_EPS * torch.randn(u.shape, generator=generator, device=device)
                    change = backbone(u + delta, c_noise, labels).float() - backbone(u, c_noise, labels).float()
                    moved += torch.linalg.vector_norm(change, dtype=torch.float32).double() ** 2
                    pushed += torch.linalg.vector_norm(delta, dtype=torch.float32).double() ** 2
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    result = {"act": _floats({name: (sums[name] / counts[name]).sqrt() for name in blocks if name in sums})}
    for kind in ("skip_in", "skip_out"):
        names = sorted((key[1] for key in sums if isinstance(key, tuple) and key[0] == kind),
                       key=lambda name: int(name[4:]))
        result[kind] = _floats({name: (sums[(kind, name)] / counts[(kind, name)]).sqrt() for name in names})
    if sensitivity:
        result["sensitivity"] = float((moved / pushed).sqrt())  # output and input have the same size
    return result


# ------------------------------------------------------------------------------------ one run

def rounded(values, digits=SIGNIFICANT_DIGITS):
    """{name: value to `digits` significant digits}: what a stats row stores."""
    return {name: float(f"{value:.{digits}g}") for name, value in values.items()}


def estimated_row_bytes(blocks, layers, skips=0):
    """Bytes of one row's dynamics object in JSON (the names and a value of the widest usual form)."""
    wide = 1.234e-05
    skip_names = [f"skip{i}" for i in range(skips)]
    sample = {"act": dict.fromkeys(blocks, wide), "weight": dict.fromkeys(layers, wide),
              "update": dict.fromkeys(layers, wide), "skip_in": dict.fromkeys(skip_names, wide),
              "skip_out": dict.fromkeys(skip_names, wide), "sensitivity": wide, "seconds": 0.1234}
    return len(json.dumps({"dynamics": sample})) + 2


def dynamics_every(status_nimg, duration, row_bytes, budget=None):
    """Image interval of the dynamics: every status row, or every k-th one if the run's rows would
    otherwise need more than `budget` bytes (default ROW_BUDGET_BYTES; stats.jsonl is read whole when
    a run resumes)."""
    budget = ROW_BUDGET_BYTES if budget is None else budget
    rows = -(-duration // status_nimg)
    stride = max(1, -(-rows * row_bytes // budget))
    return stride * status_nimg


class TrainingDynamics:
    """The probe batch and the weight copy of one run; :meth:`measure` returns a stats row's dynamics.

    `every` (images, a multiple of the status interval) says which stats rows carry them: see
    :func:`dynamics_every`.
    """

    def __init__(self, net, probe, every, micro_batch=None):
        self.net = net
        self.probe = probe
        self.every = every
        self.micro_batch = micro_batch
        self.layers = layer_weights(net)
        self._before = None        # {layer: copy} taken just before the watched optimizer step
        self._hook = None

    def due(self, nimg, stop_at):
        """Does the stats row at image count `nimg` carry dynamics? (Rows come at status boundaries
        and at the end of an invocation, `stop_at`.)"""
        return nimg % self.every == 0 or nimg >= stop_at

    def watch(self, optimizer):
        """Copy the weights just before `optimizer`'s next step (after the forward pass, whose forced
        weight normalisation belongs to the previous step's weights), for the update of the next row."""
        self._release()

        def copy_weights(optimizer, args, kwargs):
            if self._before is None:
                self._before = {name: w.detach().clone() for name, w in self.layers.items()}

        self._hook = optimizer.register_step_pre_hook(copy_weights)

    def measure(self):
        """{'act': {block: RMS}, 'weight': {layer: RMS}, 'update': {layer: relative size} (only after a
        watched step), 'seconds': time taken}, values to SIGNIFICANT_DIGITS digits."""
        started = time.time()
        probed = probe_statistics(self.net, self.probe, self.micro_batch)
        row = {"act": rounded(probed["act"]), "weight": rounded(weight_rms(self.layers))}
        if self._before is not None:
            row["update"] = rounded(relative_updates(self._before, self.layers))
        row.update(skip_in=rounded(probed["skip_in"]), skip_out=rounded(probed["skip_out"]))
        if "sensitivity" in probed:
            row["sensitivity"] = rounded({"s": probed["sensitivity"]})["s"]
        self._release()
        row["seconds"] = round(time.time() - started, 4)
        return row

    def _release(self):
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._before = None, None


def run_dynamics(state, images, labels, training, cadence, seed, micro_batch=None, device="cpu", encoder=None):
    """The :class:`TrainingDynamics` of a run: its probe from the dataset (`images` uint8, `labels`
    one-hot or None) and the training's noise distribution, its cadence within the row budget."""
    probe = make_probe(images, labels, training.P_mean, training.P_std, seed, device=device, encoder=encoder)
    layers, blocks = layer_weights(state.net), block_modules(state.net)
    skips = len(getattr(getattr(state.net, "backbone", state.net), "skips", ()))
    every = dynamics_every(cadence.status_nimg, training.duration, estimated_row_bytes(blocks, layers, skips))
    return TrainingDynamics(state.net, probe, every, micro_batch=micro_batch)
