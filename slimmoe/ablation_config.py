"""The schema of an ablation YAML (``slimmoe ablate CONFIG.yaml``) and the stages of every arm.

One teacher, one data set, one token budget, one target size; the arms compared are

    one-shot-slim     prune expert width (and KV groups if the target names them) to the
                      target in one step, distil with every token
    multi-stage-slim  the same final shape in ``num_stages`` steps (sizes interpolated
                      geometrically in parameters), the tokens split evenly over the stages
    one-shot-drop     drop whole experts to the same *total* parameters (the target's, or the
                      one-shot-slim model's when the target is active parameters or a width)
    slim-drop         expert width and expert count together, to the same total
    scratch           random init at the one-shot-slim shape, the same tokens, LM loss

Dropping experts cannot lower the *active* parameters while top-k is unchanged, so the
two drop arms are matched on total parameters (the paper's "same parameter count");
the report plots every arm against its active parameters so the difference is visible.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from slimmoe.config import DistillConfig, ImportanceConfig, SlimTargets, StrictModel, apply_overrides, load_yaml
from slimmoe.pipeline_config import DataConfig, EvalConfig, StageConfig, TrackingConfig, _folder_name

Arm = Literal["one-shot-slim", "multi-stage-slim", "one-shot-drop", "slim-drop", "scratch"]
ARMS: tuple[str, ...] = ("one-shot-slim", "multi-stage-slim", "one-shot-drop", "slim-drop", "scratch")
DROP_ARMS = ("one-shot-drop", "slim-drop")


class AblationTarget(StrictModel):
    """The size every arm ends at: a parameter count or an explicit expert width (the
    one-shot-slim shape); ``num_key_value_heads`` optionally slims attention too."""

    total_params: int | None = Field(None, gt=0)
    active_params: int | None = Field(None, gt=0)
    expert_intermediate_size: int | None = Field(None, gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> "AblationTarget":
        given = [k for k in ("total_params", "active_params", "expert_intermediate_size") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of total_params, active_params, expert_intermediate_size")
        return self


def _default_importance() -> ImportanceConfig:
    return ImportanceConfig(expert_score="reap")  # drop arms need an expert score (frequency or reap)


class AblationDistill(DistillConfig):
    """Distillation settings shared by every arm; ``tokens`` and ``seed`` come from the ablation."""

    tokens: int = Field(1, gt=0, description="ignored: the ablation's tokens are split over each arm's stages")


class AblationConfig(StrictModel):
    name: str
    teacher: str = Field(..., description="checkpoint folder or hub id of the original model")
    output_dir: Path
    data: DataConfig
    target: AblationTarget
    tokens: int = Field(..., gt=0, description="distillation tokens per arm, split evenly over its stages")
    num_stages: int = Field(2, ge=2, description="stages of the multi-stage-slim arm")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    arms: list[Arm] = Field(default_factory=lambda: list(ARMS), min_length=1)
    importance: ImportanceConfig = Field(default_factory=_default_importance)
    distill: AblationDistill = Field(default_factory=AblationDistill)
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig(register_models=False)
    trust_remote_code: bool = Field(False, description="run Python code shipped with the teacher's checkpoint")
    allow_pickle: bool = Field(False, description="load pickle weights (pytorch_model.bin); safetensors only when false")

    _name = field_validator("name")(classmethod(lambda cls, v: _folder_name(v)))

    @field_validator("seeds", "arms")
    @classmethod
    def _unique(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError(f"must not repeat, got {v}")
        return v

    @field_validator("importance")
    @classmethod
    def _drop_needs_expert_score(cls, v: ImportanceConfig, info: ValidationInfo) -> ImportanceConfig:
        if any(a in DROP_ARMS for a in info.data.get("arms", ())) and v.expert_score not in ("frequency", "reap"):
            raise PydanticCustomError("drop_score", "expert_score: the drop arms need frequency or reap, got {got!r}",
                                      {"got": v.expert_score})
        return v

    @field_validator("distill")
    @classmethod
    def _kd_loss(cls, v: AblationDistill) -> AblationDistill:
        if v.loss == "lm":
            raise PydanticCustomError("kd_loss", "loss: the arms compare distillation losses; lm is the scratch arm's")
        return v

    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{Path(self.output_dir).resolve() / 'mlflow.db'}"

    def cache_dir(self) -> Path:
        """The teacher top-k cache every arm shares."""
        return Path(self.output_dir) / "shared" / "teacher-topk"


def load_ablation_config(path: str | Path, overrides: list[str] | None = None) -> AblationConfig:
    data = load_yaml(path)
    apply_overrides(data, overrides or [])
    return AblationConfig.model_validate(data)


def slim_targets(cfg: AblationConfig, teacher_config) -> SlimTargets:
    """The one-shot-slim shape: explicit width, or the width solved for the parameter target."""
    t = cfg.target
    if t.expert_intermediate_size is not None:
        return SlimTargets(expert_intermediate_size=t.expert_intermediate_size, num_key_value_heads=t.num_key_value_heads)
    from slimmoe.strategies import resolve_sizes

    explicit = SlimTargets(num_key_value_heads=t.num_key_value_heads)
    return _named("target", lambda: resolve_sizes(teacher_config, "slim", total_params=t.total_params,
                                                  active_params=t.active_params, explicit=explicit))


def plan_arms(cfg: AblationConfig, teacher_config) -> dict[str, list[StageConfig]]:
    """Every chosen arm as its list of stages (sizes explicit, tokens per stage, seed unset).

    Stage names are ``<arm>.<stage>`` so task runs and folders tell the arms apart.
    """
    from slimmoe.schedule import estimate_total_params, interpolate_stages

    final = slim_targets(cfg, teacher_config)
    # the drop arms' budget: the target's total, else (active or width target) the slim model's total
    budget = cfg.target.total_params or estimate_total_params(teacher_config, **final.model_dump())
    arms: dict[str, list[SlimTargets]] = {}
    for arm in cfg.arms:
        if arm in ("one-shot-slim", "scratch"):
            arms[arm] = [final]
        elif arm == "multi-stage-slim":
            arms[arm] = interpolate_stages(teacher_config, final, cfg.num_stages)
        else:
            from slimmoe.strategies import resolve_sizes

            strategy = "drop" if arm == "one-shot-drop" else "slim+drop"
            arms[arm] = [_named(f"arms.{arm}", lambda s=strategy: resolve_sizes(teacher_config, s, total_params=budget))]
    return {arm: _stages(cfg, arm, targets) for arm, targets in arms.items()}


def _stages(cfg: AblationConfig, arm: str, targets: list[SlimTargets]) -> list[StageConfig]:
    n = len(targets)
    out = []
    for i, t in enumerate(targets):
        tokens = cfg.tokens // n + (cfg.tokens % n if i == n - 1 else 0)
        distill = cfg.distill.model_dump()
        distill.update(tokens=tokens, teacher_cache_dir=cfg.cache_dir().resolve())
        if arm == "scratch":  # no teacher signal: next-token loss, no top-k cache
            distill.update(loss="lm", alpha=1.0, teacher_cache_dir=None)
        name = f"{arm}.final" if i == n - 1 else f"{arm}.stage{i + 1}"
        out.append(StageConfig(name=name, **t.model_dump(), importance=cfg.importance,
                               distill=DistillConfig(**distill), eval=cfg.eval))
    return out


def scoring_targets(arms: dict[str, list[StageConfig]], teacher_config) -> SlimTargets:
    """One scoring pass on the teacher covers the first stage of every arm: it scores every
    structure kind some first stage cuts (scores of one kind do not depend on the others)."""
    firsts = [stages[0].targets() for stages in arms.values()]

    def smallest(field: str):
        values = [getattr(t, field) for t in firsts if getattr(t, field) is not None]
        return min(values) if values else None

    return SlimTargets(**{f: smallest(f) for f in SlimTargets.model_fields})


def check_ablation_inputs(cfg: AblationConfig, preflight: bool = False) -> dict[str, list[StageConfig]]:
    """Fail fast with one line naming the field: a missing teacher or data file, a dense teacher,
    a target the teacher cannot be cut to; with ``preflight`` also what `slimmoe run` checks
    before a flow starts (teacher weights, tracking server, tokenizer, corpus). Returns the
    arms' stages."""
    from slimmoe import preflight as pf
    from slimmoe.arch import get_adapter
    from slimmoe.loading import load_config

    teacher = load_config(cfg.teacher, "teacher")
    adapter = get_adapter(teacher)
    pf.check_data_paths(cfg.data)
    arms = plan_arms(cfg, teacher)
    for arm, stages in arms.items():
        current = copy.deepcopy(teacher)
        for stage in stages:
            pf.cut(adapter, current, stage.targets(), f"target: arm {arm}, stage {stage.name}: ")
    if preflight:
        pf.check_teacher_and_data(cfg.teacher, teacher, cfg.data, cfg.tracking_uri())
    return arms


def _named(field: str, fn):
    from slimmoe.errors import UserError

    try:
        return fn()
    except UserError as e:
        raise UserError(f"{field}: {e}") from None
