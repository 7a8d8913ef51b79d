"""Training and sampling throughput (img/s) of a preset's network on this machine.

    python benchmarks/bench_train_sample.py [--preset digits] [--device cpu] [--steps 20]

Training: full optimisation steps (forward, backward, Adam, EMA update) at the preset's batch.
Sampling: the 32-step Heun sampler (63 network evaluations per image), eval mode, cached weights.
Prints one JSON line per measurement; results are recorded in docs/PERFORMANCE.md.
"""

import argparse
import json
import platform
import time

import torch

from mpdiff import build_network, get_preset
from mpdiff.nn.fast import accelerate
from mpdiff.diffusion.generate import generate
from mpdiff.diffusion.loss import edm2_loss
from mpdiff.ema.trackers import PowerFunctionEMA
from mpdiff.train.optim import make_optimizer


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_training(preset, device, steps, warmup=3):
    net = accelerate(build_network(preset.network, device=device)).train()
    opt = make_optimizer(net.parameters())
    ema = PowerFunctionEMA(net)
    tc, cfg = preset.training, preset.network
    images = torch.randn(tc.batch, cfg.img_channels, cfg.img_resolution, cfg.img_resolution, device=device) * 0.5
    labels = torch.nn.functional.one_hot(torch.arange(tc.batch, device=device) % max(cfg.label_dim, 1),
                                         max(cfg.label_dim, 1)).float() if cfg.label_dim else None
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        edm2_loss(net, images, labels, P_mean=tc.P_mean, P_std=tc.P_std).sum().div(tc.batch).backward()
        opt.step()
        ema.update((i + 1) * tc.batch, tc.batch)
    sync(device)
    return steps * tc.batch / (time.perf_counter() - start)


def bench_sampling(preset, device, num_images, num_steps=32):
    net = build_network(preset.network, device=device).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.5)  # non-zero gains so the whole network runs
    generate(net, range(8), num_steps=2, progress=False, device=device)  # warm-up
    sync(device)
    start = time.perf_counter()
    generate(net, range(num_images), batch_size=num_images, sampler="heun", num_steps=num_steps, progress=False,
             device=device)
    sync(device)
    return num_images / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sample-images", type=int, default=256)
    args = parser.parse_args()
    preset = get_preset(args.preset)
    torch.manual_seed(0)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    train_ips = bench_training(preset, args.device, args.steps)
    print(json.dumps({"bench": "train", "preset": args.preset, "batch": preset.training.batch,
                      "img_per_sec": round(train_ips, 1), **machine}))
    sample_ips = bench_sampling(preset, args.device, args.sample_images)
    print(json.dumps({"bench": "sample", "preset": args.preset, "steps": 32, "nfe": 63,
                      "img_per_sec": round(sample_ips, 2), **machine}))


if __name__ == "__main__":
    main()
