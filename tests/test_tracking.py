"""tasks/tracking.py against a real MLflow sqlite store in a temp folder.

One store is shared by the module (creating a fresh sqlite store runs MLflow's migrations,
about 5 s); the cwd is a temp folder so a stray ./mlruns or ./mlartifacts would show.
"""

import json
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

pytest.importorskip("mlflow")
pytest.importorskip("matplotlib")

from slimmoe.prune.importance import ImportanceScores  # noqa: E402
from tasks.tracking import Tracker, default_uri, metric_name  # noqa: E402

PARENT = "mlflow.parentRunId"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    cwd, out = root / "cwd", root / "out"
    cwd.mkdir()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.chdir(cwd)
    mp.setenv("HOME", str(root / "home"))
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.setenv("DO_NOT_TRACK", "true")
    for var in ("MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        mp.delenv(var, raising=False)
    tr = Tracker(uri, "slimmoe-test")
    yield {"tr": tr, "cwd": cwd, "out": out, "root": root}
    mp.undo()


def _run(tr, name="r"):
    return tr.client.create_run(tr.experiment_id, run_name=name).info.run_id


def _artifacts(tr, run_id, path=None):
    return {f.path for f in tr.client.list_artifacts(run_id, path)}


def test_pipeline_and_stage_runs_with_params(env):
    tr = env["tr"]
    config = {"name": "demo", "data": {"seq_len": 256, "train": "data/x.txt"},
              "stages": [{"name": "mid"}], "note": "x" * 7000}
    parent = tr.start_pipeline("demo", config, tags={"owner": "tests"})
    stage = tr.start_stage(parent, "mid", {"expert_intermediate_size": 128, "distill": {"lr": 3e-4}})

    p, s = tr.client.get_run(parent), tr.client.get_run(stage)
    assert p.info.run_name == "demo" and p.data.tags["owner"] == "tests"
    assert p.data.params["data.seq_len"] == "256"
    assert json.loads(p.data.params["stages"]) == [{"name": "mid"}]
    assert len(p.data.params["note"]) == 6000  # truncated to MLflow's limit, not rejected
    assert s.data.tags[PARENT] == parent and s.info.run_name == "mid"
    assert s.data.params == {"expert_intermediate_size": "128", "distill.lr": "0.0003"}
    assert "config.json" in _artifacts(tr, parent)
    got = json.loads(Path(tr.client.download_artifacts(parent, "config.json", str(env["root"]))).read_text())
    assert got == config

    tr.log_params(stage, {"expert_intermediate_size": 128})  # same value again: no error
    tr.log_params(stage, {"expert_intermediate_size": 64, "new": 1})  # changed value -> tag
    s = tr.client.get_run(stage)
    assert s.data.params["expert_intermediate_size"] == "128" and s.data.params["new"] == "1"
    assert s.data.tags["param.expert_intermediate_size"] == "64"

    tr.finish(stage, "FAILED")
    tr.finish(parent)
    assert tr.client.get_run(stage).info.status == "FAILED"
    assert tr.client.get_run(parent).info.status == "FINISHED"
    with pytest.raises(ValueError):
        tr.finish(parent, "DONE")


def test_metrics_batched_skip_none_and_nan(env):
    tr = env["tr"]
    run = _run(tr)
    n = tr.log_metrics(run, {"a": 1.5, "b": None, "c": float("nan"), "d": torch.tensor(2.0), "e": "x"}, step=3)
    tr.log_metrics(run, {"a": 1.0}, step=4)
    assert n == 2
    assert set(tr.client.get_run(run).data.metrics) == {"a", "d"}
    assert [(m.step, m.value) for m in tr.client.get_metric_history(run, "a")] == [(3, 1.5), (4, 1.0)]


def test_dataset_inputs_carry_digest_and_context(env, tmp_path):
    tr = env["tr"]
    run = _run(tr)
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("to be or not to be\n")
    digest = "ab" * 32  # a sha256 hex: longer than MLflow's 36-char digest column
    tr.log_dataset(run, "tiny", str(corpus), digest, 100, 256, "train")
    tr.log_dataset(run, "stories-eval", "roneneldan/TinyStories", "e" * 16, 5, 256, "eval")
    inputs = tr.client.get_run(run).inputs.dataset_inputs
    by_ctx = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in inputs}
    assert set(by_ctx) == {"train", "eval"}
    assert by_ctx["train"].digest == digest[:36] and by_ctx["eval"].digest == "e" * 16
    profile = json.loads(by_ctx["train"].profile)
    assert profile["num_tokens"] == 25600 and profile["digest"] == digest
    assert by_ctx["train"].source_type == "local"
    assert json.loads(by_ctx["train"].source) == {"uri": str(corpus.resolve())}
    assert by_ctx["eval"].source_type == "hugging_face"
    assert json.loads(by_ctx["eval"].source) == {"path": "roneneldan/TinyStories"}


