"""``slimmoe export MODEL OUT --for ENGINE``: the architectures name each engine registers,
weights untouched, and every engine limit refused with one ``error:`` line, nothing written.

The expected names are literals copied from the engines' source (not computed by slimmoe):
vLLM vllm/model_executor/models/registry.py, SGLang python/sglang/srt/models/*.py
``EntryClass``, llama.cpp convert_hf_to_gguf.py ``@ModelBase.register(...)``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimmoe.cli.main import main
from tests.tiny_models import tiny_model

ROOT = Path(__file__).parents[1]

EXPECTED = {  # engine -> model_type -> the name in that engine's registry
    "vllm": {"phimoe": "PhiMoEForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"},
    "sglang": {"phimoe": "PhiMoEForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"},
    "llama.cpp": {"phimoe": "PhiMoEForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"},
}


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("students")
    folders = {}
    for model_type in ("phimoe", "mixtral", "qwen3_moe"):
        folders[model_type] = root / model_type
        shape = {"lm_head_bias": True} if model_type == "phimoe" else {}  # Phi-3.5-MoE has both biases
        tiny_model(model_type, **shape).save_pretrained(folders[model_type])
    folders["phimoe_top1"] = root / "phimoe_top1"
    tiny_model("phimoe", num_experts_per_tok=1).save_pretrained(folders["phimoe_top1"])
    folders["phimoe_head_dim"] = root / "phimoe_head_dim"  # 4 heads x 16 on hidden 32
    tiny_model("phimoe", head_dim=16).save_pretrained(folders["phimoe_head_dim"])
    folders["dense"] = root / "dense"  # a family no engine table lists
    folders["dense"].mkdir()
    (folders["dense"] / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return folders


def refused(argv: list[str], out: Path, capsys) -> str:
    """Run the CLI expecting a refusal: exit 2, one ``error:`` line, no OUT; return the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return err[0]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("model_type", ["phimoe", "mixtral", "qwen3_moe"])
def test_export_names_the_engine_architecture(students, tmp_path, capsys, engine, model_type):
    src, out = students[model_type], tmp_path / "served"
    assert main(["export", str(src), str(out), "--for", engine]) == 0
    cfg, before = json.loads((out / "config.json").read_text()), json.loads((src / "config.json").read_text())
    assert cfg["architectures"] == [EXPECTED[engine][model_type]]
    assert {k: v for k, v in cfg.items() if k != "architectures"} == {k: v for k, v in before.items() if k != "architectures"}
    assert list(cfg) == list(before)  # key order kept
    assert before["architectures"] != cfg["architectures"] or model_type != "phimoe"  # the source is untouched
    weights = sorted(p.name for p in src.glob("*.safetensors"))
    assert weights
    for name in weights:
        assert (out / name).read_bytes() == (src / name).read_bytes()
        assert (out / name).stat().st_ino == (src / name).stat().st_ino  # a hard link on one file system
    assert (out / "config.json").stat().st_ino != (src / "config.json").stat().st_ino
    for extra in src.iterdir():  # everything else comes along
        assert (out / extra.name).exists(), extra.name


def test_stock_phimoe_name_differs_from_the_engines(students):
    """Why export exists: transformers saves PhimoeForCausalLM, the engines register PhiMoEForCausalLM."""
    saved = json.loads((students["phimoe"] / "config.json").read_text())["architectures"]
    assert saved == ["PhimoeForCausalLM"]


def test_vllm_refuses_top1_phimoe(students, tmp_path, capsys):
    out = tmp_path / "served"
    line = refused(["export", str(students["phimoe_top1"]), str(out), "--for", "vllm"], out, capsys)
    assert "top-2" in line and "num_experts_per_tok=1" in line and "vllm" in line


def test_sglang_takes_top1_phimoe(students, tmp_path):
    assert main(["export", str(students["phimoe_top1"]), str(tmp_path / "served"), "--for", "sglang"]) == 0


