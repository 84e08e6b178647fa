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
    flow_guard,
    pipeline_tasks,
    rerun_if_missing,
    resolve_pipeline,
    stage_row,
    teacher_row,
)
from slimmoe.pipeline.schema import PipelineConfig, StageConfig


@flow(name="compress", log_prints=True)
def compress(config: PipelineConfig) -> dict:
    with flow_guard(config, "compress flow"):
        return _compress(config)


def _compress(config: PipelineConfig) -> dict:
    cfg, tracking = resolve_pipeline(config)
    out = Path(cfg.output_dir)
    t = pipeline_tasks(out)

    teacher = t.fingerprint(cfg.teacher)
    blocks = t.prepare_data(cfg.data.model_dump(), cfg.teacher, str(out / "data"))
    parent = t.start_pipeline_run(cfg.model_dump(mode="json"), teacher, blocks, tracking)
    teacher_metrics = t.evaluate("teacher", teacher, blocks, cfg.stages[0].eval.model_dump(), tracking, parent,
                                 teacher=teacher)  # KL of the teacher to itself: 0, not computed
    rows = [teacher_row(cfg.teacher, teacher_metrics, parent)]

    current = {**teacher, "version": None}
    for stage in cfg.stages:
        row, current = compress_stage(t, cfg.name, stage, current, teacher, blocks, tracking, parent, StageOutputs(out, stage.name))
        rows.append(row)

    return t.summarize(cfg.model_dump(mode="json"), rows, tracking, parent)


def compress_stage(t, pipeline: str, stage: StageConfig, current: dict, teacher: dict, blocks: dict, tracking: dict,
                   parent: str, s: StageOutputs, scores: dict | None = None) -> tuple[dict, dict]:
    """importance -> slim -> distill -> evaluate -> register, for one stage; returns its summary row and model.

    ``scores`` given (an importance result computed once for several callers) skips the importance step."""
    run = t.start_stage_run(parent, stage.model_dump(mode="json"), current, teacher, blocks, tracking)
    targets, importance = stage.targets().model_dump(), stage.importance.model_dump()
    kd_teacher = None if current["path"] == teacher["path"] else teacher  # stage 1: the model is its own teacher

    if scores is None:
        scores = rerun_if_missing(t.importance, s.scores)(stage.name, current, kd_teacher, blocks, importance, targets,
                                                          s.scores, tracking, run)
    pruned = s.pruned if stage.distill else s.model  # a prune-only stage's result is its model
    small = rerun_if_missing(t.slim, pruned)(stage.name, current, scores, targets, importance, pruned, tracking, run)
    student = small
    if stage.distill:
        student = rerun_if_missing(t.distill, s.model)(stage.name, small, teacher, blocks,
                                                       stage.distill.model_dump(mode="json"), s.model, tracking, run)
    metrics = t.evaluate(stage.name, student, blocks, stage.eval.model_dump(), tracking, run, teacher=teacher)
    version = t.register_stage_model(pipeline, stage.name, student, current, tracking, run)
    return stage_row(stage.name, small, student, scores, metrics, run, version), {**student, "version": version}
