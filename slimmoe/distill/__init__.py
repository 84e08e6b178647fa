"""Distillation: a student learns from a frozen teacher (or plain next-token loss), resumably
and deterministically, on one process or several.

    result = distill(student_dir, teacher_dir, out_dir, train_blocks, eval_blocks, DistillConfig(tokens=...))
"""

from slimmoe.distill.loop import BEST_FILE, DONE_FILE, LOSSES_FILE, DistillResult, distill

__all__ = ["BEST_FILE", "DONE_FILE", "LOSSES_FILE", "DistillResult", "distill"]
