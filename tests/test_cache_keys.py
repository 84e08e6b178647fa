"""Cache keys: stable for the same inputs (across processes), blind to where a result lies and
how a path is spelled, and computed from the code a step reaches, so a change to that code
recomputes the step and a change elsewhere recomputes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers_prefect import last_task_states
from prefect.testing.utilities import prefect_test_harness
from tiny_models import tiny_teacher_with_tokenizer

from slimmoe.config import ImportanceConfig, SlimTargets
from slimmoe.pipeline.steps import ModelRef, TokenBlocks
from tasks import code_reach, steps
from tasks.caching import step_key
from tasks.tracking import TrackingSettings

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("prepare_data", "importance", "slim", "distill", "evaluate")


def importance_inputs(**change) -> dict:
    inputs = dict(stage="mid", model=ModelRef(path="/a/teacher", fingerprint="f-model"), teacher=None,
                  blocks=TokenBlocks(path="/a/out/data/blocks-x.pt", fingerprint="f-data", source="/a/d.txt",
                                     seq_len=32, train_blocks=10, eval_blocks=2),
                  settings=ImportanceConfig(samples=8), targets=SlimTargets(expert_intermediate_size=12),
                  out_path=Path("/a/out/mid/importance.pt"),
                  tracking=TrackingSettings(uri="sqlite:///a.db", experiment="e"), run_id="run-1")
    return {**inputs, **change}


KEY_IN_A_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_cache_keys import importance_inputs
from tasks import steps
from tasks.caching import step_key
print(step_key(steps.importance, **importance_inputs()))
"""


def test_same_inputs_give_the_same_key_in_other_processes():
    here = step_key(steps.importance, **importance_inputs())
    code = KEY_IN_A_CHILD.format(tests=str(ROOT / "tests"))
    for seed in ("0", "1234"):  # hash randomisation must not leak into keys
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=300, check=True).stdout.split()
        assert out[-1] == here


def test_keys_follow_content_not_location(tmp_path, monkeypatch):
    key = lambda **change: step_key(steps.importance, **importance_inputs(**change))  # noqa: E731
    base = key()
    # where the inputs lie, how an output path is spelled, and the MLflow run: not part of the key
    assert key(model=ModelRef(path="elsewhere/teacher", fingerprint="f-model")) == base
    assert key(blocks=TokenBlocks(path="/b/blocks-x.pt", fingerprint="f-data", source="data/d.txt", seq_len=32,
                                  train_blocks=10, eval_blocks=2)) == base
    assert key(tracking=TrackingSettings(uri="http://127.0.0.1:5000", experiment="x"), run_id="run-2") == base
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    absolute = key(out_path=tmp_path / "out" / "mid" / "importance.pt")
    assert key(out_path=Path("out/mid/importance.pt")) == absolute == key(out_path=Path("./out/../out/mid/importance.pt"))
    # what the result depends on: each changes the key
    changed = [key(model=ModelRef(path="/a/teacher", fingerprint="f-other")),
               key(blocks=TokenBlocks(path="/a/out/data/blocks-x.pt", fingerprint="f-data2", source="/a/d.txt",
                                      seq_len=32, train_blocks=10, eval_blocks=2)),
               key(settings=ImportanceConfig(samples=16)), key(targets=SlimTargets(expert_intermediate_size=8)),
               key(out_path=Path("/a/out/final/importance.pt")), key(stage="final")]
    assert len({base, *changed}) == len(changed) + 1


