"""Channel-major against channels-last activations, next to NVIDIA's network (issue 18).

    python benchmarks/layout.py --edm2 /path/to/NVlabs/edm2 [--config cifar|digits] [--rounds 5]
                                [--threads 2] [--out benchmarks/results/layout]

Builds NVIDIA's network and two copies of ours with the same weights (benchmarks/vs_edm2.py's
configurations): one with `FastUNet.pixel_major = False` (channel by channel, the layout on GPUs) and one
with `True` (channels-last, the default on the CPU). For fp32 and bf16, and for one evaluation
(autograd off) and one training step (forward, backward, Adam), it times the three back to back in
each round and reports the median over rounds of each round's ratio to NVIDIA's fp32 network, and
the relative difference of D between our two layouts.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import vs_edm2  # noqa: E402  (the configurations and the pair builder)


def timed(fn, repeat=3):
    fn()  # warm-up, then vs_edm2's timing
    return vs_edm2.timed(fn, repeat)


def evaluation(net, x, sigma, labels):
    def run():
        with torch.no_grad():
            net(x, sigma, labels)
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edm2", default=os.environ.get("MPDIFF_EDM2_REF"), help="NVlabs/edm2 checkout [$MPDIFF_EDM2_REF].")
    parser.add_argument("--config", choices=sorted(vs_edm2.CONFIGS), default="cifar")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "layout"))
    args = parser.parse_args()
    if not args.edm2 or not os.path.exists(os.path.join(args.edm2, "training", "networks_edm2.py")):
        raise SystemExit("--edm2: give a checkout of github.com/NVlabs/edm2 (training/networks_edm2.py)")
    torch.set_num_threads(args.threads)
    from mpdiff.nn.runtime import set_precision

    spec = vs_edm2.CONFIGS[args.config]
    rows = []
    for precision in ("fp32", "bf16"):
        for mode in ("evaluation", "training"):
            theirs, channel_major = vs_edm2.build_pair(args.edm2, spec["net"])
            channels_last = vs_edm2.build_pair(args.edm2, spec["net"])[1]
            for net, pixel_major in ((channel_major, False), (channels_last, True)):
                set_precision(net, precision)
                net.unet.pixel_major = pixel_major
            batch = spec["sample_batch"] if mode == "evaluation" else spec["train_batch"]
            x, sigma, labels = vs_edm2.inputs(spec["net"], batch)
            nets = {"nvidia fp32": theirs, "channel-major": channel_major, "channels-last": channels_last}
            if mode == "evaluation":
                for net in nets.values():
                    net.eval()
                with torch.no_grad():
                    a, b = channel_major(x, sigma, labels), channels_last(x, sigma, labels)
                difference = ((a - b).norm() / a.norm()).item()
                runs = {name: evaluation(net, x, sigma, labels) for name, net in nets.items()}
            else:
                difference = None
                runs = {name: vs_edm2.train_runner(net, net, x, sigma, labels) for name, net in nets.items()}
            times = {name: [] for name in runs}
            for r in range(args.rounds):
                order = list(runs.items())
                for name, fn in (order if r % 2 == 0 else order[::-1]):
                    times[name].append(timed(fn))
            for name in ("channel-major", "channels-last"):
                ratios = [t / o for t, o in zip(times["nvidia fp32"], times[name])]
                rows.append(dict(precision=precision, mode=mode, layout=name, ratio=statistics.median(ratios),
                                 ratios=ratios, seconds=statistics.median(times[name]),
                                 nvidia_seconds=statistics.median(times["nvidia fp32"]), rel_diff_layouts=difference))
            print(f"{precision} {mode}: " + ", ".join(f"{r['layout']} {r['ratio']:.2f}x" for r in rows[-2:]), flush=True)

    summary = dict(config=args.config, network=spec["net"], rounds=args.rounds, threads=args.threads,
                   torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                   command=" ".join(["python", "benchmarks/layout.py", *sys.argv[1:]]), rows=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.config}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"{args.config}: {args.threads} threads, torch {torch.__version__}, {summary['date']} UTC, "
             f"median of {args.rounds} per-round ratios to NVIDIA's fp32 network", "",
             "| precision | work | channel-major | channels-last | rel. diff. of D between layouts |",
             "| --- | --- | --- | --- | --- |"]
    for cm, cl in zip(rows[::2], rows[1::2]):
        diff = "-" if cm["rel_diff_layouts"] is None else f"{cm['rel_diff_layouts']:.1e}"
        lines.append(f"| {cm['precision']} | {cm['mode']} | {cm['ratio']:.2f}x | {cl['ratio']:.2f}x | {diff} |")
    with open(os.path.join(args.out, f"{args.config}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
