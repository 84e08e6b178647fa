"""Exact resume: SIGKILL mid-run then rerun == uninterrupted run; corrupt checkpoints skipped."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from helpers_distill import (
    VOCAB,
    cli_cmd,
    env,
    load_params,
    one_torch_thread,  # noqa: F401 - autouse fixture
    read_losses,
    run_cli,
    save_pair,
    tiny_phimoe,
)

from slimmoe.distill.loop import DONE_FILE, distill
from slimmoe.io.data import random_blocks

SEQ = 16
STEPS = 240
# micro-batches of 4 with accumulation 2: resume must also restore mid-step structure exactly
ARGS = ["--tokens", str(STEPS * 8 * SEQ), "--seq-len", str(SEQ), "--random-blocks", "96", "--micro-batch-size", "4",
        "--checkpoint-every", "4", "--keep-checkpoints", "2", "--lr", "3e-3"]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    s, t = save_pair(tmp_path, student_intermediate=32)
    tiny_phimoe(1, scale=0.15, intermediate_size=32).save_pretrained(s)  # experts matter -> Gumbel noise matters
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli_cmd(s, t, killed, *ARGS), env=env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    second = killed / "checkpoints" / "step-00000008"
    deadline = time.monotonic() + 180
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / DONE_FILE).exists()
    pre_kill = read_losses(killed)

    resumed = run_cli(tmp_path, s, t, killed, *ARGS)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    line = next(ln for ln in resumed.stderr.splitlines() if "resuming from checkpoint" in ln)
    resume_step = int(line.split("(step ")[1].split("/")[0])
    assert resume_step >= 8 and resume_step < STEPS

    clean = tmp_path / "clean"
    full = run_cli(tmp_path, s, t, clean, *ARGS)
    assert full.returncode == 0, full.stderr[-2000:]
    assert "resuming" not in full.stderr

    a, b = read_losses(killed), read_losses(clean)
    assert [r["step"] for r in a] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical per-step losses
    assert [r["loss"] for r in pre_kill] == [r["loss"] for r in b[: len(pre_kill)]]
    pa, pb = load_params(killed), load_params(clean)
    for k in pb:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-6)
    assert any(not torch.equal(pb[k], v) for k, v in tiny_phimoe(1, scale=0.15, intermediate_size=32).state_dict().items())


def test_corrupt_newest_checkpoint_is_skipped_with_warning(tmp_path):
    teacher, train = tiny_phimoe(0, scale=1.0), random_blocks(VOCAB, 32, SEQ, seed=0)
    kw = dict(tokens=6 * 4 * SEQ, batch_size=4, checkpoint_every=2, keep_checkpoints=3, progress=False)
    ref = distill(tiny_phimoe(1), teacher, tmp_path / "ref", train, **kw)
    assert ref.steps == 6
    out = tmp_path / "out"
    distill(tiny_phimoe(1), teacher, out, train, **kw)
    (out / DONE_FILE).unlink()  # pretend it crashed after step 4's checkpoint
    newest = out / "checkpoints" / "step-00000004"
    model_file = newest / "dcp" / "__0_0.distcp"  # model and optimizer state (DCP)
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])  # half-written
    (out / "checkpoints" / ".tmp-step-00000006-123").mkdir()  # an interrupted write
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*step-00000004"):
        res = distill(tiny_phimoe(1), teacher, out, train, **kw)
    assert res.resumed_from_step == 2
    losses_ref = [json.loads(x)["loss"] for x in (tmp_path / "ref" / "losses.jsonl").read_text().splitlines()]
    losses_out = [json.loads(x)["loss"] for x in (out / "losses.jsonl").read_text().splitlines()]
    assert losses_out == losses_ref
    pa, pb = load_params(out), load_params(tmp_path / "ref")
    for k in pb:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-6)
