"""A pipeline stage's ``export: [vllm, sglang, llama.cpp]``: the pre-flight refuses, before any
work, an engine that could not serve the stage's model; the export step's cache key is the
model's content and the engine (the end-to-end run is in tests/test_pipeline.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_models import tiny_config, tiny_model

from slimmoe.errors import UserError
from slimmoe.pipeline.preflight import check_exports
from slimmoe.pipeline.steps import ModelRef
from tasks import code_reach, steps
from tasks.caching import step_key
from tasks.tracking import TrackingSettings


def test_engines_that_serve_the_stage_model_pass(monkeypatch):
    monkeypatch.delenv("SLIMMOE_LLAMA_CPP_CONVERT", raising=False)
    check_exports(0, ["vllm", "sglang"], tiny_config("phimoe"))
    check_exports(0, [], tiny_config("phimoe", num_experts_per_tok=1))


def test_vllm_top2_limit_names_the_stage_and_entry():
    with pytest.raises(UserError) as e:
        check_exports(2, ["sglang", "vllm"], tiny_config("phimoe", num_experts_per_tok=1))
    assert str(e.value).startswith("stages.2.export.1: PhiMoE in vLLM routes top-2 only"), e.value
    assert "--for" not in str(e.value)


def test_llama_cpp_head_dim_limit_comes_before_the_converter(monkeypatch):
    monkeypatch.delenv("SLIMMOE_LLAMA_CPP_CONVERT", raising=False)
    tiny = tiny_config("phimoe", num_attention_heads=2, head_dim=8)  # Phi-tiny's shape: head_dim != hidden / heads
    with pytest.raises(UserError, match=r"^stages\.1\.export\.0: llama\.cpp's PhiMoE converter ignores head_dim"):
        check_exports(1, ["llama.cpp"], tiny)


def test_llama_cpp_needs_its_converter(monkeypatch, tmp_path):
    import slimmoe.export.writer as writer

    monkeypatch.delenv("SLIMMOE_LLAMA_CPP_CONVERT", raising=False)
    monkeypatch.setattr(writer, "installed_converter", lambda: tmp_path / "absent" / "convert_hf_to_gguf.py")
    with pytest.raises(UserError, match=r"^stages\.0\.export\.1: .*run scripts/install-llama-cpp"):
        check_exports(0, ["vllm", "llama.cpp"], tiny_config("phimoe"))
    monkeypatch.setenv("SLIMMOE_LLAMA_CPP_CONVERT", str(tmp_path / "convert_hf_to_gguf.py"))
    with pytest.raises(UserError, match=r"^stages\.0\.export\.0: SLIMMOE_LLAMA_CPP_CONVERT=.* is not a file"):
        check_exports(0, ["llama.cpp"], tiny_config("phimoe"))


def test_a_family_the_engine_lacks_is_refused():
    with pytest.raises(UserError, match=r"^stages\.0\.export\.0: vLLM has no implementation for model_type 'jamba'"):
        check_exports(0, ["vllm"], {"model_type": "jamba"})


STAND_IN_CONVERTER = """
import argparse, json, sys
from pathlib import Path
p = argparse.ArgumentParser()
p.add_argument("model"); p.add_argument("--outfile"); p.add_argument("--outtype")
a = p.parse_args()
if json.loads((Path(a.model) / "config.json").read_text())["architectures"] != ["PhiMoEForCausalLM"]:
    sys.exit("Model PhimoeForCausalLM is not supported")
Path(a.outfile).write_bytes(b"GGUF")
"""


def test_the_export_step_writes_the_engine_folder_and_tags_the_stage_run(tmp_path, monkeypatch):
    """The task's body (the flow run is in tests/test_pipeline.py): llama.cpp through a stand-in
    converter with llama.cpp's command line, the folder named on the stage's run."""
    script = tmp_path / "llama.cpp" / "convert_hf_to_gguf.py"
    (script.parent / "gguf-py").mkdir(parents=True)  # a checkout's own gguf package
    script.write_text(STAND_IN_CONVERTER)
    monkeypatch.setenv("SLIMMOE_LLAMA_CPP_CONVERT", str(script))
    tags = {}
    stub = SimpleNamespace(client=SimpleNamespace(set_tag=lambda run, k, v: tags.update({(run, k): v})))
    monkeypatch.setattr(steps, "tracker", lambda tracking: stub)
    tiny_model("phimoe").save_pretrained(tmp_path / "final" / "model")
    out = tmp_path / "final" / "export" / "llama.cpp"
    res = steps.export.fn("final", ModelRef(path=str(tmp_path / "final" / "model"), fingerprint="f"), "llama.cpp",
                          out, TrackingSettings(uri="sqlite:///a.db", experiment="e"), "run-1")
    assert res == {"engine": "llama.cpp", "path": str(out)}
    assert (out / "model.gguf").read_bytes() == b"GGUF"
    assert tags == {("run-1", "slimmoe.export.llama.cpp"): str(out)}


def export_inputs(**change) -> dict:
    inputs = dict(stage="mid", model=ModelRef(path="/a/out/mid/model", fingerprint="f-model"), engine="vllm",
                  out_dir=Path("/a/out/mid/export/vllm"), tracking=TrackingSettings(uri="sqlite:///a.db", experiment="e"),
                  run_id="run-1")
    return {**inputs, **change}


def test_export_key_is_the_model_content_and_the_engine():
    key = lambda **change: step_key(steps.export, **export_inputs(**change))  # noqa: E731
    base = key()
    assert key(model=ModelRef(path="/elsewhere/model", fingerprint="f-model"), run_id="run-2",
               tracking=TrackingSettings(uri="http://127.0.0.1:5000", experiment="x")) == base
    changed = [key(model=ModelRef(path="/a/out/mid/model", fingerprint="f-other")),
               key(engine="sglang", out_dir=Path("/a/out/mid/export/vllm"))]
    assert len({base, *changed}) == len(changed) + 1


def test_export_step_reaches_the_export_code_only():
    reach = set(code_reach.reached_modules(steps.export.fn))
    assert {"slimmoe.export.writer", "slimmoe.export.engines"} <= reach
    assert not {m for m in reach if m.startswith(("slimmoe.prune", "slimmoe.distill", "slimmoe.evaluation",
                                                  "slimmoe.cli"))}, reach
