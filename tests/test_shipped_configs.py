"""Every YAML the project ships validates against the real schema, and the deployments in
deployments/prefect.yaml carry exactly the configs of deployments/configs/ (no drift)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from slimmoe.config import load_yaml
from slimmoe.pipeline.schema import PipelineConfig, load_pipeline_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "deployments" / "configs"
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
COMPRESS = "flows/compress.py:compress"
TEACHER = "flows/teacher.py:teacher"
ABLATION = "flows/ablation.py:ablation"  # its configs are deployments/configs/ablation-*.yaml
# Not shipped: virtual environments, caches, run outputs (as in .gitignore).
SKIP_DIRS = {"outputs", "runs", "mlruns", "__pycache__", "tmp", "node_modules"}


def shipped_yaml_files() -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames
                       if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info")]
        found += [Path(dirpath) / f for f in filenames if f.endswith((".yaml", ".yml"))]
    return sorted(found)


def deployments() -> list[dict]:
    return load_yaml(PREFECT_YAML)["deployments"]


def compress_deployments() -> dict[str, dict]:
    return {d["name"]: d for d in deployments() if d["entrypoint"] == COMPRESS}


def ablation_deployments() -> dict[str, dict]:
    return {d["name"]: d for d in deployments() if d["entrypoint"] == ABLATION}


def teacher_config_deployments() -> dict[str, dict]:
    """The teacher deployments that carry a deployments/configs/teacher-*.yaml (the file holds the
    flow's parameters themselves, not a ``config:`` of them)."""
    return {d["name"]: d for d in deployments() if d["entrypoint"] == TEACHER and d["name"].startswith("teacher-")}


def test_every_shipped_yaml_validates():
    files = shipped_yaml_files()
    assert PREFECT_YAML in files and len(list(CONFIGS.glob("*.yaml"))) >= 3, files
    checked = []
    for path in files:
        rel = path.relative_to(ROOT)
        if path == PREFECT_YAML:
            for d in deployments():
                if d["entrypoint"] == COMPRESS:
                    PipelineConfig.model_validate(d["parameters"]["config"])
                    checked.append(f"{rel}:compress/{d['name']}")
                if d["entrypoint"] == ABLATION:
                    from slimmoe.pipeline.ablation_schema import AblationConfig

                    AblationConfig.model_validate(d["parameters"]["config"])
                    checked.append(f"{rel}:ablation/{d['name']}")
                if d["entrypoint"] == TEACHER and d["name"] in teacher_config_deployments():
                    from flows.teacher import teacher_params

                    teacher_params(d["parameters"])
                    checked.append(f"{rel}:teacher/{d['name']}")
        elif path.parent == CONFIGS and path.stem.startswith("teacher"):
            from flows.teacher import load_teacher_params

            load_teacher_params(path)
            checked.append(str(rel))
        elif path.parent == CONFIGS and path.stem.startswith("ablation"):
            from slimmoe.pipeline.ablation_schema import load_ablation_config

            load_ablation_config(path)
            checked.append(str(rel))
        elif path.parent == CONFIGS:
            load_pipeline_config(path)  # the loader of `slimmoe run`: unknown keys are errors
            checked.append(str(rel))
        else:
            pytest.fail(f"{rel}: a shipped YAML this test does not know how to validate; add it here")
    assert len(checked) == len(list(CONFIGS.glob("*.yaml"))) + len(compress_deployments()) + \
        len(ablation_deployments()) + len(teacher_config_deployments())


def test_teacher_deployment_parameters_validate():
    teacher = pytest.importorskip("slimmoe.pipeline.demo_teacher", reason="the teacher flow is not in this checkout yet")
    found = [d for d in deployments() if d["entrypoint"] == TEACHER]
    assert {d["name"] for d in found} == {"demo", "teacher-gutenberg"}
    for d in found:
        teacher.TeacherConfig.model_validate(d["parameters"]["config"])
        assert set(d["parameters"]) <= {"config", "output_dir", "tracking_uri", "experiment", "split"}


def test_prefect_yaml_parameters_equal_the_config_files():
    by_name = {**compress_deployments(), **ablation_deployments(), **teacher_config_deployments()}
    files = {p.stem: p for p in CONFIGS.glob("*.yaml")}
    assert set(by_name) == set(files), "one compress/ablation/teacher deployment per deployments/configs/*.yaml, same name"
    for name, path in files.items():
        content = yaml.safe_load(path.read_text())
        expected = content if name in teacher_config_deployments() else {"config": content}
        assert by_name[name]["parameters"] == expected, (
            f"deployments/prefect.yaml compress/{name} differs from {path.relative_to(ROOT)}")


def test_deployments_layout():
    doc = load_yaml(PREFECT_YAML)
    names = {(d["entrypoint"].split(":")[-1], d["name"]) for d in doc["deployments"]}
    assert names == {("compress", "demo"), ("compress", "phi-mini-moe"), ("compress", "phi-tiny-moe"),
                     ("teacher", "demo"), ("ablation", "ablation-demo"), ("node", "default"),
                     ("teacher", "teacher-gutenberg"), ("ablation", "ablation-gutenberg-grid")}
    for d in doc["deployments"]:
        assert d["work_pool"]["name"] == "slimmoe"
        assert (ROOT / d["entrypoint"].split(":")[0]).parent.is_dir()
    (step,) = doc["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $SLIMMOE_ROOT }}"}}
    assert "# schedules:" in PREFECT_YAML.read_text() and "cron:" in PREFECT_YAML.read_text()