def test_llama_cpp_refuses_phimoe_with_its_own_head_dim(students, tmp_path, capsys):
    out = tmp_path / "served"
    line = refused(["export", str(students["phimoe_head_dim"]), str(out), "--for", "llama.cpp"], out, capsys)
    assert "head_dim=16" in line and "hidden_size / num_attention_heads" in line


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("missing", ["lm_head_bias", "attention_bias"])
def test_phimoe_without_biases_gets_zero_biases_the_engines_require(students, tmp_path, engine, missing):
    """vLLM, SGLang and llama.cpp build PhiMoE's attention and lm_head biases as required
    parameters; an export of a PhiMoE without them adds zeros (one extra indexed file), leaves
    the source untouched, and computes exactly what the source computes."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    tiny_model("phimoe", **{"lm_head_bias": True, "attention_bias": True, missing: False}).save_pretrained(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "served"
    assert main(["export", str(src), str(out), "--for", engine]) == 0
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lm_head_bias"] is True and cfg["attention_bias"] is True
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    added = sorted(k for k, f in index.items() if f == "model-00002-of-00002.safetensors")
    expected = ["lm_head.bias"] if missing == "lm_head_bias" else sorted(
        f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkvo")
    assert added == expected
    with safe_open(str(out / "model-00002-of-00002.safetensors"), "pt") as f:
        assert all(not f.get_tensor(k).any() for k in added)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.equal(ref, got)


def test_vllm_takes_phimoe_with_its_own_head_dim(students, tmp_path):
    out = tmp_path / "served"
    assert main(["export", str(students["phimoe_head_dim"]), str(out), "--for", "vllm"]) == 0
    assert json.loads((out / "config.json").read_text())["head_dim"] == 16


@pytest.mark.parametrize("engine", ["vllm", "sglang", "llama.cpp"])
def test_a_family_the_engine_lacks_is_refused(students, tmp_path, capsys, engine):
    out = tmp_path / "served"
    line = refused(["export", str(students["dense"]), str(out), "--for", engine], out, capsys)
    assert "'llama'" in line and "model_type" in line


@pytest.mark.parametrize("what", ["no folder", "no config.json"])
def test_missing_model_is_one_line(tmp_path, capsys, what):
    src, out = tmp_path / "model", tmp_path / "served"
    if what == "no config.json":
        src.mkdir()
    line = refused(["export", str(src), str(out), "--for", "vllm"], out, capsys)
    assert "MODEL" in line


def test_existing_out_is_replaced_whole(students, tmp_path, capsys):
    out = tmp_path / "served"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["export", str(students["mixtral"]), str(out), "--for", "vllm"]) == 0
    assert not (out / "stale.txt").exists()


def test_llama_cpp_without_converter_is_one_line(students, tmp_path, capsys, monkeypatch):
    import slimmoe.export.writer as writer

    monkeypatch.delenv("SLIMMOE_LLAMA_CPP_CONVERT", raising=False)
    monkeypatch.setattr(writer, "installed_converter", lambda: tmp_path / "absent" / "convert_hf_to_gguf.py")
    out = tmp_path / "served"
    line = refused(["export", str(students["phimoe"]), str(out), "--for", "llama.cpp"], out, capsys)
    assert "scripts/install-llama-cpp" in line and "SLIMMOE_LLAMA_CPP_CONVERT" in line


def test_llama_cpp_converter_env_naming_no_file_is_one_line(students, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLIMMOE_LLAMA_CPP_CONVERT", str(tmp_path / "nowhere.py"))
    out = tmp_path / "served"
    line = refused(["export", str(students["phimoe"]), str(out), "--for", "llama.cpp"], out, capsys)
    assert "nowhere.py" in line and "is not a file" in line


def test_llama_cpp_fills_the_original_context_its_phi3_reader_needs(students):
    """llama.cpp's Phi3MiniModel reads rope_parameters['original_max_position_embeddings']
    unconditionally; transformers 5 leaves it out of a model without long-context scaling."""
    from slimmoe.export.engines import LLAMA_CPP, VLLM, engine_config

    cfg = json.loads((students["phimoe"] / "config.json").read_text())
    assert "original_max_position_embeddings" not in cfg and "original_max_position_embeddings" not in (
        cfg.get("rope_parameters") or {})
    filled = engine_config(LLAMA_CPP, cfg)
    assert filled["original_max_position_embeddings"] == cfg["max_position_embeddings"]
    assert engine_config(VLLM, cfg) == cfg
    kept = {**cfg, "rope_parameters": {**cfg["rope_parameters"], "original_max_position_embeddings": 4096}}
    assert engine_config(LLAMA_CPP, kept) == kept  # Phi-3.5-MoE's own value is never overwritten


def test_cli_subprocess_exit_code(students, tmp_path):
    out = tmp_path / "served"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "slimmoe.cli", "export", str(students["phimoe_top1"]), str(out),
                           "--for", "vllm"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: --for vllm:"), done.stderr
    assert not out.exists()


FAKE_CONVERTER = '''
import argparse, json, sys
from pathlib import Path
import gguf
from safetensors.numpy import load_file
p = argparse.ArgumentParser()
p.add_argument("model"); p.add_argument("--outfile"); p.add_argument("--outtype")
a = p.parse_args()
cfg = json.loads((Path(a.model) / "config.json").read_text())
if cfg["architectures"] != ["PhiMoEForCausalLM"]:  # what llama.cpp's registry refuses
    sys.exit("Model PhimoeForCausalLM is not supported")
if cfg.get("fail"):
    sys.exit("ValueError: something the converter did not like")
w = gguf.GGUFWriter(a.outfile, "phimoe")
for name, t in load_file(str(Path(a.model) / "model.safetensors")).items():
    w.add_tensor(name, t)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
'''


def test_llama_cpp_runs_the_converter_on_the_renamed_copy(students, tmp_path, monkeypatch):
    """The plumbing with a stand-in for convert_hf_to_gguf.py (same command line): it sees the
    engine's architectures name, and its GGUF lands in OUT/model.gguf."""
    gguf = pytest.importorskip("gguf")
    from safetensors import safe_open

    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text(FAKE_CONVERTER)
    monkeypatch.setenv("SLIMMOE_LLAMA_CPP_CONVERT", str(script))
    out = tmp_path / "served"
    assert main(["export", str(students["phimoe"]), str(out), "--for", "llama.cpp"]) == 0
    reader = gguf.GGUFReader(out / "model.gguf")
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "phimoe"
    with safe_open(students["phimoe"] / "model.safetensors", "np") as f:
        assert len(reader.tensors) == len(list(f.keys()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convert_hf_to_gguf.py", "served"]  # no staging left


def test_llama_cpp_converter_failure_is_one_line(students, tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text(FAKE_CONVERTER)
    monkeypatch.setenv("SLIMMOE_LLAMA_CPP_CONVERT", str(script))
    src = tmp_path / "model"
    src.mkdir()
    cfg = json.loads((students["phimoe"] / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "fail": True}))
    out = tmp_path / "served"
    line = refused(["export", str(src), str(out), "--for", "llama.cpp"], out, capsys)
    assert "convert_hf_to_gguf.py failed" in line and "did not like" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convert_hf_to_gguf.py", "model"]


def test_symlinked_files_are_followed(students, tmp_path):
    """A Hugging Face cache snapshot: every file a relative symlink into ../blobs."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in students["mixtral"].iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    out = tmp_path / "elsewhere" / "served"
    assert main(["export", str(snap), str(out), "--for", "sglang"]) == 0
    assert not (out / "model.safetensors").is_symlink()
    assert (out / "model.safetensors").read_bytes() == (blobs / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


def test_llama_cpp_phimoe_export_warns_that_its_math_differs(students, tmp_path, monkeypatch, capsys):
    """llama.cpp's PhiMoE graph uses RMSNorm and softmax top-2 routing (make test-engines
    measures the gap); the export says so in one warning line and still writes the GGUF."""
    pytest.importorskip("gguf")
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text(FAKE_CONVERTER)
    monkeypatch.setenv("SLIMMOE_LLAMA_CPP_CONVERT", str(script))
    assert main(["export", str(students["phimoe"]), str(tmp_path / "served"), "--for", "llama.cpp"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "RMSNorm" in warning[0] and "sparsemixer" in warning[0]
    assert main(["export", str(students["phimoe"]), str(tmp_path / "vllm"), "--for", "vllm"]) == 0
    assert "warning:" not in capsys.readouterr().err
