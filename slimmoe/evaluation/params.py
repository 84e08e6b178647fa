"""Total and active parameter counts of a built model.

Active parameters are those one token passes through: embeddings (input and output,
counted once when tied), attention, norms, routers, shared experts and dense MLPs, plus
``num_experts_per_tok`` of the routed experts of every MoE layer. Embeddings are counted,
as in the Phi-3.5-MoE / Phi-mini-MoE model cards (6.6B / 2.4B active include them).
``slimmoe.prune.schedule`` computes the same counts from a config alone.
"""

from __future__ import annotations

import torch.nn as nn

from slimmoe.arch import get_adapter


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``total_params`` and ``active_params`` (see the module docstring)."""
    adapter = get_adapter(model.config)
    total = sum(p.numel() for p in model.parameters())  # tied tensors are yielded once
    inactive = 0
    top_k = adapter.top_k(model.config)
    for b in adapter.moe_blocks(model):
        E = b.experts.gate_up_proj.shape[0]
        per_expert = sum(p.numel() for p in b.experts.parameters()) // E
        inactive += per_expert * (E - min(top_k, E))
    return {"total_params": int(total), "active_params": int(total - inactive)}
