"""FSDP2 distillation (CPU, gloo, 2 processes): the same global batch as one process, exact
resume from sharded (DCP) checkpoints after SIGKILL, resume at another world size, and the
gathered final model in the teacher's dtype."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers_distill import (
    VOCAB,
    load_params,
    one_torch_thread,  # noqa: F401 - autouse fixture
    read_losses,
    run_cli,
    save_pair,
    tiny_phimoe,
    tiny_qwen2_moe,
)

from slimmoe.cli import distill as cli_distill
from slimmoe.distill import setup as distill_setup
from slimmoe.distill.checkpoint import read_train_state
from slimmoe.distill.loop import DONE_FILE, distill
from slimmoe.faults import CRASH_ENV
from slimmoe.io.data import random_blocks

SEQ, STEPS = 16, 12
# global batch 8 in micro-batches of 2: one process accumulates 4, each of two processes 2
COMMON = ["--tokens", str(STEPS * 8 * SEQ), "--seq-len", str(SEQ), "--random-blocks", "48", "--batch-size", "8",
          "--micro-batch-size", "2", "--checkpoint-every", "4", "--keep-checkpoints", "3", "--eval-fraction", "0.25",
          "--eval-every", "4", "--lr", "3e-3"]
# phimoe: Gumbel router noise, recomputed under activation checkpointing inside each FSDP unit
PHI = [*COMMON, "--gradient-checkpointing"]
# Measured: per-step losses within 1.1e-7 relative (fp32 rounding; 8 of 12 steps equal to the
# bit) and weights within 4.5e-6 absolute after 12 AdamW steps at lr 3e-3 (|w| <= 1). Not exact:
# with 2 processes each rank sums its 2 micro-batch gradients and FSDP's reduce-scatter adds the
# two halves, where one process adds 4 in a row (float addition is not associative), and the
# gradient norm is summed shard by shard; AdamW's m / sqrt(v) turns the last-bit differences of
# near-zero gradients into weight differences of up to ~lr.
LOSS_TOL = dict(rtol=1e-6, atol=1e-7)
PARAM_TOL = dict(rtol=1e-5, atol=2e-5)


def _in_process(s, t, out, *args) -> int:
    """The CLI in this process (one process, sharding none): no interpreter start-up."""
    return cli_distill.main([str(s), str(t), str(out), "--no-progress", *args])


def _assert_close_runs(a, b, loss_tol=LOSS_TOL, param_tol=PARAM_TOL) -> None:
    la, lb = read_losses(a), read_losses(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in lb], dtype=torch.float64),
                               torch.tensor([r["loss"] for r in la], dtype=torch.float64), **loss_tol)
    pa, pb = load_params(a), load_params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pb[k].float(), pa[k].float(), **param_tol)


def _assert_identical_runs(a, b) -> None:
    assert [r["loss"] for r in read_losses(a)] == [r["loss"] for r in read_losses(b)]
    pa, pb = load_params(a), load_params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.fixture(scope="module")
def phimoe(tmp_path_factory):
    """A phimoe pair and its uninterrupted 2-process FSDP run (the reference of the resume tests)."""
    root = tmp_path_factory.mktemp("fsdp-phimoe")
    s, t = save_pair(root)
    tiny_phimoe(1, scale=0.15, intermediate_size=32).save_pretrained(s)  # experts matter -> router noise matters
    two = run_cli(root, s, t, root / "two", *PHI, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("slimmoe distill: wrote") == 1  # only rank 0 reports
    return root, s, t


def test_phimoe_fsdp_two_processes_match_one_process(phimoe):
    root, s, t = phimoe
    assert _in_process(s, t, root / "one", *PHI) == 0
    _assert_close_runs(root / "one", root / "two")
    ck = root / "two" / "checkpoints" / "step-00000008"
    state = json.loads((ck / "state.json").read_text())
    assert (state["world"], state["sharding"]) == (2, "fsdp")
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata", "rng-00000.pt", "rng-00001.pt",
            "scheduler.pt"} == set(state["manifest"])
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(ck / "dcp").read_metadata().state_dict_metadata["model.model.layers.0.mlp.experts.gate_up_proj"]
    assert tuple(meta.size) == (4, 64, 32)  # fused [E, 2I, H]: each rank holds 2 whole experts (dim 0)
    assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks) == [((0, 0, 0), (2, 64, 32)),
                                                                              ((2, 0, 0), (2, 64, 32))]
    a, b = read_train_state(root / "one" / "checkpoints" / "step-00000008"), read_train_state(ck)
    for k, v in a["model"].items():  # the sharded checkpoint holds the whole model
        torch.testing.assert_close(b["model"][k], v, **PARAM_TOL)
    done = json.loads((root / "two" / DONE_FILE).read_text())
    assert done["best_step"] is not None and done["final_eval"]["held_out_kl"] > 0


def test_sigkill_whole_group_then_one_rank_mid_write_resumes_bit_identical(phimoe, tmp_path):
    """Every rank SIGKILLed after step 6 (a lost node), then rank 1 alone SIGKILLed while
    writing the step-8 checkpoint: each time the same command resumes from step 4, and the
    run ends bit-identical to the uninterrupted one. The killed run's folder also resumes in
    one process (DCP reshards; close, not bit-identical)."""
    root, s, t = phimoe
    out = tmp_path / "killed"
    r = run_cli(tmp_path, s, t, out, *PHI, nproc=2, extra_env={CRASH_ENV: "distill:step=6"})
    assert r.returncode != 0 and "crash point distill:step=6 reached" in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"]
    shutil.copytree(out, tmp_path / "world1")

    r = run_cli(tmp_path, s, t, out, *PHI, nproc=2, extra_env={CRASH_ENV: "checkpoint:write:step=8:rank=1"})
    assert r.returncode != 0 and "resuming from checkpoint" in r.stderr, r.stderr[-2000:]
    assert list((out / "checkpoints").glob(".tmp-step-00000008-*"))  # torn: rank 0 never renamed it
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000004"]

    r = run_cli(tmp_path, s, t, out, *PHI, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from checkpoint" in r.stderr and "(step 4/12)" in r.stderr
    _assert_identical_runs(out, root / "two")
    assert not list((out / "checkpoints").glob(".tmp-*"))

    with pytest.warns(UserWarning, match="written by 2: the state is resharded"):
        assert _in_process(s, t, tmp_path / "world1", *PHI) == 0
    assert json.loads((tmp_path / "world1" / DONE_FILE).read_text())["resumed_from_step"] == 4
    _assert_close_runs(tmp_path / "world1", root / "two")


def test_qwen2_moe_fsdp_with_teacher_cache_and_bf16_teacher(tmp_path):
    """qwen2_moe (shared expert): a bf16 teacher whose top-k cache the 2 ranks build in lockstep
    (the sharded teacher's forwards are collective); the final model is saved in bf16, the
    teacher's dtype, as sharded safetensors that stock transformers loads."""
    t, s = tmp_path / "teacher", tmp_path / "student"
    tiny_qwen2_moe(0, scale=0.3, moe_intermediate_size=64, dtype=torch.bfloat16).save_pretrained(t)
    tiny_qwen2_moe(1, scale=0.15).save_pretrained(s)
    args = [*COMMON, "--max-shard-size", "40KB"]
    two = run_cli(tmp_path, s, t, tmp_path / "two", *args, "--teacher-cache", str(tmp_path / "c2"), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _in_process(s, t, tmp_path / "one", *args, "--teacher-cache", str(tmp_path / "c1")) == 0
    _assert_close_runs(tmp_path / "one", tmp_path / "two", param_tol=dict(rtol=1e-2, atol=1e-4))  # saved in bf16
    a, b = (read_train_state(tmp_path / run / "checkpoints" / "step-00000008") for run in ("one", "two"))
    for k, v in a["model"].items():  # the fp32 training state: tight
        torch.testing.assert_close(b["model"][k], v, **PARAM_TOL)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert model.dtype == torch.bfloat16 and json.loads((tmp_path / "two" / "config.json").read_text())["dtype"] == "bfloat16"
    assert len(list((tmp_path / "two").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "two" / "model.safetensors.index.json").is_file()


def test_complete_cache_and_no_evaluation_never_load_the_teacher(tmp_path, monkeypatch, capsys):
    s, t = save_pair(tmp_path)
    train = random_blocks(VOCAB, 16, SEQ, seed=0)
    kw = dict(tokens=2 * 4 * SEQ, batch_size=4, progress=False, teacher_cache_dir=tmp_path / "cache")
    distill(str(s), str(t), tmp_path / "a", train, **kw)  # builds the cache
    loaded = []
    orig = distill_setup.load_model
    monkeypatch.setattr(distill_setup, "load_model", lambda p, field, **k: loaded.append(field) or orig(p, field, **k))
    distill(str(s), str(t), tmp_path / "b", train, **kw)
    assert loaded == ["STUDENT"] and "teacher not loaded" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "float32"  # the teacher's, unloaded
    pa, pb = load_params(tmp_path / "a"), load_params(tmp_path / "b")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    loaded.clear()
    distill(str(s), str(t), tmp_path / "c", train, random_blocks(VOCAB, 4, SEQ, seed=1), eval_every=2, **kw)
    assert loaded == ["STUDENT", "TEACHER"]  # held-out KL is computed by the live teacher


def test_sharding_choice_and_errors(monkeypatch):
    from slimmoe.config import DistillConfig
    from slimmoe.distill.runtime import choose_sharding
    from slimmoe.errors import UserError

    cfg = lambda **k: DistillConfig(tokens=64, **k)  # noqa: E731
    assert choose_sharding(cfg(), 1) == "none" and choose_sharding(cfg(sharding="fsdp"), 1) == "none"
    assert choose_sharding(cfg(), 2) == "fsdp" and choose_sharding(cfg(sharding="ddp"), 4) == "ddp"
    with pytest.raises(UserError, match="sharding: 'none' runs in one process"):
        choose_sharding(cfg(sharding="none"), 2)
