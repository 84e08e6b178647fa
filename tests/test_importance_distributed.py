"""Importance under FSDP2: 2 processes (torchrun, gloo on the CPU) score like 1 process.

The models are shaped so that every shard boundary is awkward: 3 experts (FSDP pads the
expert dim to 4: rank 0 holds experts 0-1, rank 1 expert 2 and a padding row), 3 KV groups
whose q/k/v rows split in the middle of group 1, a shared expert of 25 neurons (13 + 12 rows).
5 calibration sequences in batches of 2 make 3 batches: rank 1 runs batch 1 and one pass that
does not count. Both layouts a process group can score are checked: the model sharded with
FSDP2, and the model replicated in every process (no sharding at all).
This file is also the worker: ``torchrun ... test_importance_distributed.py OUT``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_distill import env, one_torch_thread  # noqa: F401 - autouse fixture
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from slimmoe.config import ImportanceConfig
from slimmoe.prune.importance import ImportanceScores, estimate_importance

ROOT = Path(__file__).resolve().parents[1]
SHAPES = dict(hidden_size=36, num_attention_heads=6, num_key_value_heads=3)
MODELS = {
    "phimoe": dict(SHAPES, num_local_experts=3),
    "qwen2_moe": dict(SHAPES, num_experts=3, shared_expert_intermediate_size=25),
}
CASES = {  # ImportanceConfig fields; the model is its own teacher unless "teacher"
    "taylor": dict(score="taylor", expert_score="taylor", loss="kd_topk_renorm"),
    "taylor-teacher": dict(score="taylor", expert_score="taylor", loss="kd_topk_renorm", teacher=True),
    "activation-reap": dict(score="activation", expert_score="reap"),
    "magnitude-frequency": dict(score="magnitude", expert_score="frequency"),
    "random": dict(score="random", expert_score="random"),
}
KINDS = ("neurons", "shared", "kv_groups", "experts")
BLOCKS = torch.randint(3, 96, (5, 12), generator=torch.Generator().manual_seed(4))
RTOL = 1e-6


def score_all(shard=None) -> dict:
    """{(model type, case): {kind: {layer: scores}}}; ``shard(model)`` shards before scoring."""
    out = {}
    for model_type, shape in MODELS.items():
        model, teacher = tiny_model(model_type, seed=1, **shape), tiny_model(model_type, seed=2, **shape)
        if shard is not None:
            shard(model), shard(teacher.requires_grad_(False))
        for case, fields in CASES.items():
            fields = dict(fields)
            t = teacher if fields.pop("teacher", False) else None
            cfg = ImportanceConfig(samples=5, batch_size=2, seq_len=12, **fields)
            scores = estimate_importance(model, BLOCKS, cfg, teacher=t, progress=False)
            out[(model_type, case)] = {kind: dict(getattr(scores, kind)) for kind in KINDS}
    return out


def worker(out: str) -> None:
    from slimmoe.parallel import device_mesh, init_process_group, shard_decoder_layers

    torch.set_num_threads(1)
    topo = init_process_group()
    mesh = device_mesh(topo)
    scores = {"replicated": score_all(), "sharded": score_all(lambda m: shard_decoder_layers(m, mesh))}
    if topo.is_main:
        torch.save(scores, out)
    torch.distributed.destroy_process_group()


def torchrun(tmp: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, env=env(tmp), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference, relative to the largest score of the layer."""
    return float((a - b).abs().max() / a.abs().max().clamp(min=1e-300))


@pytest.fixture(scope="module")
def one_process():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return score_all()
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    run = torchrun(tmp, __file__, str(tmp / "scores.pt"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return torch.load(tmp / "scores.pt", weights_only=False)


@pytest.mark.parametrize("layout", ["sharded", "replicated"])
@pytest.mark.parametrize("model_type", list(MODELS))
def test_two_processes_score_like_one(one_process, two_processes, model_type, layout):
    worst = {}
    for case in CASES:
        a, b = one_process[(model_type, case)], two_processes[layout][(model_type, case)]
        for kind in KINDS:
            assert a[kind].keys() == b[kind].keys(), (case, kind)
            for layer in a[kind]:
                d = relative_difference(a[kind][layer], b[kind][layer])
                worst[(case, kind)] = max(worst.get((case, kind), 0.0), d)
                assert d <= RTOL, (case, kind, layer, d)
    print(model_type, layout, {f"{c}/{k}": f"{d:.1e}" for (c, k), d in worst.items()})
    scored = {k for (c, k), _ in worst.items()}
    assert {"neurons", "kv_groups", "experts"} <= scored and ("shared" in scored) == (model_type == "qwen2_moe")


def save_tiny(folder: Path) -> Path:
    model = tiny_model("phimoe", seed=1, **MODELS["phimoe"])
    model.save_pretrained(folder)
    return folder


def prune_cli(tmp: Path, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "slimmoe.cli", "prune", str(model), str(out), "--expert-intermediate-size", "8",
           "--num-key-value-heads", "2", "--num-experts", "2", "--samples", "5", "--batch-size", "2",
           "--seq-len", "12", "--no-progress", *extra]
    return subprocess.run(cmd, env=env(tmp), capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_prune_in_two_processes_writes_the_same_plan(tmp_path):
    model = save_tiny(tmp_path / "model")
    one = prune_cli(tmp_path, model, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = prune_cli(tmp_path, model, tmp_path / "two", "--nproc-per-node", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    reports = [json.loads(line) for line in two.stderr.splitlines() if line.startswith('{"output"')]
    assert len(reports) == 1 and reports[0]["output"] == str(tmp_path / "two"), two.stderr[-3000:]  # rank 0's alone
    plan_one, plan_two = (json.loads((tmp_path / d / "slim_plan.json").read_text()) for d in ("one", "two"))
    assert plan_two["layers"] == plan_one["layers"]
    assert all(len(layer["experts"]) == 2 and len(layer["kv_groups"]) == 2 for layer in plan_two["layers"])
    a, b = (ImportanceScores.load(tmp_path / d / "importance.pt") for d in ("one", "two"))
    for kind in KINDS:
        assert getattr(a, kind).keys() == getattr(b, kind).keys()
        for layer, t in getattr(a, kind).items():
            assert relative_difference(t, getattr(b, kind)[layer]) <= RTOL, (kind, layer)
    slim = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert slim.config.intermediate_size == 8 and slim.config.num_local_experts == 2
    slim(input_ids=BLOCKS[:1])


if __name__ == "__main__":
    worker(sys.argv[1])
