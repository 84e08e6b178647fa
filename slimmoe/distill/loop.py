"""The distillation loop: student trains against a frozen teacher (or plain LM loss).

In the shape of torchtitan's Trainer: ``Trainer.__init__`` sets up (``setup``) and
resumes (``Checkpointer``); ``train()`` runs ``train_step()`` per optimizer step, writes
the step's record, and lets the ``Validator`` (held-out evaluation, best state, early
stopping) and the ``Checkpointer`` decide whether they act; ``finish()`` writes the model.

Determinism is by construction, which is what makes resume exact and 1-process and
N-process runs agree: the samples of optimizer step ``s`` are a function of
(seed, s) only, and before each micro-batch the global RNG is reseeded from
(seed, s, global micro-batch index), so phimoe's Gumbel router noise and any dropout
do not depend on how many steps ran in this process or on the process count.
How the processes share the student (one process, DDP or FSDP2) is the ``Runtime``
(``slimmoe.distill.runtime``); checkpoints are DCP folders under every sharding.
See docs/distill.md.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from slimmoe.config import DistillConfig
from slimmoe.distill.checkpoint import Checkpointer, all_finite, truncate_jsonl
from slimmoe.distill.determinism import micro_seed, step_sample_ids
from slimmoe.distill.messages import nonfinite_error
from slimmoe.distill.runtime import make_runtime
from slimmoe.distill.setup import (
    CACHEABLE,
    BatchGeometry,
    build_cache,
    find_cache,
    load_student,
    load_teacher,
    make_optimizer,
    make_scheduler,
    teacher_needed_live,
)
from slimmoe.distill.state import CHECKPOINTS_DIR, DONE_FILE, LOSSES_FILE, DistillResult, LoopState
from slimmoe.distill.step import Teacher, micro_loss
from slimmoe.distill.student import Student, save_final
from slimmoe.distill.validator import Validator
from slimmoe.faults import crash_point, poison_loss
from slimmoe.io.atomic import atomic_write_text
from slimmoe.resources import check_disk, oom_hint, tensor_bytes

MetricsCallback = Callable[[int, dict[str, float]], None]


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
        return DistillResult.read_done(out / DONE_FILE)
    trainer = Trainer(student, teacher, out, train_blocks, eval_blocks, cfg, metrics_callback)  # set-up, resume
    trainer.train()
    return trainer.finish()


@dataclass
class StepOutcome:
    loss: float  # mean over the global batch (all ranks); NaN/inf when skipped
    grad_norm: torch.Tensor | None  # before clipping; None without max_grad_norm
    skipped: str | None = None  # why the update was dropped, or None when it was applied


class Trainer:
    """One distillation run; ``self.step`` is the number of optimizer steps done."""

    def __init__(self, student, teacher, out: Path, train_blocks: torch.Tensor, eval_blocks: torch.Tensor | None,
                 cfg: DistillConfig, metrics_callback: MetricsCallback | None):
        self.cfg, self.out, self.train_blocks, self.metrics_callback = cfg, out, train_blocks, metrics_callback
        self.rt = rt = make_runtime(cfg)  # joins the process group
        s_model, self.save_dtype = load_student(student, teacher, train_blocks, cfg, rt.device)
        self.geo = geo = BatchGeometry.plan(cfg, rt, train_blocks)
        model = rt.shard(s_model)  # FSDP: before the optimizer, which then holds the shards
        self.opt = opt = make_optimizer(model, cfg)
        self.sched = make_scheduler(opt, cfg, geo.total_steps)
        s_model.train()
        model, self.train_opt = rt.prepare(model, opt)
        self.student = Student(model, rt.unwrap(model), rt)

        self.state = LoopState()
        self.checkpointer = Checkpointer(out / CHECKPOINTS_DIR, cfg, self.student, opt, self.sched, self.state,
                                         geo.total_steps)
        self.resumed_from = self.checkpointer.resume()
        self.step = 0 if self.resumed_from is None else self.resumed_from
        if rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
            truncate_jsonl(out / LOSSES_FILE, self.step)  # records written after the checkpoint, before a crash
        rt.barrier()

        t_model = self.open_teacher(teacher, eval_blocks)
        self.oom_settings = {"micro_batch_size": geo.micro, "chunk_size": cfg.chunk_size,
                             "eval_batch_size": cfg.eval_batch_size}
        self.validator = Validator(cfg, self.student, t_model, eval_blocks, out, geo.total_steps, self.state,
                                   self.log, self.oom_settings)

    def open_teacher(self, teacher, eval_blocks) -> torch.nn.Module | None:
        """The teacher of training steps (``self.teacher``): the live model, its top-k cache, or
        both; the live model (returned) is not loaded when a complete cache holds every training
        block and no held-out evaluation needs it."""
        cfg, rt = self.cfg, self.rt
        cache = find_cache(cfg, teacher, self.train_blocks)
        t_model = load_teacher(teacher, cfg, rt) if teacher_needed_live(cfg, teacher, eval_blocks, cache) else None
        if cache is None and t_model is not None and cfg.teacher_cache_dir is not None and cfg.loss in CACHEABLE:
            cache = build_cache(cfg, teacher, t_model, self.train_blocks, self.geo.micro, rt)
        if cache is not None and t_model is None and rt.is_main:
            print(f"slimmoe distill: teacher not loaded (its top-k cache {cache.path} holds every training block)",
                  file=sys.stderr, flush=True)
        self.teacher = Teacher(t_model, cache)
        return t_model

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.metrics_callback is not None and self.rt.is_main:
            self.metrics_callback(step, metrics)

    def train(self) -> None:
        """Optimizer steps until the token budget is spent or early stopping ends the run."""
        self.validator.evaluate_initial(self.step)
        show = self.rt.is_main and self.cfg.progress
        with tqdm(total=self.geo.total_steps, initial=self.step, disable=not show, desc="distill", unit="step") as bar:
            t0, tokens_run = time.perf_counter(), 0
            while self.step < self.geo.total_steps and not self.state.stopped_early:
                outcome = self.train_step()
                self.step += 1
                tokens_run += self.geo.tokens_per_step
                self.record(outcome, tokens_run / max(time.perf_counter() - t0, 1e-9), bar)
                if self.validator.should_evaluate(self.step):
                    self.validator.evaluate(self.step)
                if self.checkpointer.should_save(self.step):
                    self.checkpointer.save(self.step)
                crash_point("distill", step=self.step)  # tests: die after this step (and its checkpoint) ...
                crash_point("distill", step=self.step, rank=self.rt.rank)  # ... or only this rank

    def train_step(self) -> StepOutcome:
        """The optimizer step after ``self.step``: micro-batches with gradient accumulation,
        clipping, then the update, or the non-finite policy when loss or gradient norm is NaN/inf."""
        cfg, geo, rt, model = self.cfg, self.geo, self.rt, self.student.model
        ids_all = step_sample_ids(self.step, cfg.batch_size, geo.n_blocks, cfg.seed)
        step_loss = torch.zeros((), device=rt.device)
        for j in range(geo.accum):
            g = j * geo.world + geo.rank  # global micro-batch index
            rows = ids_all[g * geo.micro : (g + 1) * geo.micro]
            ids = self.train_blocks[rows].to(rt.device)
            torch.manual_seed(micro_seed(cfg.seed, self.step, g))
            sync = rt.sync_gradients(model, j == geo.accum - 1)  # reduce across processes on the last
            with sync, oom_hint("distill", self.oom_settings):
                loss = poison_loss(micro_loss(model, self.teacher, ids, rows, cfg, rt), self.step + 1)
                rt.backward(loss / geo.accum)  # DDP and FSDP average over processes: the global mean
            step_loss += loss.detach() / geo.accum
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = rt.clip_grad_norm(model, cfg.max_grad_norm)
        mean_loss = rt.reduce(step_loss, "mean").item()
        bad = None
        if not math.isfinite(mean_loss):
            bad = "non-finite loss"
        elif grad_norm is not None and not math.isfinite(float(grad_norm)):
            bad = "non-finite gradient norm"
        if bad is None:
            self.train_opt.step()
            self.sched.step()
            self.train_opt.zero_grad(set_to_none=True)
        else:
            self.drop_update(bad)
        return StepOutcome(mean_loss, grad_norm, bad)

    def drop_update(self, why: str) -> None:
        """The non-finite policy, the only place it raises: parameters and optimizer state stay
        finite; stop (``nonfinite: stop``, or too many skips) or skip the step."""
        self.train_opt.zero_grad(set_to_none=True)
        if self.cfg.nonfinite == "stop" or self.state.nonfinite_skips >= self.cfg.max_nonfinite_skips:
            raise nonfinite_error(why, self.step + 1, self.checkpointer.last, self.cfg, self.state.nonfinite_skips)
        self.state.nonfinite_skips += 1
        with warnings.catch_warnings():  # "scheduler before optimizer" when step 1 is skipped
            warnings.simplefilter("ignore", UserWarning)
            self.sched.step()  # the lr stays a function of the step number

    def record(self, outcome: StepOutcome, tok_s: float, bar: tqdm) -> None:
        """The step's line in losses.jsonl and the progress bar (rank 0), and its metrics."""
        step, ok = self.step, outcome.skipped is None
        record = {"step": step, "loss": outcome.loss if ok else None, "lr": self.sched.get_last_lr()[0],
                  "tokens": step * self.geo.tokens_per_step}
        if outcome.grad_norm is not None and ok:
            record["grad_norm"] = float(outcome.grad_norm)
        if not ok:
            record["skipped"] = outcome.skipped
            self.log(step, {"nonfinite_skips": self.state.nonfinite_skips})
        if self.rt.is_main:
            with open(self.out / LOSSES_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{outcome.loss:.4f}", tok_s=f"{tok_s:,.0f}")
        if step % self.cfg.log_every == 0 and ok:
            self.log(step, {"loss": outcome.loss, "lr": record["lr"], "tokens_per_second": tok_s})

    def finish(self) -> DistillResult:
        """Write the final student (the best held-out one with ``keep_best``), gathered on rank 0
        and saved in ``save_dtype`` as a stock Hugging Face checkpoint, then distill_done.json."""
        rt, cfg, student, st = self.rt, self.cfg, self.student, self.state
        rt.barrier()
        self.validator.restore_best(self.step)
        final_sd = student.full_state()  # collective under FSDP; rank 0 only
        result = DistillResult(out_dir=str(self.out), steps=self.step, tokens=self.step * self.geo.tokens_per_step,
                               resumed_from_step=self.resumed_from, best_step=st.best_step,
                               best_metric=st.best_metric, stopped_early=st.stopped_early,
                               initial_eval=st.initial_eval, final_eval=st.last_eval,
                               nonfinite_skips=st.nonfinite_skips)
        if rt.is_main:
            if cfg.gradient_checkpointing:
                student.unwrapped.activation_checkpointing_disable()
            cast = {k: v.to(self.save_dtype) if v.is_floating_point() else v for k, v in final_sd.items()}
            if not all_finite(cast):
                raise nonfinite_error("final parameters hold NaN/inf (model not written)", self.step,
                                      self.checkpointer.last, cfg, st.nonfinite_skips)
            check_disk(self.out, tensor_bytes(cast))
            save_final(student.unwrapped, cast, self.out, self.save_dtype, cfg.max_shard_size)
            atomic_write_text(self.out / DONE_FILE, result.to_json())
        rt.barrier()
        return result
