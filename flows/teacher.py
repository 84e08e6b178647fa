"""The offline demo teacher: a BPE tokenizer and a small phimoe MoE trained from scratch
on the bundled corpus with the distillation loop's LM loss, saved as an HF checkpoint.

    slimmoe demo                                  # trains it first, then compresses it
    prefect deployment run teacher/demo           # through a work pool (deployments/)
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from slimmoe.pipeline.demo_teacher import TeacherConfig, teacher_fingerprint, train_teacher
from tasks.caching import cached, open_step_cache, step_policy
from tasks.steps import tracker
from tasks.tracking import TrackingSettings, metric_name


@task(name="train-teacher", retries=1, cache_policy=step_policy())
def train_teacher_task(config: TeacherConfig, corpus_fingerprint: str, output_dir: Path,
                       tracking: TrackingSettings) -> dict:
    """Train (or resume, or find finished) the teacher; log it to its own MLflow run."""
    tr = tracker(tracking)
    params = config.model_dump(mode="json")
    run_id = tr.start_pipeline("teacher", params, tags={"slimmoe.kind": "teacher"})
    result = train_teacher(config, output_dir,
                           metrics_callback=lambda step, m: tr.log_metrics(run_id, {metric_name(k): v for k, v in m.items()}, step))
    tr.log_metrics(run_id, {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    losses = Path(output_dir) / "losses.jsonl"
    if losses.exists():
        tr.log_loss_curve(run_id, str(losses))
    tr.finish(run_id)
    create_table_artifact(key="demo-teacher", table=[{k: v for k, v in result.items() if not isinstance(v, dict)}],
                          description="The offline demo teacher")
    return {**result, "mlflow_run_id": run_id}


@flow(name="teacher", log_prints=True)
def teacher(config: TeacherConfig = TeacherConfig(), output_dir: str = "outputs/demo/teacher",
            tracking_uri: str | None = None, experiment: str = "slimmoe-demo") -> dict:
    out = Path(os.path.abspath(output_dir))
    config = config.model_copy(update={"corpus": Path(os.path.abspath(config.corpus))})
    tracking = TrackingSettings.for_output(tracking_uri, experiment, out.parent)
    open_step_cache(out.parent)  # the cache lies beside the teacher folder, not inside
    return cached(train_teacher_task, out.parent)(config, teacher_fingerprint(config), out, tracking)
