"""The multi-stage compression flow: for each stage, importance -> slim -> distill -> evaluate.

    slimmoe run deployments/configs/demo.yaml            # in-process, temporary Prefect server
    prefect deployment run compress/demo                 # through a work pool (deployments/)

The final stage's model is the result; ``<output_dir>/summary.json`` lists every stage.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.common import (
    StageOutputs,
    export_dir,
    fingerprint,
    flow_guard,
    quantized_dir,
    quantized_entry,
    stage_row,
    teacher_row,
    tracking_settings,
)
from slimmoe.config import LaunchConfig
from slimmoe.pipeline.resolve import resolve_pipeline
from slimmoe.pipeline.schema import PipelineConfig, StageConfig
from slimmoe.pipeline.steps import ImportanceRef, ModelRef, TokenBlocks, quantize_engine
from tasks import lineage, steps
from tasks.caching import cached, open_step_cache
from tasks.tracking import TrackingSettings


@flow(name="compress", log_prints=True)
def compress(config: PipelineConfig) -> dict:
    with flow_guard(config, "compress flow"):
        return _compress(config)


def _compress(config: PipelineConfig) -> dict:
    cfg = resolve_pipeline(config)  # explicit sizes for every stage, every path absolute
    out = Path(cfg.output_dir)
    tracking = tracking_settings(cfg)
    open_step_cache(out)

    teacher = fingerprint(cfg.teacher)
    blocks = cached(steps.prepare_data, out)(cfg.data, teacher, out / "data")
    parent = lineage.start_pipeline_run(cfg, teacher, blocks, tracking)
    teacher_metrics = cached(steps.evaluate, out)("teacher", teacher, blocks, cfg.stages[0].eval, tracking, parent,
                                                  teacher=teacher)  # KL of the teacher to itself: 0, not computed
    rows = [teacher_row(cfg.teacher, teacher_metrics, parent)]

    current, version = teacher, None
    for stage in cfg.stages:
        row, current, version = compress_stage(cfg.name, stage, current, version, teacher, blocks, tracking, parent,
                                               StageOutputs(out, stage.name), launch=cfg.launch)
        rows.append(row)

    return lineage.summarize(cfg, rows, tracking, parent)


def compress_stage(pipeline: str, stage: StageConfig, current: ModelRef, current_version: str | None,
                   teacher: ModelRef, blocks: TokenBlocks, tracking: TrackingSettings, parent: str, where,
                   scores: ImportanceRef | None = None,
                   launch: LaunchConfig = LaunchConfig()) -> tuple[dict, ModelRef, str | None]:
    """importance -> slim -> distill -> evaluate -> export -> register (-> quantize), for one stage; returns its summary
    row, its model and that model's registered version. ``where`` names the stage's outputs
    (``StageOutputs`` or the ablation's ``ArmOutputs``; its ``root`` holds the step cache).

    ``scores`` given (an importance result computed once for several callers) skips the importance step;
    ``launch`` runs importance and distillation in several processes."""
    run = lineage.start_stage_run(parent, stage, current, teacher, blocks, tracking)
    kd_teacher = None if current.path == teacher.path else teacher  # stage 1: the model is its own teacher
    root = where.root

    if scores is None:
        scores = cached(steps.importance, root, where.scores)(stage.name, current, kd_teacher, blocks, stage.importance,
                                                              stage.targets(), where.scores, tracking, run, launch)
    pruned = where.pruned if stage.distill else where.model  # a prune-only stage's result is its model
    small = cached(steps.slim, root, pruned)(stage.name, current, scores, stage.targets(), stage.importance, pruned,
                                             tracking, run)
    student = small
    if stage.distill:
        student = cached(steps.distill, root, where.model)(stage.name, small, teacher, blocks, stage.distill,
                                                           where.model, tracking, run, launch)
    metrics = cached(steps.evaluate, root)(stage.name, student, blocks, stage.eval, tracking, run, teacher=teacher)
    exports = {}
    for engine in stage.export:  # serving folders of the final model, before its run is finished
        out = export_dir(where.model, engine)
        exports[engine] = cached(steps.export, root, out)(stage.name, student, engine, out, tracking, run)["path"]
    version = lineage.register_stage_model(pipeline, stage.name, student, current, current_version, tracking, run)
    row = stage_row(stage.name, small, student, scores, metrics, run, version)
    if exports:
        row["export"] = exports
    if stage.quantize is not None:
        row["quantized"] = quantize_stage_model(pipeline, stage, student, version, teacher, blocks, tracking, parent,
                                                where)
    return row, student, version  # the next stage starts from the unquantized model


def quantize_stage_model(pipeline: str, stage: StageConfig, student: ModelRef, version: str | None, teacher: ModelRef,
                         blocks: TokenBlocks, tracking: TrackingSettings, parent: str, where) -> dict:
    """quantize -> evaluate -> register the stage's final model, in its own run ``<stage>-<scheme>``
    (a child of the pipeline's run) and as its own version whose parent is the stage's; returns the
    stage row's ``quantized`` entry."""
    settings = stage.quantize
    engine = quantize_engine(settings)  # llm-compressor's Python and versions (checked in pre-flight too)
    name = f"{stage.name}-{settings.scheme}"
    run = lineage.start_quantize_run(parent, stage.name, settings, engine, student, tracking)
    out = quantized_dir(where.model)
    quantized = cached(steps.quantize, where.root, out)(stage.name, student, settings, engine, out, tracking, run)
    metrics = cached(steps.evaluate, where.root)(name, quantized, blocks, stage.eval, tracking, run, teacher=teacher)
    qversion = lineage.register_quantized_model(pipeline, name, quantized, student, version, tracking, run)
    return quantized_entry(quantized, metrics, run, qversion, student.path)
