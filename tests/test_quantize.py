"""``slimmoe quantize``'s side in slimmoe's own environment: the config, the checks made before
llm-compressor's process starts, its one-line errors, and reading a compressed-tensors
checkpoint. None of this needs llm-compressor's environment (tests/test_quantize_engine.py does)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from slimmoe.cli.main import main
from slimmoe.config import format_validation_error
from slimmoe.quantize import DEFAULT_IGNORE, INSTALL_SCRIPT, QuantizeConfig, check_shapes, describe_checkpoint
from slimmoe.quantize import config as qconfig
from tests.tiny_models import tiny_model


def error_of(**kw) -> str:
    with pytest.raises(ValidationError) as e:
        QuantizeConfig(**kw)
    return format_validation_error(e.value)


def test_config_defaults_and_validation():
    c = QuantizeConfig(scheme="W4A16")
    assert c.group_size == 128 and c.ignore == DEFAULT_IGNORE and c.python is None
    assert "lm_head" in c.ignore and any("router" in p for p in c.ignore) and any("gate$" in p for p in c.ignore)
    assert error_of(scheme="INT3").startswith("scheme: Input should be 'FP8_DYNAMIC', 'W4A16' or 'W8A8'")
    assert error_of().startswith("scheme: Field required")
    assert error_of(scheme="W4A16", group_size=100).startswith("group_size:")
    assert error_of(scheme="FP8_DYNAMIC", group_size=64) == "group_size: applies to W4A16 only, not FP8_DYNAMIC"
    bad_regex = error_of(scheme="W8A8", ignore=["re:(unclosed"])
    assert bad_regex.startswith("ignore: entry 0 ('re:(unclosed') is not a regular expression")
    assert error_of(scheme="W8A8", schem="x").startswith("schem: unknown key (did you mean 'scheme'?)")


def test_w4a16_group_must_divide_every_input_width():
    cfg = tiny_model("phimoe").config.to_dict()  # hidden 32, 4 heads x 8, experts 16 wide
    check_shapes(cfg, QuantizeConfig(scheme="FP8_DYNAMIC"))  # no groups: any width
    with pytest.raises(Exception, match=r"^group_size: W4A16 groups 128 input columns, but hidden_size = 32"):
        check_shapes(cfg, QuantizeConfig(scheme="W4A16"))
    with pytest.raises(Exception, match=r"intermediate_size = 16 is not a multiple of 32"):
        check_shapes(cfg, QuantizeConfig(scheme="W4A16", group_size=32))
    qwen = {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "intermediate_size": 100,
            "moe_intermediate_size": 32}  # a dense MLP width no MoE layer has is not checked
    check_shapes(qwen, QuantizeConfig(scheme="W4A16", group_size=32))


@pytest.fixture
def model_dir(tmp_path) -> Path:
    tiny_model("phimoe").save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No llm-compressor environment anywhere slimmoe looks."""
    monkeypatch.delenv(qconfig.PYTHON_ENV, raising=False)
    monkeypatch.setattr(qconfig, "python_candidates", lambda: [tmp_path / "nowhere" / "bin" / "python"])


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main(["quantize", *map(str, argv)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_missing_environment_names_the_install_script(model_dir, tmp_path, no_env, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, model_dir, out, "--scheme", "FP8_DYNAMIC")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: python: no llm-compressor environment") and INSTALL_SCRIPT in err[0]
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_named_interpreter_that_does_not_exist(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, model_dir, out, "--scheme", "W8A8", "--python", tmp_path / "py")
    assert code == 2 and err == [f"error: python: {tmp_path / 'py'} does not exist; run {INSTALL_SCRIPT} "
                                 "or point it at llm-compressor's Python"]
    monkeypatch.setenv(qconfig.PYTHON_ENV, str(tmp_path / "py2"))
    code, err = run_cli(capsys, model_dir, out, "--scheme", "W8A8")
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {qconfig.PYTHON_ENV}: ")
    assert not out.exists()


def test_interpreter_without_llmcompressor(model_dir, tmp_path, capsys):
    """A Python that exists but lacks llm-compressor (here: this one, which must lack it)."""
    import importlib.util
    import sys

    if importlib.util.find_spec("llmcompressor") is not None:
        pytest.skip("llmcompressor is importable in slimmoe's own environment")
    out = tmp_path / "out"
    code, err = run_cli(capsys, model_dir, out, "--scheme", "FP8_DYNAMIC", "--python", sys.executable)
    assert code == 2 and err == [f"error: python: {sys.executable} has no llmcompressor; run {INSTALL_SCRIPT}"]
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_checks_before_the_worker_starts(model_dir, tmp_path, no_env, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, tmp_path / "missing", out, "--scheme", "FP8_DYNAMIC")
    assert code == 2 and err == [f"error: MODEL: {tmp_path / 'missing'} is not a folder"]
    code, err = run_cli(capsys, model_dir, out, "--scheme", "W4A16")  # hidden 32 < one group of 128
    assert code == 2 and len(err) == 1 and err[0].startswith("error: group_size: W4A16 groups 128 input columns")
    code, err = run_cli(capsys, model_dir, out, "--scheme", "FP8_DYNAMIC", "--group-size", "64")
    assert code == 2 and err == ["error: group_size: applies to W4A16 only, not FP8_DYNAMIC"]
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "fp8"}}))
    code, err = run_cli(capsys, model_dir, out, "--scheme", "FP8_DYNAMIC")
    assert code == 2 and len(err) == 1 and "is already quantized" in err[0]
    assert not out.exists()


