"""Held-out evaluation during distillation: when to evaluate, which state is the best one
(kept in ``best_student.pt``: the full state dict, gathered on rank 0 under FSDP), and when
to stop early."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedModel

from slimmoe.config import DistillConfig
from slimmoe.distill.state import BEST_FILE, LoopState
from slimmoe.distill.step import held_out_eval
from slimmoe.distill.student import Student
from slimmoe.io.atomic import atomic_torch_save
from slimmoe.resources import oom_hint


class Validator:
    """Evaluates every ``eval_every`` steps and at the last step (and at step 0 of a fresh run)
    when there are held-out blocks. Its bookkeeping lives in the run's ``LoopState``, so it
    survives resume."""

    def __init__(self, cfg: DistillConfig, student: Student, teacher: PreTrainedModel | None,
                 blocks: torch.Tensor | None, out: Path, total_steps: int, state: LoopState,
                 log: Callable[[int, dict[str, float]], None], oom_settings: dict[str, Any]):
        self.cfg, self.student, self.teacher, self.blocks = cfg, student, teacher, blocks
        self.best_file, self.total_steps, self.state, self.log = out / BEST_FILE, total_steps, state, log
        self.oom_settings = oom_settings
        self.enabled = blocks is not None and blocks.shape[0] > 0 and cfg.eval_every is not None
        # the held-out metric of what is trained: KL to the teacher for KD, next-token loss for `lm`
        # (a teacher given to an `lm` run is only measured against)
        self.metric = "held_out_kl" if teacher is not None and cfg.loss != "lm" else "held_out_nll"

    def should_evaluate(self, step: int) -> bool:
        return self.enabled and (step % self.cfg.eval_every == 0 or step == self.total_steps)

    def evaluate_initial(self, step: int) -> None:
        """Measure the untrained student (step 0 of a fresh run): the first best."""
        if not (self.enabled and step == 0):
            return
        self.state.initial_eval = self.state.last_eval = m0 = self._measure(0)
        self.state.best_metric, self.state.best_step = m0[self.metric], 0
        if self.cfg.keep_best:
            self._save_best()

    def evaluate(self, step: int) -> None:
        """Measure, keep the state if it is the best so far, count toward early stopping otherwise."""
        st = self.state
        st.last_eval = m = self._measure(step)
        if st.best_metric is None or m[self.metric] < st.best_metric:
            st.best_metric, st.best_step, st.bad_evals = m[self.metric], step, 0
            if self.cfg.keep_best:
                self._save_best()
        else:
            st.bad_evals += 1
            if self.cfg.early_stopping_patience and st.bad_evals >= self.cfg.early_stopping_patience:
                st.stopped_early = True

    def restore_best(self, step: int) -> None:
        """Load the best state into the student when it is not the current one (keep_best)."""
        best = self.state.best_step
        if self.enabled and self.cfg.keep_best and best is not None and best != step:
            main = self.student.rt.is_main or not self.student.sharded  # FSDP: rank 0 reads, then broadcasts
            self.student.load_full(torch.load(self.best_file, map_location="cpu") if main else None)

    def _measure(self, step: int) -> dict[str, float]:
        with oom_hint("distill", self.oom_settings):
            metrics = held_out_eval(self.student.model, self.teacher, self.blocks, self.cfg, self.student.rt)
        self.log(step, metrics)
        return metrics

    def _save_best(self) -> None:
        best_sd = self.student.full_state()  # collective under FSDP
        if self.student.rt.is_main:
            atomic_torch_save(best_sd, self.best_file)
