"""How many stages, and which budget split, the automatic schedule picks: read from a measured grid.

The rule is not written down here: it is derived, every time, from the committed report of
issue 14's grid (``measured/gutenberg-grid.json``, a copy of ``bench/quality.py --grid``'s
``report.json``). For every (budget, width cut) cell of that grid, the slim arms (one-shot,
and each multi-stage arm with its budget split) are compared on held-out perplexity over the
teacher's, mean ± sample std over seeds:

* the best multi-stage arm is chosen only if it beats one-shot and the two are told apart
  (:func:`~slimmoe.pipeline.grid_findings.told_apart`: at least twice the larger of the two
  spreads, with two seeds or more; the margin under which a pair gets a third seed);
  otherwise the cell's choice is one stage;
* a schedule is matched to the cell whose cut is nearest, in log ratio, to its own
  :func:`expert_ratio` (teacher over final routed-expert parameters per layer: the width cut
  when only width shrinks), at the measured budget nearest to ``budget_fraction`` (the
  distillation budget over the teacher's training tokens), by default the largest measured.

Outside the measured cuts the nearest one is used, and :attr:`Choice.reason` says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from slimmoe.arch import get_adapter
from slimmoe.errors import UserError
from slimmoe.pipeline.grid_findings import cell_findings, slim_splits, split_label

RESULTS = Path(__file__).with_name("measured") / "gutenberg-grid.json"


@dataclass(frozen=True)
class CellChoice:
    """What one measured (budget, cut) cell says: its winner among the slim arms and why."""

    budget: float
    cut: str
    ratio: float
    arm: str
    split: tuple[float, ...]
    one_shot: tuple[float, float]   # ppl / teacher, mean and std
    best_multi: tuple[str, float, float] | None  # arm, mean, std of the best multi-stage arm

    @property
    def num_stages(self) -> int:
        return len(self.split)

    def evidence(self) -> str:
        one = f"one-shot {self.one_shot[0]:.4f} ± {self.one_shot[1]:.4f}"
        if self.best_multi is None:
            return f"{one}; no multi-stage arm measured"
        arm, m, s = self.best_multi
        verdict = "wins" if self.num_stages > 1 else "does not beat it by 2x the spread"
        return f"{arm} {m:.4f} ± {s:.4f} vs {one}: {verdict}"


@dataclass(frozen=True)
class Choice:
    """The schedule's stage count and budget split, and the measurement behind them."""

    num_stages: int
    split: tuple[float, ...]
    cell: CellChoice | None
    reason: str


def load_results(path: str | Path = RESULTS) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
        doc["cells"], doc["meta"]["arms"], doc["meta"]["cuts"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"schedule: the measured grid {path} cannot be read ({type(e).__name__}: {e})") from None
    return doc


@lru_cache(maxsize=4)
def _committed(path: str) -> tuple[CellChoice, ...]:
    return tuple(cell_choices(load_results(path)))


def cell_choices(doc: dict) -> list[CellChoice]:
    """One choice per measured (budget, cut) that has a one-shot slim arm, in report order."""
    splits = slim_splits(doc["meta"]["arms"])
    out = []
    for f in cell_findings(doc["cells"], doc["meta"]["arms"]):
        one, best = f["one_shot"], f["best_multi"]
        if one is None:
            continue
        winner = best if f["multi_wins"] else one
        out.append(CellChoice(budget=float(f["budget"]), cut=f["cut"], ratio=float(doc["meta"]["cuts"][f["cut"]]["ratio"]),
                              arm=winner["arm"], split=splits[winner["arm"]],
                              one_shot=(one["ratio_mean"], one["ratio_std"]),
                              best_multi=None if best is None else (best["arm"], best["ratio_mean"], best["ratio_std"])))
    return out


def choose(ratio: float, budget_fraction: float | None = None, cells: list[CellChoice] | None = None) -> Choice:
    """The measured choice for a cut of ``ratio`` (see the module docstring)."""
    cells = list(_committed(str(RESULTS)) if cells is None else cells)
    if ratio <= 1.0 + 1e-9:
        return Choice(1, (1.0,), None, "the experts are not cut: one stage")
    if not cells:
        raise UserError("schedule: the measured grid holds no cell with a one-shot slim arm")
    budgets = sorted({c.budget for c in cells})
    budget = budgets[-1] if budget_fraction is None else min(
        budgets, key=lambda b: abs(math.log(b / budget_fraction)))
    cell = min((c for c in cells if c.budget == budget), key=lambda c: (abs(math.log(c.ratio / ratio)), c.ratio))
    lo, hi = min(c.ratio for c in cells), max(c.ratio for c in cells)
    where = "" if lo <= ratio <= hi else f" (outside the measured {lo:g}x-{hi:g}x: nearest cut)"
    reason = (f"{ratio:.1f}x expert cut -> measured cell {cell.cut} at {budget * 100:g}% of the teacher's "
              f"tokens{where}: {cell.evidence()}")
    return Choice(cell.num_stages, cell.split, cell, reason)


def expert_ratio(teacher_config, final) -> float:
    """Teacher over final routed-expert parameters per layer (experts x width), from the
    teacher's config and ``final`` (SlimTargets; None sizes stay the teacher's)."""
    adapter = get_adapter(teacher_config)
    width0, experts0 = adapter.expert_size(teacher_config), adapter.num_experts(teacher_config)
    width = final.expert_intermediate_size or width0
    experts = final.num_experts or experts0
    return (width0 * experts0) / (width * experts)


def split_tokens(tokens: int, split: tuple[float, ...] | list[float]) -> list[int]:
    """``tokens`` in shares (rounded; the last stage takes the remainder)."""
    counts = [int(round(s * tokens)) for s in split[:-1]]
    return [*counts, tokens - sum(counts)]


def rule_markdown(cells: list[CellChoice] | None = None) -> str:
    """The rule as a table: per measured budget and cut, the stages and split it picks and why."""
    cells = list(_committed(str(RESULTS)) if cells is None else cells)
    lines = ["| budget | cut | stages | split | measured (ppl / teacher, mean ± std) |", "|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c.budget * 100:g}% | {c.cut} | {c.num_stages} | {split_label(c.split)} | {c.evidence()} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m slimmoe.pipeline.schedule_rule: the rule the committed grid gives
    print(f"{RESULTS}\n\n{rule_markdown()}")