def test_each_step_reaches_the_code_it_runs_and_not_the_rest():
    reach = {name: set(code_reach.reached_modules(getattr(steps, name).fn)) for name in STEPS}
    families = {f"slimmoe.arch.{m}" for m in ("phimoe", "mixtral", "qwen_moe", "olmoe", "granitemoe", "deepseek_v3")}
    # importance: the scorer, and what it reaches only indirectly: the plan (targets -> which kinds are
    # scored), the losses, and the architecture families registered by slimmoe.arch's __init__
    assert {"slimmoe.pipeline.steps.score", "slimmoe.prune.importance", "slimmoe.prune.plan",
            "slimmoe.losses"} | families <= reach["importance"]
    assert {"slimmoe.prune.slim", "slimmoe.prune.plan", "slimmoe.evaluation.params"} | families <= reach["slim"]
    assert {"slimmoe.distill.loop", "slimmoe.distill.step", "slimmoe.distill.checkpoint", "slimmoe.losses"} \
        <= reach["distill"]
    assert {"slimmoe.evaluation.quality", "slimmoe.evaluation.speed", "slimmoe.evaluation.harness"} <= reach["evaluate"]
    assert {"slimmoe.io.data", "slimmoe.io.loading"} <= reach["prepare_data"]
    # and not what they do not run: one name of a package is not the whole package
    assert not {m for m in reach["importance"] if m.startswith(("slimmoe.distill", "slimmoe.evaluation"))}
    assert not {m for m in reach["distill"] if m.startswith(("slimmoe.evaluation", "slimmoe.prune.importance"))}
    assert not {m for m in reach["evaluate"] if m.startswith(("slimmoe.prune", "slimmoe.distill"))}
    for name in STEPS:
        assert not {m for m in reach[name] if m.startswith(("slimmoe.cli", "slimmoe.prune.schedule"))}, name


def tiny_project(root: Path) -> tuple[Path, Path]:
    """A copy of the project's code (slimmoe, tasks, flows) and a one-stage config for it."""
    for part in ("slimmoe", "tasks", "flows"):
        shutil.copytree(ROOT / part, root / "project" / part, ignore=shutil.ignore_patterns("__pycache__"))
    teacher, corpus = tiny_teacher_with_tokenizer(root / "teacher", corpus_chars=12000)
    config = {"name": "reach", "teacher": str(teacher), "output_dir": str(root / "out"),
              "data": {"train": str(corpus), "eval_fraction": 0.1, "seq_len": 32},
              "stages": [{"name": "mid", "expert_intermediate_size": 8, "importance": {"samples": 4},
                          "distill": {"tokens": 1024, "batch_size": 8, "progress": False},
                          "eval": {"max_blocks": 2, "generation": False, "throughput_batch_sizes": [1]}}],
              "tracking": {"experiment": "reach"}}
    (root / "pipe.yaml").write_text(yaml.safe_dump(config))
    return root / "project", root / "pipe.yaml"


def run_copy(project: Path, config: Path, api: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(project), "PREFECT_API_URL": api, "OMP_NUM_THREADS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.run([sys.executable, "-m", "slimmoe.cli", "run", str(config)], env=env, cwd=project.parent,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = {n: s for n, s in last_task_states().items() if n.split("-")[0] in {"prepare", "importance", "slim",
                                                                                   "distill", "evaluate"}}
    return {("prepare-data" if n.startswith("prepare-data") else n): s for n, s in steps.items()}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path}: {old!r} not found (the test's anchor moved)"
    path.write_text(text.replace(old, new))


@pytest.mark.slow  # ~100 s on 2 cores (copies the project, runs the pipeline three times): `make test-slow`
@pytest.mark.timeout(900)
def test_a_change_to_reached_code_recomputes_the_step_and_unrelated_code_recomputes_nothing(tmp_path):
    from prefect.settings import PREFECT_API_URL

    project, config = tiny_project(tmp_path)
    with prefect_test_harness(server_startup_timeout=60):
        api = PREFECT_API_URL.value()
        first = run_copy(project, config, api)
        assert set(first.values()) == {"Completed"}, first
        # an unrelated module (the stage schedule, which no step runs) changes: nothing is recomputed
        edit(project / "slimmoe" / "prune" / "schedule.py", "def _geo(", "def _unused() -> int:\n    return 1\n\n\ndef _geo(")
        assert set(run_copy(project, config, api).values()) == {"Cached"}
        # the plan (what slimming keeps) changes: the importance step reaches it only indirectly
        # (through wanted_for), and must run again; the slim step now keeps the *lowest* scores,
        # so its model differs and everything downstream is recomputed too
        edit(project / "slimmoe" / "prune" / "plan.py", "torch.sort(-scores.double(), stable=True)",
             "torch.sort(scores.double(), stable=True)")
        third = run_copy(project, config, api)
    assert third == {"prepare-data": "Cached", "importance-mid": "Completed", "slim-mid": "Completed",
                     "distill-mid": "Completed", "evaluate-teacher": "Cached", "evaluate-mid": "Completed"}, third
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == ["teacher", "mid"]
