"""Distillation and language-model losses, computed in chunks of positions.

All functions take logits of shape [B, T, V] or [N, V] whose positions are already
aligned (the caller shifts labels). ``mask`` is a bool tensor of the leading shape
(True = the position counts; None = all count). Every loss is the mean over counted
positions, returned as a float32 scalar.

Memory: the vocabulary-sized intermediates (log-softmax, probabilities) exist for one
chunk of ``chunk_size`` positions at a time. When the logits need a gradient, it is
computed chunk by chunk in the forward pass into a single logits-shaped buffer (see
``_ChunkedMean``), so backward holds nothing else and recomputes nothing. Gradients flow
to the student logits only; teacher outputs and labels are constants.

Names follow DESIGN.md: ``kd_topk_loss`` is the residual-bucket form (the default
distillation loss), ``kd_topk_renorm_loss`` the paper's soft cross-entropy to the
renormalised teacher top-k (non-zero gradient when student == teacher; used for
importance scores).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = [
    "teacher_topk",
    "kd_topk_loss",
    "kd_topk_renorm_loss",
    "kl_loss",
    "lm_loss",
    "mixed_loss",
]

# log(1 - exp(x)) is undefined at x = 0 (all mass on the top-k); clamp just below it.
_LOG_MASS_MAX = -1e-6


def teacher_topk(
    teacher_logits: torch.Tensor, k: int = 8, temperature: float = 1.0, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher's top-k log-probabilities (float32, at ``temperature``) and token ids, [..., k]."""
    if k <= 0 or k > teacher_logits.shape[-1]:
        raise ValueError(f"topk: k must be in 1..{teacher_logits.shape[-1]}, got {k}")
    lead = teacher_logits.shape[:-1]
    flat = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    lps, idxs = [], []
    for s in range(0, flat.shape[0], chunk_size):
        z = flat[s : s + chunk_size].float()
        lp = torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)
        v, i = lp.topk(k, dim=-1)
        lps.append(v)
        idxs.append(i)
    if not lps:
        empty = flat.new_zeros((0, k), dtype=torch.float32)
        return empty.reshape(*lead, k), empty.long().reshape(*lead, k)
    return torch.cat(lps).reshape(*lead, k), torch.cat(idxs).reshape(*lead, k)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler's switch at -ln 2)."""
    x = x.clamp(max=_LOG_MASS_MAX)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class _ChunkedMean(torch.autograd.Function):
    """Mean of a per-position loss over counted positions, one chunk at a time.

    When the logits need a gradient it is computed chunk by chunk during the forward
    pass into one buffer of the logits' shape (the gradient has to exist anyway), so
    neither pass ever holds more than one chunk of vocabulary-sized intermediates and
    nothing is recomputed in backward. Only ``logits`` receives a gradient; the other
    inputs (teacher outputs, labels) are constants.
    """

    @staticmethod
    def forward(ctx, logits, per_position, others, mask, chunk_size):  # noqa: D401
        need_grad = ctx.needs_input_grad[0]
        n = logits.shape[0]
        grad = torch.zeros_like(logits) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        count = 0
        for s in range(0, n, chunk_size):
            part, rest = logits[s : s + chunk_size], [t[s : s + chunk_size] for t in others]
            sel = None
            if mask is not None:
                m = mask[s : s + chunk_size]
                c = int(m.sum())
                if c == 0:
                    continue
                if c < m.numel():
                    sel = m
                    rest = [t[m] for t in rest]
            else:
                c = part.shape[0]
            if need_grad:
                with torch.enable_grad():
                    leaf = part.detach().requires_grad_(True)
                    val = per_position(leaf if sel is None else leaf[sel], *rest).sum()
                    (g,) = torch.autograd.grad(val, leaf)
                grad[s : s + chunk_size] = g
            else:
                val = per_position(part if sel is None else part[sel], *rest).sum()
            total += val.detach().float()
            count += c
        denom = max(count, 1)
        if need_grad:
            grad.div_(denom)
            ctx.save_for_backward(grad)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        scaled = grad if bool(grad_out == 1) else grad * grad_out.to(grad.dtype)
        return scaled, None, None, None, None


