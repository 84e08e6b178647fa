"""The pipeline YAML schema and `slimmoe run`'s handling of bad configs (exit 2, field named)."""

from __future__ import annotations

import pytest
import yaml
from tiny_models import tiny_config

from slimmoe.cli import main
from slimmoe.config import SlimTargets
from slimmoe.pipeline.resolve import expand_schedule
from slimmoe.pipeline.schema import DEFAULT_STAGE_TOKENS, PipelineConfig, load_pipeline_config


def write(tmp_path, data: dict):
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


BASE = {"name": "p", "teacher": "t", "output_dir": "o", "data": {"train": "d.txt"}}


def test_two_line_stage_gets_working_defaults(tmp_path):
    cfg = load_pipeline_config(write(tmp_path, {**BASE, "stages": [{"name": "final", "expert_intermediate_size": 64}]}))
    st = cfg.stages[0]
    assert st.distill.tokens == DEFAULT_STAGE_TOKENS and st.importance.loss == "kd_topk_renorm"
    assert st.targets() == SlimTargets(expert_intermediate_size=64)
    assert cfg.tracking_uri().startswith("sqlite:///") and cfg.tracking_uri().endswith("o/mlflow.db")


def test_overrides_and_prune_only_stage(tmp_path):
    path = write(tmp_path, {**BASE, "stages": [{"name": "a", "distill": {"lr": 1e-3}}, {"name": "b"}]})
    cfg = load_pipeline_config(path, ["stages.1.distill=null", "stages.0.distill.tokens=123", "data.seq_len=64"])
    assert cfg.stages[0].distill.tokens == 123 and cfg.stages[0].distill.lr == 1e-3
    assert cfg.stages[1].distill is None and cfg.data.seq_len == 64


@pytest.mark.parametrize("data,needle", [
    ({**BASE, "stages": [{"name": "a", "expert_intermediate_size": 8, "distil": {}}]}, "stages.0.distil: unknown key"),
    ({**BASE, "stages": []}, "exactly one"),
    ({**BASE, "stages": [{"name": "a"}], "schedule": {"final": {"num_experts": 2}}}, "exactly one"),
    ({**BASE, "stages": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({**BASE, "stages": [{"name": "a/b"}]}, "stages.0.name"),
    ({**BASE, "stages": [{"name": "a", "distill": {"tokens": 0}}]}, "stages.0.distill.tokens"),
    ({**BASE, "stages": [{"name": "a"}, {"name": "b", "export": ["vllm", "tensorrt"]}]},
     "stages.1.export.1: unknown engine 'tensorrt'; choose one of vllm, sglang, llama.cpp"),
    ({**BASE, "stages": [{"name": "a", "export": ["vllm", "vllm"]}]}, "stages.0.export: vllm listed more than once"),
])
def test_bad_configs_exit_2_naming_the_field(tmp_path, capsys, data, needle):
    assert main(["run", str(write(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and needle in err, err


def test_missing_teacher_and_data_fail_before_any_flow(tmp_path, capsys):
    path = write(tmp_path, {**BASE, "teacher": str(tmp_path / "nope"), "stages": [{"name": "a"}]})
    assert main(["run", str(path)]) == 2
    assert "teacher: no such checkpoint folder" in capsys.readouterr().err
    tiny_config("mixtral").save_pretrained(tmp_path / "t")
    path = write(tmp_path, {**BASE, "teacher": str(tmp_path / "t"), "data": {"train": str(tmp_path / "x.txt")},
                            "stages": [{"name": "a"}]})
    assert main(["run", str(path)]) == 2
    assert "data.train: no such file" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such config file" in capsys.readouterr().err


def test_schedule_expands_to_named_stages_ending_at_final():
    cfg = PipelineConfig.model_validate({**BASE, "schedule": {"num_stages": 3, "final": {"expert_intermediate_size": 4,
                                                                                          "num_key_value_heads": 1}}})
    out = expand_schedule(cfg, tiny_config("mixtral"))
    assert [s.name for s in out.stages] == ["stage1", "stage2", "final"] and out.schedule is None
    assert out.stages[-1].targets() == SlimTargets(expert_intermediate_size=4, num_key_value_heads=1)
    widths = [s.expert_intermediate_size for s in out.stages]
    assert widths == sorted(widths, reverse=True) and widths[0] < 16


@pytest.mark.parametrize("stages,needle", [
    ([{"name": "a", "expert_intermediate_size": 8}, {"name": "b", "expert_intermediate_size": 12}],
     "stages.1.expert_intermediate_size: target 12 is larger than the source's 8"),
    ([{"name": "a", "num_key_value_heads": 3}], "stages.0.num_key_value_heads"),
    ([{"name": "a", "num_experts": 9}], "stages.0.num_experts"),
])
def test_impossible_stage_targets_fail_before_any_flow(tmp_path, capsys, stages, needle):
    tiny_config("mixtral").save_pretrained(tmp_path / "t")
    (tmp_path / "d.txt").write_text("text")
    path = write(tmp_path, {**BASE, "teacher": str(tmp_path / "t"), "data": {"train": str(tmp_path / "d.txt")},
                            "output_dir": str(tmp_path / "o"), "stages": stages})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and needle in err, err
    assert not (tmp_path / "o").exists()  # no flow started, nothing written
