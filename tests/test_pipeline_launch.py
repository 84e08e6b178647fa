"""`slimmoe run` with `launch: {nproc_per_node: 2}`: the importance and distill steps run in two
processes under torchrun, started by their Prefect tasks; the pipeline completes, its models
load, and a second run finds every step cached."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers_prefect import last_task_states
from prefect.testing.utilities import prefect_test_harness
from tiny_models import tiny_teacher_with_tokenizer
from transformers import AutoModelForCausalLM

from slimmoe.cli import main

STEPS = ("prepare-data", "importance", "slim", "distill", "evaluate")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    teacher, corpus = tiny_teacher_with_tokenizer(root / "teacher", corpus_chars=20000)
    stage = {"importance": {"samples": 8}, "eval": {"max_blocks": 4, "generation": False, "throughput_batch_sizes": [1]},
             "distill": {"tokens": 1024, "batch_size": 8, "checkpoint_every": 2, "eval_every": 2, "lr": 1e-3,
                         "progress": False}}
    config = {"name": "launched", "teacher": str(teacher), "output_dir": str(root / "out"),
              "data": {"train": str(corpus), "eval_fraction": 0.1, "seq_len": 32},
              "stages": [{"name": "mid", "expert_intermediate_size": 12, **stage},
                         {"name": "final", "expert_intermediate_size": 8, "num_key_value_heads": 1, **stage}],
              "launch": {"nproc_per_node": 2}, "tracking": {"experiment": "launched"}}
    (root / "pipe.yaml").write_text(yaml.safe_dump(config))
    with prefect_test_harness(server_startup_timeout=60):
        assert main(["run", str(root / "pipe.yaml")]) == 0
        first = last_task_states()
        assert main(["run", str(root / "pipe.yaml")]) == 0
        second = last_task_states()
    return root, first, second


def steps_of(states: dict[str, str]) -> dict[str, str]:
    return {n: s for n, s in states.items() if n.startswith(STEPS)}


def test_two_stages_run_in_two_processes_and_load(launched):
    root, first, _ = launched
    assert set(steps_of(first).values()) == {"Completed"}, first
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == ["teacher", "mid", "final"]
    assert [r["tokens"] for r in summary["stages"]] == [0, 1024, 1024]
    final = AutoModelForCausalLM.from_pretrained(root / "out" / "final" / "model")
    assert final.config.intermediate_size == 8 and final.config.num_key_value_heads == 1
    losses = [json.loads(x) for x in (root / "out" / "final" / "model" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]  # one log, by rank 0, not one per process


def test_training_metrics_reach_mlflow_from_the_launched_processes(launched):
    from mlflow.tracking import MlflowClient

    root, _, _ = launched
    summary = json.loads((root / "out" / "summary.json").read_text())
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    final = next(r for r in summary["stages"] if r["stage"] == "final")
    history = client.get_metric_history(final["mlflow_run_id"], "distill/held_out_kl")
    assert [m.step for m in history] == [0, 2, 4]  # written by rank 0 to a file the task followed
    assert len(client.get_metric_history(final["mlflow_run_id"], "train/loss")) == 4


def test_a_second_run_is_cached(launched):
    _, _, second = launched
    steps = steps_of(second)
    assert len(steps) == 10 and set(steps.values()) == {"Cached"}, steps
