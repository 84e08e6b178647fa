"""Who this process is among the processes torchrun started, and the few collectives the
library needs. With one process every function here is a no-op, so code written for N
processes runs unchanged in one."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def topology() -> Topology:
    """This process's place, from the process group when there is one, else from torchrun's
    environment (RANK, WORLD_SIZE, LOCAL_RANK); one process otherwise."""
    local = _env_int("LOCAL_RANK", 0)
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return Topology(dist.get_rank(), dist.get_world_size(), local, device)
    return Topology(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), local, device)


def init_process_group() -> Topology:
    """Join the process group torchrun set up (nccl on GPUs, gloo on CPUs), once; with one
    process nothing is initialised."""
    topo = topology()
    if topo.world > 1 and not dist.is_initialized():
        if topo.device.type == "cuda":
            torch.cuda.set_device(topo.device)
        dist.init_process_group("nccl" if topo.device.type == "cuda" else "gloo")
    return topology()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every process, in place (``t`` itself with one process). gloo
    reduces on the CPU, nccl on the process's GPU; the result lands where ``t`` was."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    backend_device = torch.device("cpu") if dist.get_backend() == "gloo" else topology().device
    moved = t.to(backend_device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    if moved is not t:
        t.copy_(moved)
    return t
