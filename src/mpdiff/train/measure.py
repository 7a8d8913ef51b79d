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

from mpdiff.config import SAMPLING

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
    from mpdiff.train.optim import make_optimizer, set_learning_rate

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_network(network)
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
        evaluations = 2 * SAMPLING.num_steps - 1  # one image of the default Heun sampler
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
    (2 x steps - 1 evaluations per image); working_bytes: peak memory above the built network.
    """
    threads = threads or torch.get_num_threads()
    context = multiprocessing.get_context("spawn")
    out = {}
    for kind in ("train", "sample"):
        result = context.Queue()
        process = context.Process(target=_run, args=(kind, network, batch, steps, threads, result))
        process.start()
        out[kind] = result.get(timeout=600)
        process.join()
    out["network_bytes"] = sum(p.numel() * 4 for p in _meta_params(network))
    return out


def _meta_params(network):
    from mpdiff.nn.build import build_meta_network

    return list(build_meta_network(network).parameters())
