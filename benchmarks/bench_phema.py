"""Post-hoc EMA benchmarks (numbers go to docs/PERFORMANCE.md and docs/POSTHOC_EMA.md).

    python benchmarks/bench_phema.py                 # streaming speed and memory on ~300 MB of snapshots
    python benchmarks/bench_phema.py --accuracy      # reconstruction error vs snapshot density

Speed: writes a synthetic run (random tensors in network-file format) to a temporary directory, then,
each in a fresh process so that peak RSS belongs to that phase alone and with the files dropped from the
page cache first: reads every file's bytes once, and runs :func:`mpdiff.phema.reconstruct` for 1, 8 and
16 targets (``--targets``; outputs written to an empty directory and fsync'ed). Memory is the peak resident
size during the phase above the resident size at its start. The temporary data is removed.

Accuracy: trains a small denoiser on the built-in digits while tracking sigma_rel 0.05 and 0.10 as
snapshots and 0.07 directly, for several snapshot intervals, and reports
||w_rec - w_tracked|| / ||w_tracked - w_raw||; also the relative L2 error of the reconstructed profile.
"""

import argparse
import multiprocessing
import os
import resource
import shutil
import tempfile
import time

import numpy as np
import torch

from mpdiff.ema.profiles import profile_reconstruction_error
from mpdiff.ema.reconstruct import reconstruct
from mpdiff.ema.snapshots import save_ema_snapshots, save_snapshot, snapshot_name
from mpdiff.ema.trackers import PowerFunctionEMA

# ------------------------------------------------------------------------------------------------
# Speed and memory.


