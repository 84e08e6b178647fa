"""`slimmoe prune` and `slimmoe eval` as the contract in DESIGN.md describes them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import tiny_model, tiny_teacher_with_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from slimmoe.cli import main
from slimmoe.prune.plan import SlimPlan


@pytest.fixture(scope="module")
def phimoe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("phimoe")
    tiny_model("phimoe").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def phimoe_with_tokenizer(tmp_path_factory):
    """A tiny phimoe whose vocabulary is a BPE tokenizer trained on a slice of the corpus, plus
    a ``tokenizer.model`` of its own bytes, standing for the SentencePiece file Phi-3.5-MoE ships
    (transformers 5 reads it on load and never writes it back)."""
    model_dir, text = tiny_teacher_with_tokenizer(tmp_path_factory.mktemp("phimoe_tok"))
    (model_dir / "tokenizer.model").write_bytes(bytes(range(256)) * 4)
    return model_dir, text


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_writes_loadable_checkpoint_and_plan(phimoe_with_tokenizer, tmp_path, capsys):
    model_dir, text = phimoe_with_tokenizer
    out = tmp_path / "slim"
    code, stdout, _ = run_cli(["prune", model_dir, out, "--expert-intermediate-size", 8, "--num-key-value-heads", 1,
                               "--num-experts", 3, "--data", text, "--samples", 4, "--seq-len", 32, "--no-progress"], capsys)
    assert code == 0
    result = json.loads(stdout)
    assert result["params_after"]["total_params"] < result["params_before"]["total_params"]
    model = AutoModelForCausalLM.from_pretrained(out)  # stock loader, no remote code
    assert model.config.intermediate_size == 8
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
    assert model.config.num_local_experts == 3
    plan = json.loads((out / "slim_plan.json").read_text())
    assert len(plan["layers"]) == 2
    for layer in plan["layers"]:
        assert len(layer["experts"]) == 3 and all(0 <= e < 4 for e in layer["experts"])
        assert [len(n) for n in layer["expert_neurons"]] == [8, 8, 8]
        assert all(0 <= j < 16 for n in layer["expert_neurons"] for j in n)
        assert len(layer["kv_groups"]) == 1
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    # llama.cpp's Phi converter reads tokenizer.model: the student keeps the teacher's, byte for byte
    assert (out / "tokenizer.model").read_bytes() == (model_dir / "tokenizer.model").read_bytes()

    code, stdout, _ = run_cli(["eval", out, "--data", text, "--seq-len", 32, "--max-blocks", 4], capsys)
    assert code == 0
    metrics = json.loads(stdout)
    assert set(metrics) == {"perplexity", "total_params", "active_params", "tokens_per_second"}
    assert metrics["total_params"] == sum(p.numel() for p in model.parameters())
    assert 1.0 < metrics["perplexity"] < 10 * len(open(out / "tokenizer.json").read())
    assert metrics["active_params"] < metrics["total_params"] and metrics["tokens_per_second"] > 0


def test_prune_without_data_warns_and_uses_random_tokens(phimoe_dir, tmp_path, capsys, caplog):
    code, _, _ = run_cli(["prune", phimoe_dir, tmp_path / "o", "--expert-intermediate-size", 4, "--samples", 2,
                          "--seq-len", 8, "--no-progress"], capsys)
    assert code == 0 and "random token" in caplog.text
    assert SlimPlan.load(tmp_path / "o").target["expert_intermediate_size"] == 4


def test_active_params_follow_the_definition(phimoe_dir):
    from slimmoe.evaluation.params import parameter_counts

    model = AutoModelForCausalLM.from_pretrained(phimoe_dir)
    expert = 3 * 16 * 32  # gate, up, down of one expert
    counts = parameter_counts(model)
    assert counts["total_params"] - counts["active_params"] == 2 * (4 - 2) * expert  # 2 layers, 2 of 4 idle


def dense_dir(tmp_path):
    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def six_head_dir(tmp_path):
    tiny_model("mixtral", hidden_size=48, num_attention_heads=6, num_key_value_heads=6).save_pretrained(tmp_path / "six")
    return tmp_path / "six"


BAD = [
    ("missing path", lambda d, t: ["prune", t / "nope", t / "o", "--expert-intermediate-size", 8], "MODEL"),
    ("dense model", lambda d, t: ["prune", dense_dir(t), t / "o", "--expert-intermediate-size", 8], "not a Mixture-of-Experts"),
    ("target larger", lambda d, t: ["prune", d, t / "o", "--expert-intermediate-size", 32], "expert_intermediate_size"),
    ("more experts", lambda d, t: ["prune", d, t / "o", "--num-experts", 9], "num_experts"),
    ("kv not dividing", lambda d, t: ["prune", six_head_dir(t), t / "o", "--num-key-value-heads", 4], "num_key_value_heads"),
    ("zero samples", lambda d, t: ["prune", d, t / "o", "--expert-intermediate-size", 8, "--samples", 0], "samples"),
    ("negative size", lambda d, t: ["prune", d, t / "o", "--expert-intermediate-size", -1], "expert_intermediate_size"),
    ("missing data", lambda d, t: ["prune", d, t / "o", "--expert-intermediate-size", 8, "--data", t / "no.txt"], "data"),
    ("eval missing", lambda d, t: ["eval", t / "nope"], "MODEL"),
]


@pytest.mark.parametrize("name,argv,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_2_with_one_error_line(name, argv, needle, phimoe_dir, tmp_path, capsys):
    code, _, err = run_cli(argv(phimoe_dir, tmp_path), capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_entry_point_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "slimmoe.cli", "prune", str(tmp_path / "x"), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: MODEL")
    assert "Traceback" not in proc.stderr


def test_existing_foreign_output_is_not_damaged(phimoe_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(["prune", phimoe_dir, out, "--expert-intermediate-size", 8], capsys)
    assert code == 2 and "OUT" in err
    assert (out / "precious.txt").read_text() == "keep me"


def test_failed_run_keeps_the_previous_output(phimoe_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(["prune", phimoe_dir, out, "--expert-intermediate-size", 8, "--samples", 2, "--seq-len", 8, "--no-progress"], capsys)[0] == 0
    before = (out / "slim_plan.json").read_text()
    code, _, _ = run_cli(["prune", phimoe_dir, out, "--expert-intermediate-size", 64], capsys)
    assert code == 2 and (out / "slim_plan.json").read_text() == before
    torch.testing.assert_close(  # and it still loads
        AutoModelForCausalLM.from_pretrained(out).config.intermediate_size, 8)
