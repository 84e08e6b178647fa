"""One Prefect task per pipeline step, each wrapping one call of ``slimmoe.pipeline.steps``.

Inputs and outputs are typed: the step records of ``slimmoe.pipeline.steps.refs`` (path +
content fingerprint + counts), the settings models of the config, output ``Path``s and the
tracking settings, so a reader can follow them and ``tasks.caching`` hashes them by what
they are. Each task logs what it produced to the stage's MLflow run (ids passed
explicitly: MLflow's active run is thread-local) and leaves a Prefect artifact.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from slimmoe.config import DistillConfig, ImportanceConfig, LaunchConfig, SlimTargets
from slimmoe.errors import UserError
from slimmoe.export import export_model
from slimmoe.pipeline import steps as library
from slimmoe.pipeline.schema import DataConfig, EvalConfig
from slimmoe.pipeline.steps import (
    DistilledModel,
    ImportanceRef,
    ModelRef,
    QuantizedModel,
    QuantizeEngine,
    SlimmedModel,
    TokenBlocks,
)
from slimmoe.pipeline.steps.launched import run_spec, write_spec
from slimmoe.quantize import QuantizeConfig
from tasks.caching import step_policy
from tasks.tracking import Tracker, TrackingSettings, metric_key, metric_name

FAULT_ENV = "SLIMMOE_INJECT_FAULT_AT_STEP"  # tests: fail the distill task once at this step
NODE_DEPLOYMENT = "node/default"  # flows/node.py: a step's share on another node


def tracker(tracking: TrackingSettings) -> Tracker:
    return Tracker(tracking.uri, tracking.experiment, tracking.artifact_location)


class LiveMetrics:
    """Training metrics sent to MLflow every few seconds in one batch, not one call per step:
    a call costs 10-20 ms on sqlite, which at hundreds of steps would slow training.

    A run resumed after a crash repeats the steps after its last checkpoint (bit-identically);
    steps the run's MLflow history already holds are not logged twice.
    """

    def __init__(self, tr: Tracker, run_id: str, every_s: float = 5.0):
        self.tr, self.run_id, self.every_s = tr, run_id, every_s
        self.rows: list[tuple[int, dict]] = []
        self.last = time.monotonic()
        self.logged = tr.last_steps(run_id)

    def add(self, step: int, metrics: dict) -> None:
        named = {metric_name(k): v for k, v in metrics.items()}
        fresh = {k: v for k, v in named.items() if step > self.logged.get(metric_key(k), -1)}
        if fresh:
            self.rows.append((step, fresh))
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.tr.log_metric_rows(self.run_id, self.rows)
        self.rows, self.last = [], time.monotonic()


@contextmanager
def following(path: Path, live: LiveMetrics, every_s: float = 2.0) -> Iterator[None]:
    """While the block runs, feed the metrics lines other processes append to ``path`` to
    ``live`` (a step launched across processes has no callback in this process)."""
    stop, seen = threading.Event(), [0]

    def read() -> None:
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        for line in lines[seen[0]:]:
            try:
                rec = json.loads(line)
            except ValueError:  # a line being written; read it next time
                break
            live.add(int(rec.pop("step")), rec)
            seen[0] += 1

    def loop() -> None:
        while not stop.wait(every_s):
            read()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        read()


def run_across(launch: LaunchConfig, fn, kwargs: dict, work_dir: Path, metrics_file: Path | None = None):
    """``fn(**kwargs)`` in the processes of ``launch``; on several nodes, the other nodes' shares
    are started as runs of :data:`NODE_DEPLOYMENT` on the work queues ``node-1`` ... (each
    served by a worker on that node) before this node's own."""
    spec, result = write_spec(fn, kwargs, work_dir, metrics_file)
    if launch.nnodes > 1:
        start_other_nodes(launch, spec, result)
    return run_spec(launch.model_copy(update={"node_rank": 0}), spec, result)


def start_other_nodes(launch: LaunchConfig, spec: Path, result: Path) -> list:
    from prefect.deployments import run_deployment

    from slimmoe.io.loading import load_policy

    policy = load_policy()
    runs = []
    for r in range(1, launch.nnodes):
        params = {"spec": str(spec), "result": str(result),
                  "launch": launch.model_copy(update={"node_rank": r}).model_dump(mode="json"),
                  "trust_remote_code": policy.trust_remote_code, "allow_pickle": policy.allow_pickle}
        runs.append(run_deployment(NODE_DEPLOYMENT, parameters=params, work_queue_name=f"node-{r}", timeout=0))
    return runs


