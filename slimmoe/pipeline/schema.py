"""The schema of a pipeline YAML (``slimmoe run CONFIG.yaml``): teacher, data, stages, tracking.

A stage needs only a name and a target; everything else has defaults::

    stages:
      - name: final
        expert_intermediate_size: 64
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, field_validator, model_validator

from slimmoe.config import (
    DROP_EXPERT_SCORES,
    DROP_STRATEGIES,
    DistillConfig,
    ImportanceConfig,
    LaunchConfig,
    SlimTargets,
    Strategy,
    StrictModel,
    apply_overrides,
    load_yaml,
    parse_param_count,
)
from slimmoe.export.engines import ENGINES
from slimmoe.quantize.config import QuantizeConfig

DEFAULT_STAGE_TOKENS = 1_000_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _folder_name(v: str) -> str:
    """Stage and pipeline names name folders and registered models."""
    if not _NAME.match(v):
        raise ValueError("must be letters, digits, '_', '.' or '-'")
    return v


class DataConfig(StrictModel):
    train: str = Field(..., description="text/jsonl/parquet file or folder, or a hub dataset id")
    eval: str | None = Field(None, description="held-out text; default: the last eval_fraction of train")
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    seq_len: int = Field(256, gt=1)
    text_field: str = "text"
    max_blocks: int | None = Field(None, gt=0, description="cap on train blocks")
    name: str | None = Field(None, description="hub dataset configuration name")
    split: str = Field("train", description="hub dataset split")
    data_files: list[str] | None = Field(None, description="data_files of a hub dataset or builder (json, text)")
    streaming: bool = Field(False, description="stream a hub dataset while tokenising (no full download)")
    max_tokens: int | None = Field(None, gt=0, description="stop tokenising data.train after this many tokens")
    num_proc: int = Field(1, gt=0, description="tokenising processes (the shards do not change)")


class EvalConfig(StrictModel):
    """What the evaluate step measures (README "Evaluation")."""

    max_blocks: int = Field(64, gt=0, description="held-out blocks used for perplexity and KL")
    batch_size: int = Field(8, gt=0)
    kl_to_teacher: bool = Field(True, description="full-vocabulary KL(teacher || model) on the held-out blocks")
    throughput_batch_sizes: list[int] = Field(default_factory=lambda: [1, 8],
                                              description="batch sizes of the forward / generation tokens/s")
    generation: bool = Field(True, description="measure greedy generation tokens/s")
    generation_tokens: int = Field(32, gt=0, description="new tokens generated per sequence")
    generation_prompt_tokens: int = Field(32, gt=0, description="prompt length (first tokens of held-out blocks)")
    peak_memory: bool = True
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness tasks (pip install slimmoe[eval])")
    lm_eval_limit: int | float | None = Field(None, gt=0, description="items per task; a float < 1 is a fraction")
    lm_eval_batch_size: int = Field(8, gt=0)
    lm_eval_include_path: str | None = Field(None, description="folder of extra (local) lm-eval task YAMLs")

    @field_validator("throughput_batch_sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if any(n <= 0 for n in v) or len(set(v)) != len(v):
            raise ValueError(f"must be distinct positive integers, got {v}")
        return v

    @field_validator("lm_eval_tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        if any(not t.strip() for t in v):
            raise ValueError("task names must not be empty")
        return v


class StageSettings(StrictModel):
    """How a stage scores, distils and evaluates; shared by explicit and scheduled stages."""

    importance: ImportanceConfig = ImportanceConfig()
    distill: DistillConfig | None = Field(
        default_factory=lambda: DistillConfig(tokens=DEFAULT_STAGE_TOKENS),
        description="null: prune only, no distillation",
    )
    eval: EvalConfig = EvalConfig()

    @field_validator("distill", mode="before")
    @classmethod
    def _default_tokens(cls, v: Any) -> Any:
        if isinstance(v, dict) and "tokens" not in v:
            return {**v, "tokens": DEFAULT_STAGE_TOKENS}
        return v


def _engine_name(v: str) -> str:
    """A stage's ``export`` entry: a serving engine ``slimmoe export --for`` knows."""
    if v not in ENGINES:
        raise ValueError(f"unknown engine {v!r}; choose one of {', '.join(ENGINES)}")
    return v


EngineName = Annotated[str, AfterValidator(_engine_name)]


def _distinct_engines(v: list[str]) -> list[str]:
    twice = sorted({e for e in v if v.count(e) > 1})
    if twice:
        raise ValueError(f"{', '.join(twice)} listed more than once")
    return v