def test_bad_scheme_is_a_usage_error(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(model_dir), str(tmp_path / "out"), "--scheme", "INT3"])
    assert e.value.code == 2
    assert "invalid choice: 'INT3'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_describe_checkpoint_reads_the_headers(tmp_path):
    """FP8 weights with scales, packed int4 weights with scales, and the kept head and router."""
    e = "model.layers.0.block_sparse_moe.experts.{}.w1"
    tensors = {
        f"{e.format(0)}.weight": torch.zeros(8, 8, dtype=torch.float8_e4m3fn),
        f"{e.format(0)}.weight_scale": torch.ones(8, 1),
        f"{e.format(1)}.weight_packed": torch.zeros(8, 1, dtype=torch.int32),
        f"{e.format(1)}.weight_scale": torch.ones(8, 1),
        f"{e.format(1)}.weight_shape": torch.tensor([8, 8]),
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8, dtype=torch.float8_e4m3fn),
        "model.layers.0.self_attn.q_proj.weight_scale": torch.ones(8, 1),
        "model.layers.0.block_sparse_moe.gate.weight": torch.zeros(2, 8),
        "model.layers.0.input_layernorm.weight": torch.zeros(8),
        "lm_head.weight": torch.zeros(16, 8),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    d = describe_checkpoint(tmp_path)
    assert d["quantized_weights"] == 3 and d["quantized_expert_weights"] == 2
    assert d["quantized_dtypes"] == {"F8_E4M3": 2, "I32": 1} and d["unquantized_expert_weights"] == 0
    assert d["unquantized_weights"] == ["lm_head", "model.layers.0.block_sparse_moe.gate"]
    assert d["safetensors_bytes"] == (tmp_path / "model.safetensors").stat().st_size


def int8_checkpoint(src: Path):
    """A W8A8-format checkpoint of a tiny phimoe written by hand: int8 experts and attention,
    one scale per output channel, as llm-compressor writes them. Returns the original model."""
    model = tiny_model("phimoe")
    model.save_pretrained(src)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        plain = {k: f.get_tensor(k) for k in f.keys()}
    quantized = {}
    for name, t in plain.items():
        if name.endswith(".weight") and t.dim() == 2 and ("experts" in name or "self_attn" in name):
            scale = t.abs().amax(dim=1, keepdim=True) / 127
            quantized[name] = torch.round(t / scale).to(torch.int8)
            quantized[name.replace(".weight", ".weight_scale")] = scale
        else:
            quantized[name] = t
    save_file(quantized, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "int-quantized",
                                  "quantization_status": "compressed",
                                  "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                                                "format": "int-quantized"}}}
    (src / "config.json").write_text(json.dumps(cfg))
    return model


def test_dequantized_copy_of_int8_experts(tmp_path):
    """W8A8's int8 experts (which transformers 5.24 does not dequantize): weight x scale per
    output channel, in the config's dtype, quantization_config and parameters gone."""
    from slimmoe.io.loading import load_model
    from slimmoe.quantize.checkpoint import dequantize_checkpoint, needs_dequantized_copy

    src = tmp_path / "q"
    model = int8_checkpoint(src)
    assert needs_dequantized_copy(src) and not needs_dequantized_copy(tmp_path / "nothing")
    out = dequantize_checkpoint(src, tmp_path / "plain")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    back = load_model(out)
    w = "model.layers.0.mlp.experts.gate_up_proj"
    rel = ((back.get_parameter(w) - model.get_parameter(w)).norm() / model.get_parameter(w).norm()).item()
    assert 0 < rel < 0.01  # int8 per channel: ~0.5%
    router = "model.layers.0.mlp.router.weight"
    assert torch.equal(back.get_parameter(router), model.get_parameter(router))


def test_slimmoe_eval_reads_int8_experts_through_a_dequantized_copy(tmp_path, capsys):
    int8_checkpoint(tmp_path / "q")
    assert main(["eval", str(tmp_path / "q"), "--max-blocks", "2", "--seq-len", "16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] > 1 and result["total_params"] > 0