def artifact_key(*parts: str) -> str:
    return "-".join(p.lower().replace("_", "-").replace(".", "-") for p in parts)[:100]


@task(name="prepare-data", cache_policy=step_policy())
def prepare_data(data: DataConfig, teacher: ModelRef, out_dir: Path) -> TokenBlocks:
    """Tokenise and pack the corpus with the teacher's tokenizer (once per content)."""
    return library.prepare_data(data.train, teacher.path, out_dir, data.seq_len, eval_path=data.eval,
                                eval_fraction=data.eval_fraction, text_field=data.text_field,
                                max_blocks=data.max_blocks, name=data.name, split=data.split,
                                data_files=data.data_files, streaming=data.streaming, max_tokens=data.max_tokens,
                                num_proc=data.num_proc)


@task(name="importance", task_run_name="importance-{stage}", cache_policy=step_policy())
def importance(stage: str, model: ModelRef, teacher: ModelRef | None, blocks: TokenBlocks, settings: ImportanceConfig,
               targets: SlimTargets, out_path: Path, tracking: TrackingSettings, run_id: str,
               launch: LaunchConfig = LaunchConfig()) -> ImportanceRef:
    """Score the current model's structures against the original teacher (itself when None),
    in the processes ``launch`` asks for."""
    kwargs = dict(model_dir=model.path, teacher_dir=teacher.path if teacher else None, blocks_path=blocks.path,
                  cfg=settings, targets=targets, out_path=out_path)
    if launch.is_multiprocess():
        res = run_across(launch, library.score, {**kwargs, "progress": False}, Path(out_path).parent)
    else:
        res = library.score(**kwargs)
    tr = tracker(tracking)
    tr.log_dataset(run_id, "calibration", blocks.source, blocks.fingerprint, min(settings.samples, blocks.train_blocks),
                   blocks.seq_len, "calibration")
    tr.log_importance_histograms(run_id, res.path)
    return res


