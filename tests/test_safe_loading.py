"""Safe loading: safetensors only unless pickle is opted into, no checkpoint code unless
trust_remote_code is on, YAML read with a safe loader, servers documented on 127.0.0.1."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import tiny_model

from slimmoe.cli import main
from slimmoe.errors import UserError
from slimmoe.io.loading import load_config, load_model, loading_policy
from slimmoe.pipeline.schema import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pickle_ckpt(tmp_path_factory):
    """A tiny phimoe whose only weights are a pickle ``pytorch_model.bin``."""
    d = tmp_path_factory.mktemp("pickle")
    model = tiny_model("phimoe")
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    return d, model


def errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("argv", [
    ["eval", "{m}"],
    ["prune", "{m}", "{out}", "--expert-intermediate-size", "8", "--samples", "2", "--seq-len", "8"],
    ["distill", "{m}", "{m}", "{out}", "--tokens", "64", "--seq-len", "8"],
])
def test_pickle_only_checkpoint_is_refused_by_every_command(pickle_ckpt, tmp_path, capsys, argv):
    d, _ = pickle_ckpt
    assert main([a.format(m=d, out=tmp_path / "out") for a in argv]) == 2
    (line,) = errors(capsys.readouterr().err)
    assert "pytorch_model.bin" in line and "--allow-pickle" in line and "safetensors" in line
    assert not (tmp_path / "out").exists()


def test_allow_pickle_loads_the_same_weights(pickle_ckpt, capsys):
    d, model = pickle_ckpt
    with loading_policy(allow_pickle=True):
        loaded = load_model(str(d), dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert main(["eval", str(d), "--allow-pickle", "--seq-len", "8", "--max-blocks", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == sum(p.numel() for p in model.parameters())


def test_pipeline_refuses_a_pickle_teacher_unless_allow_pickle(pickle_ckpt, tmp_path, capsys):
    d, _ = pickle_ckpt
    (tmp_path / "c.txt").write_text("x")
    cfg = {"name": "p", "teacher": str(d), "output_dir": str(tmp_path / "o"), "data": {"train": str(tmp_path / "c.txt")},
           "stages": [{"name": "a", "expert_intermediate_size": 8}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "p.yaml")]) == 2
    (line,) = errors(capsys.readouterr().err)
    assert line.startswith("error: teacher: ") and "allow_pickle: true" in line
    # opted in, the weights check passes and the next check (the teacher has no tokenizer) speaks
    assert main(["run", str(tmp_path / "p.yaml"), "--set", "allow_pickle=true"]) == 2
    (line,) = errors(capsys.readouterr().err)
    assert "pytorch_model.bin" not in line and "has no tokenizer" in line
    assert not (tmp_path / "o").exists()


def test_safety_switches_are_off_by_default_and_part_of_the_logged_params(tmp_path):
    from tasks.tracking import _flatten

    cfg = PipelineConfig.model_validate({"name": "p", "teacher": "t", "output_dir": "o", "data": {"train": "d.txt"},
                                         "stages": [{"name": "a"}]})
    assert cfg.trust_remote_code is False and cfg.allow_pickle is False
    params = _flatten(cfg.model_dump(mode="json"))  # what start_pipeline_run logs
    assert params["trust_remote_code"] == "False" and params["allow_pickle"] == "False"


REMOTE_CODE = """
from pathlib import Path
Path({sentinel!r}).write_text("ran")
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "evil_moe"
"""


def test_checkpoint_code_runs_only_with_trust_remote_code(tmp_path):
    d = tmp_path / "remote"
    d.mkdir()
    sentinel = tmp_path / "ran.txt"
    (d / "configuration_evil.py").write_text(REMOTE_CODE.format(sentinel=str(sentinel)))
    (d / "config.json").write_text(json.dumps({"model_type": "evil_moe",
                                               "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    with pytest.raises(UserError, match="trust_remote_code"):
        load_config(str(d), "teacher")
    assert not sentinel.exists()
    with loading_policy(trust_remote_code=True):  # the opt-in reaches transformers
        assert load_config(str(d), "teacher").model_type == "evil_moe"
    assert sentinel.read_text() == "ran"


def test_yaml_python_tags_are_refused_not_executed(tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    (tmp_path / "p.yaml").write_text(f"name: !!python/object/apply:os.system ['touch {sentinel}']\n"
                                     "teacher: t\noutput_dir: o\ndata: {train: d.txt}\nstages: [{name: a}]\n")
    assert main(["run", str(tmp_path / "p.yaml")]) == 2
    (line,) = errors(capsys.readouterr().err)
    assert "p.yaml: not valid YAML" in line
    assert not sentinel.exists()


SERVER = re.compile(r"(prefect server start|mlflow (?:ui|server))\b[^`\n\"]*")


def test_documented_server_commands_bind_to_localhost():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "flows" / "commands.py"]
    found = [(f.name, m.group(0)) for f in files for m in SERVER.finditer(f.read_text())]
    assert len(found) >= 4
    bad = [(f, cmd) for f, cmd in found if "--host 127.0.0.1" not in cmd]
    assert not bad, bad
