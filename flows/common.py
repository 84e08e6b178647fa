"""What the flows share: resolving a config, binding tasks to the output folder's cache,
the folder layout of a stage, and the rows of ``summary.json``."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from prefect import task
from prefect.cache_policies import NO_CACHE

from slimmoe.arch import get_adapter
from slimmoe.io.atomic import is_complete
from slimmoe.io.loading import load_config, loading_policy
from slimmoe.io.lock import output_lock
from slimmoe.pipeline import steps as stages
from slimmoe.pipeline.resolve import expand_schedule
from slimmoe.pipeline.schema import PipelineConfig
from slimmoe.prune.plan import source_sizes
from tasks import lineage, steps
from tasks.caching import bind_cache

CACHED_STEPS = ("prepare_data", "importance", "slim", "distill", "evaluate")
RUN_STEPS = ("start_pipeline_run", "start_stage_run", "register_stage_model", "summarize")


@task(name="fingerprint-teacher", cache_policy=NO_CACHE)
def fingerprint(path: str) -> dict:
    return stages.model_ref(path)


@contextmanager
def flow_guard(config, what: str):
    """Inside a flow, also when a work pool starts it: the config's safety switches, and one
    writer per output folder (re-entering the lock a `slimmoe` command already holds)."""
    with loading_policy(config.trust_remote_code, config.allow_pickle), \
            output_lock(config.output_dir, what, reentrant=True):
        yield


def resolve_pipeline(config: PipelineConfig) -> tuple[PipelineConfig, dict]:
    """Expand an automatic schedule (printing it) and fix the tracking settings."""
    teacher_cfg = load_config(config.teacher, "teacher")
    get_adapter(teacher_cfg)  # a dense or unsupported teacher fails here, before any work
    cfg = expand_schedule(config, teacher_cfg)
    if config.schedule is not None:
        from slimmoe.prune.schedule import format_schedule

        print("automatic schedule:\n" + format_schedule([s.targets() for s in cfg.stages], teacher_cfg))
    if any(s.has_param_target() for s in cfg.stages):  # parameter targets -> sizes (slimmoe.prune.strategies)
        from slimmoe.pipeline.resolve import format_stages, resolve_stages

        cfg = resolve_stages(cfg, teacher_cfg)
        print("sizes chosen for the parameter targets:\n" + format_stages(cfg, teacher_cfg))
    out = Path(cfg.output_dir).resolve()
    tracking = {"uri": cfg.tracking_uri(), "experiment": cfg.tracking.experiment,
                "artifact_location": (out / "mlartifacts").as_uri(), "register_models": cfg.tracking.register_models}
    return cfg, tracking


def pipeline_tasks(output_dir: Path, refresh: bool = False) -> SimpleNamespace:
    """The flow's tasks, with cached steps storing keys and results under ``output_dir``."""
    bound = {name: bind_cache(getattr(steps, name), output_dir, refresh) for name in CACHED_STEPS}
    bound.update({name: getattr(lineage, name) for name in RUN_STEPS})
    return SimpleNamespace(fingerprint=fingerprint, **bound)


def rerun_if_missing(task, *paths: str):
    """The task, recomputing instead of using its cache when an output its result names is
    not complete: a file that is gone, or a folder without its completion marker.

    A cached result is a record that points at files; deleting a stage folder (but not
    ``.prefect-cache``), or a crash that left a folder half written, must not hand a
    missing or partial path to the next step.
    """
    return task if all(is_complete(p) for p in paths) else task.with_options(refresh_cache=True)


@dataclass
class StageOutputs:
    """Where a stage writes: ``<output_dir>/<stage>/{importance.pt, pruned/, model/}``
    (a stage without distillation slims straight into ``model/``)."""

    root: Path
    stage: str

    @property
    def scores(self) -> str:
        return str(self.root / self.stage / "importance.pt")

    @property
    def pruned(self) -> str:
        return str(self.root / self.stage / "pruned")

    @property
    def model(self) -> str:
        return str(self.root / self.stage / "model")


def teacher_row(path: str, metrics: dict, run_id: str) -> dict:
    config = load_config(path, "teacher")
    sizes = source_sizes(get_adapter(config), config)
    return {"stage": "teacher", "model": path, **_sizes(sizes), **_metrics(metrics), "tokens": 0,
            "calibration_tokens": 0, "mlflow_run_id": run_id, "model_version": None}


def stage_row(name: str, small: dict, student: dict, scores: dict, metrics: dict, run_id: str, version) -> dict:
    distilled = student.get("distill") or {}
    return {"stage": name, "model": student["path"], **_sizes(small["target"]), **_metrics(metrics),
            "tokens": int(distilled.get("tokens", 0)), "calibration_tokens": int(scores.get("calibration_tokens", 0)),
            "distill_steps": distilled.get("steps"), "resumed_from_step": distilled.get("resumed_from_step"),
            "mlflow_run_id": run_id, "model_version": version}


def _sizes(s: dict) -> dict:
    keys = ("expert_intermediate_size", "num_experts", "num_experts_per_tok", "num_key_value_heads", "num_attention_heads")
    return {k: s.get(k) for k in keys}


def _metrics(m: dict) -> dict:
    """The contract's four keys, then every other number the evaluate step measured
    (KL to the teacher, throughput at each batch size, peak memory, lm-eval scores)."""
    keys = ("total_params", "active_params", "perplexity", "tokens_per_second")
    extra = {k: v for k, v in m.items() if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {**{k: m[k] for k in keys}, **extra}
