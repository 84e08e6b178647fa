"""Disk space is checked before checkpoints and models are written; out-of-memory errors
name the settings to lower. Both are one-line UserErrors (exit 2 through the CLI)."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch
from helpers_distill import (
    VOCAB,
    one_torch_thread,  # noqa: F401 - autouse fixture
    save_pair,
    tiny_phimoe,
)

from slimmoe import resources
from slimmoe.cli import main
from slimmoe.config import ImportanceConfig
from slimmoe.distill import loop as distill_mod
from slimmoe.distill.loop import distill
from slimmoe.io.data import random_blocks
from slimmoe.prune.importance import estimate_importance
from slimmoe.resources import GIB, ResourceError, check_disk, oom_hint, state_dict_bytes, tensor_bytes

SEQ = 16
Usage = namedtuple("Usage", "total used free")


def low_disk(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, (1 << 40) - free, free))


def test_check_disk_message_and_threshold(tmp_path, monkeypatch):
    low_disk(monkeypatch, int(0.5 * GIB))
    with pytest.raises(ResourceError) as e:
        check_disk(tmp_path / "not" / "yet", 2 * (1 << 30))
    assert str(e.value) == f"{tmp_path / 'not' / 'yet'}: needs ~2.22 GiB free, 0.50 GiB available"
    check_disk(tmp_path, 100 << 20)  # 100 MiB x 1.1 + 16 MiB < 0.5 GiB: fine


def test_tensor_bytes_counts_model_and_adam_state():
    model = tiny_phimoe(1)
    n = sum(p.numel() for p in model.parameters())
    assert state_dict_bytes(model) == 4 * sum(t.numel() for t in model.state_dict().values())
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    opt.step()
    assert tensor_bytes(opt.state_dict()) == 2 * 4 * n + 4 * len(list(model.parameters()))  # exp_avg(+sq) + step


def test_distill_checkpoint_needs_room(tmp_path, monkeypatch):
    teacher, student = tiny_phimoe(0), tiny_phimoe(1)
    need = int((2 * state_dict_bytes(student) + state_dict_bytes(student)) * 1.1)  # weights + Adam moments, > 0 free
    low_disk(monkeypatch, need // 4)
    with pytest.raises(ResourceError, match=r"checkpoints: needs ~\d+\.\d\d GiB free, 0\.00 GiB available"):
        distill(student, teacher, tmp_path / "out", random_blocks(VOCAB, 16, SEQ), tokens=4 * 4 * SEQ, batch_size=4,
                checkpoint_every=2, progress=False)
    assert not list((tmp_path / "out" / "checkpoints").glob("*"))  # nothing half written


def test_slimmed_model_needs_room_and_leaves_old_output(tmp_path, monkeypatch):
    from slimmoe.prune.plan import SlimPlan
    from slimmoe.prune.slim import save_slimmed

    out = tmp_path / "pruned"
    out.mkdir()
    (out / "config.json").write_text("{}")
    low_disk(monkeypatch, 1 << 20)
    with pytest.raises(ResourceError, match=rf"^{out}: needs ~"):
        save_slimmed(tiny_phimoe(1), SlimPlan(model_type="phimoe", source={}, target={}), out)
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"] and (out / "config.json").read_text() == "{}"


def raise_in_forward(model, exc):
    def boom(*a, **k):
        raise exc

    model.forward = boom
    return model


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 123 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_distill_oom_names_the_settings(tmp_path, exc):
    student = raise_in_forward(tiny_phimoe(1), exc)
    with pytest.raises(ResourceError) as e:
        distill(student, tiny_phimoe(0), tmp_path / "out", random_blocks(VOCAB, 16, SEQ), tokens=4 * 4 * SEQ,
                batch_size=4, micro_batch_size=2, progress=False)
    msg = str(e.value)
    assert msg.startswith("distill: out of memory (") and "\n" not in msg
    for s in ("distill.micro_batch_size (now 2)", "distill.chunk_size (now 512)", "distill.gradient_checkpointing: true"):
        assert s in msg


def test_other_runtime_errors_pass_through():
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with oom_hint("distill"):
            raise RuntimeError("shape mismatch")


def test_importance_oom_names_batch_size():
    model = raise_in_forward(tiny_phimoe(1), torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(ResourceError, match=r"importance: out of memory .*importance.batch_size \(now 4\)"):
        estimate_importance(model, random_blocks(VOCAB, 8, SEQ), ImportanceConfig(samples=8, loss="lm"), progress=False)


def test_cli_distill_oom_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    s, t = save_pair(tmp_path)

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(distill_mod, "micro_loss", boom)
    rc = main(["distill", str(s), str(t), str(tmp_path / "out"), "--tokens", "256", "--seq-len", str(SEQ),
               "--random-blocks", "16", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: distill: out of memory (CUDA out of memory.")
    assert "distill.gradient_checkpointing: true" in err[-1]
    assert resources.is_oom(torch.OutOfMemoryError("x"))
