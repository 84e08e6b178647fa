"""The distillation loop: student trains against a frozen teacher (or plain LM loss).

Determinism is by construction, which is what makes resume exact and 1-process and
N-process runs agree: the samples of optimizer step ``s`` are a function of
(seed, s) only, and before each micro-batch the global RNG is reseeded from
(seed, s, global micro-batch index), so phimoe's Gumbel router noise and any dropout
do not depend on how many steps ran in this process or on the process count.
See docs/distill.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator, DistributedType
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from slimmoe.config import DistillConfig
from slimmoe.distill.checkpoint import (
    all_finite,
    capture_rng_state,
    full_model_state,
    full_train_state,
    load_latest_checkpoint,
    load_train_state,
    restore_rng_state,
    save_checkpoint,
    truncate_jsonl,
)
from slimmoe.distill.step import Teacher, held_out_eval, micro_loss
from slimmoe.distill.teacher_cache import fingerprint_model, open_shared
from slimmoe.errors import UserError
from slimmoe.faults import crash_point, poison_loss
from slimmoe.io.atomic import atomic_torch_save, atomic_write_text, save_pretrained_atomic
from slimmoe.io.loading import load_model
from slimmoe.resources import check_disk, oom_hint, state_dict_bytes, tensor_bytes

DONE_FILE = "distill_done.json"
LOSSES_FILE = "losses.jsonl"
BEST_FILE = "best_student.pt"
# Measured in bench/distill.py (see docs/distill.md): fastest per device type.
FASTEST_EXPERTS = {"cpu": "grouped_mm", "cuda": "grouped_mm"}

MetricsCallback = Callable[[int, dict[str, float]], None]


@dataclass
class DistillResult:
    out_dir: str
    steps: int
    tokens: int
    resumed_from_step: int | None = None
    best_step: int | None = None
    best_metric: float | None = None
    stopped_early: bool = False
    initial_eval: dict[str, float] | None = None
    final_eval: dict[str, float] | None = None
    already_done: bool = False
    nonfinite_skips: int = 0


def set_experts_implementation(model: PreTrainedModel, impl: str, device_type: str) -> str | None:
    """Select transformers' fused-experts kernel; 'auto' = fastest measured on this device."""
    if impl == "auto":
        impl = FASTEST_EXPERTS.get(device_type, "eager")
    if not getattr(model, "_can_set_experts_implementation", lambda: False)():
        return None
    model.set_experts_implementation(impl)
    return impl


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
    return ((seed * 1_000_003 + step) * 8191 + micro) % (2**63 - 1)


def lr_lambda(total_steps: int, warmup_fraction: float, min_lr_ratio: float) -> Callable[[int], float]:
    warmup = int(round(total_steps * warmup_fraction))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _make_accelerator(cfg: DistillConfig) -> Accelerator:
    cuda = torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    kw: dict[str, Any] = {}
    if cfg.distributed == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        kw["fsdp_plugin"] = FullyShardedDataParallelPlugin(state_dict_type="FULL_STATE_DICT")
    return Accelerator(cpu=not cuda, mixed_precision=mp, **kw)


def _validate(student, teacher, train_blocks, eval_blocks, cfg: DistillConfig) -> None:
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


def _nonfinite_error(what: str, step: int, last_ck: Path | None, cfg: DistillConfig, skips: int) -> UserError:
    where = (f"last good checkpoint: step {int(last_ck.name[5:])} ({last_ck})" if last_ck is not None
             else "no checkpoint written yet")
    if cfg.nonfinite == "skip":
        fix = f"skipped {skips} bad steps already (distill.max_nonfinite_skips: {cfg.max_nonfinite_skips}); lower distill.lr"
    else:
        fix = "lower distill.lr (or set distill.nonfinite: skip to skip such batches)"
    return UserError(f"distill: {what} at step {step}; {where}; {fix}")


