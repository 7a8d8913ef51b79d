"""How fast a network trains and samples on this machine, and how much memory it takes, measured in a
few seconds on random data (`mpdiff info PRESET --measure`).

Training and sampling are each measured in a fresh process, so that each one's peak memory is its
own: the figure reported is the peak resident memory above the process's memory once the network is
built (activations, gradients, Adam state, sampler state), next to the network's own size.
"""

import multiprocessing
import resource
import time

import torch

from mpdiff.config import SAMPLING, network_evaluations

_KIB = 1024


def _resident_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _KIB


def _run(kind, network, batch, steps, threads, result):
    from mpdiff.diffusion.loss import edm2_loss
    from mpdiff.nn.build import build_network
    from mpdiff.nn.fast import accelerate
    from mpdiff.train.optim import make_optimizer, set_learning_rate

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = accelerate(build_network(network))  # what training and sampling run (mpdiff.nn.fast)
    shape = [batch, network.img_channels, network.img_resolution, network.img_resolution]
    labels = None
    if network.label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(batch) % network.label_dim, network.label_dim).float()
    images = torch.randn(shape).clamp(-1, 1)
    base = _resident_bytes()
    if kind == "train":
        net.train()
        optimizer = make_optimizer(net.parameters())
        set_learning_rate(optimizer, 1e-4)

        def work():
            optimizer.zero_grad(set_to_none=True)
            edm2_loss(net, images, labels).sum().backward()
            optimizer.step()
        evaluations = 1
    else:
        net.eval().requires_grad_(False)
        sigma = torch.full([batch], 1.0)

        def work():
            with torch.no_grad():
                net(images, sigma, labels)
        evaluations = network_evaluations(SAMPLING.sampler, SAMPLING.check().num_steps)  # one image, default sampler
    work()  # warm-up: first-call costs are not the steady state
    start = time.perf_counter()
    for _ in range(steps):
        work()
    seconds = (time.perf_counter() - start) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _KIB
    result.put({"img_per_sec": batch / (seconds * evaluations), "seconds_per_batch": seconds,
                "working_bytes": max(peak - base, 0)})


def measure(network, batch, steps=2, threads=None):
    """{'train': {...}, 'sample': {...}} for `network` (a NetworkConfig) at `batch` images per step.

    train: img/s of training steps (forward, backward, Adam); sample: img/s of the default sampler
    (its evaluations per image, in the network's default precision); working_bytes: peak memory above the
    built network.
    """
    from mpdiff.nn.build import build_meta_network

    threads = threads or torch.get_num_threads()
    context = multiprocessing.get_context("spawn")
    out = {}
    for kind in ("train", "sample"):
        result = context.Queue()
        process = context.Process(target=_run, args=(kind, network, batch, steps, threads, result))
        process.start()
        out[kind] = result.get(timeout=600)
        process.join()
    out["network_bytes"] = sum(p.numel() * 4 for p in build_meta_network(network).parameters())
    return out


# ------------------------------------------------------------------ the default micro-batch on CPU

PEAK_PER_SAVED = 2.0            # training peak / bytes autograd saves; measured 1.8-1.9 (docs/PERFORMANCE.md)
MICRO_BATCH_BUDGET = 2 << 30    # bytes of training working memory the default micro-batch aims for ...
MICRO_BATCH_RAM_SHARE = 8       # ... or 1/8 of the machine's memory, whichever is smaller


def activation_bytes_per_image(network):
    """Bytes that autograd keeps for the backward pass, per training image, measured on this network.

    Runs the training loss forward at 1 and 2 images (on the CPU, float32) and counts the distinct
    storages autograd saves; the difference is the per-image share (weights and other batch-independent
    tensors cancel). Deterministic: it depends on the network only, not on the machine's load.
    """
    from mpdiff.diffusion.loss import edm2_loss
    from mpdiff.nn.build import build_network
    from mpdiff.nn.fast import accelerate

    generator = torch.Generator().manual_seed(0)
    net = accelerate(build_network(network)).train()  # what training runs (mpdiff.nn.fast)

    def saved(n):
        storages = {}

        def pack(t):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        shape = (n, network.img_channels, network.img_resolution, network.img_resolution)
        images = torch.randn(shape, generator=generator).clamp(-1, 1)
        labels = None
        if network.label_dim:
            labels = torch.nn.functional.one_hot(torch.arange(n) % network.label_dim, network.label_dim).float()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            edm2_loss(net, images, labels).sum()
        return sum(storages.values())

    return max(saved(2) - saved(1), 1)


def micro_batch_budget():
    """Working-memory bytes the default CPU micro-batch aims for: 2 GiB, or 1/8 of the RAM if less."""
    from mpdiff.budgets import physical_memory

    ram = physical_memory()
    return MICRO_BATCH_BUDGET if ram is None else min(MICRO_BATCH_BUDGET, ram // MICRO_BATCH_RAM_SHARE)


def choose_micro_batch(network, batch, budget=None):
    """(micro_batch, per_image_bytes, budget): the largest divisor of `batch` whose estimated training
    working memory (PEAK_PER_SAVED x the measured saved bytes per image x micro-batch) fits `budget`;
    at least 1. The micro-batch changes memory only, never the gradient (train/step.py)."""
    budget = budget or micro_batch_budget()
    per_image = activation_bytes_per_image(network)
    fits = max(int(budget // (PEAK_PER_SAVED * per_image)), 1)
    micro = max(d for d in range(1, batch + 1) if batch % d == 0 and d <= fits)
    return micro, per_image, budget
