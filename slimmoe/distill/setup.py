"""Set-up of a distillation run: accelerator, models, batch geometry, optimizer, learning-rate
schedule and the teacher (live, or its top-k cache). Nothing here trains."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from accelerate import Accelerator, DistributedType
from transformers import PreTrainedModel

from slimmoe.config import DistillConfig
from slimmoe.distill.messages import warn_caller
from slimmoe.distill.step import Teacher
from slimmoe.distill.teacher_cache import fingerprint_model, open_shared
from slimmoe.errors import UserError
from slimmoe.io.loading import load_model

# Measured in bench/distill.py (see docs/distill.md): fastest per device type.
FASTEST_EXPERTS = {"cpu": "grouped_mm", "cuda": "grouped_mm"}


def set_experts_implementation(model: PreTrainedModel, impl: str, device_type: str) -> str | None:
    """Select transformers' fused-experts kernel; 'auto' = fastest measured on this device."""
    if impl == "auto":
        impl = FASTEST_EXPERTS.get(device_type, "eager")
    if not getattr(model, "_can_set_experts_implementation", lambda: False)():
        return None
    model.set_experts_implementation(impl)
    return impl


def make_accelerator(cfg: DistillConfig) -> Accelerator:
    cuda = torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    kw: dict[str, Any] = {}
    if cfg.sharding == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        kw["fsdp_plugin"] = FullyShardedDataParallelPlugin(state_dict_type="FULL_STATE_DICT")
    return Accelerator(cpu=not cuda, mixed_precision=mp, **kw)


def validate_inputs(student, teacher, train_blocks, cfg: DistillConfig) -> None:
    if not isinstance(train_blocks, torch.Tensor) or train_blocks.dim() != 2 or train_blocks.shape[0] == 0:
        raise UserError("data: expected a non-empty [N, seq_len] tensor of token blocks")
    if train_blocks.shape[1] < 2:
        raise UserError("data: blocks need at least 2 tokens")
    if cfg.loss != "lm" and teacher is None:
        raise UserError(f"teacher: loss {cfg.loss!r} needs a teacher (use loss='lm' without one)")
    if cfg.teacher_cache_dir is not None and cfg.loss not in ("kd_topk", "kd_topk_renorm"):
        raise UserError(f"teacher_cache_dir: the cache holds top-k outputs; loss {cfg.loss!r} cannot use it")
    if teacher is not None and student.config.vocab_size != teacher.config.vocab_size:
        raise UserError(f"teacher: vocab size {teacher.config.vocab_size} differs from the student's "
                        f"{student.config.vocab_size}")
    if cfg.topk > student.config.vocab_size:
        raise UserError(f"topk: {cfg.topk} exceeds the vocabulary size {student.config.vocab_size}")


def load_models(student, teacher, train_blocks, cfg: DistillConfig, device: torch.device):
    """(student in float32, ready to train; frozen teacher on its device(s), or None)."""
    s_model = load_model(student, "STUDENT", dtype=torch.float32)
    t_kw = {"device_map": cfg.teacher_device_map} if cfg.teacher_device_map else {}
    t_model = load_model(teacher, "TEACHER", **t_kw) if teacher is not None else None
    validate_inputs(s_model, t_model, train_blocks, cfg)
    set_experts_implementation(s_model, cfg.experts_implementation, device.type)
    if t_model is not None:
        set_experts_implementation(t_model, cfg.experts_implementation, device.type)
        t_model.eval().requires_grad_(False)
        if not cfg.teacher_device_map:
            t_model.to(device)
    if cfg.gradient_checkpointing:
        s_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    s_model.config.use_cache = False
    return s_model, t_model


def uses_fsdp(cfg: DistillConfig, acc: Accelerator) -> bool:
    fsdp = acc.distributed_type == DistributedType.FSDP
    if cfg.sharding == "fsdp" and not fsdp and acc.is_main_process:
        warn_caller(f"sharding: FSDP is not available here ({acc.distributed_type.value}); using DDP")
    return fsdp


@dataclass(frozen=True)
class BatchGeometry:
    """How the global batch of ``batch_size`` sequences is split: ``accum`` micro-batches of
    ``micro`` sequences on each of ``world`` processes; ``total_steps`` spends the token budget."""

    world: int
    rank: int
    micro: int
    accum: int
    n_blocks: int
    seq_len: int
    total_steps: int
    tokens_per_step: int

    @classmethod
    def plan(cls, cfg: DistillConfig, acc: Accelerator, train_blocks: torch.Tensor) -> BatchGeometry:
        world = acc.num_processes
        micro = cfg.micro_batch_size or max(1, cfg.batch_size // world)
        if cfg.batch_size % (micro * world):
            raise UserError(f"batch_size: {cfg.batch_size} is not a multiple of micro_batch_size {micro} x "
                            f"{world} processes")
        n, seq_len = train_blocks.shape
        return cls(world=world, rank=acc.process_index, micro=micro, accum=cfg.batch_size // (micro * world),
                   n_blocks=n, seq_len=seq_len, total_steps=math.ceil(cfg.tokens / (cfg.batch_size * seq_len)),
                   tokens_per_step=cfg.batch_size * seq_len)


def lr_lambda(total_steps: int, warmup_fraction: float, min_lr_ratio: float) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` (a factor of the peak lr)."""
    warmup = int(round(total_steps * warmup_fraction))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_optimizer(model: PreTrainedModel, cfg: DistillConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)


def make_scheduler(opt: torch.optim.Optimizer, cfg: DistillConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, cfg.warmup_fraction, cfg.min_lr_ratio))


def open_teacher(t_model: PreTrainedModel | None, cfg: DistillConfig, train_blocks: torch.Tensor, micro: int,
                 acc: Accelerator) -> Teacher:
    """The teacher of training steps: the live model, or its top-k cache (built by rank 0, collective)."""
    teacher = Teacher(t_model)
    if cfg.teacher_cache_dir is not None and t_model is not None:
        teacher.cache = open_shared(cfg.teacher_cache_dir, train_blocks, lambda ids: teacher.logits(ids, acc.device),
                                    teacher_fp=fingerprint_model(t_model), k=cfg.topk, temperature=cfg.temperature,
                                    batch_size=micro, is_main=acc.is_main_process, barrier=acc.wait_for_everyone)
    return teacher
