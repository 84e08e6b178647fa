"""How well a model predicts held-out text: perplexity, and KL to the teacher."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimmoe.losses import kl_loss


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
def kl_to_teacher(model: nn.Module, teacher: nn.Module, blocks: torch.Tensor, batch_size: int = 8,
                  chunk_size: int = 1024, progress: bool = False) -> float:
    """Full-vocabulary KL(teacher || model), mean per token over every position of every block.

    The vocabulary-sized softmaxes are taken ``chunk_size`` positions at a time
    (``losses.kl_loss``), so memory beyond the two models' logits does not grow with
    vocab x sequence.
    """
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
