"""Prefect tasks of the ablation flow: the scratch init (a cached step), its MLflow runs
(one parent, one per arm and seed) and the report (files, MLflow artifacts, Prefect artifacts)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from slimmoe.pipeline import report, scratch
from slimmoe.pipeline.ablation_schema import AblationConfig
from slimmoe.pipeline.schema import StageConfig
from slimmoe.pipeline.steps import ModelRef, TokenBlocks
from tasks.caching import step_policy
from tasks.lineage import KEY_TAG, find_run, run_key
from tasks.steps import artifact_key, tracker
from tasks.tracking import TrackingSettings


@task(name="scratch-init", task_run_name="scratch-init-seed{seed}", cache_policy=step_policy())
def scratch_init(shape: ModelRef, seed: int, out_dir: Path) -> ModelRef:
    """Random weights at the shape of ``shape``'s checkpoint (the from-scratch baseline)."""
    return scratch.init_scratch(shape.path, out_dir, seed)


@task(name="start-ablation-run", cache_policy=NO_CACHE)
def start_ablation_run(config: AblationConfig, teacher: ModelRef, blocks: TokenBlocks,
                       tracking: TrackingSettings) -> str:
    tr = tracker(tracking)
    params = config.model_dump(mode="json")
    key = run_key("ablation", params, teacher.fingerprint, blocks.fingerprint)
    return find_run(tr, key) or tr.start_pipeline(
        config.name, params, tags={KEY_TAG: key, "slimmoe.kind": "ablation", "slimmoe.teacher": teacher.path})


@task(name="start-arm-run", task_run_name="start-arm-run-{arm}-seed{seed}", cache_policy=NO_CACHE)
def start_arm_run(parent_run_id: str, name: str, arm: str, seed: int, stages: list[StageConfig], teacher: ModelRef,
                  blocks: TokenBlocks, tracking: TrackingSettings) -> str:
    """A run per arm and seed, nested under the ablation's run; stage runs nest under it."""
    tr = tracker(tracking)
    key = run_key("arm", name, arm, seed, [s.model_dump(mode="json") for s in stages], teacher.fingerprint,
                  blocks.fingerprint)
    params = {"arm": arm, "seed": seed, "stages": [s.name for s in stages],
              "tokens": sum(s.distill.tokens if s.distill else 0 for s in stages)}
    return find_run(tr, key) or tr.start_stage(parent_run_id, f"{arm}-seed{seed}", params, tags={
        KEY_TAG: key, "slimmoe.kind": "arm", "arm": arm, "seed": str(seed)})


@task(name="finish-arm-run", task_run_name="finish-arm-run-{arm}-seed{seed}", cache_policy=NO_CACHE)
def finish_arm_run(arm: str, seed: int, result: dict, teacher_ppl: float, tracking: TrackingSettings,
                   run_id: str) -> None:
    tr = tracker(tracking)
    tr.log_metrics(run_id, {"eval/perplexity": result["perplexity"], "eval/perplexity_over_teacher":
                            result["perplexity"] / teacher_ppl, "total_params": result["total_params"],
                            "active_params": result["active_params"], "tokens": result["tokens"]})
    tr.finish(run_id)


@task(name="ablation-report", cache_policy=NO_CACHE)
def publish_report(out_dir: Path, runs: list[dict], teacher: dict, meta: dict, tracking: TrackingSettings,
                   parent_run_id: str) -> dict:
    """report.md / report.json / PNGs in ``out_dir``, as artifacts of the parent MLflow run
    and as a Prefect markdown + table artifact."""
    res = report.write_report(out_dir, runs, teacher, meta)
    tr = tracker(tracking)
    for path in res["paths"].values():
        tr.client.log_artifact(parent_run_id, path, "report")
    for row in res["arms"]:
        tr.log_metrics(parent_run_id, {f"{row['arm']}/perplexity_mean": row["perplexity_mean"],
                                       f"{row['arm']}/perplexity_std": row["perplexity_std"],
                                       f"{row['arm']}/ratio_mean": row["ratio_mean"]})
    tr.finish(parent_run_id)
    link = f"\n\nMLflow: [ablation run]({tr.run_url(parent_run_id)}) (`{tr.ui_command()}`); files: `{Path(out_dir)}`\n"
    create_markdown_artifact(key=artifact_key(meta.get("name", "ablation"), "report"), markdown=res["markdown"] + link,
                             description="Ablation: every arm, mean and spread over seeds")
    create_table_artifact(key=artifact_key(meta.get("name", "ablation"), "arms"),
                          table=[{k: v for k, v in r.items() if k != "seeds"} for r in res["arms"]],
                          description="Ablation arms: perplexity mean / std over seeds")
    return {"arms": res["arms"], "paths": res["paths"], "mlflow_run_id": parent_run_id}


@task(name="grid-report", cache_policy=NO_CACHE)
def publish_grid_report(out_dir: Path, runs: list[dict], teacher: dict, meta: dict, tracking: TrackingSettings,
                        parent_run_id: str) -> dict:
    """The grid's report.md / report.json / plot in ``out_dir`` (slimmoe.pipeline.grid_report), as
    artifacts of the parent MLflow run and as a Prefect markdown artifact."""
    from slimmoe.pipeline.grid_report import write_grid_report

    res = write_grid_report(out_dir, runs, teacher, meta)
    tr = tracker(tracking)
    for path in res["paths"].values():
        tr.client.log_artifact(parent_run_id, path, "report")
    tr.finish(parent_run_id)
    link = f"\n\nMLflow: [grid run]({tr.run_url(parent_run_id)}) (`{tr.ui_command()}`); files: `{Path(out_dir)}`\n"
    create_markdown_artifact(key=artifact_key(meta.get("name", "grid"), "report"), markdown=res["markdown"] + link,
                             description="Ablation grid: a table per budget, ppl / teacher over seeds")
    return {"cells": res["cells"], "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs],
            "paths": res["paths"]}
