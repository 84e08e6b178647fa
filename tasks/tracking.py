"""MLflow lineage for the slimmoe Prefect tasks.

MLflow's fluent API keeps the active run in a thread-local, and Prefect runs tasks in
worker threads, so nothing here touches ``mlflow.start_run`` or any active-run state:
every call goes through one ``MlflowClient`` with an explicit run id.

The library (``slimmoe/``) never imports this module; only ``tasks/`` and ``flows/`` do.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# The pipeline must run offline; MLflow 3 otherwise starts a telemetry client at import.
# Opt back in by exporting MLFLOW_DISABLE_TELEMETRY=false.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelOutput, Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import (  # noqa: E402
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_LOGGED_ARTIFACTS,
    MLFLOW_MODEL_VERSIONS,
    MLFLOW_PARENT_RUN_ID,
)
from pydantic import BaseModel  # noqa: E402

from tasks.figures import as_float, importance_figure, loss_figure, read_series  # noqa: E402

# MLflow's limits (mlflow/utils/validation.py).
MAX_KEY, MAX_PARAM_VALUE, MAX_TAG_VALUE, MAX_DIGEST = 250, 6000, 8000, 36
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000

LOCAL_UI = "http://127.0.0.1:5000"
# The experiment tag the MLflow 3 UI reads to choose an experiment's type (and its landing
# tab): without it the UI guesses, and an experiment with no traces opens on the GenAI
# overview. Values and key from the UI bundle shipped in the wheel
# (mlflow/server/js/build/static/js/main.*.js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT =
# "custom_model_development", read from tag "mlflow.experimentKind"); MLflow's own demo sets
# the same key from Python (mlflow/demo/generators/traces.py).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".csv", ".arrow")


def default_uri(output_dir: str | os.PathLike) -> str:
    """``sqlite:///<abs output_dir>/mlflow.db`` (four slashes: an absolute path)."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class TrackingSettings(BaseModel):
    """Where a flow's runs and models go; built once per flow (:meth:`for_output`)."""

    uri: str
    experiment: str
    artifact_location: str | None = None
    register_models: bool = True

    @classmethod
    def for_output(cls, uri: str | None, experiment: str, output_dir: str | os.PathLike,
                   register_models: bool = True) -> "TrackingSettings":
        """``uri`` (default: ``sqlite:///<output_dir>/mlflow.db``), artifacts under ``<output_dir>/mlartifacts``."""
        out = Path(output_dir).resolve()
        return cls(uri=uri or default_uri(out), experiment=experiment,
                   artifact_location=(out / "mlartifacts").as_uri(), register_models=register_models)


def metric_name(key: str) -> str:
    """Name under which a distillation record key is logged: ``loss`` -> ``train/loss``;
    the loop's own held-out pass ``held_out_kl`` -> ``distill/held_out_kl`` (``eval/...``
    names the evaluate step's numbers, measured on other blocks: README, "Evaluation");
    keys that already hold a ``/`` are kept."""
    if "/" in key:
        return key
    if key.startswith("held_out_"):
        return "distill/" + key
    return "train/" + key


def _key(key: Any) -> str:
    """A key MLflow accepts: [/\\w.\\- ] only, no empty/relative path segments, <= 250 chars."""
    s = "".join(c if (c.isalnum() or c in "_-. /") else "_" for c in str(key))
    s = "/".join(p for p in s.split("/") if p not in ("", ".", ".."))
    return (s or "_")[:MAX_KEY]


metric_key = _key  # the name MLflow stores a metric under


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str)
    return str(v)


