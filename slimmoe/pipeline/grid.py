"""A grid of ablations in one file: token budgets x width cuts x arms x seeds (issue 14).

An ablation YAML with a ``grid:`` section describes every cell: a *budget* is a fraction of the
teacher's training tokens (read from the teacher's ``teacher.json`` unless
``grid.teacher_tokens`` is given), a *cut* divides the teacher's expert width (and halves its
KV groups when ``halve_kv``), and every *arm* is a kind with, for slimming, the share of the
budget each stage gets::

    grid:
      budgets: [0.025, 0.10]
      cuts: [{ratio: 4}, {ratio: 16, halve_kv: true}, {ratio: 8, arms: [one-shot-slim, two-stage-even]}]
      arms:
        one-shot-slim:   {kind: slim, split: [1]}
        two-stage-25-75: {kind: slim, split: [0.25, 0.75]}
        one-shot-drop:   {kind: drop}          # whole experts, to the one-shot model's total
        slim-drop:       {kind: slim-drop}     # width and experts, to the same total
        scratch:         {kind: scratch}       # random init at the one-shot shape, LM loss

A slim arm of n stages cuts the width geometrically (teacher width x ratio^(-i/n), rounded to a
multiple of 8; widths that do not decrease are an error) and halves the KV groups in its last stage only, so the first stage of a
two-stage 16x arm is the one-shot 4x model. Stage names are what the stage *is* (kind, sizes,
tokens), and a stage's folders are named by the chain of stages that leads to it, so two cells
whose arms begin with the same stage (same teacher, same shape, same tokens, same seed) compute
the same cache keys for it: the second finds the first's result in the task cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from slimmoe.config import DistillConfig, SlimTargets, StrictModel
from slimmoe.errors import UserError
from slimmoe.pipeline.schedule_rule import split_tokens
from slimmoe.pipeline.schema import StageConfig, check_split
from slimmoe.prune.schedule import estimate_total_params
from slimmoe.prune.strategies import resolve_sizes

ArmKind = Literal["slim", "drop", "slim-drop", "scratch"]
CHAIN_SEP = "__"  # joins the stage names of a chain into one (stage names allow letters, digits, _ . -)


class GridArm(StrictModel):
    kind: ArmKind
    split: list[float] | None = Field(None, min_length=1, description="slim: the budget's share per stage")

    @model_validator(mode="after")
    def _split(self) -> "GridArm":
        if self.kind != "slim":
            if self.split is not None:
                raise ValueError(f"split: only slim arms have stages, not {self.kind}")
            return self
        if self.split is None:
            self.split = [1.0]
        check_split(self.split)
        return self


def default_arms() -> dict[str, GridArm]:
    """Issue 14's arms."""
    return {"one-shot-slim": GridArm(kind="slim", split=[1.0]),
            "two-stage-even": GridArm(kind="slim", split=[0.5, 0.5]),
            "two-stage-25-75": GridArm(kind="slim", split=[0.25, 0.75]),
            "three-stage": GridArm(kind="slim", split=[1 / 3, 1 / 3, 1 / 3]),
            "one-shot-drop": GridArm(kind="drop"), "slim-drop": GridArm(kind="slim-drop"),
            "scratch": GridArm(kind="scratch")}


class GridCut(StrictModel):
    ratio: int = Field(..., gt=1, description="the teacher's expert width divided by this")
    halve_kv: bool = Field(False, description="also halve the KV groups (query heads follow)")
    arms: list[str] | None = Field(None, min_length=1, description="the arms of this cut (default: every arm)")

    @property
    def label(self) -> str:
        return f"{self.ratio}x" + ("-kv-half" if self.halve_kv else "")


