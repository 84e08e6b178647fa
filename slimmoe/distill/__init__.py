"""Distillation: a student learns from a frozen teacher (or plain next-token loss), resumably
and deterministically, on one process or several.

    result = distill(student_dir, teacher_dir, out_dir, train_blocks, eval_blocks, DistillConfig(tokens=...))
"""

from slimmoe.distill.loop import distill
from slimmoe.distill.setup import FASTEST_EXPERTS
from slimmoe.distill.state import BEST_FILE, DONE_FILE, LOSSES_FILE, DistillResult, LoopState

__all__ = ["BEST_FILE", "DONE_FILE", "FASTEST_EXPERTS", "LOSSES_FILE", "DistillResult", "LoopState", "distill"]