def _chunked_mean(
    per_position: Callable[..., torch.Tensor],
    logits: torch.Tensor,
    others: list[torch.Tensor],
    mask: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """Mean of ``per_position(logits_chunk, *other_chunks) -> [n]`` over counted positions.

    ``logits`` is [N, V], ``others`` are [N, ...], ``mask`` is [N] or None.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    n = logits.shape[0]
    if mask is not None:
        mask = mask.reshape(-1).to(device=logits.device, dtype=torch.bool)
        if mask.shape[0] != n:
            raise ValueError(f"mask has {mask.shape[0]} positions, logits have {n}")
    others = [t.detach() for t in others]
    if torch.is_grad_enabled() and logits.requires_grad:
        return _ChunkedMean.apply(logits, per_position, others, mask, chunk_size)
    with torch.no_grad():
        return _ChunkedMean.forward(_NoGradCtx(), logits, per_position, others, mask, chunk_size)


class _NoGradCtx:
    needs_input_grad = (False,)


class _GatheredMean(torch.autograd.Function):
    """Mean loss that sees the student only through its log-probs at k ids per position.

    ``per_position(l_k [n, k], *others) -> [n]`` is differentiated by autograd on the small
    [n, k] tensor; the map to the logits is the softmax Jacobian written out,
    dL/dz = (scatter(g) - softmax(z/T) * sum(g)) / T with g = dL/dl_k, which is streamed
    into the gradient buffer one chunk at a time (no [n, V] log-softmax is kept or
    back-propagated through).
    """

    @staticmethod
    def forward(ctx, logits, idx, others, mask, per_position, temperature, chunk_size):  # noqa: D401
        need_grad = ctx.needs_input_grad[0]
        n = logits.shape[0]
        denom = max(int(mask.sum()) if mask is not None else n, 1)
        grad = torch.empty_like(logits) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = logits[s:e].float()
            if temperature != 1.0:
                z = z / temperature
            # log_softmax is one fused pass on CPU and GPU (torch.logsumexp is ~7x slower on CPU)
            lsm = torch.log_softmax(z, dim=-1)
            del z
            ik = idx[s:e]
            l_k = lsm.gather(-1, ik)
            rest = [o[s:e] for o in others]
            m = mask[s:e] if mask is not None else None
            with torch.enable_grad():
                leaf = l_k.detach().requires_grad_(need_grad)
                per = per_position(leaf, *rest)
                if m is not None:
                    per = torch.where(m, per, torch.zeros_like(per))
                val = per.sum()
                if need_grad:
                    (g,) = torch.autograd.grad(val, leaf)
            total += val.detach().float()
            if need_grad:
                g = g / (denom * temperature)
                out = grad[s:e]
                if out.dtype == torch.float32:
                    torch.exp(lsm, out=out)
                else:
                    out.copy_(lsm.exp_())
                out.mul_(-g.sum(-1, keepdim=True).to(out.dtype))
                out.scatter_add_(-1, ik, g.to(out.dtype))
        if need_grad:
            ctx.save_for_backward(grad)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        scaled = grad if bool(grad_out == 1) else grad * grad_out.to(grad.dtype)
        return scaled, None, None, None, None, None, None


def _gathered_mean(per_position, logits, idx, others, mask, temperature, chunk_size) -> torch.Tensor:
    """Flatten, validate and dispatch to :class:`_GatheredMean`."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    idx = idx.reshape(flat.shape[0], -1).to(flat.device)
    if mask is not None:
        mask = mask.reshape(-1).to(device=flat.device, dtype=torch.bool)
        if mask.shape[0] != flat.shape[0]:
            raise ValueError(f"mask has {mask.shape[0]} positions, logits have {flat.shape[0]}")
    others = [o.reshape(flat.shape[0], -1).detach() for o in others]
    if torch.is_grad_enabled() and flat.requires_grad:
        return _GatheredMean.apply(flat, idx, others, mask, per_position, float(temperature), chunk_size)
    with torch.no_grad():
        return _GatheredMean.forward(_NoGradCtx(), flat, idx, others, mask, per_position, float(temperature),
                                     chunk_size)


def kd_topk_loss(
    student_logits: torch.Tensor,
    t_logprobs: torch.Tensor,
    t_idx: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """KL between (k+1)-bucket distributions: teacher top-k + residual vs student on the same ids.

    Target: the teacher's k probabilities unnormalised plus one bucket 1 - sum(top-k).
    Student: its probabilities on the same k ids plus 1 - their sum. Scaled by T^2.
    Zero when the student equals the teacher.
    """
    def per_position(s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        t_lp = t_lp.float()
        s_rest = _log1mexp(torch.logsumexp(s_lp, dim=-1))
        t_rest = _log1mexp(torch.logsumexp(t_lp, dim=-1))
        kl_k = (t_lp.exp() * (t_lp - s_lp)).sum(-1)
        p_rest = t_rest.exp()
        kl_rest = torch.where(p_rest > 0, p_rest * (t_rest - s_rest), torch.zeros_like(p_rest))
        return kl_k + kl_rest

    loss = _gathered_mean(per_position, student_logits, t_idx, [t_logprobs], mask, temperature, chunk_size)
    return loss * temperature**2


def kd_topk_renorm_loss(
    student_logits: torch.Tensor,
    t_logprobs: torch.Tensor,
    t_idx: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Soft cross-entropy to the renormalised teacher top-k: -sum_i p_i log q_i, scaled by T^2.

    q is the student's full-vocabulary softmax at temperature T, so the gradient is
    non-zero even when student == teacher (what Taylor importance needs).
    """
    def per_position(s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        return -(torch.softmax(t_lp.float(), dim=-1) * s_lp).sum(-1)

    loss = _gathered_mean(per_position, student_logits, t_idx, [t_logprobs], mask, temperature, chunk_size)
    return loss * temperature**2


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Full-vocabulary forward KL(teacher || student) at temperature T, scaled by T^2."""

    def per_position(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        s_lp = torch.log_softmax(s_logits.float() / temperature, dim=-1)
        t_lp = torch.log_softmax(t_logits.detach().float() / temperature, dim=-1)
        return (t_lp.exp() * (t_lp - s_lp)).sum(-1)

    V = student_logits.shape[-1]
    if teacher_logits.shape[-1] != V:
        raise ValueError(f"vocab sizes differ: student {V}, teacher {teacher_logits.shape[-1]}")
    loss = _chunked_mean(
        per_position, student_logits.reshape(-1, V), [teacher_logits.reshape(-1, V)], mask, chunk_size
    )
    return loss * temperature**2


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk_size: int = 4096,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Next-token cross-entropy; labels already shifted. ``ignore_index`` and mask=False are excluded."""
    flat_labels = labels.reshape(-1)
    keep = flat_labels != ignore_index
    if mask is not None:
        keep = keep & mask.reshape(-1).to(device=keep.device, dtype=torch.bool)
    safe = torch.where(keep, flat_labels, torch.zeros_like(flat_labels))[:, None]

    def per_position(s_lp: torch.Tensor) -> torch.Tensor:
        return -s_lp[:, 0]

    return _gathered_mean(per_position, logits, safe, [], keep, 1.0, chunk_size)


def mixed_loss(kd: torch.Tensor, lm: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * kd + (1 - alpha) * lm."""
    return alpha * kd + (1.0 - alpha) * lm
