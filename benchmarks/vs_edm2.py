"""Our network against NVIDIA's official EDM2 network, side by side (issue 18).

    python benchmarks/vs_edm2.py --edm2 /path/to/NVlabs/edm2 [--config digits|cifar|img512-s] [--rounds 5]
                                 [--device cpu|cuda] [--threads 2] [--compile] [--settings A,B,...]
                                 [--train-batch N] [--sample-batch N] [--sample-steps 32]
                                 [--out benchmarks/results/vs_edm2]

NVIDIA's code is read from a checkout the user fetched (it is never part of mpdiff: its licence is
non-commercial). Both networks are built in this process with the same configuration and the same
weights (ours through `mpdiff.nn.compat.load_edm2` from NVIDIA's state_dict; the scalar gains drawn
at random so that every path runs), and get the same inputs.

Measured, interleaved round by round so that both see the same machine load:

- training: forward, backward and Adam at the configuration's batch (img/s);
- sampling: 63 network evaluations per image (the 32-step Heun sampler of mpdiff for both networks),
  eval mode, at the sampling batch (img/s);

for NVIDIA's network in float32 and for ours in float32, bf16 and (with --compile) torch.compile,
alone and with bf16 (training through `compiled(net)`, sampling through `compiled(net, frozen=True)`
as `mpdiff generate --compile` does). The table gives the median img/s of the rounds, the median over rounds of each
round's ratio to NVIDIA's (each round times every setting back to back), and the relative difference of D from NVIDIA's on a fixed batch (the quality check of the network function;
sample quality is checked in docs/PERFORMANCE.md). Compile time is reported separately.

Configurations (the issue's): `digits` 8x8x1, C0 32, mult 1-2-2, attention at 4, batch 256;
`cifar` 32x32x3, C0 64, mult 1-2-2, attention at 16, batch 32; `img512-s` the edm2-img512-s network on
its 64x64x4 latents (C0 192, mult 1-2-3-4, 3 blocks, attention at 16 and 8), batch 64 per GPU.

On a GPU (`--device cuda`) NVIDIA's network is also measured in its own fp16 mode (`use_fp16=True`, as
its training script runs it), which is then the baseline of the ratios (`--baseline` changes it), ours
also in fp16. Model FLOP utilisation (MFU, on any device): model flops per image (mpdiff.nn.flops, x3 for
a training step) times img/s, over the bf16 matrix-multiply peak measured on the device after the rounds.
Both sides run as NVIDIA's training script sets them up: cuDNN autotuning on, TF32 off. A setting that
runs out of memory is reported as such and the others go on.
"""

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {
    "digits": dict(net=dict(img_resolution=8, img_channels=1, label_dim=10, model_channels=32,
                            channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[4]),
                   train_batch=256, sample_batch=256),
    "cifar": dict(net=dict(img_resolution=32, img_channels=3, label_dim=10, model_channels=64,
                           channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[16]),
                  train_batch=32, sample_batch=32),
    "img512-s": dict(net=dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=192,
                              channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8]),
                     train_batch=64, sample_batch=64),
}


def build_pair(edm2, config, seed=0, device="cpu", nvidia_fp16=False):
    sys.path.insert(0, edm2)
    from training.networks_edm2 import Precond as NvidiaPrecond

    from mpdiff.nn.compat import load_edm2
    from mpdiff.nn.fast import accelerate

    torch.manual_seed(seed)
    theirs = NvidiaPrecond(**config, use_fp16=nvidia_fp16)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.ndim == 0:
                p.copy_(torch.rand([]) * 0.3 + 0.2)
    ours = accelerate(load_edm2(theirs.state_dict()))  # the fast twin, as training and sampling run it
    return theirs.to(device), ours.to(device)


def inputs(config, batch, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    res, ch, classes = config["img_resolution"], config["img_channels"], config["label_dim"]
    sigma = (torch.randn(batch, generator=gen) * 1.2 - 0.4).exp()
    x = torch.randn(batch, ch, res, res, generator=gen) * 0.5
    labels = torch.eye(classes)[torch.randint(classes, [batch], generator=gen)]
    return x.to(device), sigma.to(device), labels.to(device)


def train_runner(net, model, x, sigma, labels):
    from mpdiff.diffusion.loss import edm2_loss

    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
    noise = torch.randn_like(x)

    def step():
        net.train()
        opt.zero_grad(set_to_none=True)
        edm2_loss(model, x, labels, sigma=sigma, noise=noise).sum().div(len(x)).backward()
        opt.step()
    return step


def sample_runner(model, x, labels, steps=32):
    from mpdiff.diffusion.samplers import sample_heun
    from mpdiff.diffusion.schedules import edm_sigmas

    sigmas = edm_sigmas(steps)

    def run():
        with torch.no_grad():
            sample_heun(lambda y, s, c: model(y, s, c), x.double() * 80, sigmas, labels)
    return run


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, repeat, device="cpu"):
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeat


