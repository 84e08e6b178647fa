"""Determinism by construction: which samples a step trains on, and the RNG seed of each
micro-batch, are functions of (seed, step[, micro-batch]) only. Resume is then exact,
and 1-process and N-process runs see the same micro-batches and router noise."""

from __future__ import annotations

import torch


def step_sample_ids(step: int, batch_size: int, n: int, seed: int, _perms: dict = {}) -> torch.Tensor:  # noqa: B006
    """Block indices of the global batch of optimizer step ``step``: one fixed permutation per epoch."""
    g = torch.arange(step * batch_size, (step + 1) * batch_size)
    out = torch.empty_like(g)
    for epoch in torch.unique(g // n).tolist():
        key = (seed, n, epoch)
        if key not in _perms:
            _perms.clear() if len(_perms) > 8 else None
            _perms[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        sel = (g // n) == epoch
        out[sel] = _perms[key][g[sel] % n]
    return out


def micro_seed(seed: int, step: int, micro: int) -> int:
    """Seed of the global RNG before global micro-batch ``micro`` of step ``step``."""
    return ((seed * 1_000_003 + step) * 8191 + micro) % (2**63 - 1)