def make_synthetic_run(run_dir, total_mb, num_times, seed=0):
    """num_times x 2 profiles snapshots of a fake network whose float32 tensors total total_mb MB."""
    num_files = 2 * num_times
    floats_per_file = int(total_mb * 2 ** 20 / 4 / num_files)
    rng = np.random.default_rng(seed)
    # A network-like mix of tensor sizes: a few large ones and many small ones.
    sizes = rng.dirichlet(np.ones(60) * 0.3) * floats_per_file
    shapes = [(max(1, int(s) // 64), 64) for s in sizes]
    buffers = {"fourier.freqs": torch.randn(128), "fourier.phases": torch.rand(128)}
    generator = torch.Generator().manual_seed(seed)
    snapshot_dir = os.path.join(run_dir, "snapshots")
    for time_index in range(1, num_times + 1):
        state = {f"block{i}.weight": torch.randn(shape, generator=generator) for i, shape in enumerate(shapes)}
        state.update(buffers)
        for sigma_rel in (0.05, 0.10):
            nimg = time_index * 8 * 2 ** 20
            path = os.path.join(snapshot_dir, snapshot_name(nimg, sigma_rel))
            save_snapshot(path, state, nimg, sigma_rel, step=nimg // 2048, batch_size=2048,
                                network_config={"kind": "synthetic", "floats": floats_per_file})
    return sum(np.prod(s) for s in shapes) * 4 / 2 ** 20  # MB of parameters per file


def _status_mb(field):
    """VmRSS / VmHWM (current / peak resident memory) from /proc/self/status, in MB; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _start_rss_mb():
    """Resident memory now, with the peak reset to it where Linux allows (so imports' transient peaks don't hide
    the phase's own); falls back to the peak so far."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return _status_mb("VmRSS")
    except OSError:
        return _peak_rss_mb()


def _peak_rss_mb():
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def evict_from_page_cache(directory):
    """Drop our own files from the OS page cache (clean pages only; they were fsync'ed) for cold reads."""
    for file_name in os.listdir(directory):
        fd = os.open(os.path.join(directory, file_name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _phase(name, run_dir, threads, batch_outputs, queue):
    torch.set_num_threads(threads)
    import tqdm  # noqa: F401
    from safetensors import safe_open  # noqa: F401  (imports outside the timed region)
    snapshot_dir = os.path.join(run_dir, "snapshots")
    out_dir = os.path.join(run_dir, "out")
    shutil.rmtree(out_dir, ignore_errors=True)  # write new files, as a first reconstruction does
    evict_from_page_cache(snapshot_dir)
    baseline = _start_rss_mb()
    start = time.perf_counter()
    if name == "read":
        for file_name in sorted(os.listdir(snapshot_dir)):
            with open(os.path.join(snapshot_dir, file_name), "rb") as f:
                while f.read(16 * 2 ** 20):
                    pass
    else:
        num_targets = int(name.split("-")[1])
        targets = np.linspace(0.02, 0.25, num_targets) if num_targets > 1 else [0.13]
        kwargs = {} if batch_outputs is None else {"batch_outputs": batch_outputs}
        reconstruct(run_dir, targets, out_dir=out_dir, progress=False, **kwargs)
    queue.put((time.perf_counter() - start, baseline, _peak_rss_mb()))


def run_in_fresh_process(name, run_dir, threads, batch_outputs=None):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_phase, args=(name, run_dir, threads, batch_outputs, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def bench_speed(total_mb, num_times, tmp_root, threads, repeats, num_targets=(1, 8, 16), batch_outputs=None):
    run_dir = tempfile.mkdtemp(prefix="bench-phema-", dir=tmp_root)
    try:
        start = time.perf_counter()
        file_mb = make_synthetic_run(run_dir, total_mb, num_times)
        print(f"synthetic run: {2 * num_times} snapshots x {file_mb:.1f} MB = {2 * num_times * file_mb:.0f} MB "
              f"(written in {time.perf_counter() - start:.1f} s)")
        print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
        print(f"cold page cache for every phase (posix_fadvise DONTNEED); best of {repeats} fresh processes; "
              f"torch threads {threads}; batch_outputs "
              f"{'default' if batch_outputs is None else batch_outputs}")
        print()
        print("| phase | time (s) | x read | peak RSS (MB) | RSS above start (MB) | outputs written (MB) |")
        print("| --- | --- | --- | --- | --- | --- |")
        read_time = None
        for name in ["read"] + [f"reconstruct-{n}" for n in num_targets]:
            runs = [run_in_fresh_process(name, run_dir, threads, batch_outputs) for _ in range(repeats)]
            seconds = min(r[0] for r in runs)
            baseline = min(r[1] for r in runs)
            peak = max(r[2] for r in runs)
            read_time = read_time or seconds
            targets = 0 if name == "read" else int(name.split("-")[1])
            expected = f"{targets * file_mb:.0f}" if targets else "-"
            print(f"| {name} | {seconds:.2f} | {seconds / read_time:.2f} | {peak:.0f} | {peak - baseline:.0f} | "
                  f"{expected} |")
        print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Accuracy vs snapshot density.


def train_and_reconstruct(snapshot_every, steps=512, batch=64, width=256, lr=3e-3, seed=0, target=0.07):
    """Relative weight error of the post-hoc target vs tracking it directly (as tests/test_phema_e2e.py)."""
    from mpdiff.data.digits import load_builtin_digits
    from mpdiff.storage.tensors import load_tensors

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(load_builtin_digits()["train_images"]).float().flatten(1) / 127.5 - 1
    net = torch.nn.Sequential(torch.nn.Linear(65, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                              torch.nn.SiLU(), torch.nn.Linear(width, 64))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    ema = PowerFunctionEMA(net, (0.05, 0.10))
    tracked = PowerFunctionEMA(net, (target,))
    run_dir = tempfile.mkdtemp(prefix="bench-phema-acc-")
    try:
        for step in range(1, steps + 1):
            clean = images[torch.randint(len(images), (batch,), generator=generator)]
            sigma = (torch.randn(batch, 1, generator=generator) * 1.2 - 0.4).exp()
            noisy = clean + torch.randn(clean.shape, generator=generator) * sigma
            pred = net(torch.cat([noisy / (1 + sigma ** 2).sqrt(), sigma.log() / 4], dim=1))
            loss = (pred - clean).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update(step * batch, batch)
            tracked.update(step * batch, batch)
            if step % snapshot_every == 0:
                save_ema_snapshots(ema, os.path.join(run_dir, "snapshots"), {"kind": "mlp", "width": width},
                                   step=step, batch_size=batch)
        [path] = reconstruct(run_dir, target, progress=False)
        reconstructed = load_tensors(path)[0]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    names = [name for name, _ in net.named_parameters()]
    flat = lambda state: torch.cat([state[name].detach().double().flatten() for name in names])
    w_rec, w_tracked, w_raw = flat(reconstructed), flat(tracked.averaged_state_dict()), flat(dict(net.named_parameters()))
    return ((w_rec - w_tracked).norm() / (w_tracked - w_raw).norm()).item()


def bench_accuracy(steps=512):
    torch.set_num_threads(1)
    print(f"weights: denoiser MLP on digits, {steps} steps, snapshots of sigma_rel 0.05 + 0.10, target 0.07")
    print()
    print("| snapshot every (steps) | snapshot times | ||w_rec - w_tracked|| / ||w_tracked - w_raw|| |")
    print("| --- | --- | --- |")
    for every in (64, 32, 16, 8):
        print(f"| {every} | {steps // every} | {train_and_reconstruct(every, steps=steps):.2e} |")
    print()
    print("profile: relative L2 error ||p_rec - p|| / ||p|| of the reconstructed response (two profiles per time)")
    print()
    print("| snapshot times | sigma_rel 0.015 | 0.07 | 0.13 | 0.25 |")
    print("| --- | --- | --- | --- | --- |")
    for num_times in (8, 16, 32, 64, 128, 256):
        times = np.arange(1, num_times + 1) / num_times
        in_t, in_sigma_rel = np.repeat(times, 2), np.tile([0.05, 0.10], num_times)
        errors = [profile_reconstruction_error(in_t, in_sigma_rel, 1.0, s, num_points=200001)[1]
                  for s in (0.015, 0.07, 0.13, 0.25)]
        print(f"| {num_times} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy", action="store_true", help="measure reconstruction error vs snapshot density")
    parser.add_argument("--total-mb", type=float, default=300, help="total size of the synthetic snapshots")
    parser.add_argument("--times", type=int, default=15, help="snapshot times (2 profiles each)")
    parser.add_argument("--tmp", default=None, help="where to put the temporary run (default: system temp)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per phase; the best time counts")
    parser.add_argument("--targets", default="1,8,16", help="comma-separated numbers of targets to reconstruct")
    parser.add_argument("--batch-outputs", type=int, default=None, help="targets per pass (default: reconstruct's)")
    args = parser.parse_args()
    if args.accuracy:
        bench_accuracy()
    else:
        bench_speed(args.total_mb, args.times, args.tmp, args.threads, args.repeats,
                    tuple(int(n) for n in args.targets.split(",")), args.batch_outputs)


if __name__ == "__main__":
    main()