def test_importance_histograms_one_png_per_layer(env, tmp_path):
    tr = env["tr"]
    g = torch.Generator().manual_seed(0)
    scores = ImportanceScores(
        neurons={0: torch.rand(4, 32, generator=g, dtype=torch.float64) + 1e-4,
                 1: torch.randn(4, 32, generator=g, dtype=torch.float64)},  # signed: linear axis
        shared={1: torch.rand(8, generator=g, dtype=torch.float64)},
        kv_groups={0: torch.rand(2, dtype=torch.float64), 1: torch.rand(2, dtype=torch.float64),
                   2: torch.rand(2, dtype=torch.float64)},  # attention-only layer
        experts={0: torch.rand(4, dtype=torch.float64), 1: torch.rand(4, dtype=torch.float64)},
        meta={"score": "taylor", "samples": 8})
    path = tmp_path / "scores.pt"
    scores.save(path)
    run = _run(tr)
    names = tr.log_importance_histograms(run, path)
    expected = {f"importance/layer_{i:02d}.png" for i in range(3)}
    assert set(names) == expected
    assert expected | {"importance/meta.json"} == _artifacts(tr, run, "importance")
    png = Path(tr.client.download_artifacts(run, "importance/layer_01.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def _losses(path: Path) -> Path:
    lines = [json.dumps({"step": 0, "held_out_kl": 0.9, "held_out_ppl": 40.0, "held_out_nll": 3.7})]
    lines += [json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-3, "tokens": 512 * s, "grad_norm": 1.0})
              for s in range(1, 6)]
    lines += ["", json.dumps({"step": 5, "held_out_kl": 0.5, "held_out_ppl": 30.0, "held_out_nll": 3.4}), '{"step": 6, "lo']
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loss_curve_logs_png_and_metrics_once(env, tmp_path):
    tr = env["tr"]
    run = _run(tr)
    path = _losses(tmp_path / "losses.jsonl")
    n = tr.log_loss_curve(run, path)
    assert n == 5 * 4 + 2 * 3  # the torn last line (a crash) is skipped
    assert "loss_curve.png" in _artifacts(tr, run)
    hist = tr.client.get_metric_history(run, "train/loss")
    assert [m.step for m in hist] == [1, 2, 3, 4, 5] and hist[0].value == pytest.approx(3.0)
    assert [m.step for m in tr.client.get_metric_history(run, "distill/held_out_kl")] == [0, 5]

    assert tr.log_loss_curve(run, path) == 0  # cached re-run
    assert len(tr.client.get_metric_history(run, "train/loss")) == 5
    assert len(tr.client.get_metric_history(run, "distill/held_out_ppl")) == 2

    live = _run(tr)  # a run whose distill callback already logged train/loss live
    tr.log_metrics(live, {"train/loss": 2.0}, step=2)
    tr.log_loss_curve(live, path)
    assert len(tr.client.get_metric_history(live, "train/loss")) == 1
    assert len(tr.client.get_metric_history(live, "train/lr")) == 5

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert tr.log_loss_curve(live, empty) == 0


def test_register_model_versions_tags_and_dedup(env, tmp_path):
    from tiny_models import tiny_teacher_with_tokenizer

    tr = env["tr"]
    dirs = []
    for name in ("mid", "final"):
        d, _ = tiny_teacher_with_tokenizer(tmp_path / name, corpus_chars=3000)
        (d / "best_student.pt").write_bytes(b"\0" * 64)  # training leftovers: never registered
        (d / "losses.jsonl").write_text("{}\n")
        dirs.append(d)
    r1, r2 = _run(tr, "mid"), _run(tr, "final")
    tags1 = {"stage": "mid", "fingerprint": "fp-mid", "parent_model": "teacher/model", "parent_version": "teacher"}
    tags2 = {"stage": "final", "fingerprint": "fp-final", "parent_model": str(dirs[0]), "parent_version": 1}
    assert tr.register_model("tiny-demo", dirs[0], r1, tags1) == "1"
    assert tr.register_model("tiny-demo", dirs[1], r2, tags2, description="made from v1") == "2"

    v2 = tr.client.get_model_version("tiny-demo", "2")
    outputs = tr.client.get_run(r2).outputs.model_outputs  # the run lists its logged model
    assert len(outputs) == 1
    model_id = outputs[0].model_id
    assert v2.run_id == r2 and v2.source == tr.client.get_logged_model(model_id).artifact_location
    assert v2.tags == {k: str(v) for k, v in tags2.items()}
    assert v2.description == "made from v1"
    # an MLflow 3 Logged Model of the run (the experiment's Models tab), READY, with the lineage
    # tags, listed among the run's outputs and linked to its registered version
    logged = tr.client.get_logged_model(model_id)
    assert logged.source_run_id == r2 and logged.name == "final" and str(logged.status) == "READY"
    assert {k: logged.tags[k] for k in tags2} == {k: str(v) for k, v in tags2.items()}
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "tiny-demo", "version": "2"}]
    # of the transformers flavour: MLmodel, the weights under model/, the tokenizer under
    # components/; the checkpoint folder's other files stay out
    files = {f.path for f in tr.client.list_logged_model_artifacts(model_id)}
    assert {"MLmodel", "model", "components"} <= files
    weights = {f.path for f in tr.client.list_logged_model_artifacts(model_id, "model")}
    assert {"model/config.json", "model/model.safetensors"} <= weights
    assert not any(f.endswith(("best_student.pt", "losses.jsonl")) for f in files | weights)

    again = _run(tr, "mid-cached")
    assert tr.register_model("tiny-demo", dirs[0], again, tags1) == "1"
    assert len(tr.client.search_model_versions("name='tiny-demo'")) == 2
    experiment = tr.client.get_run(again).info.experiment_id
    assert len(tr.client.search_logged_models([experiment])) == 2  # nothing logged for a known fingerprint
    with pytest.raises(FileNotFoundError):
        tr.register_model("tiny-demo", tmp_path / "missing", again, {"fingerprint": "fp-new"})


