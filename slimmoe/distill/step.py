"""One distillation step's pieces: the loss of a micro-batch against the teacher (live or
its top-k cache) and the held-out evaluation; the loop around them is ``slimmoe.distill.loop``."""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel

from slimmoe import losses
from slimmoe.config import DistillConfig
from slimmoe.distill.runtime import Runtime


def shift(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (next token) and mask for full-length logits: the last position has no label."""
    labels = torch.roll(ids, -1, dims=1)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, -1] = False
    return labels, mask


class Teacher:
    """The frozen teacher on its own device/dtype (sharded under FSDP: then every rank must
    run the same number of forwards), or the top-k cache standing in for it."""

    def __init__(self, model: PreTrainedModel | None, cache=None):
        self.model, self.cache = model, cache

    def logits(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model(input_ids=ids.to(dev), use_cache=False).logits.to(device)
        if hasattr(self.model, "reshard"):  # FSDP2 keeps the root's gathered parameters after forward
            self.model.reshard()
        return out

    def topk(self, ids, rows, cfg: DistillConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            lp, idx = self.cache.get(rows)
            return lp.to(device), idx.to(device)
        return losses.teacher_topk(self.logits(ids, device), k=cfg.topk, temperature=cfg.temperature)


def micro_loss(model, teacher: Teacher, ids, rows, cfg: DistillConfig, rt: Runtime) -> torch.Tensor:
    labels, mask = shift(ids)
    kw = {"output_router_logits": True} if cfg.router_aux_loss_coef > 0 else {}
    with rt.autocast():
        out = model(input_ids=ids, use_cache=False, **kw)
    logits = out.logits
    lm = None
    if cfg.loss == "lm" or cfg.alpha < 1:
        lm = losses.lm_loss(logits, labels, mask=mask, chunk_size=cfg.chunk_size)
    if cfg.loss == "lm":
        loss = lm
    else:
        if cfg.loss == "kl":
            kd = losses.kl_loss(logits, teacher.logits(ids, logits.device), mask, cfg.temperature, cfg.chunk_size)
        else:
            fn = losses.kd_topk_loss if cfg.loss == "kd_topk" else losses.kd_topk_renorm_loss
            t_lp, t_idx = teacher.topk(ids, rows, cfg, logits.device)
            kd = fn(logits, t_lp, t_idx, mask, cfg.temperature, cfg.chunk_size)
        loss = kd if lm is None else losses.mixed_loss(kd, lm, cfg.alpha)
    if cfg.router_aux_loss_coef > 0 and getattr(out, "aux_loss", None) is not None:
        loss = loss + cfg.router_aux_loss_coef * out.aux_loss.float()
    return loss


@torch.no_grad()
def held_out_eval(model, teacher: PreTrainedModel | None, blocks: torch.Tensor, cfg: DistillConfig,
                  rt: Runtime) -> dict[str, float]:
    """Held-out perplexity of the student and full-vocabulary KL(teacher || student), all ranks.

    Keys ``held_out_nll``, ``held_out_ppl`` and (with a teacher) ``held_out_kl``: named apart
    from the pipeline's evaluate step, which measures other blocks. Every rank runs the same
    number of forwards (sharded models gather parameters collectively): a rank with fewer
    blocks repeats its first one and does not count it."""
    was_training = model.training
    model.eval()
    shard = blocks[rt.rank :: rt.world]
    per_rank = -(-blocks.shape[0] // rt.world)  # the most blocks any rank has
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # nll, kl, positions
    t = Teacher(teacher)
    for s in range(0, per_rank, cfg.eval_batch_size):
        ids = (shard[s : s + cfg.eval_batch_size] if s < shard.shape[0] else blocks[:1]).to(rt.device)
        labels, mask = shift(ids)
        with rt.autocast():
            logits = model(input_ids=ids, use_cache=False).logits
        if s >= shard.shape[0]:
            if teacher is not None:
                t.logits(ids, logits.device)
            continue
        count = int(mask.sum())
        sums[0] += losses.lm_loss(logits, labels, mask, cfg.chunk_size).double() * count
        if teacher is not None:
            kl = losses.kl_loss(logits, t.logits(ids, logits.device), mask, 1.0, cfg.chunk_size)
            sums[1] += kl.double() * count
        sums[2] += count
    sums = rt.reduce(sums, "sum")
    model.train(was_training)
    n = max(sums[2].item(), 1.0)
    out = {"held_out_nll": sums[0].item() / n, "held_out_ppl": math.exp(min(sums[0].item() / n, 50.0))}
    if teacher is not None:
        out["held_out_kl"] = sums[1].item() / n
    return out
