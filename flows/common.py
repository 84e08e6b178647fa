"""What the flows share: the safety switches and folder lock inside a flow, the teacher's
fingerprint, the tracking settings, the folder layout of a stage, and the rows of
``summary.json``."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from slimmoe.arch import get_adapter
from slimmoe.io.loading import load_config, loading_policy
from slimmoe.io.lock import output_lock
from slimmoe.pipeline.steps import DistilledModel, ImportanceRef, ModelRef, QuantizedModel, SlimmedModel
from slimmoe.prune.plan import source_sizes
from tasks.tracking import TrackingSettings


@task(name="fingerprint-teacher", cache_policy=NO_CACHE)
def fingerprint(path: str) -> ModelRef:
    return ModelRef.of(path)


@contextmanager
def flow_guard(config, what: str):
    """Inside a flow, also when a work pool starts it: the config's safety switches, and one
    writer per output folder (re-entering the lock a `slimmoe` command already holds)."""
    with loading_policy(config.trust_remote_code, config.allow_pickle), \
            output_lock(config.output_dir, what, reentrant=True):
        yield


def tracking_settings(config) -> TrackingSettings:
    """The tracking settings of a pipeline or ablation config, built once per flow."""
    t = config.tracking
    return TrackingSettings.for_output(t.uri, t.experiment, config.output_dir, t.register_models)


@dataclass
class StageOutputs:
    """Where a stage writes: ``<root>/<stage>/{importance.pt, pruned/, model/, export/<engine>/, quantized/}``
    (a stage without distillation slims straight into ``model/``); ``root`` also holds the
    step cache."""

    root: Path
    stage: str

    @property
    def scores(self) -> Path:
        return self.root / self.stage / "importance.pt"

    @property
    def pruned(self) -> Path:
        return self.root / self.stage / "pruned"

    @property
    def model(self) -> Path:
        return self.root / self.stage / "model"

    @property
    def quantized(self) -> Path:
        return quantized_dir(self.model)


def quantized_dir(model_dir: Path) -> Path:
    """Where a stage's ``quantize:`` writes its compressed-tensors checkpoint: ``<stage>/quantized/``."""
    return Path(model_dir).parent / "quantized"


def export_dir(model_dir: Path, engine: str) -> Path:
    """Where a stage's export for ``engine`` goes: ``<stage>/export/<engine>/``, beside ``model/``."""
    return Path(model_dir).parent / "export" / engine


def teacher_row(path: str, metrics: dict, run_id: str) -> dict:
    config = load_config(path, "teacher")
    sizes = source_sizes(get_adapter(config), config)
    return {"stage": "teacher", "model": path, **_sizes(sizes), **_metrics(metrics), "tokens": 0,
            "calibration_tokens": 0, "mlflow_run_id": run_id, "model_version": None}


def stage_row(name: str, small: SlimmedModel, student: ModelRef, scores: ImportanceRef | None, metrics: dict,
              run_id: str, version: str | None) -> dict:
    distilled = student.distill if isinstance(student, DistilledModel) else {}
    return {"stage": name, "model": student.path, **_sizes(small.target), **_metrics(metrics),
            "tokens": int(distilled.get("tokens", 0)), "calibration_tokens": scores.calibration_tokens if scores else 0,
            "distill_steps": distilled.get("steps"), "resumed_from_step": distilled.get("resumed_from_step"),
            "mlflow_run_id": run_id, "model_version": version}


def quantized_entry(model: QuantizedModel, metrics: dict, run_id: str, version: str | None, source: str) -> dict:
    """A stage row's ``quantized`` entry: the scheme, the folder, its weights' bytes on disk next
    to the unquantized model's, its held-out perplexity, its MLflow run and registered version."""
    def weights(folder) -> int:
        return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))

    return {"scheme": model.scheme, "path": model.path, "bytes": weights(model.path), "source_bytes": weights(source),
            "perplexity": metrics.get("perplexity"), "kl_to_teacher": metrics.get("kl_to_teacher"),
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
