"""Perplexity on held-out blocks, total / active parameter counts, forward throughput.

Active parameters are those one token passes through: embeddings (input and output,
counted once when tied), attention, norms, routers, shared experts and dense MLPs, plus
``num_experts_per_tok`` of the routed experts of every MoE layer. Embeddings are counted,
as in the Phi-3.5-MoE / Phi-mini-MoE model cards (6.6B / 2.4B active include them).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimmoe.arch import get_adapter


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``total_params`` and ``active_params`` (see the module docstring)."""
    adapter = get_adapter(model.config)
    total = sum(p.numel() for p in model.parameters())  # tied tensors are yielded once
    routed = inactive = 0
    top_k = adapter.top_k(model.config)
    for b in adapter.moe_blocks(model):
        E = b.experts.gate_up_proj.shape[0]
        per_expert = sum(p.numel() for p in b.experts.parameters()) // E
        routed += per_expert * E
        inactive += per_expert * (E - min(top_k, E))
    return {"total_params": int(total), "active_params": int(total - inactive)}


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean next-token cross-entropy) over every position of every block."""
    if blocks.numel() == 0:
        raise ValueError("perplexity needs at least one block")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in tqdm(blocks.split(batch_size), desc="eval", unit="batch", disable=not progress):
        ids = ids.to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


@torch.no_grad()
def tokens_per_second(model: nn.Module, batch: torch.Tensor, repeats: int = 3) -> float:
    """Forward-pass throughput on one batch: best of ``repeats`` timed runs after a warm-up."""
    was_training = model.training
    model.eval()
    batch = batch.to(next(model.parameters()).device)
    model(input_ids=batch)
    best = math.inf
    for _ in range(repeats):
        if batch.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=batch)
        if batch.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    model.train(was_training)
    return batch.numel() / best


def evaluate(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> dict:
    """The JSON object `slimmoe eval` prints."""
    out = {"perplexity": perplexity(model, blocks, batch_size, progress)}
    out.update(parameter_counts(model))
    out["tokens_per_second"] = tokens_per_second(model, blocks[:batch_size])
    return out
