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
See docs/distill.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from slimmoe.config import DistillConfig
from slimmoe.distill.checkpoint import Checkpointer, Student, all_finite, truncate_jsonl
from slimmoe.distill.determinism import micro_seed, step_sample_ids
from slimmoe.distill.messages import nonfinite_error
from slimmoe.distill.setup import (
    BatchGeometry,
    load_models,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    open_teacher,
    uses_fsdp,
)
from slimmoe.distill.state import CHECKPOINTS_DIR, DONE_FILE, LOSSES_FILE, DistillResult, LoopState
from slimmoe.distill.step import micro_loss
from slimmoe.distill.validator import Validator
from slimmoe.faults import crash_point, poison_loss
from slimmoe.io.atomic import atomic_write_text, save_pretrained_atomic
from slimmoe.resources import check_disk, oom_hint, state_dict_bytes, tensor_bytes

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
        self.acc = acc = make_accelerator(cfg)
        s_model, t_model = load_models(student, teacher, train_blocks, cfg, acc.device)
        fsdp = uses_fsdp(cfg, acc)
        self.geo = geo = BatchGeometry.plan(cfg, acc, train_blocks)
        opt = make_optimizer(s_model, cfg)
        self.sched = make_scheduler(opt, cfg, geo.total_steps)
        s_model.train()
        model, self.opt = acc.prepare(s_model, opt)
        self.student = Student(model, acc.unwrap_model(model), acc, fsdp)

        self.state = LoopState()
        self.checkpointer = Checkpointer(out / CHECKPOINTS_DIR, cfg, self.student, self.opt, self.sched, self.state,
                                         geo.total_steps)
        self.resumed_from = self.checkpointer.resume()
        self.step = 0 if self.resumed_from is None else self.resumed_from
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            truncate_jsonl(out / LOSSES_FILE, self.step)  # records written after the checkpoint, before a crash
        acc.wait_for_everyone()

        self.teacher = open_teacher(t_model, cfg, train_blocks, geo.micro, acc)
        self.oom_settings = {"micro_batch_size": geo.micro, "chunk_size": cfg.chunk_size,
                             "eval_batch_size": cfg.eval_batch_size}
        self.validator = Validator(cfg, self.student, t_model, eval_blocks, out, geo.total_steps, self.state,
                                   self.log, self.oom_settings)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.metrics_callback is not None and self.acc.is_main_process:
            self.metrics_callback(step, metrics)

    def train(self) -> None:
        """Optimizer steps until the token budget is spent or early stopping ends the run."""
        self.validator.evaluate_initial(self.step)
        show = self.acc.is_main_process and self.cfg.progress
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
                crash_point("distill", step=self.step)  # tests: die after this step (and its checkpoint)

    def train_step(self) -> StepOutcome:
        """The optimizer step after ``self.step``: micro-batches with gradient accumulation,
        clipping, then the update, or the non-finite policy when loss or gradient norm is NaN/inf."""
        cfg, geo, acc, model = self.cfg, self.geo, self.acc, self.student.model
        ids_all = step_sample_ids(self.step, cfg.batch_size, geo.n_blocks, cfg.seed)
        step_loss = torch.zeros((), device=acc.device)
        for j in range(geo.accum):
            g = j * geo.world + geo.rank  # global micro-batch index
            rows = ids_all[g * geo.micro : (g + 1) * geo.micro]
            ids = self.train_blocks[rows].to(acc.device)
            torch.manual_seed(micro_seed(cfg.seed, self.step, g))
            sync = acc.no_sync(model) if j < geo.accum - 1 else contextlib.nullcontext()  # all-reduce on the last
            with sync, oom_hint("distill", self.oom_settings):
                loss = poison_loss(micro_loss(model, self.teacher, ids, rows, cfg, acc), self.step + 1)
                acc.backward(loss / geo.accum)
            step_loss += loss.detach() / geo.accum
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        mean_loss = (acc.reduce(step_loss, reduction="mean") if geo.world > 1 else step_loss).item()
        bad = None
        if not math.isfinite(mean_loss):
            bad = "non-finite loss"
        elif grad_norm is not None and not math.isfinite(float(grad_norm)):
            bad = "non-finite gradient norm"
        if bad is None:
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            self.drop_update(bad)
        return StepOutcome(mean_loss, grad_norm, bad)

    def drop_update(self, why: str) -> None:
        """The non-finite policy, the only place it raises: parameters and optimizer state stay
        finite; stop (``nonfinite: stop``, or too many skips) or skip the step."""
        self.opt.zero_grad(set_to_none=True)
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
        if self.acc.is_main_process:
            with open(self.out / LOSSES_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{outcome.loss:.4f}", tok_s=f"{tok_s:,.0f}")
        if step % self.cfg.log_every == 0 and ok:
            self.log(step, {"loss": outcome.loss, "lr": record["lr"], "tokens_per_second": tok_s})

    def finish(self) -> DistillResult:
        """Write the final student (the best held-out one with ``keep_best``), then distill_done.json."""
        acc, cfg, student, st = self.acc, self.cfg, self.student, self.state
        acc.wait_for_everyone()
        self.validator.restore_best(self.step)
        final_sd = student.full_state() if student.fsdp else None
        result = DistillResult(out_dir=str(self.out), steps=self.step, tokens=self.step * self.geo.tokens_per_step,
                               resumed_from_step=self.resumed_from, best_step=st.best_step,
                               best_metric=st.best_metric, stopped_early=st.stopped_early,
                               initial_eval=st.initial_eval, final_eval=st.last_eval,
                               nonfinite_skips=st.nonfinite_skips)
        if acc.is_main_process:
            if cfg.gradient_checkpointing:
                student.unwrapped.activation_checkpointing_disable()
            if not all_finite(final_sd if final_sd is not None else student.unwrapped.state_dict()):
                raise nonfinite_error("final parameters hold NaN/inf (model not written)", self.step,
                                      self.checkpointer.last, cfg, st.nonfinite_skips)
            check_disk(self.out, tensor_bytes(final_sd) if final_sd is not None else state_dict_bytes(student.unwrapped))
            save_pretrained_atomic(student.unwrapped, self.out, final_sd)
            atomic_write_text(self.out / DONE_FILE, result.to_json())
        acc.wait_for_everyone()
        return result
