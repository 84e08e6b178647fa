"""Perplexity on held-out blocks, KL to the teacher, total / active parameter counts,
throughput and peak memory (the last two in ``slimmoe.evaluate_extra``).

Active parameters are those one token passes through: embeddings (input and output,
counted once when tied), attention, norms, routers, shared experts and dense MLPs, plus
``num_experts_per_tok`` of the routed experts of every MoE layer. Embeddings are counted,
as in the Phi-3.5-MoE / Phi-mini-MoE model cards (6.6B / 2.4B active include them).
"""

from __future__ import annotations

import contextlib
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


@torch.no_grad()
def kl_to_teacher(model: nn.Module, teacher: nn.Module, blocks: torch.Tensor, batch_size: int = 8,
                  chunk_size: int = 1024, progress: bool = False) -> float:
    """Full-vocabulary KL(teacher || model), mean per token over every position of every block.

    The vocabulary-sized softmaxes are taken ``chunk_size`` positions at a time
    (``losses.kl_loss``), so memory beyond the two models' logits does not grow with
    vocab x sequence.
    """
    from slimmoe.losses import kl_loss

    if blocks.numel() == 0:
        raise ValueError("kl_to_teacher needs at least one block")
    modes = model.training, teacher.training
    model.eval()
    teacher.eval()
    device, t_device = next(model.parameters()).device, next(teacher.parameters()).device
    total, count = 0.0, 0
    for ids in tqdm(blocks.split(batch_size), desc="kl", unit="batch", disable=not progress):
        s_logits = model(input_ids=ids.to(device)).logits
        t_logits = teacher(input_ids=ids.to(t_device)).logits.to(device)
        total += kl_loss(s_logits, t_logits, chunk_size=chunk_size).item() * ids.numel()
        count += ids.numel()
    model.train(modes[0])
    teacher.train(modes[1])
    return total / count


def evaluate(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False, *,
             teacher: nn.Module | None = None, throughput_batch_sizes=(), generation_tokens: int = 0,
             generation_prompt_tokens: int = 32, peak_memory: bool = False) -> dict:
    """The JSON object `slimmoe eval` prints (perplexity, total_params, active_params,
    tokens_per_second), plus on request:

    * ``kl_to_teacher`` when a teacher is given;
    * ``forward_tokens_per_second_b{n}`` for each n of ``throughput_batch_sizes``, and
      ``generate_tokens_per_second_b{n}`` when ``generation_tokens`` > 0;
    * ``peak_memory_bytes``: weights + peak working memory of perplexity, throughput and
      generation (not of the KL pass, which also holds the teacher); see evaluate_extra.
    """
    from slimmoe.evaluate_extra import PeakMemory, model_bytes, throughput_metrics

    mem = PeakMemory(next(model.parameters()).device) if peak_memory else contextlib.nullcontext()
    with mem:
        out = {"perplexity": perplexity(model, blocks, batch_size, progress)}
        out.update(parameter_counts(model))
        out["tokens_per_second"] = tokens_per_second(model, blocks[:batch_size])
        out.update(throughput_metrics(model, blocks, throughput_batch_sizes, generation_tokens,
                                      generation_prompt_tokens))
    if peak_memory and mem.growth is not None:  # None: RSS unreadable on this platform
        out["peak_memory_bytes"] = model_bytes(model) + max(mem.growth, 0)
    if teacher is not None:
        out["kl_to_teacher"] = kl_to_teacher(model, teacher, blocks, batch_size, progress=progress)
    return out
