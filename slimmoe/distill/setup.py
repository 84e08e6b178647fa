"""Set-up of a distillation run: models, batch geometry, optimizer, learning-rate schedule and
the teacher (live, or its top-k cache, or both). Nothing here trains; the parallel engine is
``slimmoe.distill.runtime``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import PreTrainedModel

from slimmoe.config import DistillConfig
from slimmoe.distill import teacher_cache
from slimmoe.distill.runtime import Runtime
from slimmoe.distill.step import Teacher
from slimmoe.distill.student import config_dtype, save_dtype
from slimmoe.distill.teacher_cache import teacher_fingerprint
from slimmoe.errors import UserError
from slimmoe.io.loading import load_config, load_model
from slimmoe.parallel import topology

CACHEABLE = ("kd_topk", "kd_topk_renorm")  # losses that read only the teacher's top-k

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


def validate_inputs(student, t_config, train_blocks, cfg: DistillConfig) -> None:
    """Refuse bad data and settings; ``t_config`` is the teacher's config (None without a teacher)."""
    # a tensor, or lazy blocks with its interface (slimmoe.io.token_shards.ShardBlocks)
    if not callable(getattr(train_blocks, "dim", None)) or train_blocks.dim() != 2 or train_blocks.shape[0] == 0:
        raise UserError("data: expected a non-empty [N, seq_len] tensor of token blocks")
    if train_blocks.shape[1] < 2:
        raise UserError("data: blocks need at least 2 tokens")
    if cfg.loss != "lm" and t_config is None:
        raise UserError(f"teacher: loss {cfg.loss!r} needs a teacher (use loss='lm' without one)")
    if cfg.teacher_cache_dir is not None and cfg.loss not in CACHEABLE:
        raise UserError(f"teacher_cache_dir: the cache holds top-k outputs; loss {cfg.loss!r} cannot use it")
    if t_config is not None and student.config.vocab_size != t_config.vocab_size:
        raise UserError(f"teacher: vocab size {t_config.vocab_size} differs from the student's "
                        f"{student.config.vocab_size}")
    if cfg.topk > student.config.vocab_size:
        raise UserError(f"topk: {cfg.topk} exceeds the vocabulary size {student.config.vocab_size}")


def source_dtype(model_or_path, config) -> torch.dtype:
    """The dtype a model is stored in: an in-memory model's own, a folder's config's."""
    if isinstance(model_or_path, torch.nn.Module):
        return next(model_or_path.parameters()).dtype
    return config_dtype(config)


def load_student(student, teacher, train_blocks, cfg: DistillConfig, device: torch.device):
    """(student in float32, ready to train; dtype the final model is saved in). Checks the inputs
    against the teacher's config, without loading the teacher."""
    s_config = None if isinstance(student, torch.nn.Module) else load_config(str(student), "STUDENT")
    s_dtype = source_dtype(student, s_config)
    s_model = load_model(student, "STUDENT", dtype=torch.float32)
    t_config = None
    if teacher is not None:
        t_config = teacher.config if isinstance(teacher, torch.nn.Module) else load_config(str(teacher), "TEACHER")
    validate_inputs(s_model, t_config, train_blocks, cfg)
    set_experts_implementation(s_model, cfg.experts_implementation, device.type)
    if cfg.gradient_checkpointing:  # per decoder layer, inside its FSDP unit; replays the router's RNG
        s_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    s_model.config.use_cache = False
    t_dtype = None if teacher is None else source_dtype(teacher, t_config)
    return s_model, save_dtype(cfg.save_dtype, t_dtype, s_dtype)


def load_teacher(teacher, cfg: DistillConfig, rt: Runtime) -> PreTrainedModel:
    """The frozen teacher in its stored dtype: sharded for forward only under FSDP, else on
    the device (or spread by ``teacher_device_map``)."""
    t_kw = {"device_map": cfg.teacher_device_map} if cfg.teacher_device_map else {}
    t_model = load_model(teacher, "TEACHER", **t_kw)
    set_experts_implementation(t_model, cfg.experts_implementation, rt.device.type)
    t_model.eval().requires_grad_(False)
    return t_model if cfg.teacher_device_map else rt.shard_teacher(t_model)


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
    def plan(cls, cfg: DistillConfig, rt: Runtime, train_blocks: torch.Tensor) -> BatchGeometry:
        world = rt.world
        micro = cfg.micro_batch_size or max(1, cfg.batch_size // world)
        if cfg.batch_size % (micro * world):
            raise UserError(f"batch_size: {cfg.batch_size} is not a multiple of micro_batch_size {micro} x "
                            f"{world} processes")
        n, seq_len = train_blocks.shape
        return cls(world=world, rank=rt.rank, micro=micro, accum=cfg.batch_size // (micro * world),
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


def teacher_needed_live(cfg: DistillConfig, teacher, eval_blocks: torch.Tensor | None, cache) -> bool:
    """Whether the run reads anything the top-k cache (``cache``, None when there is none) does
    not hold: training targets, or held-out evaluation (full-vocabulary KL to the live teacher)."""
    evaluates = eval_blocks is not None and eval_blocks.shape[0] > 0 and cfg.eval_every is not None
    return teacher is not None and ((cfg.loss != "lm" and cache is None) or evaluates)


def find_cache(cfg: DistillConfig, teacher, train_blocks: torch.Tensor):
    """The complete top-k cache entry of (teacher, blocks, k, temperature), or None; the
    teacher is fingerprinted from its folder, not loaded. Collective."""
    if cfg.teacher_cache_dir is None or cfg.loss not in CACHEABLE or teacher is None:
        return None
    return teacher_cache.find_complete(cfg.teacher_cache_dir, train_blocks, teacher_fp=teacher_fingerprint(teacher),
                                       k=cfg.topk, temperature=cfg.temperature,
                                       logprobs_dtype=cfg.teacher_cache_dtype, topo=topology())


def build_cache(cfg: DistillConfig, teacher, t_model: PreTrainedModel, train_blocks: torch.Tensor, micro: int,
                rt: Runtime):
    """Build the top-k cache with every rank computing its share. Collective; a sharded teacher's
    forwards are collective too, so the ranks run them in lockstep."""
    return teacher_cache.build(cfg.teacher_cache_dir, train_blocks, lambda ids: Teacher(t_model).logits(ids, rt.device),
                               teacher_fp=teacher_fingerprint(teacher), k=cfg.topk, temperature=cfg.temperature,
                               logprobs_dtype=cfg.teacher_cache_dtype, vocab_size=t_model.config.vocab_size,
                               batch_size=micro, topo=topology(), lockstep=rt.sharding == "fsdp")
