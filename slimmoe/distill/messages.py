"""What distillation tells its user: warnings pointed at the caller of ``distill()``, and the
one-line error that ends a run whose numbers went non-finite."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from slimmoe.config import DistillConfig
from slimmoe.errors import UserError

_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep


def warn_caller(message: str) -> None:
    """A UserWarning attributed to the first frame outside slimmoe.distill (the user's call of distill())."""
    frame, level = sys._getframe(1), 2
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def nonfinite_error(what: str, step: int, last_ck: Path | None, cfg: DistillConfig, skips: int) -> UserError:
    where = (f"last good checkpoint: step {int(last_ck.name[5:])} ({last_ck})" if last_ck is not None
             else "no checkpoint written yet")
    if cfg.nonfinite == "skip":
        fix = f"skipped {skips} bad steps already (distill.max_nonfinite_skips: {cfg.max_nonfinite_skips}); lower distill.lr"
    else:
        fix = "lower distill.lr (or set distill.nonfinite: skip to skip such batches)"
    return UserError(f"distill: {what} at step {step}; {where}; {fix}")
