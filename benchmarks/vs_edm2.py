"""Our network against NVIDIA's official EDM2 network, side by side (issue 18).

    python benchmarks/vs_edm2.py --edm2 /path/to/NVlabs/edm2 [--config digits|cifar] [--rounds 5]
                                 [--threads 2] [--compile] [--out benchmarks/results/vs_edm2]

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
`cifar` 32x32x3, C0 64, mult 1-2-2, attention at 16, batch 32.
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
}


def build_pair(edm2, config, seed=0):
    sys.path.insert(0, edm2)
    from training.networks_edm2 import Precond as NvidiaPrecond

    from mpdiff.nn.compat import load_edm2

    torch.manual_seed(seed)
    theirs = NvidiaPrecond(**config, use_fp16=False)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.ndim == 0:
                p.copy_(torch.rand([]) * 0.3 + 0.2)
    ours = load_edm2(theirs.state_dict())
    return theirs, ours


def inputs(config, batch, seed=1):
    gen = torch.Generator().manual_seed(seed)
    res, ch, classes = config["img_resolution"], config["img_channels"], config["label_dim"]
    sigma = (torch.randn(batch, generator=gen) * 1.2 - 0.4).exp()
    x = torch.randn(batch, ch, res, res, generator=gen) * 0.5
    labels = torch.eye(classes)[torch.randint(classes, [batch], generator=gen)]
    return x, sigma, labels


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


def timed(fn, repeat):
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edm2", default=os.environ.get("MPDIFF_EDM2_REF"), help="NVlabs/edm2 checkout [$MPDIFF_EDM2_REF].")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="digits")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=3, help="Training steps per round and setting [3].")
    parser.add_argument("--compile", action="store_true", help="Also measure torch.compile (compiles first).")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "vs_edm2"))
    args = parser.parse_args()
    if not args.edm2 or not os.path.exists(os.path.join(args.edm2, "training", "networks_edm2.py")):
        raise SystemExit("--edm2: give a checkout of github.com/NVlabs/edm2 (training/networks_edm2.py)")
    torch.set_num_threads(args.threads)
    from mpdiff.nn.runtime import compiled, set_precision

    spec = CONFIGS[args.config]
    theirs, ours = build_pair(args.edm2, spec["net"])
    x, sigma, labels = inputs(spec["net"], spec["sample_batch"])
    theirs.eval(), ours.eval()
    with torch.no_grad():
        reference = theirs(x, sigma, labels)

    ours_bf16 = set_precision(build_pair(args.edm2, spec["net"])[1], "bf16")  # each setting has its own network
    # name: (network, what trains it, network sampled, what samples with it, precision)
    settings = {"nvidia fp32": (theirs, theirs, theirs, theirs, None), "ours fp32": (ours, ours, ours, ours, None),
                "ours bf16": (ours_bf16, ours_bf16, ours_bf16, ours_bf16, "bf16")}
    compile_seconds = {}
    if args.compile:
        for name, precision in (("ours compile", None), ("ours compile bf16", "bf16")):
            net = build_pair(args.edm2, spec["net"])[1]
            model = compiled(net)
            set_precision(net, precision)
            initial = {k: v.clone() for k, v in net.state_dict().items()}
            start = time.perf_counter()
            tx, ts, tl = inputs(spec["net"], spec["train_batch"])
            train_runner(net, model, tx, ts, tl)()  # training graphs (forward and backward)
            train_seconds = time.perf_counter() - start
            net.load_state_dict(initial)  # that warm-up took an Adam step: D is compared on the shared weights
            # Sampling compiles as mpdiff generate --compile does: for eval without autograd, weights frozen in.
            # A copy of its own that training never touches: a frozen program compiles again when its
            # network's weights change, as they do in every round's training.
            sample_net = copy.deepcopy(net).eval()
            frozen = compiled(sample_net, frozen=True)
            start = time.perf_counter()
            with torch.no_grad():
                frozen(x, sigma, labels)
            compile_seconds[name] = (round(train_seconds, 1), round(time.perf_counter() - start, 1))
            settings[name] = (net, model, sample_net, frozen, precision)

    quality = {}
    for name, (_, _, net, model, precision) in settings.items():
        net.eval()
        with torch.no_grad():
            out = model(x, sigma, labels)
        quality[name] = ((out - reference).norm() / reference.norm()).item()

    tx, ts, tl = inputs(spec["net"], spec["train_batch"])
    runners = {}
    for name, (net, trainer, sample_net, sampler, precision) in settings.items():
        fresh = {k: v.clone() for k, v in net.state_dict().items()}
        runners[name] = (train_runner(net, trainer, tx, ts, tl), sample_runner(sampler, x, labels), net, sample_net,
                         fresh)
    times = {name: {"train": [], "sample": []} for name in settings}
    for r in range(args.rounds):
        order = list(runners.items())
        for name, (train, sample, net, sample_net, fresh) in (order if r % 2 == 0 else order[::-1]):  # no setting always first
            train()  # warm-up of this round
            times[name]["train"].append(timed(train, args.train_steps))
            net.load_state_dict(fresh)  # every setting trains from the same weights
            sample_net.eval()
            times[name]["sample"].append(timed(sample, 1))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {spec['train_batch'] / t['train'][-1]:.1f}/{spec['sample_batch'] / t['sample'][-1]:.2f} img/s"
            for n, t in times.items()), flush=True)

    rows = []
    base = times["nvidia fp32"]
    for name, t in times.items():
        train_ips = spec["train_batch"] / statistics.median(t["train"])
        sample_ips = spec["sample_batch"] / statistics.median(t["sample"])
        # The ratio of each round (both timed within seconds of each other), then the median over rounds:
        # steadier than a ratio of medians when the machine's speed drifts between rounds.
        train_ratios = [b / o for b, o in zip(base["train"], t["train"])]
        sample_ratios = [b / o for b, o in zip(base["sample"], t["sample"])]
        rows.append(dict(setting=name, train_img_s=train_ips, sample_img_s=sample_ips,
                         train_ratio=statistics.median(train_ratios), sample_ratio=statistics.median(sample_ratios),
                         train_ratios=train_ratios, sample_ratios=sample_ratios,
                         rel_diff_D=quality[name], compile_seconds=compile_seconds.get(name)))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads"
    summary = dict(config=args.config, network=spec["net"], train_batch=spec["train_batch"],
                   sample_batch=spec["sample_batch"], rounds=args.rounds, machine=machine,
                   torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                   command=" ".join(["python", "benchmarks/vs_edm2.py", *sys.argv[1:]]), rows=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.config}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"{args.config}: {machine}, torch {torch.__version__}, {summary['date']} UTC, median of {args.rounds} rounds (ratios: median of the per-round ratios)",
             "", "| setting | training img/s | ratio | sampling img/s | ratio | rel. diff. of D from NVIDIA | "
             "compile (s): training / sampling |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        seconds = " / ".join(str(c) for c in r["compile_seconds"]) if r["compile_seconds"] else "-"
        lines.append(f"| {r['setting']} | {r['train_img_s']:.1f} | {r['train_ratio']:.2f}x | {r['sample_img_s']:.2f} | "
                     f"{r['sample_ratio']:.2f}x | {r['rel_diff_D']:.1e} | {seconds} |")
    with open(os.path.join(args.out, f"{args.config}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