@task(name="slim", task_run_name="slim-{stage}", cache_policy=step_policy())
def slim(stage: str, model: ModelRef, scores: ImportanceRef, targets: SlimTargets, settings: ImportanceConfig,
         out_dir: Path, tracking: TrackingSettings, run_id: str) -> SlimmedModel:
    """Cut the model to the stage's sizes by the scores."""
    res = library.slim(model.path, scores.path, targets, out_dir, score_info=settings.model_dump())
    tracker(tracking).log_metrics(run_id, {"slim/total_params": res.total_params, "slim/active_params": res.active_params})
    return res


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry crashes and transient faults, not bad settings, NaN losses or missing disk/memory:
    those would fail again the same way (a ``UserError`` names what to change)."""
    return not isinstance(getattr(state, "data", None), UserError)


@task(name="distill", task_run_name="distill-{stage}", retries=2, retry_delay_seconds=1,
      retry_condition_fn=retry_unless_user_error, cache_policy=step_policy())
def distill(stage: str, student: ModelRef, teacher: ModelRef, blocks: TokenBlocks, settings: DistillConfig,
            out_dir: Path, tracking: TrackingSettings, run_id: str, launch: LaunchConfig = LaunchConfig()) -> DistilledModel:
    """Distil from the original teacher, in the processes ``launch`` asks for. A retry resumes
    from the newest checkpoint in ``out_dir``."""
    tr = tracker(tracking)
    fault_at = int(os.environ.get(FAULT_ENV, "0") or 0)
    marker = Path(out_dir).with_name(Path(out_dir).name + ".fault-injected")

    live = LiveMetrics(tr, run_id)

    def on_metrics(step: int, metrics: dict) -> None:
        live.add(step, metrics)
        if fault_at and step == fault_at and not marker.exists():
            marker.touch()
            live.flush()
            raise RuntimeError(f"injected fault at step {step} ({FAULT_ENV})")

    kwargs = dict(student_dir=student.path, teacher_dir=teacher.path, blocks_path=blocks.path, cfg=settings,
                  out_dir=out_dir)
    metrics_file = Path(out_dir).with_name(Path(out_dir).name + ".metrics.jsonl")
    try:
        if launch.is_multiprocess():
            metrics_file.unlink(missing_ok=True)
            with following(metrics_file, live):
                res = run_across(launch, library.distill_stage, kwargs, Path(out_dir).parent, metrics_file)
        else:
            res = library.distill_stage(**kwargs, metrics_callback=on_metrics)
    finally:
        live.flush()
    tr.log_dataset(run_id, "train", blocks.source, blocks.fingerprint, blocks.train_blocks, blocks.seq_len, "train")
    tr.log_loss_curve(run_id, str(Path(out_dir) / "losses.jsonl"))
    return res


@task(name="evaluate", task_run_name="evaluate-{stage}", cache_policy=step_policy())
def evaluate(stage: str, model: ModelRef, blocks: TokenBlocks, settings: EvalConfig, tracking: TrackingSettings,
             run_id: str, teacher: ModelRef | None = None) -> dict:
    """Held-out perplexity and KL to the teacher, total / active parameters, throughput,
    peak memory and lm-eval scores of the stage's model."""
    metrics = library.evaluate_stage(model.path, blocks.path, teacher_dir=teacher.path if teacher else None,
                                     **settings.model_dump())
    tr = tracker(tracking)
    if blocks.eval_blocks:
        tr.log_dataset(run_id, "eval", blocks.source, blocks.fingerprint, blocks.eval_blocks, blocks.seq_len, "eval")
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tr.log_metrics(run_id, {(k if "/" in k else f"eval/{k}"): v for k, v in numeric.items()})
    create_table_artifact(key=artifact_key("stage", stage, "metrics"), table=[{"stage": stage, **metrics}],
                          description=f"Sizes and metrics of stage {stage}")
    kl = metrics.get("kl_to_teacher")
    create_markdown_artifact(
        key=artifact_key("stage", stage, "summary"),
        markdown=f"### Stage `{stage}`\n\n* model: `{model.path}`\n* perplexity: {metrics['perplexity']:.3f}\n"
                 + (f"* KL(teacher || model): {kl:.4f} nats/token\n" if kl is not None else "")
                 + f"* total / active parameters: {metrics['total_params']:,} / {metrics['active_params']:,}\n"
                 f"* MLflow run: [{run_id}]({tr.run_url(run_id)})\n",
    )
    return metrics


EXPORT_TAG = "slimmoe.export.{engine}"  # the stage run's tag naming the folder exported for an engine


@task(name="export", task_run_name="export-{stage}-{engine}", cache_policy=step_policy())
def export(stage: str, model: ModelRef, engine: str, out_dir: Path, tracking: TrackingSettings, run_id: str) -> dict:
    """What ``engine`` loads of the stage's final model, written to ``out_dir`` as
    ``slimmoe export --for ENGINE`` writes it (hard links to the model's files where the file
    system allows). The stage's run gets a tag naming the folder; nothing is uploaded (the
    registered version already holds the weights)."""
    out = export_model(model.path, out_dir, engine)
    tracker(tracking).client.set_tag(run_id, EXPORT_TAG.format(engine=engine), str(out))
    return {"engine": engine, "path": str(out)}


@task(name="quantize", task_run_name="quantize-{stage}", cache_policy=step_policy())
def quantize(stage: str, model: ModelRef, settings: QuantizeConfig, engine: QuantizeEngine, out_dir: Path,
             tracking: TrackingSettings, run_id: str) -> QuantizedModel:
    """A compressed-tensors checkpoint of the stage's final model in ``out_dir``, made by
    llm-compressor in its own environment (``engine.python``). Keyed by the model's content, the
    settings and the engine's worker hash and versions, never the interpreter's path
    (``QuantizeConfig.cache_identity``, ``QuantizeEngine.cache_identity``). What was quantized
    goes to the quantize run as metrics and ``quantize.json``."""
    res = library.quantize_stage(model.path, out_dir, settings, python=engine.python)
    tr = tracker(tracking)
    counts = ("safetensors_bytes", "quantized_weights", "quantized_expert_weights", "unquantized_expert_weights")
    tr.log_metrics(run_id, {f"quantize/{k}": res.report[k] for k in counts if k in res.report})
    tr.client.log_dict(run_id, res.report, "quantize.json")
    return res
