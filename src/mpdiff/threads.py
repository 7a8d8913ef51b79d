"""Torch's intra-op thread count: chosen for the CPUs this process may really use, and changed for a while.

:func:`default_threads` picks the count the heavy commands (train, generate, metrics, ema-sweep, ref) use
unless `--threads` or OMP_NUM_THREADS says otherwise (issue 33): the CPUs this process may run on, less
the load that other processes put on them. Torch's own default is every core, and its OpenMP workers
spin-wait for each other: when other processes hold some of the cores, every parallel op waits for a
descheduled worker, and a training step on a busy 2-core machine became 5-20x slower
(docs/PERFORMANCE.md has the measurement).
"""

import contextlib
import math
import os
from typing import NamedTuple

import torch

from mpdiff.errors import ConfigError

THREADS_ENV = "OMP_NUM_THREADS"          # set by the user: torch already follows it, and so do we


def usable_cpus():
    """The CPUs this process may run on: its affinity mask, limited by a cgroup CPU quota (containers)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(count, math.ceil(quota))) if quota else max(1, count)


def _cgroup_quota():
    """CPUs of the cgroup v2 quota ('max' or missing: None)."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def load_of_others(cpus=None):
    """The 1-minute load average on the CPUs this process may use (the machine's, scaled to them when the
    process may use only some of its CPUs); 0 where unknown. A command that has just started adds
    almost nothing to it."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
    cpus = cpus or usable_cpus()
    total = os.cpu_count() or cpus
    return load * min(1.0, cpus / total)


def default_threads(local_processes=1):
    """(threads, why): the CPUs this process may use, less the load of others, shared among the
    `local_processes` of a torchrun launch on this machine; at least 1."""
    cpus = usable_cpus()
    share = max(1, cpus // max(1, local_processes))
    load = load_of_others(cpus)
    threads = max(1, min(share, share - round(load / max(1, local_processes))))
    why = f"{cpus} usable CPU{'s' if cpus != 1 else ''}, load of others {load:.1f}"
    if local_processes > 1:
        why += f", {local_processes} processes on this machine"
    return threads, why


class ThreadChoice(NamedTuple):
    count: int
    why: str                    # e.g. "2 usable CPUs, load of others 1.3; --threads N to choose"
    limited: bool               # the default left some usable CPUs to the load of others

    def note(self):
        return f"{self.count} CPU thread{'s' if self.count != 1 else ''} ({self.why})"


_chosen = []                    # the choice of this process's command, for threads_note()


def choose_threads(threads=None, why="--threads"):
    """Set torch's intra-op threads for a heavy command; returns a :class:`ThreadChoice`: `threads` when
    given (--threads), else what OMP_NUM_THREADS set, else :func:`default_threads`."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"--threads must be a whole number >= 1, got {threads!r}")
        torch.set_num_threads(threads)
        choice = ThreadChoice(threads, why, False)
    elif os.environ.get(THREADS_ENV):
        choice = ThreadChoice(torch.get_num_threads(), f"{THREADS_ENV}={os.environ[THREADS_ENV]}", False)
    else:
        local = os.environ.get("LOCAL_WORLD_SIZE", "")  # torchrun's processes on this machine
        processes = int(local) if local.isdigit() else 1
        count, why = default_threads(processes)
        torch.set_num_threads(count)
        choice = ThreadChoice(count, f"{why}; --threads N to choose", count < usable_cpus() // max(1, processes))
    _chosen[:] = [choice]
    return choice


def threads_note():
    """The thread count torch uses now, and why when a command chose it (:func:`choose_threads`)."""
    count = torch.get_num_threads()
    if _chosen and _chosen[0].count == count:
        return _chosen[0].note()
    return f"{count} CPU thread{'s' if count != 1 else ''}"


@contextlib.contextmanager
def torch_threads(count):
    """Run the body with `count` torch intra-op threads, restoring the previous count afterwards.

    Used where the work is tiny or I/O-bound (the digit classifier, the post-hoc EMA pass): extra
    threads add nothing on an idle machine and, when other processes hold the cores, every op waits
    for a descheduled worker (measured 2-15x slower on a busy 2-core VM).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
