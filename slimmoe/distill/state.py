"""What a distillation run keeps: the loop's bookkeeping (saved in every checkpoint), the
result, and the names of the files it writes into ``out_dir``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

DONE_FILE = "distill_done.json"  # the DistillResult, written last
LOSSES_FILE = "losses.jsonl"  # one record per optimizer step
BEST_FILE = "best_student.pt"  # state dict of the best held-out evaluation (keep_best)
CHECKPOINTS_DIR = "checkpoints"


@dataclass
class LoopState:
    """Held-out bookkeeping and fault counts, carried across resume in ``state.json``.

    The field order is the key order of ``state.json``. The step itself is the
    checkpoint's position, kept by the trainer.
    """

    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    initial_eval: dict[str, float] | None = None  # at step 0, before training
    last_eval: dict[str, float] | None = None
    stopped_early: bool = False
    nonfinite_skips: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Take the loop keys present in ``saved`` (a checkpoint's state.json); ignore the rest."""
        for f in fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])


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

    @classmethod
    def read_done(cls, path: Path) -> DistillResult:
        """The result of the finished run whose ``distill_done.json`` is ``path``."""
        return cls(**{**json.loads(Path(path).read_text()), "already_done": True})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)
