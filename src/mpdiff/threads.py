"""Temporarily changing torch's intra-op thread count."""

import contextlib

import torch


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
