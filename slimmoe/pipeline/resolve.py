"""From a pipeline config as written to the explicit stages a flow runs, and the checks
that fail before anything starts.

``stages`` or ``schedule`` with sizes or parameter targets -> :func:`resolve_pipeline` ->
explicit sizes per stage (``StageConfig.targets()``), every path absolute.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable, TypeVar

from slimmoe.arch import get_adapter
from slimmoe.errors import UserError
from slimmoe.io.loading import load_config
from slimmoe.pipeline import schedule_rule
from slimmoe.pipeline.preflight import (
    check_data_paths,
    check_exports,
    check_quantize,
    check_smaller,
    check_teacher_and_data,
    check_topk,
    cut,
)
from slimmoe.pipeline.schema import PipelineConfig, StageConfig
from slimmoe.prune.plan import resolve_targets, source_sizes
from slimmoe.prune.schedule import format_schedule, interpolate_stages
from slimmoe.prune.strategies import resolve_sizes

Config = TypeVar("Config")  # a PipelineConfig or an AblationConfig


def expand_schedule(cfg: PipelineConfig, teacher_config) -> PipelineConfig:
    """Turn ``schedule`` into explicit stages (``stage1`` ... ``final``); a copy of ``cfg``."""
    return plan_schedule(cfg, teacher_config)[0]


def plan_schedule(cfg: PipelineConfig, teacher_config) -> tuple[PipelineConfig, str | None]:
    """:func:`expand_schedule`, and the sentence saying where its stage count and split come
    from (None without a schedule). Each stage distils its share of ``distill.tokens``."""
    if cfg.schedule is None:
        return cfg, None
    sch = cfg.schedule
    final = sch.final
    if sch.total_params is not None or sch.active_params is not None:
        try:
            final = resolve_sizes(teacher_config, sch.strategy, sch.total_params, sch.active_params, sch.final)
        except UserError as e:
            raise UserError(f"schedule.{e}") from None
    if sch.num_stages is None:
        choice = schedule_rule.choose(schedule_rule.expert_ratio(teacher_config, final), sch.budget_fraction)
        num_stages, split = choice.num_stages, sch.split or choice.split
        reason = f"stages and budget split from the measured grid: {choice.reason}"
        if sch.split is not None and len(sch.split) != num_stages:
            raise UserError(f"schedule.split: {len(sch.split)} shares, but the measured rule chose {num_stages} "
                            f"stages ({choice.reason}); give num_stages too")
    else:
        num_stages, split = sch.num_stages, sch.split or [1 / sch.num_stages] * sch.num_stages
        reason = f"{num_stages} stages (schedule.num_stages)"
    targets = interpolate_stages(teacher_config, final, num_stages)
    tokens = schedule_rule.split_tokens(sch.distill.tokens, split) if sch.distill else [None] * num_stages
    stages = [
        StageConfig(
            name="final" if i == len(targets) - 1 else f"stage{i + 1}",
            **t.model_dump(),
            strategy=sch.strategy,
            importance=sch.importance,
            distill=sch.distill.model_copy(update={"tokens": n}) if sch.distill else None,
            eval=sch.eval,
            **({"export": sch.export, "quantize": sch.quantize} if i == len(targets) - 1 else {}),
        )
        for i, (t, n) in enumerate(zip(targets, tokens))
    ]
    if sch.distill:
        reason += "; tokens per stage " + " / ".join(f"{n:,}" for n in tokens)
    return cfg.model_copy(update={"stages": stages, "schedule": None}), reason


def resolve_stages(cfg: PipelineConfig, teacher_config) -> PipelineConfig:
    """A copy of ``cfg`` whose stages with a parameter target carry explicit sizes instead.

    Stages are solved in order, each from the shape the previous stage left (the teacher's
    for the first); targets are absolute counts. Errors name ``stages.N.<field>``.
    """
    if not any(s.has_param_target() for s in cfg.stages):
        return cfg
    adapter = get_adapter(teacher_config)
    current = copy.deepcopy(teacher_config)
    stages = []
    for i, stage in enumerate(cfg.stages):
        try:
            if stage.has_param_target():
                t = resolve_sizes(current, stage.strategy, stage.total_params, stage.active_params, stage.targets())
                stage = stage.model_copy(update={**t.model_dump(), "total_params": None, "active_params": None})
            sizes = resolve_targets(adapter, current, stage.targets())
        except UserError as e:
            raise UserError(f"stages.{i}.{e}") from None
        adapter.update_config(current, expert_size=sizes["expert_intermediate_size"], num_experts=sizes["num_experts"],
                              kv_heads=sizes["num_key_value_heads"], shared_size=sizes["shared_intermediate_size"])
        stages.append(stage)
    return cfg.model_copy(update={"stages": stages})


def format_stages(cfg: PipelineConfig, teacher_config) -> str:
    """The sizes every stage of a resolved ``cfg`` cuts to, as ``format_schedule`` prints them."""
    return format_schedule([s.targets() for s in cfg.stages], teacher_config, names=[s.name for s in cfg.stages])


def _absolute(p):
    return os.path.abspath(os.path.expanduser(p))


def anchor_paths(cfg: Config) -> Config:
    """A copy of a pipeline (or ablation) config whose local paths are absolute: the output
    folder, and the teacher, data and teacher-cache paths that exist here (a hub id stays as
    it is). The same files spelled ``data/x.txt`` from one working directory and
    ``/repo/data/x.txt`` from another are then the same input to every step and cache key."""
    def local(p):
        return _absolute(p) if p and Path(os.path.expanduser(p)).exists() else p

    def stage(s: StageConfig) -> StageConfig:
        if not (s.distill and s.distill.teacher_cache_dir):
            return s
        cache = Path(_absolute(s.distill.teacher_cache_dir))
        return s.model_copy(update={"distill": s.distill.model_copy(update={"teacher_cache_dir": cache})})

    data = cfg.data.model_copy(update={"train": local(cfg.data.train), "eval": local(cfg.data.eval)})
    update = {"teacher": local(cfg.teacher), "output_dir": Path(_absolute(cfg.output_dir)), "data": data}
    if getattr(cfg, "stages", None):
        update["stages"] = [stage(s) for s in cfg.stages]
    return cfg.model_copy(update=update)


def resolve_pipeline(config: PipelineConfig, echo: Callable[[str], None] = print) -> PipelineConfig:
    """Explicit stages for ``config``, every local path absolute (:func:`anchor_paths`): an
    automatic schedule expanded and parameter targets solved into sizes (both tables are
    passed to ``echo`` before anything runs). A dense or unsupported teacher fails here,
    before any work."""
    config = anchor_paths(config)
    teacher_cfg = load_config(config.teacher, "teacher")
    get_adapter(teacher_cfg)
    cfg, reason = plan_schedule(config, teacher_cfg)
    if config.schedule is not None:
        echo(f"automatic schedule ({reason}):\n" + format_schedule([s.targets() for s in cfg.stages], teacher_cfg))
    if any(s.has_param_target() for s in cfg.stages):
        cfg = resolve_stages(cfg, teacher_cfg)
        echo("sizes chosen for the parameter targets:\n" + format_stages(cfg, teacher_cfg))
    return cfg


def check_inputs(cfg: PipelineConfig) -> None:
    """Fail fast, before any flow starts and before anything is written: everything
    :func:`check_config` checks, then a pickle-only or truncated teacher, an unreachable
    tracking server, a tokenizer that does not fit the teacher, and a corpus that is empty or
    shorter than one block (tokenised into the cache the flow's prepare step then reuses)."""
    check_teacher_and_data(cfg.teacher, check_config(cfg), cfg.data, cfg.tracking_uri())


def check_config(cfg: PipelineConfig):
    """The checks that need only the teacher's config.json: a missing, dense or unsupported
    teacher, missing data paths, top-k beyond the vocabulary, and stage targets its
    predecessor cannot be cut to (larger, not smaller, KV heads not dividing the query
    heads), serving engines a stage exports for that could not serve its model
    (:func:`~slimmoe.pipeline.preflight.check_exports`), and a stage's quantization that could
    not run (:func:`~slimmoe.pipeline.preflight.check_quantize`). Returns the teacher's config."""
    teacher = load_config(cfg.teacher, "teacher")
    adapter = get_adapter(teacher)
    check_data_paths(cfg.data)
    stages = resolve_stages(expand_schedule(cfg, teacher), teacher).stages
    check_topk(stages, teacher.vocab_size)
    current = copy.deepcopy(teacher)
    for i, stage in enumerate(stages):
        before = source_sizes(adapter, current)
        t = cut(adapter, current, stage.targets(), f"stages.{i}.")
        if cfg.schedule is None:
            check_smaller(i, before, t, f"stages.{i - 1}" if i else "the teacher")
        check_exports(i, stage.export, current)
        check_quantize(i, stage.quantize, current)
    return teacher