PHI35 = dict(hidden_size=4096, intermediate_size=6400, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2, vocab_size=32064)


def test_phi_configs_carry_the_paper_targets():
    """DESIGN.md: Phi-mini-MoE keeps 8 KV heads at expert width 960; Phi-tiny-MoE has width
    448 and 4 KV heads (16 query heads x 128). Both on the automatic schedule with the
    paper's 400B tokens."""
    mini = load_pipeline_config(CONFIGS / "phi-mini-moe.yaml")
    tiny = load_pipeline_config(CONFIGS / "phi-tiny-moe.yaml")
    for cfg in (mini, tiny):
        assert cfg.teacher == "microsoft/Phi-3.5-MoE-instruct"
        assert cfg.schedule is not None and not cfg.stages
        assert cfg.schedule.distill.tokens == 400_000_000_000
        assert cfg.schedule.final.num_experts is None  # slimming, not dropping: 16 experts kept
    assert mini.schedule.final.expert_intermediate_size == 960
    assert mini.schedule.final.num_key_value_heads is None  # the teacher's 8 kept
    assert tiny.schedule.final.expert_intermediate_size == 448
    assert tiny.schedule.final.num_key_value_heads == 4


@pytest.mark.parametrize("name, width, kv", [("phi-mini-moe", 960, None), ("phi-tiny-moe", 448, 4)])
def test_phi_schedules_follow_the_measured_rule(name, width, kv):
    """Against the Phi-3.5-MoE shape (config only, no download): the stage count and the
    token split are schedule_rule's for the config's cut (width 6400 / final width) and budget,
    widths shrink stage by stage, and the last stage is the paper's shape."""
    from transformers import PhimoeConfig

    from slimmoe.pipeline.resolve import expand_schedule
    from slimmoe.pipeline.schedule_rule import choose, split_tokens

    cfg = load_pipeline_config(CONFIGS / f"{name}.yaml")
    assert cfg.schedule.num_stages is None and cfg.schedule.split is None  # nothing chosen by hand
    stages = expand_schedule(cfg, PhimoeConfig(**PHI35)).stages
    rule = choose(6400 / width, cfg.schedule.budget_fraction)
    assert len(stages) == rule.num_stages and stages[-1].name == "final"
    assert [s.distill.tokens for s in stages] == split_tokens(400_000_000_000, rule.split)
    assert stages[-1].expert_intermediate_size == width and stages[-1].num_key_value_heads == kv
    widths = [s.expert_intermediate_size or 6400 for s in stages]
    assert widths == sorted(widths, reverse=True) and widths[-1] == width
