"""The compress flow end to end through `slimmoe run`: outputs, summary, MLflow lineage,
caching across runs, and a distill task that fails once and resumes on retry."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers_prefect import last_task_states
from prefect.testing.utilities import prefect_test_harness
from tiny_models import tiny_teacher_with_tokenizer
from transformers import AutoModelForCausalLM

from slimmoe.cli import main
from tasks.steps import FAULT_ENV

STEP_TASKS = {"importance", "slim", "distill", "evaluate"}


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, prefect_server):
    root = tmp_path_factory.mktemp("pipeline")
    teacher, corpus = tiny_teacher_with_tokenizer(root / "teacher", corpus_chars=30000)
    config = {
        "name": "tiny-pipe",
        "teacher": str(teacher),
        "output_dir": str(root / "out"),
        "data": {"train": str(corpus), "eval_fraction": 0.1, "seq_len": 32},
        "stages": [
            {"name": "mid", "expert_intermediate_size": 12, "importance": {"samples": 8},
             "distill": {"tokens": 4096, "batch_size": 8, "checkpoint_every": 4, "lr": 1e-3}, "export": ["vllm"]},
            {"name": "final", "expert_intermediate_size": 8, "num_key_value_heads": 1, "importance": {"samples": 8},
             "distill": {"tokens": 4096, "batch_size": 8, "checkpoint_every": 4, "lr": 1e-3}},
        ],
        "tracking": {"experiment": "test-pipe"},
    }
    path = root / "pipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path, config


def run(path, *overrides):
    args = ["run", str(path)]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0


def test_first_run_with_a_failing_distill_retries_and_resumes(pipeline, monkeypatch):
    root, path, config = pipeline
    monkeypatch.setenv(FAULT_ENV, "6")  # each distill task fails once at step 6, after the step-4 checkpoint
    run(path)
    summary = json.loads((root / "out" / "summary.json").read_text())
    stages = {r["stage"]: r for r in summary["stages"]}
    assert [r["stage"] for r in summary["stages"]] == ["teacher", "mid", "final"]
    for name in ("mid", "final"):
        assert stages[name]["resumed_from_step"] == 4
        assert stages[name]["distill_steps"] == 16  # 4096 tokens / (8 x 32)
    states = last_task_states()
    assert states["distill-mid"] == "Completed" and states["distill-final"] == "Completed"


def test_a_stage_export_is_what_vllm_loads_and_its_run_names_it(pipeline):
    from mlflow.tracking import MlflowClient

    root, _, _ = pipeline
    folder = root / "out" / "mid" / "export" / "vllm"
    exported = json.loads((folder / "config.json").read_text())
    stock = json.loads((root / "out" / "mid" / "model" / "config.json").read_text())
    assert exported["architectures"] == ["PhiMoEForCausalLM"] and stock["architectures"] == ["PhimoeForCausalLM"]
    # the tiny teacher has no lm_head bias, which vLLM's PhiMoE requires: the export adds a zero one
    assert stock["lm_head_bias"] is False and exported["lm_head_bias"] is True
    assert {k: v for k, v in exported.items() if k not in ("architectures", "lm_head_bias")} == \
        {k: v for k, v in stock.items() if k not in ("architectures", "lm_head_bias")}
    assert (folder / "model-00001-of-00002.safetensors").read_bytes() == \
        (root / "out" / "mid" / "model" / "model.safetensors").read_bytes()
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert [k for k, f in index.items() if f == "model-00002-of-00002.safetensors"] == ["lm_head.bias"]
    assert not (root / "out" / "final" / "export").exists()  # only the stage that asked
    summary = json.loads((root / "out" / "summary.json").read_text())
    rows = {r["stage"]: r for r in summary["stages"]}
    assert rows["mid"]["export"] == {"vllm": str(folder)} and "export" not in rows["final"]
    run = MlflowClient(summary["mlflow"]["tracking_uri"]).get_run(rows["mid"]["mlflow_run_id"])
    assert run.data.tags["slimmoe.export.vllm"] == str(folder)
    assert last_task_states()["export-mid-vllm"] == "Completed"


def test_every_stage_model_loads_with_the_planned_shape(pipeline):
    root, _, _ = pipeline
    mid = AutoModelForCausalLM.from_pretrained(root / "out" / "mid" / "model")
    final = AutoModelForCausalLM.from_pretrained(root / "out" / "final" / "model")
    assert mid.config.intermediate_size == 12 and mid.config.num_key_value_heads == 2
    assert final.config.intermediate_size == 8 and final.config.num_key_value_heads == 1
    assert final.config.num_attention_heads == 2
    assert final.model.layers[0].mlp.experts.down_proj.shape[-1] == 8


def test_summary_is_complete(pipeline):
    root, _, config = pipeline
    summary = json.loads((root / "out" / "summary.json").read_text())
    for row in summary["stages"]:
        for key in ("expert_intermediate_size", "num_key_value_heads", "num_experts", "total_params",
                    "active_params", "perplexity", "tokens", "mlflow_run_id"):
            assert row[key] is not None, (row["stage"], key)
    t, mid, final = summary["stages"]
    assert t["total_params"] > mid["total_params"] > final["total_params"]
    assert mid["tokens"] == 4096 and final["tokens"] == 4096
    assert summary["mlflow"]["tracking_uri"].startswith("sqlite:///")


def test_mlflow_holds_the_lineage(pipeline):
    from mlflow.tracking import MlflowClient

    root, _, config = pipeline
    summary = json.loads((root / "out" / "summary.json").read_text())
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    exp = client.get_experiment_by_name("test-pipe")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    parent = runs[summary["mlflow"]["parent_run_id"]]
    children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["final", "mid"]
    for child in children:
        assert child.data.params["expert_intermediate_size"] in ("12", "8")
        assert "eval/perplexity" in child.data.metrics
        # distill failed at step 6 and resumed from step 4: steps 5-6 ran twice, logged once
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, 17)), steps
        contexts = {d.tags[0].value for d in child.inputs.dataset_inputs if d.tags}
        assert {"train", "calibration"} <= contexts
    versions = {v.tags["stage"]: v for v in client.search_model_versions("name='tiny-pipe'")}
    assert set(versions) == {"mid", "final"}
    assert versions["final"].tags["parent_version"] == str(versions["mid"].version)


def test_experiment_kind_and_version_descriptions(pipeline):
    from mlflow.tracking import MlflowClient

    from tasks.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING

    root, _, _ = pipeline
    summary = json.loads((root / "out" / "summary.json").read_text())
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    # the MLflow 3 UI opens it on its runs, not on the GenAI overview of traces
    assert client.get_experiment_by_name("test-pipe").tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    rows = {r["stage"]: r for r in summary["stages"]}
    versions = {v.tags["stage"]: v for v in client.search_model_versions("name='tiny-pipe'")}
    for stage, v in versions.items():
        text = v.description
        parent = f"tiny-pipe version {versions['mid'].version}" if stage == "final" else "the teacher"
        assert f"made from {parent}" in text, text
        ppl = float(re.search(r"perplexity: ([0-9.e+-]+)", text).group(1))
        assert ppl == pytest.approx(rows[stage]["perplexity"], rel=1e-5), text
        assert f"{rows[stage]['total_params']:,} / {rows[stage]['active_params']:,}" in text, text
        assert "KL(teacher || model): not measured" not in text


@pytest.mark.slow  # ~50 s on 2 cores (an MLflow server and a browser): `make test-slow`
@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
                    reason="no Chromium: the MLflow UI check renders the pages in a headless browser "
                           "(Debian: apt-get install chromium)")
def test_the_mlflow_ui_shows_the_runs_and_versions(pipeline, monkeypatch):
    root, path, _ = pipeline
    if not (root / "out" / "summary.json").is_file():  # selected alone (`make test-slow`): run the pipeline first
        monkeypatch.delenv(FAULT_ENV, raising=False)
        run(path)
    script = Path(__file__).parents[1] / "scripts" / "mlflow-ui-check"
    r = subprocess.run([sys.executable, str(script), str(root / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: the MLflow UI shows the runs and the model versions" in r.stdout


def test_every_registered_version_is_an_mlflow_model_that_generates_like_its_folder(pipeline, monkeypatch):
    import mlflow
    import mlflow.pyfunc
    import mlflow.transformers
    import torch
    from mlflow.tracking import MlflowClient
    from transformers import AutoTokenizer

    root, _, _ = pipeline
    summary = json.loads((root / "out" / "summary.json").read_text())
    uri = summary["mlflow"]["tracking_uri"]
    client = MlflowClient(uri, registry_uri=uri)
    rows = {r["stage"]: r for r in summary["stages"]}
    prompt = "To be, or not"
    # through the environment, which monkeypatch restores: mlflow.set_registry_uri(uri) also
    # writes MLFLOW_REGISTRY_URI into os.environ and set_registry_uri(None) leaves it there
    # (MLflow 3.17, measured), so every later MlflowClient(other_uri) read this run's registry
    # and a later test's versions went missing
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    for v in client.search_model_versions("name='tiny-pipe'"):
        folder = rows[v.tags["stage"]]["model"]
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
        expected = prompt + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        loaded = mlflow.pyfunc.load_model(f"models:/tiny-pipe/{v.version}")
        got = loaded.predict([prompt], params={"max_new_tokens": 8, "do_sample": False})
        assert got == [expected], (v.version, got, expected)
        components = mlflow.transformers.load_model(f"models:/tiny-pipe/{v.version}", return_type="components")
        assert components["model"].config.intermediate_size == model.config.intermediate_size


def test_second_run_is_fully_cached(pipeline, monkeypatch):
    root, path, _ = pipeline
    monkeypatch.delenv(FAULT_ENV, raising=False)
    before = (root / "out" / "final" / "model" / "model.safetensors").stat().st_mtime_ns
    run(path)
    states = last_task_states()
    steps = {n: s for n, s in states.items() if n.split("-")[0] in STEP_TASKS or n.startswith("prepare-data")}
    assert len(steps) == 10 and set(steps.values()) == {"Cached"}, steps
    assert states["export-mid-vllm"] == "Cached"
    assert (root / "out" / "final" / "model" / "model.safetensors").stat().st_mtime_ns == before


def test_a_work_pool_run_of_the_same_config_finds_the_cli_runs_cache(pipeline, monkeypatch, tmp_path):
    """What differs between `slimmoe run` and a work-pool run (working directory, relative vs
    absolute paths, environment, a dict parameter instead of the CLI's pre-flight) enters no
    cache key: both ways find every step of the first run cached."""
    from flows.compress import compress

    root, _, config = pipeline
    monkeypatch.delenv(FAULT_ENV, raising=False)
    relative = {**config, "teacher": "teacher/model", "output_dir": "out",
                "data": {**config["data"], "train": "teacher/corpus.txt"}}
    assert (root / relative["teacher"]).resolve() == Path(config["teacher"]).resolve()
    assert (root / relative["data"]["train"]).resolve() == Path(config["data"]["train"]).resolve()
    (root / "relative.yaml").write_text(yaml.safe_dump(relative))
    monkeypatch.chdir(root)
    run(root / "relative.yaml")  # the CLI, paths relative to the working directory
    steps = {n: s for n, s in last_task_states().items() if n.split("-")[0] in STEP_TASKS or n.startswith("prepare-data")}
    assert len(steps) == 10 and set(steps.values()) == {"Cached"}, steps

    elsewhere = tmp_path / "worker-cwd"  # as a worker starts it: another folder, another env, the flow itself
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("SLIMMOE_CACHE", str(tmp_path / "worker-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "worker-hf"))
    compress(config=json.loads(json.dumps(config)))
    steps = {n: s for n, s in last_task_states().items() if n.split("-")[0] in STEP_TASKS or n.startswith("prepare-data")}
    assert len(steps) == 10 and set(steps.values()) == {"Cached"}, steps


def test_changing_stage_two_recomputes_only_stage_two(pipeline):
    root, path, _ = pipeline
    run(path, "stages.1.expert_intermediate_size=4")
    states = last_task_states()
    for name in ("importance-mid", "slim-mid", "distill-mid", "evaluate-mid", "evaluate-teacher"):
        assert states[name] == "Cached", (name, states[name])
    for name in ("importance-final", "slim-final", "distill-final", "evaluate-final"):
        assert states[name] == "Completed", (name, states[name])
    final = AutoModelForCausalLM.from_pretrained(root / "out" / "final" / "model")
    assert final.config.intermediate_size == 4


def test_a_deleted_stage_output_is_rebuilt_not_served_from_cache(pipeline):
    import shutil

    root, path, _ = pipeline
    shutil.rmtree(root / "out" / "final" / "model")
    run(path, "stages.1.expert_intermediate_size=4")
    states = last_task_states()
    assert states["distill-mid"] == "Cached" and states["slim-final"] == "Cached"
    assert states["distill-final"] == "Completed"
    assert AutoModelForCausalLM.from_pretrained(root / "out" / "final" / "model").config.intermediate_size == 4


def test_prune_only_stage_writes_its_model_folder(pipeline):
    root, _, config = pipeline
    cfg = {**config, "output_dir": str(root / "prune-only"),
           "stages": [{"name": "only", "expert_intermediate_size": 8, "importance": {"samples": 4}, "distill": None}]}
    path = root / "prune-only.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run(path)
    model = AutoModelForCausalLM.from_pretrained(root / "prune-only" / "only" / "model")
    assert model.config.intermediate_size == 8
    summary = json.loads((root / "prune-only" / "summary.json").read_text())
    assert summary["stages"][-1]["tokens"] == 0 and summary["stages"][-1]["model"].endswith("only/model")


def test_the_flow_itself_refuses_a_folder_another_process_writes(pipeline):
    """A work pool starts the flow without `slimmoe run`: the flow takes the folder's lock itself
    (and, started by `slimmoe run`, re-enters the lock its own process already holds)."""
    from test_lock import hold_in_child

    from flows.compress import compress
    from slimmoe.io.lock import FolderLocked
    from slimmoe.pipeline.schema import PipelineConfig

    root, _, config = pipeline
    out = root / "held"
    cfg = PipelineConfig.model_validate({**config, "output_dir": str(out)})
    child = hold_in_child(out)
    try:
        with pytest.raises(FolderLocked, match=f"pid {child.pid}"):
            compress(cfg)
        assert sorted(p.name for p in out.iterdir()) == [".slimmoe.lock"]  # nothing else written
    finally:
        child.kill()
        child.wait(timeout=30)