def _default_reap(data: Any) -> Any:
    """``drop`` without an explicit ``importance.expert_score`` uses ``reap`` (the default is taylor)."""
    if not isinstance(data, dict) or data.get("strategy") not in DROP_STRATEGIES:
        return data
    imp = data.get("importance")
    if imp is None:
        return {**data, "importance": {"expert_score": "reap"}}
    if isinstance(imp, dict) and "expert_score" not in imp:
        return {**data, "importance": {**imp, "expert_score": "reap"}}
    if isinstance(imp, ImportanceConfig) and "expert_score" not in imp.model_fields_set:
        return {**data, "importance": imp.model_copy(update={"expert_score": "reap"})}
    return data


def _check_strategy(v: str, info) -> str:
    imp = info.data.get("importance")
    if v in DROP_STRATEGIES and imp is not None and imp.expert_score not in DROP_EXPERT_SCORES:
        raise ValueError(f"{v} removes whole experts by importance.expert_score frequency or reap, got {imp.expert_score}")
    return v


def _check_target(v: int | None, info, sizes: dict) -> int | None:
    """At most one of total_params / active_params; with one, only num_key_value_heads among ``sizes``."""
    if v is None:
        return v
    if info.field_name == "active_params" and info.data.get("total_params") is not None:
        raise ValueError("give total_params or active_params, not both")
    given = [f for f in ("expert_intermediate_size", "num_experts") if sizes.get(f) is not None]
    if given:
        raise ValueError(f"a parameter target sets {' and '.join(given)} itself (only num_key_value_heads "
                         "may be given with it)")
    return v


class StageConfig(StageSettings):
    """One stage: prune one-shot to these sizes, then distil from the original teacher.

    Either explicit sizes or a parameter target (``total_params`` or ``active_params``)
    that ``strategy`` turns into sizes (slimmoe.pipeline.resolve.resolve_stages): ``slim``
    solves the expert width, ``drop`` the number of experts, ``slim+drop`` both. With a
    target only ``num_key_value_heads`` may be given explicitly; explicit sizes are used as
    given (a resolved stage keeps its strategy and carries all three). ``drop`` and
    ``slim+drop`` score whole experts by ``importance.expert_score`` frequency or reap
    (reap when not set). ``export: [vllm, llama.cpp]`` writes, once the stage's model is
    final, what each serving engine loads into ``<stage>/export/<engine>/`` (as
    ``slimmoe export``); the engines' limits are checked before the run starts.
    ``quantize: {scheme: FP8_DYNAMIC}`` also writes a compressed-tensors copy of the final
    model into ``<stage>/quantized/`` (as ``slimmoe quantize``), evaluates and registers it;
    the next stage still starts from the unquantized model.
    """

    name: str
    expert_intermediate_size: int | None = Field(None, gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)
    num_experts: int | None = Field(None, gt=0)
    strategy: Strategy = Field("slim", description="slim: expert width; drop: whole experts; slim+drop: both")
    total_params: int | None = Field(None, gt=0, description="target total parameters (instead of sizes)")
    active_params: int | None = Field(None, gt=0, description="target active parameters (instead of sizes)")
    export: list[EngineName] = Field(default_factory=list, description="serving engines (vllm, sglang, llama.cpp) "
                                     "the stage's model is exported for, into <stage>/export/<engine>/")
    quantize: QuantizeConfig | None = Field(None, description="a compressed-tensors copy of the stage's model "
                                            "(FP8_DYNAMIC | W4A16 | W8A8, by llm-compressor) in <stage>/quantized/")

    _name = field_validator("name")(classmethod(lambda cls, v: _folder_name(v)))
    _engines = field_validator("export")(classmethod(lambda cls, v: _distinct_engines(v)))
    _counts = field_validator("total_params", "active_params", mode="before")(
        classmethod(lambda cls, v: parse_param_count(v)))

    _reap = model_validator(mode="before")(classmethod(lambda cls, data: _default_reap(data)))
    _strategy = field_validator("strategy")(classmethod(lambda cls, v, info: _check_strategy(v, info)))
    _target = field_validator("total_params", "active_params")(
        classmethod(lambda cls, v, info: _check_target(v, info, info.data)))

    def has_param_target(self) -> bool:
        return self.total_params is not None or self.active_params is not None

    def targets(self) -> SlimTargets:
        return SlimTargets(
            expert_intermediate_size=self.expert_intermediate_size,
            num_key_value_heads=self.num_key_value_heads,
            num_experts=self.num_experts,
        )