def _flatten(params: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts (or pydantic models) -> {"a.b.c": "value"}; lists stay one JSON value."""
    if hasattr(params, "model_dump"):
        params = params.model_dump(mode="json")
    out: dict[str, str] = {}
    for k, v in (params or {}).items():
        name = f"{prefix}{k}"
        if hasattr(v, "model_dump"):
            v = v.model_dump(mode="json")
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, name + "."))
        else:
            out[_key(name)] = _value(v)[:MAX_PARAM_VALUE]
    return out


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _quote(s: str) -> str:
    """Quote a value for an MLflow search filter."""
    if "'" not in s:
        return f"'{s}'"
    if '"' not in s:
        return f'"{s}"'
    raise ValueError(f"cannot search for a value holding both quote kinds: {s!r}")


class Tracker:
    """Gets or creates ``experiment`` at ``uri``; all methods take explicit run ids.

    For a sqlite URI the database folder is created and, unless ``artifact_location`` is
    given, artifacts go to ``<db folder>/mlartifacts`` (never the cwd's ./mlruns).
    """

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        self.uri = uri
        if uri.startswith("sqlite:///"):
            db = uri[len("sqlite:///"):].split("?", 1)[0]
            if db and db != ":memory:":
                Path(db).parent.mkdir(parents=True, exist_ok=True)
                if artifact_location is None:
                    artifact_location = str(Path(db).resolve().parent / "mlartifacts")
        if artifact_location is not None and "://" not in artifact_location:
            artifact_location = Path(artifact_location).resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.experiment_id = self._experiment(experiment, artifact_location)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        """Get or create; marked as a model-training experiment unless a kind is already chosen."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location,
                                                     tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
            except MlflowException as e:  # another process created it first
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(name)
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made before slimmoe set it, or by someone else
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return exp.experiment_id

    # ---- runs ----
    def start_pipeline(self, name: str, params: Mapping | Any, tags: Mapping | None = None) -> str:
        """Parent run: flattened params plus the whole resolved config as ``config.json``."""
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"slimmoe.kind": "pipeline", **_str_tags(tags)})
        run_id = run.info.run_id
        self.log_params(run_id, params)
        config = params.model_dump(mode="json") if hasattr(params, "model_dump") else params
        self.client.log_dict(run_id, _jsonable(dict(config or {})), "config.json")
        return run_id

    def start_stage(self, parent_run_id: str, stage: str, params: Mapping | Any,
                    tags: Mapping | None = None) -> str:
        """Nested run (``mlflow.parentRunId``) named after the stage."""
        all_tags = {"slimmoe.kind": "stage", "slimmoe.stage": stage, **_str_tags(tags),
                    MLFLOW_PARENT_RUN_ID: parent_run_id}
        run = self.client.create_run(self.experiment_id, run_name=stage, tags=all_tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, not {status!r}")
        self.client.set_terminated(run_id, status)

    # ---- params and metrics ----
    def log_params(self, run_id: str, params: Mapping | Any) -> None:
        """Params are immutable in MLflow: a key logged again with the same value is skipped;
        with a different value it is kept as tag ``param.<key>`` instead of failing."""
        flat = _flatten(params)
        if not flat:
            return
        existing = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        changed = [RunTag(_key(f"param.{k}"), v[:MAX_TAG_VALUE]) for k, v in flat.items()
                   if k in existing and existing[k] != v]
        for chunk in _chunks(new, PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk)
        for chunk in _chunks(changed, PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk)

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> int:
        """One batched call; None, NaN and non-numbers are skipped. Returns how many were logged."""
        ts, st = int(time.time() * 1000), int(step or 0)
        items = [Metric(_key(k), x, ts, st) for k, v in metrics.items() if (x := as_float(v)) is not None]
        for chunk in _chunks(items, METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)
        return len(items)

    def log_metric_rows(self, run_id: str, rows: list[tuple[int, Mapping[str, Any]]]) -> int:
        """Many steps' metrics in as few batched calls as possible (one call costs ~10-20 ms on sqlite)."""
        ts = int(time.time() * 1000)
        items = [Metric(_key(k), x, ts, int(step)) for step, metrics in rows for k, v in metrics.items()
                 if (x := as_float(v)) is not None]
        for chunk in _chunks(items, METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)
        return len(items)

    def last_steps(self, run_id: str) -> dict[str, int]:
        """The highest step logged so far for each metric of the run (empty for a new run)."""
        keys = self.client.get_run(run_id).data.metrics
        return {k: max((m.step for m in self.client.get_metric_history(run_id, k)), default=0) for k in keys}

    def log_dataset(self, run_id: str, name: str, source: str, digest: str, num_blocks: int,
                    seq_len: int, context: str) -> None:
        """A dataset input; MLflow keeps only 36 digest chars, the full one is in the profile."""
        if "://" in source:
            source_type, src = source.split("://", 1)[0], {"url": source}
        elif os.path.exists(source) or source.startswith((".", "/", "~")) or Path(source).suffix in DATA_SUFFIXES:
            source_type, src = "local", {"uri": str(Path(source).expanduser().resolve())}
        else:
            source_type, src = "hugging_face", {"path": source}
        profile = {"num_blocks": int(num_blocks), "seq_len": int(seq_len),
                   "num_tokens": int(num_blocks) * int(seq_len), "digest": digest}
        ds = Dataset(name=name[:500], digest=str(digest)[:MAX_DIGEST], source_type=source_type,
                     source=json.dumps(src), profile=json.dumps(profile))
        self.client.log_inputs(run_id, [DatasetInput(ds, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    # ---- plots ----
    def log_importance_histograms(self, run_id: str, scores_path: str | os.PathLike) -> list[str]:
        """One PNG per layer under ``importance/``; returns their artifact paths."""
        from slimmoe.prune.importance import ImportanceScores  # heavy (torch); only when needed

        scores = ImportanceScores.load(scores_path)
        kinds = ("neurons", "shared", "kv_groups", "experts")
        layers = sorted({i for k in kinds for i in getattr(scores, k)})
        names = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in layers:
                fig = importance_figure(i, {k: getattr(scores, k).get(i) for k in kinds})
                fig.savefig(Path(tmp) / f"layer_{i:02d}.png", dpi=80)
                names.append(f"importance/layer_{i:02d}.png")
            (Path(tmp) / "meta.json").write_text(json.dumps(_jsonable(scores.meta), indent=1))
            self.client.log_artifacts(run_id, tmp, "importance")
        return names

    def log_loss_curve(self, run_id: str, losses_jsonl_path: str | os.PathLike) -> int:
        """Plot ``loss_curve.png`` from distill's ``losses.jsonl`` and log its per-step values
        as metrics (``train/loss``, ``train/lr``, ...) for every name the run does not already
        have, so a cached re-run neither duplicates nor loses curves. Returns points logged."""
        series = read_series(Path(losses_jsonl_path), metric_name)
        if not series:
            return 0
        self.client.log_figure(run_id, loss_figure(series), "loss_curve.png")
        ts, items = int(time.time() * 1000), []
        for name, points in series.items():
            if not self.client.get_metric_history(run_id, name):
                items += [Metric(name, v, ts, s) for s, v in sorted(points.items())]
        for chunk in _chunks(items, METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)
        return len(items)

    # ---- registry ----
    def find_version(self, name: str, fingerprint: str) -> str | None:
        flt = f"name={_quote(name)} and tags.fingerprint={_quote(str(fingerprint))}"
        found = self.client.search_model_versions(flt)
        return str(min(int(v.version) for v in found)) if found else None

    def register_model(self, name: str, model_dir: str | os.PathLike, run_id: str,
                       tags: Mapping | None = None, description: str | None = None, files_only: bool = False) -> str:
        """Log ``model_dir`` (a Hugging Face causal LM with its tokenizer) as an MLflow 3 Logged
        Model of the transformers flavour (only the Hugging Face files: tasks/mlflow_model.py),
        linked to the run and listed in the experiment's Models tab, and register it as a new
        version of ``name`` with ``tags`` and ``description``; an existing version with the same
        ``fingerprint`` tag is returned as is (cached re-runs). Not atomic across concurrent
        registrations. The client calls are the ones ``mlflow.transformers.log_model`` makes
        (``mlflow/models/model.py``: create_logged_model, log_model_artifacts,
        finalize_logged_model; ``create_model_version(..., model_id=...)``), made directly so
        that a stage's run need not be the active run of this process. ``files_only``: the
        folder's files as they are (a quantized checkpoint, :func:`tasks.mlflow_model.save_checkpoint_files`)."""
        from tasks.mlflow_model import save_checkpoint_files, save_text_generation_model  # heavy (torch)

        tags = _str_tags(tags)
        if "fingerprint" in tags and (found := self.find_version(name, tags["fingerprint"])):
            return found
        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"model folder not found: {model_dir}")
        experiment_id = self.client.get_run(run_id).info.experiment_id
        # a logged model's name may not hold / : . % " ' (ablation stages are "<arm>.<stage>")
        logged_name = re.sub(r"[/:.%\"']", "-", tags.get("stage", "model"))
        logged = self.client.create_logged_model(experiment_id, name=logged_name, source_run_id=run_id,
                                                 tags=tags, model_type="text-generation")
        try:
            with tempfile.TemporaryDirectory() as tmp:
                saved = (save_checkpoint_files(model_dir, Path(tmp) / "model") if files_only else
                         save_text_generation_model(model_dir, Path(tmp) / "model", card=description or ""))
                self.client.log_model_artifacts(logged.model_id, str(saved))
        except BaseException:
            self.client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(logged.model_id, "READY")
        self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])  # the run page lists it
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # source: the logged model's artifact location, not models:/<id>: MLflow 3.17's registry
        # resolves a models:/ source through the *global* tracking URI (sqlalchemy_store.py
        # create_model_version, its own TODO), which is not this client's in a flow process
        mv = self.client.create_model_version(name, logged.artifact_location, run_id=run_id, tags=tags,
                                              run_link=self.run_url(run_id), description=description,
                                              model_id=logged.model_id)
        # the logged model's page links its version (what mlflow.register_model records)
        self.client.set_logged_model_tags(
            logged.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([{"name": name, "version": str(mv.version)}])})
        return str(mv.version)

    # ---- summary and links ----
    def log_summary(self, parent_run_id: str, rows: list[Mapping[str, Any]]) -> str:
        """``summary.json`` (table, pandas "split" layout like log_table, but overwritten rather
        than appended on a re-run) and ``lineage.md``; returns the markdown."""
        cols = list(dict.fromkeys(k for r in rows for k in r))
        table = {"columns": cols, "data": [[_jsonable(r.get(c)) for c in cols] for r in rows]}
        self.client.log_dict(parent_run_id, table, "summary.json")
        logged = json.loads(self.client.get_run(parent_run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        if {"path": "summary.json", "type": "table"} not in logged:
            logged.append({"path": "summary.json", "type": "table"})
            self.client.set_tag(parent_run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(logged))
        text = self.lineage_markdown(rows, parent_run_id)
        self.client.log_text(parent_run_id, text, "lineage.md")
        return text

    def lineage_markdown(self, rows: list[Mapping[str, Any]], parent_run_id: str | None = None) -> str:
        """``teacher -> mid (v1) -> final (v2)`` then one table line per stage; a row's run id
        is ``run_id`` or ``mlflow_run_id``, its version ``model_version``."""
        def label(r: Mapping) -> str:
            name = str(r.get("stage") or r.get("name") or "?")
            return f"{name} (v{r['model_version']})" if r.get("model_version") else name

        lines = ["# Lineage", ""]
        if parent_run_id:
            lines += [f"Pipeline run: [{parent_run_id}]({self.run_url(parent_run_id)})", ""]
        lines += [" -> ".join(label(r) for r in rows), ""]
        extra = [c for c in dict.fromkeys(k for r in rows for k in r)
                 if c not in ("stage", "name", "run_id", "mlflow_run_id", "model_name", "model_version")]
        lines.append("| stage | run | model | " + " | ".join(extra) + " |")
        lines.append("|---" * (3 + len(extra)) + "|")
        for r in rows:
            rid = r.get("run_id") or r.get("mlflow_run_id")
            run = f"[{rid}]({self.run_url(rid)})" if rid else ""
            model = f"{r.get('model_name') or ''} v{r['model_version']}".strip() if r.get("model_version") else ""
            cells = [label(r), run, model] + [_cell(r.get(c)) for c in extra]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def run_url(self, run_id: str) -> str:
        base = self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else LOCAL_UI
        return f"{base}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def ui_command(self) -> str:
        """Shell command that serves this store at ``LOCAL_UI`` (empty for http URIs)."""
        if self.uri.startswith(("http://", "https://")):
            return ""
        return f"mlflow ui --backend-store-uri {shlex.quote(self.uri)}"


def _str_tags(tags: Mapping | None) -> dict[str, str]:
    return {_key(k): str(v)[:MAX_TAG_VALUE] for k, v in (tags or {}).items()}


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v).replace("|", "\\|")
