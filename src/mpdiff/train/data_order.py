"""Which dataset images a training step sees: a function of the seed and the image count only.

Each epoch is a permutation seeded by (seed, epoch), so the order does not depend on when a run
was stopped and resumed, on the micro-batch size or (later) on how many processes share the batch.
"""

import functools
import hashlib

import torch


def derived_seed(*parts):
    """A 63-bit seed from a hash of the parts (stable across processes and platforms)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed, dataset_size, epoch):
    generator = torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch))
    return torch.randperm(dataset_size, generator=generator)


def batch_indices(seed, dataset_size, start, count):
    """Dataset indices for the global sample positions start .. start + count - 1."""
    out = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, dataset_size)
        take = min(count - len(out), dataset_size - offset)
        out += _epoch_permutation(seed, dataset_size, epoch)[offset:offset + take].tolist()
        pos += take
    return out
