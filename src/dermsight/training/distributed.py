"""Multi-GPU / multi-node training under `torchrun` (DDP), and the same code as one process without it.

Rank 0 alone writes files and takes every decision that ranks must agree on (a refusal, the best epoch, the time
budget's stop): ranks that decided differently would wait for each other forever.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dermsight.models.factory import use_cuda


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = use_cuda(device_pref)
    if world > 1:
        d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
    else:
        d = Dist()
    device = torch.device(f"cuda:{d.local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels once
    return d, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def close(d: Dist) -> None:
    if d.world > 1:
        dist.destroy_process_group()


def from_rank_0(d: Dist, value: Callable[[], Any]) -> Any:
    """``value()`` computed on rank 0 and given to every rank. Rank 0 alone holds the run folder's files for sure
    (other nodes may not see them)."""
    result = value() if d.main else None
    if d.world > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def numbers_from_rank_0(d: Dist, values: Sequence[float]) -> list[float]:
    """Rank 0's ``values`` on every rank (a tensor broadcast: cheap enough for every epoch)."""
    if d.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return t.tolist()


def checked_on_rank_0(d: Dist, check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 and stop every rank with its ValueError, if it raises one (a rank left going on alone
    would wait for the others forever under a launcher that does not tear a failed job down; torchrun does)."""

    def refusal() -> str | None:
        try:
            check()
        except ValueError as e:
            return str(e)
        return None

    why = from_rank_0(d, refusal)
    if why is not None:
        raise ValueError(why)
