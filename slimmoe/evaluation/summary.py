"""Every measurement of one model in one call: what `slimmoe eval` prints and the
pipeline's evaluate step records."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from slimmoe.evaluation.params import parameter_counts
from slimmoe.evaluation.quality import kl_to_teacher, perplexity
from slimmoe.evaluation.speed import PeakMemory, resident_bytes, throughput_metrics, tokens_per_second


def evaluate(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False, *,
             teacher: nn.Module | None = None, throughput_batch_sizes=(), generation_tokens: int = 0,
             generation_prompt_tokens: int = 32, peak_memory: bool = False) -> dict:
    """The JSON object `slimmoe eval` prints (perplexity, total_params, active_params,
    tokens_per_second), plus on request:

    * ``kl_to_teacher`` when a teacher is given;
    * ``forward_tokens_per_second_b{n}`` for each n of ``throughput_batch_sizes``, and
      ``generate_tokens_per_second_b{n}`` when ``generation_tokens`` > 0;
    * ``peak_memory_bytes``: weights + peak working memory of perplexity, throughput and
      generation (not of the KL pass, which also holds the teacher); see ``speed.PeakMemory``.
    """
    mem = PeakMemory(next(model.parameters()).device) if peak_memory else contextlib.nullcontext()
    with mem:
        out = {"perplexity": perplexity(model, blocks, batch_size, progress)}
        out.update(parameter_counts(model))
        out["tokens_per_second"] = tokens_per_second(model, blocks[:batch_size])
        out.update(throughput_metrics(model, blocks, throughput_batch_sizes, generation_tokens,
                                      generation_prompt_tokens))
    if peak_memory and mem.growth is not None:  # None: RSS unreadable on this platform
        out["peak_memory_bytes"] = resident_bytes(model) + max(mem.growth, 0)
    if teacher is not None:
        out["kl_to_teacher"] = kl_to_teacher(model, teacher, blocks, batch_size, progress=progress)
    return out
