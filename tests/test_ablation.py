"""The ablation flow on a tiny teacher: every arm at every seed, shared steps computed once
(the others find them in the task cache), one MLflow run per arm and seed under one parent,
a report with one row per arm; bad configs exit 2 with one line."""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter

import pytest
import torch
import yaml
from helpers_prefect import newest_flow_runs, settled_task_runs
from prefect.testing.utilities import prefect_test_harness
from tiny_models import tiny_teacher_with_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

import slimmoe.cli
from slimmoe.io.loading import load_config
from slimmoe.pipeline.ablation_schema import ARMS
from slimmoe.prune.schedule import estimate_total_params

SEEDS = [0, 1]


@pytest.fixture(scope="module")
def ablated(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    teacher, corpus = tiny_teacher_with_tokenizer(root / "teacher", corpus_chars=20000)
    # the total of 3 experts of width 12: slim lands on width 8, multi-stage on 12 then 8, drop on
    # 2 experts, slim-drop on 3 x 12 (widths a multiple of 4: CPU grouped_mm needs 16-byte strides)
    target = estimate_total_params(load_config(str(teacher)), expert_intermediate_size=12, num_experts=3)
    config = {"name": "tiny-ablation", "teacher": str(teacher), "output_dir": str(root / "out"),
              "data": {"train": str(corpus), "eval_fraction": 0.1, "seq_len": 32},
              "target": {"total_params": target}, "tokens": 1024, "num_stages": 2, "seeds": SEEDS,
              "importance": {"samples": 8, "expert_score": "frequency"},
              "distill": {"batch_size": 8, "lr": 1e-3, "progress": False}, "eval": {"max_blocks": 4},
              "tracking": {"experiment": "test-ablation"}}
    path = root / "ablation.yaml"
    path.write_text(yaml.safe_dump(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: OpenMP barriers on a loaded 2-core box cost more than they give
    with prefect_test_harness(server_startup_timeout=60):
        assert slimmoe.cli.main(["ablate", str(path)]) == 0
        flow_runs = newest_flow_runs(n=200)
        task_runs = settled_task_runs([fr.id for fr in flow_runs])
    torch.set_num_threads(threads)
    yield root, config, flow_runs, task_runs


def test_every_arm_runs_at_every_seed(ablated):
    root, _, flow_runs, _ = ablated
    doc = json.loads((root / "out" / "report.json").read_text())
    assert sorted((r["arm"], r["seed"]) for r in doc["runs"]) == sorted((a, s) for a in ARMS for s in SEEDS)
    subflows = {fr.name: fr.state.name for fr in flow_runs if fr.parent_task_run_id is not None}
    assert subflows == {f"{a}-seed{s}": "Completed" for a in ARMS for s in SEEDS}
    sizes = {r["arm"]: r for r in doc["arms"]}
    target = doc["meta"]["target"]["total_params"]
    for arm in ARMS:  # every arm at the target's total, within one expert of one layer
        assert sizes[arm]["total_params"] <= target + 1
    drop = AutoConfig.from_pretrained(root / "out" / "arms" / "one-shot-drop" / "seed0" / "one-shot-drop.final" / "model")
    assert drop.num_local_experts == 2
    assert all(r["tokens"] == 1024 for r in doc["runs"])


def test_shared_steps_run_once_and_are_cached_elsewhere(ablated):
    *_, task_runs = ablated
    states: dict[str, Counter] = {}
    for r in task_runs:
        states.setdefault(r.name, Counter())[r.state.name] += 1
    assert states["importance-teacher"] == {"Completed": 1}
    assert states["evaluate-teacher"] == {"Completed": 1}
    assert sum(states[n]["Completed"] for n in states if n.startswith("prepare-data")) == 1
    # one-shot-slim's slim step: computed once, then cached for its other seed and both scratch seeds
    assert states["slim-one-shot-slim.final"] == {"Completed": 1, "Cached": 3}
    assert states["slim-multi-stage-slim.stage1"] == {"Completed": 1, "Cached": 1}
    # the seed changes distillation: every arm distils anew at every seed; later stages follow
    assert states["distill-one-shot-slim.final"] == {"Completed": len(SEEDS)}
    assert states["slim-multi-stage-slim.final"] == {"Completed": len(SEEDS)}
    assert states["distill-scratch.final"] == {"Completed": len(SEEDS)}


def test_teacher_cache_is_one_folder_shared_by_every_kd_arm(ablated):
    root, *_ = ablated
    entries = [p for p in (root / "out" / "shared" / "teacher-topk").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1


def test_scratch_is_random_at_the_one_shot_shape_and_seeded(ablated):
    root, *_ = ablated
    arms = root / "out" / "arms"
    shape = AutoConfig.from_pretrained(arms / "one-shot-slim" / "shared" / "one-shot-slim.final" / "pruned")
    inits = [AutoModelForCausalLM.from_pretrained(arms / "scratch" / f"seed{s}" / "scratch.final" / "init") for s in SEEDS]
    for m in inits:
        for k in ("intermediate_size", "num_local_experts", "num_key_value_heads", "hidden_size"):
            assert getattr(m.config, k) == getattr(shape, k), k
    w0, w1 = (m.model.layers[0].mlp.experts.gate_up_proj for m in inits)
    assert not torch.equal(w0, w1)
    pruned = AutoModelForCausalLM.from_pretrained(arms / "one-shot-slim" / "shared" / "one-shot-slim.final" / "pruned")
    assert not torch.equal(w0, pruned.model.layers[0].mlp.experts.gate_up_proj)
    losses = [json.loads(line) for line in (arms / "scratch" / "seed0" / "scratch.final" / "model" / "losses.jsonl")
              .read_text().splitlines()]
    assert losses and losses[-1]["tokens"] == 1024


def test_report_has_one_row_per_arm_with_mean_and_spread(ablated):
    root, *_ = ablated
    doc = json.loads((root / "out" / "report.json").read_text())
    assert [r["arm"] for r in doc["arms"]] == list(ARMS)
    for row in doc["arms"]:
        ppl = [r["perplexity"] for r in doc["runs"] if r["arm"] == row["arm"]]
        assert row["seeds"] == SEEDS
        assert row["perplexity_mean"] == pytest.approx(statistics.mean(ppl))
        assert row["perplexity_std"] == pytest.approx(statistics.stdev(ppl))
        assert row["ratio_mean"] == pytest.approx(statistics.mean(ppl) / doc["teacher"]["perplexity"])
    md = (root / "out" / "report.md").read_text()
    assert sum(line.startswith(f"| {a} |") for a in ARMS for line in md.splitlines()) == len(ARMS)
    for png in ("perplexity_vs_active.png", "loss_curves.png"):
        assert (root / "out" / png).read_bytes()[:4] == b"\x89PNG"


def test_mlflow_has_a_run_per_arm_and_seed_under_one_parent(ablated):
    from mlflow.tracking import MlflowClient

    root, *_ = ablated
    client = MlflowClient(f"sqlite:///{root / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("test-ablation")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r.info.run_id for r in runs if r.data.tags.get("slimmoe.kind") == "ablation"]
    arm_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted((r.data.tags["arm"], r.data.tags["seed"]) for r in arm_runs) == \
        sorted((a, str(s)) for a in ARMS for s in SEEDS)
    ids = {r.info.run_id for r in arm_runs}
    stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in ids]
    assert len(stage_runs) == len(SEEDS) * (len(ARMS) + 1)  # multi-stage has two stages
    assert all("eval/perplexity" in r.data.metrics for r in arm_runs)
    artifacts = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/report.json", "report/perplexity_vs_active.png"} <= artifacts


def _error_lines(err: str) -> list[str]:
    """stderr's error and traceback lines (not the tokenizer's progress bars)."""
    return [ln for ln in err.splitlines() if "error" in ln.lower() or "Traceback" in ln]


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory):
    return tiny_teacher_with_tokenizer(tmp_path_factory.mktemp("bad") / "teacher", corpus_chars=3000)


@pytest.mark.parametrize("override, field", [
    ("arms=[one-shot-slim, nope]", "arms.1"),
    ("seeds=[1, 1]", "seeds"),
    ("target.total_params=10", "target"),
    ("importance.expert_score=taylor", "importance: expert_score"),
    ("distill.loss=lm", "distill: loss"),
    ("data.train=missing.txt", "data.train"),
    ("teacher=no/such/folder", "teacher"),
    ("tracking.uri=http://127.0.0.1:9", "tracking.uri"),  # refused in seconds, not after MLflow's retries
    ("data.seq_len=100000", "data.train"),  # the corpus is shorter than one block
])
def test_bad_configs_exit_2_with_one_line_naming_the_field(small_teacher, tmp_path, monkeypatch, capsys, override,
                                                           field):
    teacher, corpus = small_teacher
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "teacher": str(teacher), "output_dir": str(tmp_path / "out"),
                                    "data": {"train": str(corpus)}, "target": {"expert_intermediate_size": 8},
                                    "tokens": 64}))
    capsys.readouterr()
    assert slimmoe.cli.main(["ablate", str(path), "--set", override]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: {field}"), err
    assert not (tmp_path / "out").exists()


def test_ablate_owns_its_output_folder(ablated, capsys):
    """`slimmoe ablate` marks and locks its folder as `slimmoe run` does: another pipeline's
    name is refused (unless --force), and so is a second run while one holds the lock."""
    from slimmoe.io.lock import output_lock

    root, *_ = ablated
    before = (root / "out" / "report.json").read_bytes()
    capsys.readouterr()
    assert slimmoe.cli.main(["ablate", str(root / "ablation.yaml"), "--set", "name=other"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "holds the results of pipeline 'tiny-ablation'" in err[0], err
    with output_lock(root / "out", "a test"):
        assert slimmoe.cli.main(["ablate", str(root / "ablation.yaml")]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(os.getpid()) in err[0], err
    assert (root / "out" / "report.json").read_bytes() == before
