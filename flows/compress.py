"""The multi-stage compression flow: for each stage, importance -> slim -> distill -> evaluate.

    slimmoe run deployments/configs/demo.yaml            # in-process, temporary Prefect server
    prefect deployment run compress/demo                 # through a work pool (deployments/)

The final stage's model is the result; ``<output_dir>/summary.json`` lists every stage.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.common import StageOutputs, pipeline_tasks, resolve_pipeline, stage_row, teacher_row
from slimmoe.pipeline_config import PipelineConfig


@flow(name="compress", log_prints=True)
def compress(config: PipelineConfig) -> dict:
    cfg, tracking = resolve_pipeline(config)
    out = Path(cfg.output_dir)
    t = pipeline_tasks(out)

    teacher = t.fingerprint(cfg.teacher)
    blocks = t.prepare_data(cfg.data.model_dump(), cfg.teacher, str(out / "data"))
    parent = t.start_pipeline_run(cfg.model_dump(mode="json"), teacher, blocks, tracking)
    rows = [teacher_row(cfg.teacher, t.evaluate("teacher", teacher, blocks, cfg.stages[0].eval.model_dump(), tracking, parent), parent)]

    current = {**teacher, "version": None}
    for stage in cfg.stages:
        s = StageOutputs(out, stage.name)
        run = t.start_stage_run(parent, stage.model_dump(mode="json"), current, teacher, blocks, tracking)
        scores = t.importance(stage.name, current, None if current["path"] == teacher["path"] else teacher, blocks,
                              stage.importance.model_dump(), stage.targets().model_dump(), s.scores, tracking, run)
        small = t.slim(stage.name, current, scores, stage.targets().model_dump(), stage.importance.model_dump(), s.pruned, tracking, run)
        student = (t.distill(stage.name, small, teacher, blocks, stage.distill.model_dump(mode="json"), s.model, tracking, run)
                   if stage.distill else small)
        metrics = t.evaluate(stage.name, student, blocks, stage.eval.model_dump(), tracking, run)
        version = t.register_stage_model(cfg.name, stage.name, student, current, tracking, run)
        rows.append(stage_row(stage.name, small, student, scores, metrics, run, version))
        current = {**student, "version": version}

    return t.summarize(cfg.model_dump(mode="json"), rows, tracking, parent)
