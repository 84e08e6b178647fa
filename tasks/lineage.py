"""MLflow runs of a pipeline: one parent run, one nested run per stage, registered models.

Runs are keyed by what they describe (the resolved config and the fingerprints of the
teacher and data for the parent; the stage's settings and input fingerprints for a
stage), so a cached re-run of the same pipeline finds and reuses the same runs instead
of creating empty ones, and a stage whose work is reused keeps its one run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from slimmoe.io.atomic import atomic_write_text
from slimmoe.pipeline.schema import PipelineConfig, StageConfig
from slimmoe.pipeline.steps import ModelRef, QuantizeEngine, TokenBlocks
from slimmoe.quantize import QuantizeConfig
from tasks.steps import artifact_key, tracker
from tasks.tracking import TrackingSettings

KEY_TAG = "slimmoe.key"
SUMMARY_FILE = "summary.json"
# Stage settings that change no result of the stage's run: asking for an export or a
# quantization later keeps the same runs (each export names its folder in a
# ``slimmoe.export.<engine>`` tag; a quantization has its own run, :func:`start_quantize_run`).
NOT_RUN_PARAMS = ("export", "quantize")


def run_key(*parts) -> str:
    """The tag that finds a run again on a re-run or resume (hash of what defines the run)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def find_run(tr, key: str) -> str | None:
    """The newest run tagged with ``key``; None when there is none yet."""
    runs = tr.client.search_runs([tr.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1,
                                 order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


@task(name="start-pipeline-run", cache_policy=NO_CACHE)
def start_pipeline_run(config: PipelineConfig, teacher: ModelRef, blocks: TokenBlocks,
                       tracking: TrackingSettings) -> str:
    tr = tracker(tracking)
    params = config.model_dump(mode="json", exclude={"stages": {"__all__": set(NOT_RUN_PARAMS)}})
    key = run_key(params, teacher.fingerprint, blocks.fingerprint)
    return find_run(tr, key) or tr.start_pipeline(
        config.name, params, tags={KEY_TAG: key, "slimmoe.teacher": teacher.path})


@task(name="start-stage-run", cache_policy=NO_CACHE)
def start_stage_run(parent_run_id: str, stage: StageConfig, model: ModelRef, teacher: ModelRef, blocks: TokenBlocks,
                    tracking: TrackingSettings) -> str:
    tr = tracker(tracking)
    params = stage.model_dump(mode="json", exclude=set(NOT_RUN_PARAMS))
    key = run_key(params, model.fingerprint, teacher.fingerprint, blocks.fingerprint)
    return find_run(tr, key) or tr.start_stage(
        parent_run_id, stage.name, params, tags={KEY_TAG: key, "slimmoe.input_model": model.path})


@task(name="start-quantize-run", cache_policy=NO_CACHE)
def start_quantize_run(parent_run_id: str, stage: str, settings: QuantizeConfig, engine: QuantizeEngine,
                       model: ModelRef, tracking: TrackingSettings) -> str:
    """The nested run (a child of the pipeline's run, like a stage's) of a stage's quantization,
    named ``<stage>-<scheme>``; keyed by the settings, the engine and the stage model's content,
    never llm-compressor's path."""
    tr = tracker(tracking)
    params = {**settings.cache_identity(), "stage": stage, "llmcompressor": engine.versions}
    key = run_key(params, engine.cache_identity(), model.fingerprint)
    return find_run(tr, key) or tr.start_stage(
        parent_run_id, f"{stage}-{settings.scheme}", params,
        tags={KEY_TAG: key, "slimmoe.kind": "quantize", "slimmoe.input_model": model.path})


@task(name="register-quantized-model", cache_policy=NO_CACHE)
def register_quantized_model(pipeline: str, name: str, model: ModelRef, parent: ModelRef,
                             parent_version: str | None, tracking: TrackingSettings, run_id: str) -> str | None:
    """A quantized stage model as its own version ``name`` (``<stage>-<scheme>``), its parent the
    stage's version, as :func:`register_stage_model` registers a stage; but as the checkpoint's
    files (compressed-tensors, what vLLM serves), not an MLflow Model of the transformers
    flavour, which cannot save it (:func:`tasks.mlflow_model.save_checkpoint_files`)."""
    return register_stage_model.fn(pipeline, name, model, parent, parent_version, tracking, run_id, files_only=True)


@task(name="register-stage-model", cache_policy=NO_CACHE)
def register_stage_model(pipeline: str, stage: str, model: ModelRef, parent: ModelRef, parent_version: str | None,
                         tracking: TrackingSettings, run_id: str, files_only: bool = False) -> str | None:
    """A model-registry version per stage (an MLflow Model, transformers flavour), tagged with
    the model it was made from and described by its sizes, metrics and parent."""
    tr = tracker(tracking)
    version = None
    if tracking.register_models:
        metrics = tr.client.get_run(run_id).data.metrics
        version = tr.register_model(pipeline, model.path, run_id, tags={
            "stage": stage, "fingerprint": model.fingerprint, "parent_model": parent.path,
            "parent_version": parent_version or "teacher"},
            description=version_description(pipeline, stage, metrics, parent.path, parent_version),
            files_only=files_only)
    tr.finish(run_id)
    return version


def version_description(pipeline: str, stage: str, metrics: dict, parent_path: str,
                        parent_version: str | None) -> str:
    """A model version's description: sizes, held-out metrics (the stage run's ``eval/...``,
    the numbers summary.json holds) and the model it was made from."""
    def num(key: str, fmt: str) -> str:
        v = metrics.get(f"eval/{key}")
        return "not measured" if v is None else format(v, fmt)

    parent = (f"{pipeline} version {parent_version} ({parent_path})" if parent_version
              else f"the teacher ({parent_path})")
    return (f"Stage `{stage}` of pipeline `{pipeline}`, made from {parent}.\n\n"
            f"* total / active parameters: {num('total_params', ',.0f')} / {num('active_params', ',.0f')}\n"
            f"* perplexity: {num('perplexity', '.6g')}\n"
            f"* KL(teacher || model): {num('kl_to_teacher', '.6g')} nats/token\n")


@task(name="summarize", cache_policy=NO_CACHE)
def summarize(config: PipelineConfig, rows: list[dict], tracking: TrackingSettings, parent_run_id: str) -> dict:
    """Write ``summary.json``, log the lineage to the parent run, publish a Prefect table."""
    tr = tracker(tracking)
    summary = {"name": config.name, "teacher": config.teacher, "mlflow": {
        "tracking_uri": tracking.uri, "experiment": tracking.experiment, "parent_run_id": parent_run_id,
        "ui": tr.ui_command()}, "stages": rows}
    out = Path(config.output_dir) / SUMMARY_FILE
    atomic_write_text(out, json.dumps(summary, indent=1), point="summary:write")
    tr.log_summary(parent_run_id, rows)
    tr.finish(parent_run_id)
    create_table_artifact(key=artifact_key(config.name, "summary"), table=rows,
                          description="Teacher and every stage: sizes, parameters, perplexity, tokens")
    lineage = " -> ".join(r["stage"] for r in rows)
    create_markdown_artifact(key=artifact_key(config.name, "lineage"), markdown=(
        f"## {config.name}\n\nLineage: {lineage}\n\nMLflow: [parent run]({tr.run_url(parent_run_id)}) "
        f"(`{tr.ui_command()}`)\n\nSummary: `{out}`\n"))
    return summary
