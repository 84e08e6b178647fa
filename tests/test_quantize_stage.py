"""A pipeline stage's ``quantize: {scheme: ...}``: the config and the pre-flight refuse, before any
work, a bad scheme, a missing llm-compressor environment or a scheme the stage's shapes do not fit;
the quantize step's key is the model's content, the settings and the engine, never the interpreter's
path; and (with llm-compressor's environment) a tiny one-stage run quantizes, evaluates and registers
the stage's model, then finds everything cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_models import tiny_config

from slimmoe.cli import main
from slimmoe.pipeline.steps import ModelRef, QuantizeEngine
from slimmoe.quantize import QuantizeConfig, resolve_python
from slimmoe.quantize import config as qconfig
from tasks import steps
from tasks.caching import step_key
from tasks.tracking import TrackingSettings


def write_config(tmp_path: Path, quantize, teacher: Path | None = None, **stage) -> Path:
    if teacher is None:
        teacher = tmp_path / "t"
        tiny_config("phimoe").save_pretrained(teacher)  # config.json only: the pre-flight reads no weights first
    data = {"name": "q", "teacher": str(teacher), "output_dir": str(tmp_path / "out"),
            "data": {"train": str(tmp_path / "d.txt")},
            "stages": [{"name": "final", "expert_intermediate_size": 8, "quantize": quantize, **stage}]}
    (tmp_path / "d.txt").write_text("some text\n")
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def refused(capsys, path: Path) -> str:
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0][len("error: "):]


@pytest.mark.parametrize("quantize,needle", [
    ({"scheme": "INT3"}, "stages.0.quantize.scheme: Input should be 'FP8_DYNAMIC', 'W4A16' or 'W8A8'"),
    ({}, "stages.0.quantize.scheme: Field required"),
    ({"scheme": "FP8_DYNAMIC", "group_size": 64}, "stages.0.quantize.group_size: applies to W4A16 only"),
    ({"scheme": "W8A8", "schem": 1}, "stages.0.quantize.schem: unknown key"),
])
def test_bad_settings_exit_2_naming_the_field(tmp_path, capsys, quantize, needle):
    msg = refused(capsys, write_config(tmp_path, quantize))
    assert msg.startswith(needle), msg
    assert not (tmp_path / "out").exists()


def test_missing_llmcompressor_environment_fails_in_preflight(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(qconfig.PYTHON_ENV, raising=False)
    monkeypatch.setattr(qconfig, "python_candidates", lambda: [tmp_path / "none" / "bin" / "python"])
    path = write_config(tmp_path, {"scheme": "FP8_DYNAMIC"})
    msg = refused(capsys, path)
    assert msg.startswith("stages.0.quantize.python: no llm-compressor environment"), msg
    assert "scripts/install-llmcompressor" in msg
    monkeypatch.setenv(qconfig.PYTHON_ENV, str(tmp_path / "py"))
    assert refused(capsys, path).startswith(f"stages.0.quantize: {qconfig.PYTHON_ENV}: {tmp_path / 'py'} does not exist")
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_an_interpreter_without_llmcompressor_is_refused(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.delenv(qconfig.PYTHON_ENV, raising=False)
    try:
        import llmcompressor  # noqa: F401
        pytest.skip("llmcompressor is importable in slimmoe's own environment")
    except ImportError:
        pass
    msg = refused(capsys, write_config(tmp_path, {"scheme": "W8A8", "python": sys.executable}))
    assert msg == f"stages.0.quantize.python: {sys.executable} has no llmcompressor; run scripts/install-llmcompressor"


def test_w4a16_group_must_divide_the_stage_widths(tmp_path, capsys):
    msg = refused(capsys, write_config(tmp_path, {"scheme": "W4A16", "group_size": 32}))  # hidden 32, experts 8 wide
    assert msg.startswith("stages.0.quantize.group_size: W4A16 groups 32 input columns, but "
                          "moe_intermediate_size = 8") or "= 8 is not a multiple of 32" in msg, msg
    assert "--group-size" not in msg


ENGINE = QuantizeEngine(python="/a/.venv-llmcompressor/bin/python", worker="w1",
                        versions={"llmcompressor": "0.14.0.1", "compressed-tensors": "0.19.0"})


def quantize_inputs(**change) -> dict:
    inputs = dict(stage="final", model=ModelRef(path="/a/out/final/model", fingerprint="f-model"),
                  settings=QuantizeConfig(scheme="FP8_DYNAMIC"), engine=ENGINE, out_dir=Path("/a/out/final/quantized"),
                  tracking=TrackingSettings(uri="sqlite:///a.db", experiment="e"), run_id="run-1")
    return {**inputs, **change}


def test_quantize_key_is_model_settings_and_engine_not_the_interpreter():
    key = lambda **change: step_key(steps.quantize, **quantize_inputs(**change))  # noqa: E731
    base = key()
    elsewhere = ENGINE.model_copy(update={"python": "/b/other-env/bin/python3"})
    assert key(engine=elsewhere, settings=QuantizeConfig(scheme="FP8_DYNAMIC", python=Path("/c/python")),
               model=ModelRef(path="/moved/model", fingerprint="f-model"), run_id="run-2",
               tracking=TrackingSettings(uri="http://127.0.0.1:5000", experiment="x")) == base
    changed = [key(settings=QuantizeConfig(scheme="W8A8")),
               key(settings=QuantizeConfig(scheme="W4A16", group_size=32)),
               key(settings=QuantizeConfig(scheme="FP8_DYNAMIC", ignore=["lm_head"])),
               key(model=ModelRef(path="/a/out/final/model", fingerprint="f-other")),
               key(engine=ENGINE.model_copy(update={"worker": "w2"})),
               key(engine=ENGINE.model_copy(update={"versions": {**ENGINE.versions, "llmcompressor": "0.15.0"}}))]
    assert len({base, *changed}) == len(changed) + 1


def test_the_stage_run_keys_leave_quantize_out():
    from slimmoe.pipeline.schema import StageConfig
    from tasks.lineage import NOT_RUN_PARAMS

    stage = StageConfig(name="final", expert_intermediate_size=8, quantize={"scheme": "FP8_DYNAMIC"})
    assert "quantize" in NOT_RUN_PARAMS
    assert stage.model_dump(mode="json", exclude=set(NOT_RUN_PARAMS)) == \
        StageConfig(name="final", expert_intermediate_size=8).model_dump(mode="json", exclude=set(NOT_RUN_PARAMS))


PYTHON = resolve_python()
needs_llmcompressor = pytest.mark.skipif(
    PYTHON is None or not PYTHON.is_file(),
    reason="no llm-compressor environment (.venv-llmcompressor): run scripts/install-llmcompressor or "
           "make test-quantize, or set SLIMMOE_LLMCOMPRESSOR_PYTHON")


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@needs_llmcompressor
@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC",
                                    # int8 experts: evaluated through a dequantized copy, registered as files
                                    pytest.param("W8A8", marks=pytest.mark.slow)])
def test_a_quantized_last_stage_is_evaluated_registered_and_cached(tmp_path, prefect_server, scheme):
    from helpers_prefect import last_task_states
    from mlflow.tracking import MlflowClient
    from tiny_models import tiny_teacher_with_tokenizer

    from slimmoe.quantize import load_evaluable

    teacher, corpus = tiny_teacher_with_tokenizer(tmp_path / "teacher", corpus_chars=30000)
    path = write_config(tmp_path, {"scheme": scheme}, teacher=teacher, importance={"samples": 8},
                        distill={"tokens": 4096, "batch_size": 8, "lr": 1e-3},
                        eval={"throughput_batch_sizes": [1], "generation": False, "peak_memory": False})
    cfg = yaml.safe_load(path.read_text())
    cfg["data"] = {"train": str(corpus), "eval_fraction": 0.1, "seq_len": 32}
    cfg["tracking"] = {"experiment": "test-quant"}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0

    out = tmp_path / "out"
    folder = out / "final" / "quantized"
    load_evaluable(folder)  # loads (transformers + compressed-tensors)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    summary = json.loads((out / "summary.json").read_text())
    row = summary["stages"][-1]
    q = row["quantized"]
    assert q["scheme"] == scheme and q["path"] == str(folder)
    assert 0 < q["bytes"] < q["source_bytes"]
    assert abs(q["perplexity"] / row["perplexity"] - 1) < 0.05, (q["perplexity"], row["perplexity"])

    client = MlflowClient(summary["mlflow"]["tracking_uri"], registry_uri=summary["mlflow"]["tracking_uri"])
    run = client.get_run(q["mlflow_run_id"])
    assert run.info.run_name == f"final-{scheme}" and q["mlflow_run_id"] != row["mlflow_run_id"]
    assert run.data.tags["mlflow.parentRunId"] == summary["mlflow"]["parent_run_id"]
    assert run.data.params["scheme"] == scheme and "python" not in run.data.params
    assert run.data.metrics["eval/perplexity"] == pytest.approx(q["perplexity"])
    assert run.data.metrics["quantize/quantized_expert_weights"] > 0
    version = client.get_model_version("q", q["model_version"])
    assert version.tags["parent_version"] == row["model_version"] and version.tags["stage"] == f"final-{scheme}"
    import mlflow.artifacts

    files = Path(mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version_download_uri(
        "q", q["model_version"]), dst_path=str(tmp_path / "registered"), tracking_uri=summary["mlflow"]["tracking_uri"]))
    assert (files / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()  # as served
    assert last_task_states()["quantize-final"] == "Completed"
    print(f"{scheme}: {q['bytes']:,} bytes (unquantized {q['source_bytes']:,}), perplexity {row['perplexity']:.4f} -> "
          f"{q['perplexity']:.4f}, KL {row['kl_to_teacher']:.4f} -> {q['kl_to_teacher']:.4f}")

    assert main(["run", str(path)]) == 0  # again: every step cached, the same runs and versions
    states = last_task_states()
    cached = {n: s for n, s in states.items() if n.split("-")[0] in {"prepare", "importance", "slim", "distill",
                                                                     "evaluate", "quantize"}}
    assert set(cached.values()) == {"Cached"} and "quantize-final" in cached, states
    again = json.loads((out / "summary.json").read_text())["stages"][-1]["quantized"]
    assert again == q