def matmul_peak(device, dtype=torch.bfloat16, size=None, repeat=None):
    """Measured flop/s of a large square matrix product at `dtype`: the peak that MFU is taken against."""
    cuda = str(device).startswith("cuda")
    size = size or (8192 if cuda else 2048)
    repeat = repeat or (50 if cuda else 5)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(3):
        a @ b
    seconds = timed(lambda: a @ b, repeat, device)
    return 2 * size ** 3 / seconds


def out_of_memory(error):
    return isinstance(error, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(error).lower()


def free_cached_memory(device):
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edm2", default=os.environ.get("MPDIFF_EDM2_REF"), help="NVlabs/edm2 checkout [$MPDIFF_EDM2_REF].")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="digits")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] [cpu].")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads [2].")
    parser.add_argument("--train-steps", type=int, default=3, help="Training steps per round and setting [3].")
    parser.add_argument("--train-batch", type=int, help="Training batch [the configuration's].")
    parser.add_argument("--sample-batch", type=int, help="Sampling batch [the configuration's].")
    parser.add_argument("--sample-steps", type=int, default=32,
                        help="Heun steps per sampling [32, i.e. 63 network evaluations].")
    parser.add_argument("--compile", action="store_true", help="Also measure torch.compile (compiles first).")
    parser.add_argument("--settings", help="Only these settings, comma-separated (see the table's names).")
    parser.add_argument("--baseline", help="The setting that ratios divide by [nvidia fp16 on a GPU, else nvidia fp32].")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "vs_edm2"))
    args = parser.parse_args()
    if not args.edm2 or not os.path.exists(os.path.join(args.edm2, "training", "networks_edm2.py")):
        raise SystemExit("--edm2: give a checkout of github.com/NVlabs/edm2 (training/networks_edm2.py)")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device here")
    torch.set_num_threads(args.threads)
    if cuda:  # as NVIDIA's training script: autotuned cuDNN, no TF32 (float32 is float32)
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    from mpdiff.nn.flops import count_flops
    from mpdiff.nn.runtime import compiled, set_precision

    spec = CONFIGS[args.config]
    train_batch = args.train_batch or spec["train_batch"]
    sample_batch = args.sample_batch or spec["sample_batch"]
    evaluations = 2 * args.sample_steps - 1
    # name: (how it is built: NVIDIA fp16 mode?, our precision, compiled?)
    plans = {"nvidia fp32": ("nvidia", False, None, False)}
    if cuda:
        plans["nvidia fp16"] = ("nvidia", True, None, False)
    plans.update({"ours fp32": ("ours", False, None, False), "ours bf16": ("ours", False, "bf16", False)})
    if cuda:
        plans["ours fp16"] = ("ours", False, "fp16", False)
    if args.compile:
        plans.update({"ours compile": ("ours", False, None, True), "ours compile bf16": ("ours", False, "bf16", True)})
    if args.settings:
        wanted = [w.strip() for w in args.settings.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in plans]
        if unknown:
            raise SystemExit(f"--settings: unknown {', '.join(unknown)}; known here: {', '.join(plans)}")
        plans = {name: plan for name, plan in plans.items() if name in wanted or name == "nvidia fp32"}
    baseline = args.baseline or ("nvidia fp16" if "nvidia fp16" in plans else "nvidia fp32")
    if baseline not in plans:
        raise SystemExit(f"--baseline {baseline}: not among the settings measured ({', '.join(plans)})")

    x, sigma, labels = inputs(spec["net"], sample_batch, device=device)
    tx, ts, tl = inputs(spec["net"], train_batch, device=device)

    # Each setting has its own network (the same weights): name -> (network, what trains it, network
    # sampled, what samples with it). Sampling compiles as mpdiff generate --compile does: for eval without
    # autograd, weights frozen in, on a copy of its own that training never touches (a frozen program
    # compiles again when its network's weights change, as they do in every round's training).
    settings, compile_seconds, failures = {}, {}, {}
    for name, (side, nvidia_fp16, precision, compile_it) in plans.items():
        try:
            pair = build_pair(args.edm2, spec["net"], device=device, nvidia_fp16=nvidia_fp16)
            net = pair[0] if side == "nvidia" else set_precision(pair[1], precision)
            if not compile_it:
                settings[name] = (net, net, net, net)
                continue
            model = compiled(net)
            initial = {k: v.clone() for k, v in net.state_dict().items()}
            start = time.perf_counter()
            train_runner(net, model, tx, ts, tl)()  # training graphs (forward and backward)
            synchronize(device)
            train_seconds = time.perf_counter() - start
            net.load_state_dict(initial)  # that warm-up took an Adam step: D is compared on the shared weights
            sample_net = copy.deepcopy(net).eval()
            frozen = compiled(sample_net, frozen=True)
            start = time.perf_counter()
            with torch.no_grad():
                frozen(x, sigma, labels)
            synchronize(device)
            compile_seconds[name] = (round(train_seconds, 1), round(time.perf_counter() - start, 1))
            settings[name] = (net, model, sample_net, frozen)
        except RuntimeError as error:
            if not out_of_memory(error):
                raise
            failures[name] = "out of memory while building or compiling"
            free_cached_memory(device)
    for needed in dict.fromkeys((baseline, "nvidia fp32")):
        if needed not in settings:
            raise SystemExit(f"{needed} could not run: {failures.get(needed)}")
    with torch.no_grad():  # NVIDIA's network in float32: what D is compared with
        reference = settings["nvidia fp32"][0].eval()(x, sigma, labels)

    quality = {}
    for name, (_, _, net, model) in settings.items():
        net.eval()
        with torch.no_grad():
            out = model(x, sigma, labels)
        quality[name] = ((out.float() - reference).norm() / reference.norm()).item()

    runners = {}
    for name, (net, trainer, sample_net, sampler) in settings.items():
        fresh = {k: v.clone() for k, v in net.state_dict().items()}
        runners[name] = (train_runner(net, trainer, tx, ts, tl), sample_runner(sampler, x, labels, args.sample_steps),
                         net, sample_net, fresh)
    times = {name: {"train": [], "sample": []} for name in settings}
    for r in range(args.rounds):
        order = list(runners.items())
        for name, (train, sample, net, sample_net, fresh) in (order if r % 2 == 0 else order[::-1]):  # no setting always first
            if name in failures:
                continue
            try:
                train()  # warm-up of this round
                times[name]["train"].append(timed(train, args.train_steps, device))
                net.load_state_dict(fresh)  # every setting trains from the same weights
                sample_net.eval()
                times[name]["sample"].append(timed(sample, 1, device))
            except RuntimeError as error:
                if not out_of_memory(error):
                    raise
                failures[name] = f"out of memory in round {r + 1}"
                free_cached_memory(device)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {train_batch / t['train'][-1]:.1f}/{sample_batch / t['sample'][-1]:.2f} img/s"
            for n, t in times.items() if n not in failures), flush=True)
    if baseline in failures:
        raise SystemExit(f"the baseline {baseline} could not run: {failures[baseline]}")

    ours = next((net for name, (net, *_) in settings.items() if name.startswith("ours")), None)
    ours = ours if ours is not None else build_pair(args.edm2, spec["net"])[1]
    model_flops = count_flops(ours, batch=train_batch)["flops"]  # per image, forward (weights swapped for meta)
    peak = matmul_peak(device)
    rows = []
    base = times[baseline]
    for name, t in times.items():
        if name in failures:
            rows.append(dict(setting=name, failed=failures[name], compile_seconds=compile_seconds.get(name)))
            continue
        train_ips = train_batch / statistics.median(t["train"])
        sample_ips = sample_batch / statistics.median(t["sample"])
        # The ratio of each round (both timed within seconds of each other), then the median over rounds:
        # steadier than a ratio of medians when the machine's speed drifts between rounds.
        train_ratios = [b / o for b, o in zip(base["train"], t["train"])]
        sample_ratios = [b / o for b, o in zip(base["sample"], t["sample"])]
        row = dict(setting=name, train_img_s=train_ips, sample_img_s=sample_ips,
                   train_ratio=statistics.median(train_ratios), sample_ratio=statistics.median(sample_ratios),
                   train_ratios=train_ratios, sample_ratios=sample_ratios,
                   rel_diff_D=quality[name], compile_seconds=compile_seconds.get(name))
        row.update(  # a training step: forward and backward, counted as three forwards
            train_mfu=3 * model_flops * train_ips / peak, sample_mfu=evaluations * model_flops * sample_ips / peak)
        rows.append(row)
    if cuda:
        machine = f"{torch.cuda.get_device_name(device)}, bf16 matmul peak measured {peak / 1e12:.0f} Tflop/s"
    else:
        machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
                   f"bf16 matmul peak measured {peak / 1e9:.0f} Gflop/s")
    summary = dict(config=args.config, network=spec["net"], train_batch=train_batch, sample_batch=sample_batch,
                   evaluations=evaluations, rounds=args.rounds, machine=machine, device=str(device),
                   baseline=baseline, model_gflops_per_image=model_flops / 1e9, bf16_peak_flops=peak,
                   torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                   command=" ".join(["python", "benchmarks/vs_edm2.py", *sys.argv[1:]]), rows=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.config}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"{args.config}: {machine}, torch {torch.__version__}, {summary['date']} UTC, median of {args.rounds} "
             f"rounds (ratios to {baseline}: median of the per-round ratios); training batch {train_batch}, "
             f"sampling batch {sample_batch}, {evaluations} evaluations per image",
             "", "| setting | training img/s | ratio | sampling img/s | ratio | rel. diff. of D from NVIDIA fp32 | "
             "compile (s): training / sampling | training MFU | sampling MFU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        seconds = " / ".join(str(c) for c in r["compile_seconds"]) if r["compile_seconds"] else "-"
        if "failed" in r:
            lines.append(f"| {r['setting']} | {r['failed']} | | | | | {seconds} | | |")
            continue
        lines.append(f"| {r['setting']} | {r['train_img_s']:.1f} | {r['train_ratio']:.2f}x | {r['sample_img_s']:.2f} | "
                     f"{r['sample_ratio']:.2f}x | {r['rel_diff_D']:.1e} | {seconds} | {r['train_mfu']:.1%} | "
                     f"{r['sample_mfu']:.1%} |")
    with open(os.path.join(args.out, f"{args.config}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
