"""The schema of an ablation YAML (``slimmoe ablate CONFIG.yaml``); ``arms.py`` plans each arm's stages.

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

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from slimmoe.config import DROP_EXPERT_SCORES, DistillConfig, ImportanceConfig, StrictModel, apply_overrides, load_yaml
from slimmoe.pipeline.grid import GridConfig
from slimmoe.pipeline.schema import DataConfig, EvalConfig, TrackingConfig, _folder_name

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
    target: AblationTarget | None = Field(None, description="required without grid")
    tokens: int | None = Field(None, gt=0, description="distillation tokens per arm, split evenly over its stages "
                                                        "(required without grid)")
    grid: GridConfig | None = Field(None, description="budgets x width cuts x arms (slimmoe.pipeline.grid); "
                                                      "replaces target, tokens, num_stages and arms")
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
        if info.data.get("grid") is not None:  # a grid's arms are checked with the whole config
            return v
        if any(a in DROP_ARMS for a in info.data.get("arms", ())) and v.expert_score not in DROP_EXPERT_SCORES:
            raise PydanticCustomError("drop_score", "expert_score: the drop arms need frequency or reap, got {got}",
                                      {"got": v.expert_score})
        return v

    @field_validator("distill")
    @classmethod
    def _kd_loss(cls, v: AblationDistill) -> AblationDistill:
        if v.loss == "lm":
            raise PydanticCustomError("kd_loss", "loss: the arms compare distillation losses; lm is the scratch arm's")
        return v

    @model_validator(mode="after")
    def _target_or_grid(self) -> "AblationConfig":
        if self.grid is None:
            missing = [k for k in ("target", "tokens") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"{missing[0]}: required (or describe a grid)")
        else:
            given = [k for k in ("target", "tokens") if getattr(self, k) is not None] + \
                [k for k in ("num_stages", "arms") if k in self.model_fields_set]
            if given:
                raise ValueError(f"{given[0]}: a grid gives every cell's (grid.budgets, grid.cuts, grid.arms); "
                                 "leave it out")
            kinds = {a.kind for a in self.grid.arms.values()}
            if kinds & {"drop", "slim-drop"} and self.importance.expert_score not in DROP_EXPERT_SCORES:
                raise ValueError(f"importance: expert_score: the drop arms need frequency or reap, "
                                 f"got {self.importance.expert_score!r}")
        return self

    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{Path(self.output_dir).resolve() / 'mlflow.db'}"

    def cache_dir(self) -> Path:
        """The teacher top-k cache every arm shares."""
        return Path(self.output_dir) / "shared" / "teacher-topk"


def load_ablation_config(path: str | Path, overrides: list[str] | None = None) -> AblationConfig:
    data = load_yaml(path)
    apply_overrides(data, overrides or [])
    return AblationConfig.model_validate(data)
