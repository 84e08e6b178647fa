"""torchrun --nproc_per_node 2 (gloo, CPU), sharding ddp, on the same global batch == 1-process run
(FSDP, the default with more than one process: tests/test_distill_fsdp.py)."""

from __future__ import annotations

import torch
from helpers_distill import (
    load_params,
    one_torch_thread,  # noqa: F401 - autouse fixture
    read_losses,
    run_cli,
    save_pair,
    tiny_phimoe,
)

SEQ = 16


def test_two_processes_match_one_process(tmp_path):
    s, t = save_pair(tmp_path)
    tiny_phimoe(1, scale=0.15, intermediate_size=32).save_pretrained(s)
    # global batch 8 in micro-batches of 2: 1 process accumulates 4, each of 2 processes accumulates 2
    args = ["--tokens", str(30 * 8 * SEQ), "--seq-len", str(SEQ), "--random-blocks", "64", "--batch-size", "8",
            "--micro-batch-size", "2", "--checkpoint-every", "10", "--eval-fraction", "0.25", "--eval-every", "10",
            "--lr", "3e-3"]
    one = run_cli(tmp_path, s, t, tmp_path / "one", *args)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_cli(tmp_path, s, t, tmp_path / "two", *args, "--sharding", "ddp", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("slimmoe distill: wrote") == 1  # only rank 0 reports
    a, b = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    assert [r["step"] for r in b] == list(range(1, 31))  # rank 0 alone writes the log
    torch.testing.assert_close(torch.tensor([r["loss"] for r in b]), torch.tensor([r["loss"] for r in a]),
                               rtol=1e-5, atol=1e-6)
    assert a[-1]["loss"] < a[0]["loss"]
    pa, pb = load_params(tmp_path / "one"), load_params(tmp_path / "two")
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-00000010", "step-00000020"]