def test_a_folder_without_a_tokenizer_registers_its_weights_only(env, tmp_path):
    from tiny_models import tiny_model

    tr = env["tr"]
    d = tmp_path / "model"
    tiny_model("phimoe").save_pretrained(d)
    (d / "best_student.pt").write_bytes(b"\0" * 64)
    run = _run(tr, "no-tokenizer")
    assert tr.register_model("no-tok", d, run, {"fingerprint": "fp-no-tok"}) == "1"
    assert _artifacts(tr, run, "model") == {"model/config.json", "model/generation_config.json",
                                            "model/model.safetensors"}


def test_experiment_is_a_model_training_experiment(env):
    from tasks.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING

    tr = env["tr"]
    assert tr.client.get_experiment(tr.experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    # an experiment made without the tag gets it when slimmoe uses it; a chosen kind is kept
    bare = tr.client.create_experiment("made-elsewhere")
    assert Tracker(tr.uri, "made-elsewhere").client.get_experiment(bare).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    chosen = tr.client.create_experiment("chosen-kind", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert Tracker(tr.uri, "chosen-kind").client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_summary_lineage_and_links(env, tmp_path):
    tr = env["tr"]
    parent = tr.start_pipeline("demo", {"name": "demo"})
    mid, final = tr.start_stage(parent, "mid", {}), tr.start_stage(parent, "final", {})
    rows = [{"stage": "teacher", "total_params": 3_600_000, "perplexity": 12.5},
            {"stage": "mid", "run_id": mid, "model_name": "tiny-demo", "model_version": "1", "perplexity": 14.0},
            {"stage": "final", "mlflow_run_id": final, "model_version": "2", "perplexity": 15.25}]
    text = tr.log_summary(parent, rows)
    tr.log_summary(parent, rows)  # a re-run overwrites, it does not append
    assert {"summary.json", "lineage.md"} <= _artifacts(tr, parent)
    table = json.loads(Path(tr.client.download_artifacts(parent, "summary.json", str(tmp_path))).read_text())
    assert table["columns"][:3] == ["stage", "total_params", "perplexity"] and len(table["data"]) == 3
    assert "teacher -> mid (v1) -> final (v2)" in text and "tiny-demo v1" in text
    assert f"| final (v2) | [{final}]({tr.run_url(final)}) | v2 |  | 15.25 |" in text
    logged = json.loads(tr.client.get_run(parent).data.tags["mlflow.loggedArtifacts"])
    assert logged == [{"path": "summary.json", "type": "table"}]

    url = tr.run_url(mid)
    assert url == f"http://127.0.0.1:5000/#/experiments/{tr.experiment_id}/runs/{mid}"
    assert tr.ui_command() == f"mlflow ui --backend-store-uri {tr.uri}"
    remote = Tracker.__new__(Tracker)  # no server here: only the URL shape is checked
    remote.uri, remote.experiment_id = "https://mlflow.example.com/", "7"
    assert remote.run_url("abc") == "https://mlflow.example.com/#/experiments/7/runs/abc"


def test_store_layout_and_nothing_in_cwd(env):
    tr = env["tr"]
    run = _run(tr)
    tr.client.log_text(run, "hello", "notes/hello.txt")
    exp = tr.client.get_experiment(tr.experiment_id)
    assert exp.artifact_location == (env["out"] / "mlartifacts").as_uri()
    assert (env["out"] / "mlartifacts" / run / "artifacts" / "notes" / "hello.txt").is_file()
    assert Tracker(tr.uri, "slimmoe-test").experiment_id == tr.experiment_id  # get, not create
    assert list(env["cwd"].iterdir()) == []  # no ./mlruns, ./mlartifacts, ./mlflow.db
    assert not (env["root"] / "home").exists()


def test_helpers_and_library_never_imports_mlflow(tmp_path):
    assert default_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert [metric_name(k) for k in ("loss", "held_out_kl", "slim/x")] == ["train/loss", "distill/held_out_kl", "slim/x"]
    lib = Path(__file__).resolve().parents[1] / "slimmoe"
    pattern = re.compile(r"^\s*(import|from)\s+(mlflow|prefect|tasks|flows)\b", re.M)
    offenders = [p.name for p in lib.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
