"""Scoring over several processes: which rows of a tensor this process holds, the batches
it runs, FSDP2's gradient reduction turned into a plain sum, and the one all-reduce of the
per-structure partial sums at the end.

A model sharded with FSDP2 (``slimmoe.parallel.shard_decoder_layers``) holds every parameter
as a DTensor split on dim 0 in ``torch.chunk`` fashion (uneven shards are padded inside FSDP;
the local tensor has the real rows only). Each process folds the rows it holds into the
per-structure sums, at their global positions; the sums are added over processes at the end.
With one process, or a plain tensor, every helper here returns its input unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from slimmoe.parallel import all_reduce_sum, topology


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the rows of ``t`` this process holds, the global index of the first one). A plain
    tensor is held whole by every process (its gradient is this process's own)."""
    if not isinstance(t, DTensor):
        return t, 0
    if any(p != Shard(0) for p in t.placements):
        raise NotImplementedError(f"scoring needs parameters sharded on dim 0, got {t.placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = t.to_local()
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    assert tuple(shape) == tuple(local.shape), (shape, local.shape)
    return local, int(offset[0])


def owned_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Like :func:`local_rows`, for scores of the weights alone: a plain tensor is replicated
    in every process, so only rank 0 counts it (the others get no rows)."""
    if isinstance(t, DTensor) or topology().rank == 0:
        return local_rows(t)
    return t[:0], 0


def group_sums(t: torch.Tensor, start: int, total: int, groups: int) -> torch.Tensor:
    """Per-group sums of rows [start, start + len(t)) of a tensor whose ``total`` rows form
    ``groups`` equal consecutive groups (a projection's rows, KV group by KV group)."""
    if start == 0 and t.shape[0] == total:
        return t.reshape(groups, -1).sum(1)
    rows = t.flatten(1).sum(1) if t.dim() > 1 else t  # a shard may hold no rows at all
    ids = torch.arange(start, start + t.shape[0], device=t.device) // (total // groups)
    return torch.zeros(groups, dtype=rows.dtype, device=rows.device).index_add_(0, ids, rows)


def reduce_sums(tensors: list[torch.Tensor]) -> None:
    """Every tensor (float64, CPU) summed over the processes in place, in one all-reduce.
    Every process must pass tensors of the same shapes in the same order."""
    if topology().world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    all_reduce_sum(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def rank_batches(blocks: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, bool]]:
    """This process's calibration batches, each with whether it counts.

    The batches are those of one process (``blocks.split(batch_size)``), so every loss is the
    same and the summed scores equal one process's; batch j goes to rank j mod N. A sharded
    forward is a collective, so every process runs the same number of passes: a process out
    of batches runs one more that does not count (zero loss, statistics not kept)."""
    batches = blocks.split(batch_size)
    topo = topology()
    if topo.world == 1:
        return [(b, True) for b in batches]
    steps = -(-len(batches) // topo.world)
    mine = [j * topo.world + topo.rank for j in range(steps)]
    return [(batches[j], True) if j < len(batches) else (batches[0], False) for j in mine]


@contextmanager
def summed_gradients(model: nn.Module):
    """FSDP2 reduce-scatters gradients as a mean over processes by default; a score is the
    sensitivity of the *summed* loss over all calibration batches, so the reduction is made a
    plain sum for the block (back to FSDP's defaults after). Nothing to do without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    try:
        for m in sharded:
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a sum with no pre- or post-division
        yield
    finally:
        for m in sharded:
            m.set_gradient_divide_factor(None)
            m.set_force_sum_reduction_for_comms(False)