class GridConfig(StrictModel):
    budgets: list[float] = Field(..., min_length=1, description="fractions of the teacher's training tokens")
    teacher_tokens: int | None = Field(None, gt=0, description="default: result.tokens of <teacher>/teacher.json")
    cuts: list[GridCut] = Field(..., min_length=1)
    arms: dict[str, GridArm] = Field(default_factory=default_arms, min_length=1, description="name -> arm, in row order")
    close_pair_seeds: list[int] = Field(default_factory=list, description="seeds run afterwards, only for the arms "
                                        "of pairs within twice their spread (grid_report.close_pairs)")

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        if any(not 0 < b <= 1 for b in v) or len(set(v)) != len(v):
            raise ValueError(f"must be distinct fractions in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _known_arms(self) -> "GridConfig":
        for i, cut in enumerate(self.cuts):
            unknown = [a for a in cut.arms or () if a not in self.arms]
            if unknown:
                raise ValueError(f"cuts.{i}.arms: unknown arm {unknown[0]!r} (grid.arms has {', '.join(self.arms)})")
        labels = [c.label for c in self.cuts]
        if len(set(labels)) != len(labels):
            raise ValueError(f"cuts: the same cut twice ({labels})")
        if any(CHAIN_SEP in a or not a.replace("-", "").replace("_", "").isalnum() for a in self.arms):
            raise ValueError(f"arms: names must be letters, digits, '-' or '_' (and no {CHAIN_SEP!r})")
        return self


@dataclass
class GridCell:
    """One budget x one cut: its arms' stages, named and chained (see the module docstring)."""

    budget: float
    cut: GridCut
    tokens: int
    arms: dict[str, list] = field(default_factory=dict)  # arm -> [StageConfig]
    shape: object = None  # the one-shot slim StageConfig (the scratch arm's shape)

    @property
    def label(self) -> str:
        return f"b{self.budget * 100:g}pct-{self.cut.label}"


def teacher_tokens(cfg, grid: GridConfig) -> int:
    """The teacher's training tokens: the grid's, else its ``teacher.json``'s token budget
    (``config.tokens``: the trained count rounds it up to whole batches; the budget keeps the
    cells' token counts round, so equal shares of two budgets stay equal)."""
    if grid.teacher_tokens is not None:
        return grid.teacher_tokens
    marker = Path(cfg.teacher) / "teacher.json"
    try:
        doc = json.loads(marker.read_text())
        return int(doc.get("config", {}).get("tokens") or doc["result"]["tokens"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"grid.teacher_tokens: not given, and {marker} (a slimmoe teacher's record) holds no "
                        "token count") from None


def expand_grid(cfg, teacher_config) -> list[GridCell]:
    """Every cell of ``cfg.grid`` (``cfg``: an AblationConfig), budgets outer, cuts inner."""
    grid = cfg.grid
    total = teacher_tokens(cfg, grid)
    width0 = int(teacher_config.intermediate_size)
    kv0 = int(teacher_config.num_key_value_heads)
    cells = []
    for budget in grid.budgets:
        tokens = int(round(budget * total))
        for i, cut in enumerate(grid.cuts):
            final = _cut_targets(cut, width0, kv0, f"grid.cuts.{i}")
            cell = GridCell(budget, cut, tokens)
            for arm in cut.arms or list(grid.arms):
                spec = grid.arms[arm]
                targets = _arm_targets(spec, final, width0, teacher_config, f"grid.cuts.{i}: arm {arm}")
                cell.arms[arm] = _chain(cfg, spec, targets, tokens)
            cell.shape = _chain(cfg, GridArm(kind="slim"), [final], tokens)[0]
            cells.append(cell)
    return cells


def _cut_targets(cut: GridCut, width0: int, kv0: int, where: str) -> SlimTargets:
    if width0 % cut.ratio:
        raise UserError(f"{where}.ratio: {cut.ratio} does not divide the teacher's expert width {width0}")
    kv = None
    if cut.halve_kv:
        if kv0 % 2:
            raise UserError(f"{where}.halve_kv: the teacher has {kv0} KV groups, which cannot be halved")
        kv = kv0 // 2
    return SlimTargets(expert_intermediate_size=width0 // cut.ratio, num_key_value_heads=kv)


def _arm_targets(spec: GridArm, final: SlimTargets, width0: int, teacher_config, where: str) -> list[SlimTargets]:
    """The sizes of each stage of one arm at one cut."""
    if spec.kind == "scratch":
        return [final]
    if spec.kind == "slim":
        n, w = len(spec.split), final.expert_intermediate_size
        widths = [_round_width(width0 * (w / width0) ** (i / n)) for i in range(1, n)] + [w]
        if any(a <= b for a, b in zip([width0, *widths], widths)):
            raise UserError(f"{where}: {n} stages from expert width {width0} to {w} need decreasing widths "
                            f"(multiples of 8), got {widths}; use fewer stages or a larger cut")
        return [SlimTargets(expert_intermediate_size=x, num_key_value_heads=final.num_key_value_heads if i == n - 1
                            else None) for i, x in enumerate(widths)]
    budget = estimate_total_params(teacher_config, **final.model_dump())
    strategy = "drop" if spec.kind == "drop" else "slim+drop"
    try:
        return [resolve_sizes(teacher_config, strategy, total_params=budget)]
    except UserError as e:
        raise UserError(f"{where} ({spec.kind} to {budget:,} total parameters): {e}") from None


def _round_width(width: float) -> int:
    """Multiples of 8 (what the CPU grouped-mm kernels and the schedule use), exact below 8."""
    return 8 * round(width / 8) if width >= 8 else max(1, round(width))


def stage_name(kind: str, t: SlimTargets, tokens: int) -> str:
    """What a stage is: kind, sizes and tokens, e.g. ``slim-w128-t600000`` or ``drop-e2-t600000``."""
    sizes = [f"{p}{v}" for p, v in (("w", t.expert_intermediate_size), ("kv", t.num_key_value_heads),
                                    ("e", t.num_experts)) if v is not None]
    return "-".join([kind.replace("-", ""), *sizes, f"t{tokens}"])


def _chain(cfg, spec: GridArm, targets: list[SlimTargets], tokens: int) -> list:
    """The arm's StageConfigs; each one's name is the chain of stage names up to it."""
    counts = split_tokens(tokens, spec.split or [1.0])
    stages, chain = [], []
    for t, n in zip(targets, counts):
        distill = cfg.distill.model_dump()
        distill.update(tokens=n, teacher_cache_dir=cfg.cache_dir().resolve())
        if spec.kind == "scratch":  # no teacher signal: next-token loss, no top-k cache
            distill.update(loss="lm", alpha=1.0, teacher_cache_dir=None)
        chain.append(stage_name(spec.kind, t, n))
        stages.append(StageConfig(name=CHAIN_SEP.join(chain), **t.model_dump(), importance=cfg.importance,
                                  distill=DistillConfig(**distill), eval=cfg.eval))
    return stages


def chain_folder(stage_name_: str) -> Path:
    """The folder (relative to the grid's ``stages/``) of a chained stage: one level per stage."""
    return Path(*stage_name_.split(CHAIN_SEP))
