"""The process group as the loop sees it: ranks, reductions across them, seeding, stop signals, and the
end of the helper processes (DataLoader workers) with the trainer."""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import random
import signal
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist


def ensure_distributed_env() -> None:
    """A plain `python -m recipe.train` is a world of one; launchers (torchrun, srun) set these."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_mean(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def all_gather_lists(items: list) -> list:
    """Every rank's list, concatenated in rank order (picklable items; for rare, small reports)."""
    if not dist.is_initialized():
        return list(items)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def any_rank(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def die_with_parent() -> None:
    """The kernel sends this process SIGKILL when its parent dies (Linux). In DataLoader workers: a trainer
    killed with kill -9 or by the OOM killer leaves no worker behind (elsewhere DataLoader's own watchdog
    ends an idle worker within seconds). In ranks started by torchrun: a launcher killed with kill -9 takes
    its ranks with it, instead of leaving them to train on beside the rerun. (A parent that died before this
    call is noticed otherwise: by DataLoader's watchdog in a worker, at the rendezvous with torchrun's
    store in a rank, which therefore calls this before joining the process group.)"""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))


def kill_worker_processes() -> None:
    """SIGKILL what is left of the daemonic multiprocessing children (DataLoader workers) after their
    orderly shutdown. They ignore SIGTERM (see recipe.train), so multiprocessing's exit handler, which
    terminates them with SIGTERM and then joins them, would otherwise wait forever for one that is stuck."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)