def distill(
    student: str | Path | PreTrainedModel,
    teacher: str | Path | PreTrainedModel | None,
    out_dir: str | Path,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor | None = None,
    config: DistillConfig | None = None,
    *,
    metrics_callback: MetricsCallback | None = None,
    **overrides: Any,
) -> DistillResult:
    """Distil ``student`` from ``teacher`` on token blocks [N, seq_len]; write the result to ``out_dir``.

    ``out_dir`` receives the final student (``save_pretrained``), ``checkpoints/``,
    ``losses.jsonl`` (one line per optimizer step) and ``distill_done.json``. Calling
    again with the same arguments resumes from the newest good checkpoint, or returns
    at once (``already_done``) after success. ``config`` fields may also be given as
    keyword overrides. ``metrics_callback(step, metrics)`` runs on rank 0 only.
    """
    cfg = DistillConfig(**{**(config.model_dump() if config else {}), **overrides})
    out = Path(out_dir)
    if (out / DONE_FILE).is_file():
        doc = json.loads((out / DONE_FILE).read_text())
        return DistillResult(**{**doc, "already_done": True})
    acc = _make_accelerator(cfg)
    dev_type = acc.device.type
    s_model = load_model(student, "STUDENT", dtype=torch.float32)
    t_kw = {"device_map": cfg.teacher_device_map} if cfg.teacher_device_map else {}
    t_model = load_model(teacher, "TEACHER", **t_kw) if teacher is not None else None
    _validate(s_model, t_model, train_blocks, eval_blocks, cfg)
    set_experts_implementation(s_model, cfg.experts_implementation, dev_type)
    if t_model is not None:
        set_experts_implementation(t_model, cfg.experts_implementation, dev_type)
        t_model.eval().requires_grad_(False)
        if not cfg.teacher_device_map:
            t_model.to(acc.device)
    if cfg.gradient_checkpointing:
        s_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    s_model.config.use_cache = False

    world, rank = acc.num_processes, acc.process_index
    fsdp = acc.distributed_type == DistributedType.FSDP
    if cfg.distributed == "fsdp" and not fsdp and acc.is_main_process:
        warnings.warn(f"distributed: FSDP is not available here ({acc.distributed_type.value}); using DDP", stacklevel=2)
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // world)
    if cfg.batch_size % (micro * world):
        raise UserError(f"batch_size: {cfg.batch_size} is not a multiple of micro_batch_size {micro} x {world} processes")
    accum = cfg.batch_size // (micro * world)
    n, seq_len = train_blocks.shape
    total_steps = math.ceil(cfg.tokens / (cfg.batch_size * seq_len))

    decay = [p for p in s_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in s_model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, cfg.warmup_fraction, cfg.min_lr_ratio))
    s_model.train()
    model, opt = acc.prepare(s_model, opt)
    unwrapped = acc.unwrap_model(model)

    ck_root = out / "checkpoints"
    state: dict[str, Any] = {"best_metric": None, "best_step": None, "bad_evals": 0, "initial_eval": None,
                             "last_eval": None, "stopped_early": False, "nonfinite_skips": 0}
    start_step, resumed, last_ck = 0, None, None
    found = load_latest_checkpoint(ck_root)
    if found is not None:
        path, saved, payload = found
        last_ck = path
        load_train_state(fsdp, model, unwrapped, opt, payload)
        sched.load_state_dict(payload["scheduler"])
        restore_rng_state(payload["rng"])
        start_step = resumed = saved["step"]
        state.update({k: saved[k] for k in state if k in saved})
        now = cfg.model_dump(mode="json")
        changed = sorted(k for k, v in saved.get("config", {}).items() if k != "progress" and now.get(k) != v)
        if changed:
            warnings.warn(f"resuming {path} with settings changed since it was written: {', '.join(changed)}",
                          stacklevel=2)
        if acc.is_main_process:
            print(f"slimmoe distill: resuming from checkpoint {path} (step {start_step}/{total_steps})",
                  file=sys.stderr, flush=True)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(out / LOSSES_FILE, start_step)
    acc.wait_for_everyone()

    teacher = Teacher(t_model)
    if cfg.teacher_cache_dir is not None and t_model is not None:
        teacher.cache = open_shared(cfg.teacher_cache_dir, train_blocks, lambda ids: teacher.logits(ids, acc.device),
                                    teacher_fp=fingerprint_model(t_model), k=cfg.topk, temperature=cfg.temperature,
                                    batch_size=micro, is_main=acc.is_main_process, barrier=acc.wait_for_everyone)

    def log(step: int, metrics: dict[str, float]) -> None:
        if metrics_callback is not None and acc.is_main_process:
            metrics_callback(step, metrics)

    oom_settings = {"micro_batch_size": micro, "chunk_size": cfg.chunk_size, "eval_batch_size": cfg.eval_batch_size}

    def run_eval(step: int) -> dict[str, float]:
        with oom_hint("distill", oom_settings):
            metrics = held_out_eval(model, t_model, eval_blocks, cfg, acc)
        log(step, metrics)
        return metrics

    do_eval = eval_blocks is not None and eval_blocks.shape[0] > 0 and cfg.eval_every is not None
    # the held-out metric of what is trained: KL to the teacher for KD, next-token loss for `lm`
    # (a teacher given to an `lm` run is only measured against)
    metric_name = "eval_kl" if t_model is not None and cfg.loss != "lm" else "eval_nll"
    if do_eval and start_step == 0:
        state["initial_eval"] = state["last_eval"] = m0 = run_eval(0)
        state["best_metric"], state["best_step"] = m0[metric_name], 0
        if cfg.keep_best:
            best_sd = full_model_state(fsdp, acc, model, unwrapped)
            if acc.is_main_process:
                atomic_torch_save(best_sd, out / BEST_FILE)

    bar = tqdm(total=total_steps, initial=start_step, disable=not (acc.is_main_process and cfg.progress),
               desc="distill", unit="step")
    t0, tokens_run = time.perf_counter(), 0
    step = start_step
    while step < total_steps and not state["stopped_early"]:
        ids_all = step_sample_ids(step, cfg.batch_size, n, cfg.seed)
        step_loss = torch.zeros((), device=acc.device)
        for j in range(accum):
            g = j * world + rank  # global micro-batch index
            rows = ids_all[g * micro : (g + 1) * micro]
            ids = train_blocks[rows].to(acc.device)
            torch.manual_seed(micro_seed(cfg.seed, step, g))
            ctx = acc.no_sync(model) if j < accum - 1 else contextlib.nullcontext()
            with ctx, oom_hint("distill", oom_settings):
                loss = poison_loss(micro_loss(model, teacher, ids, rows, cfg, acc), step + 1)
                acc.backward(loss / accum)
            step_loss += loss.detach() / accum
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        mean_loss = (acc.reduce(step_loss, reduction="mean") if world > 1 else step_loss).item()
        bad = None
        if not math.isfinite(mean_loss):
            bad = "non-finite loss"
        elif grad_norm is not None and not math.isfinite(float(grad_norm)):
            bad = "non-finite gradient norm"
        if bad is not None:  # the update is dropped: parameters and optimizer state stay finite
            opt.zero_grad(set_to_none=True)
            if cfg.nonfinite == "stop" or state["nonfinite_skips"] >= cfg.max_nonfinite_skips:
                bar.close()
                raise _nonfinite_error(bad, step + 1, last_ck, cfg, state["nonfinite_skips"])
            state["nonfinite_skips"] += 1
            with warnings.catch_warnings():  # "scheduler before optimizer" when step 1 is skipped
                warnings.simplefilter("ignore", UserWarning)
                sched.step()  # the lr stays a function of the step number
        else:
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        step += 1
        tokens_run += cfg.batch_size * seq_len
        tok_s = tokens_run / max(time.perf_counter() - t0, 1e-9)
        record = {"step": step, "loss": mean_loss if bad is None else None, "lr": sched.get_last_lr()[0],
                  "tokens": step * cfg.batch_size * seq_len}
        if grad_norm is not None and bad is None:
            record["grad_norm"] = float(grad_norm)
        if bad is not None:
            record["skipped"] = bad
            log(step, {"nonfinite_skips": state["nonfinite_skips"]})
        if acc.is_main_process:
            with open(out / LOSSES_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tok_s:,.0f}")
        if step % cfg.log_every == 0 and bad is None:
            log(step, {"loss": mean_loss, "lr": record["lr"], "tokens_per_second": tok_s})
        if do_eval and (step % cfg.eval_every == 0 or step == total_steps):
            state["last_eval"] = m = run_eval(step)
            if state["best_metric"] is None or m[metric_name] < state["best_metric"]:
                state.update(best_metric=m[metric_name], best_step=step, bad_evals=0)
                if cfg.keep_best:
                    best_sd = full_model_state(fsdp, acc, model, unwrapped)
                    if acc.is_main_process:
                        atomic_torch_save(best_sd, out / BEST_FILE)
            else:
                state["bad_evals"] += 1
                if cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience:
                    state["stopped_early"] = True
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0) and step < total_steps:
            model_sd, opt_sd = full_train_state(fsdp, acc, model, unwrapped, opt)
            finite = all_finite(unwrapped.state_dict() if model_sd is None else model_sd) and all_finite(
                opt.state_dict() if opt_sd is None else opt_sd)
            if not finite:  # every rank decides alike (DDP replicas hold the same state)
                raise _nonfinite_error("parameters or optimizer state hold NaN/inf (checkpoint not written)",
                                       step, last_ck, cfg, state["nonfinite_skips"])
            if acc.is_main_process:
                payload = {"model": model_sd, "optimizer": opt_sd, "scheduler": sched.state_dict(),
                           "rng": capture_rng_state()}
                check_disk(ck_root, tensor_bytes(payload))
                last_ck = save_checkpoint(ck_root, step, payload, dict(state, config=cfg.model_dump(mode="json")),
                                          cfg.keep_checkpoints)
            acc.wait_for_everyone()
        crash_point("distill", step=step)  # tests: die after this step (and its checkpoint)
    bar.close()

    acc.wait_for_everyone()
    if do_eval and cfg.keep_best and state["best_step"] is not None and state["best_step"] != step:
        load_train_state(fsdp, model, unwrapped, None, {"model": torch.load(out / BEST_FILE, map_location="cpu")})
    final_sd = full_model_state(fsdp, acc, model, unwrapped) if fsdp else None
    result = DistillResult(out_dir=str(out), steps=step, tokens=step * cfg.batch_size * seq_len,
                           resumed_from_step=resumed, best_step=state["best_step"], best_metric=state["best_metric"],
                           stopped_early=state["stopped_early"], initial_eval=state["initial_eval"],
                           final_eval=state["last_eval"], nonfinite_skips=state["nonfinite_skips"])
    if acc.is_main_process:
        if cfg.gradient_checkpointing:
            unwrapped.activation_checkpointing_disable()
        if not all_finite(final_sd if final_sd is not None else unwrapped.state_dict()):
            raise _nonfinite_error("final parameters hold NaN/inf (model not written)", step, last_ck, cfg,
                                   state["nonfinite_skips"])
        check_disk(out, tensor_bytes(final_sd) if final_sd is not None else state_dict_bytes(unwrapped))
        save_pretrained_atomic(unwrapped, out, final_sd)
        atomic_write_text(out / DONE_FILE, json.dumps(asdict(result), indent=1))
    acc.wait_for_everyone()
    return result
