"""Several processes launched by ``torchrun``: who this process is, and the few collective operations
mpdiff needs (barrier, sum, broadcast of a small object).

``torchrun --nproc_per_node N -m mpdiff ...`` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
address; :meth:`Distributed.from_env` joins the process group (gloo on the CPU, NCCL on CUDA devices).
A plain ``mpdiff ...`` is a world of one, and every operation is then a no-op.
"""

import contextlib
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mpdiff.errors import ConfigError, MpdiffError

# What gloo and NCCL say when the process at the other end of a collective is gone (killed, crashed) or hangs.
_PEER_GONE = re.compile(r"connection (reset|closed|refused)|broken pipe|end of file|remote process exited|"
                        r"communicator was aborted|timed out|timeout", re.IGNORECASE)
_COLLECTIVES = re.compile(r"gloo|nccl|c10d|process ?group", re.IGNORECASE)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    host_group: object = None  # NCCL runs: a gloo group for host tensors, which then never wait on the GPU

    @classmethod
    def single(cls):
        return cls()

    @classmethod
    def from_env(cls, device="cpu"):
        """The process group of a torchrun launch (joined here), or a world of one without one.

        On CUDA, process LOCAL_RANK uses device cuda:LOCAL_RANK; :meth:`device` gives it."""
        world = _launch_number("WORLD_SIZE", "1")
        if world <= 1:
            return cls.single()
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:  # a stray WORLD_SIZE in the shell, not a torchrun launch
            raise ConfigError(f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                              f"not: start several processes with torchrun, or unset WORLD_SIZE for one")
        rank, local = _launch_number("RANK", "0"), _launch_number("LOCAL_RANK", "0")
        if not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} is not a rank of a world of WORLD_SIZE={world} processes")
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            if local >= torch.cuda.device_count():
                raise ConfigError(f"torchrun started process {local} on this node, but there are only "
                                  f"{torch.cuda.device_count()} CUDA devices")
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        host_group = dist.new_group(backend="gloo") if backend == "nccl" else None
        return cls(rank=rank, world_size=world, local_rank=local, backend=backend, host_group=host_group)

    @property
    def active(self):
        return self.world_size > 1

    def device(self, device):
        """`device` for this process: 'cuda' becomes cuda:LOCAL_RANK in a multi-process launch."""
        if self.active and str(device) == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def barrier(self):
        if self.active:
            dist.barrier()

    def all_sum(self, tensor):
        """Sum a tensor over the processes (in place; also returned), where it lives: a host tensor over
        gloo (in an NCCL run, its host group: no wait on the GPU), a CUDA tensor over NCCL. Gloo sums
        float64 exactly as given."""
        if self.active:
            group = self.host_group if tensor.device.type == "cpu" else None
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    def all_min(self, value):
        """The smallest of an integer over the processes."""
        if not self.active:
            return value
        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.host_group)
        return int(t.item())

    def peer_stopped(self, error, resume_from="the last checkpoint"):
        """The one line for `error` when it is a collective that failed because another process of the launch
        stopped (a killed rank: its sockets close, and gloo or NCCL raises in this one); None for any other."""
        text = str(error)
        ours = isinstance(error, getattr(dist, "DistError", ())) or bool(_COLLECTIVES.search(text))
        if not (self.active and isinstance(error, RuntimeError) and ours and _PEER_GONE.search(text)):
            return None
        who = f"rank {1 - self.rank}" if self.world_size == 2 else f"another of the {self.world_size} processes"
        return (f"{who} stopped (killed?), so rank {self.rank} cannot go on; the run can be resumed from "
                f"{resume_from} (run the same command again)")

    @contextlib.contextmanager
    def peers_watched(self, resume_from="the last checkpoint"):
        """Inside the block, a collective that fails because another process stopped (:meth:`peer_stopped`)
        is one MpdiffError line instead of the backend's traceback; every other error is left as it is."""
        try:
            yield
        except RuntimeError as e:
            line = self.peer_stopped(e, resume_from)
            if line is None:
                raise
            raise MpdiffError(line) from None

    def close(self):
        if self.active:
            if dist.is_initialized():
                dist.destroy_process_group()


def _launch_number(name, default):
    """An integer that torchrun sets in the environment; anything else is one line naming the variable."""
    text = os.environ.get(name, default) or default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text[:20]!r} is not a whole number (torchrun sets it)") \
            from None
    if value < 0:
        raise ConfigError(f"environment variable {name}={value} is negative")
    return value
