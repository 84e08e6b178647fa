"""The offline demo teacher: a BPE tokenizer and a small phimoe MoE trained from scratch
on the bundled corpus with the distillation loop's LM loss, saved as an HF checkpoint.

    slimmoe demo                                  # trains it first, then compresses it
    prefect deployment run teacher/demo           # through a work pool (deployments/)
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from slimmoe.pipeline.demo_teacher import TeacherConfig, teacher_fingerprint, train_teacher
from tasks.caching import bind_cache, step_policy
from tasks.steps import tracker
from tasks.tracking import metric_name


@task(name="train-teacher", retries=1, cache_policy=step_policy("slimmoe.pipeline.demo_teacher", "slimmoe.distill.loop", "slimmoe.io.tokenizer"))
def train_teacher_task(config: dict, corpus_fingerprint: str, output_dir: str, tracking: dict) -> dict:
    """Train (or resume, or find finished) the teacher; log it to its own MLflow run."""
    tr = tracker(tracking)
    run_id = tr.start_pipeline("teacher", config, tags={"slimmoe.kind": "teacher"})
    result = train_teacher(TeacherConfig(**config), output_dir,
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
    out = Path(output_dir)
    tracking = {"uri": tracking_uri or f"sqlite:///{out.resolve().parent / 'mlflow.db'}", "experiment": experiment,
                "artifact_location": (out.resolve().parent / "mlartifacts").as_uri()}
    train = bind_cache(train_teacher_task, out.parent)  # cache beside the teacher folder, not inside
    return train(config.model_dump(mode="json"), teacher_fingerprint(config), str(out), tracking)