def check_split(split: list[float]) -> None:
    """A budget split (a schedule's or a grid arm's): positive shares adding up to 1."""
    if any(x <= 0 for x in split) or abs(sum(split) - 1) > 1e-3:
        raise ValueError(f"split: shares must be positive and add up to 1, got {split}")


class ScheduleConfig(StageSettings):
    """Automatic stages: sizes interpolated geometrically in parameters from teacher to ``final``.

    ``final`` may instead be a parameter target (``total_params`` / ``active_params``, with
    ``strategy``, as in a stage); it is solved into sizes from the teacher first.
    ``distill.tokens`` is the whole budget, shared out over the stages by ``split``; ``export``
    and ``quantize`` apply to the last stage (``final``). Without
    ``num_stages`` the stage count and split are the measured grid's choice for this cut
    (:mod:`slimmoe.pipeline.schedule_rule`); with it and no ``split``, the budget is split evenly.
    """

    num_stages: int | None = Field(None, ge=1, description="default: the measured rule's (schedule_rule)")
    split: list[float] | None = Field(None, min_length=1, description="share of distill.tokens per stage; "
                                      "default: the measured rule's, or even when num_stages is given")
    budget_fraction: float | None = Field(None, gt=0, le=1, description="distill.tokens over the teacher's "
                                          "training tokens: picks the measured budget nearest (default: the largest)")
    export: list[EngineName] = Field(default_factory=list, description="serving engines the final stage's "
                                     "model is exported for, as a stage's export")
    quantize: QuantizeConfig | None = Field(None, description="a compressed-tensors copy of the final stage's "
                                            "model, as a stage's quantize")

    _engines = field_validator("export")(classmethod(lambda cls, v: _distinct_engines(v)))
    final: SlimTargets = SlimTargets()
    strategy: Strategy = "slim"
    total_params: int | None = Field(None, gt=0)
    active_params: int | None = Field(None, gt=0)

    _counts = field_validator("total_params", "active_params", mode="before")(
        classmethod(lambda cls, v: parse_param_count(v)))
    _reap = model_validator(mode="before")(classmethod(lambda cls, data: _default_reap(data)))
    _strategy = field_validator("strategy")(classmethod(lambda cls, v, info: _check_strategy(v, info)))
    _target = field_validator("total_params", "active_params")(
        classmethod(lambda cls, v, info: _check_target(v, info, dict(info.data.get("final") or {}))))

    @model_validator(mode="after")
    def _final_or_target(self) -> "ScheduleConfig":
        if self.final.is_noop() and self.total_params is None and self.active_params is None:
            raise ValueError("give final sizes or a parameter target (total_params or active_params)")
        if self.split is not None:
            check_split(self.split)
            if self.num_stages is not None and len(self.split) != self.num_stages:
                raise ValueError(f"split: {len(self.split)} shares for num_stages {self.num_stages}")
        return self


class TrackingConfig(StrictModel):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<output_dir>/mlflow.db")
    experiment: str = "slimmoe"
    register_models: bool = True


class PipelineConfig(StrictModel):
    name: str
    teacher: str = Field(..., description="checkpoint folder or hub id of the original model")
    output_dir: Path
    data: DataConfig
    stages: list[StageConfig] = Field(default_factory=list)
    schedule: ScheduleConfig | None = None
    tracking: TrackingConfig = TrackingConfig()
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="processes the importance and distill "
                                 "steps run in (torchrun); one by default")
    seed: int = 0
    trust_remote_code: bool = Field(False, description="run Python code shipped with the teacher's checkpoint")
    allow_pickle: bool = Field(False, description="load pickle weights (pytorch_model.bin); safetensors only when false")

    _name = field_validator("name")(classmethod(lambda cls, v: _folder_name(v)))

    @model_validator(mode="after")
    def _stages_or_schedule(self) -> "PipelineConfig":
        if bool(self.stages) == (self.schedule is not None):
            raise ValueError("give either stages or schedule (exactly one)")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return self

    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{Path(self.output_dir).resolve() / 'mlflow.db'}"


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML, apply ``--set a.b=c`` overrides, validate (unknown keys are errors).

    Relative paths inside the file (teacher, data, output_dir) stay relative to the current
    directory, as the CLI user typed them.
    """
    data = load_yaml(path)
    apply_overrides(data, overrides or [])
    return PipelineConfig.model_validate(data)
