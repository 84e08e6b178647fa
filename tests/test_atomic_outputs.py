"""No partial outputs: a writer SIGKILLed mid-write (a real kill, in a forked child) leaves the
previous result intact, a folder without its completion marker is not a result, and torn
checkpoints / log lines are skipped."""

from __future__ import annotations

import json
import os
import signal

import torch
from helpers_distill import one_torch_thread, tiny_phimoe  # noqa: F401 - autouse fixture

from slimmoe.distill.checkpoint import load_latest_checkpoint, save_checkpoint, truncate_jsonl
from slimmoe.faults import CRASH_ENV
from slimmoe.io.atomic import COMPLETE_FILE, atomic_write_text, is_complete, replace_folder, save_pretrained_atomic
from tasks import steps
from tasks.caching import cached


def killed_child(point: str, fn) -> None:
    """Run ``fn`` in a forked child with ``SLIMMOE_CRASH_AT=point``; assert the child died by SIGKILL."""
    pid = os.fork()
    if pid == 0:  # child: never returns to pytest
        try:
            os.environ[CRASH_ENV] = point
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_killed_folder_swap_leaves_the_old_result(tmp_path):
    out = tmp_path / "pruned"
    with replace_folder(out) as tmp:
        (tmp / "w").write_text("old")
    assert is_complete(out)

    def write_new():
        with replace_folder(out, point="slim:write") as tmp:
            (tmp / "w").write_text("new")

    killed_child("slim:write", write_new)
    assert (out / "w").read_text() == "old" and is_complete(out)
    assert list(tmp_path.glob(".pruned.tmp-*"))  # the killed writer's folder ...
    with replace_folder(out) as tmp:
        (tmp / "w").write_text("newer")
    assert not list(tmp_path.glob(".pruned.*"))  # ... is cleared by the next writer
    assert (out / "w").read_text() == "newer"


def test_killed_text_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text(path, '{"v": 1}')
    killed_child("summary:write", lambda: atomic_write_text(path, '{"v": 2}', point="summary:write"))
    assert json.loads(path.read_text()) == {"v": 1}
    atomic_write_text(path, '{"v": 3}')
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_killed_checkpoint_write_is_not_a_checkpoint(tmp_path):
    def payload(v):
        return {"model": {"w": torch.full((3,), float(v))}, "optimizer": {}, "scheduler": {}, "rng": {}}

    save_checkpoint(tmp_path, 2, payload(2), {}, keep=3)
    killed_child("checkpoint:write", lambda: save_checkpoint(tmp_path, 4, payload(4), {}, keep=3))
    assert list(tmp_path.glob(".tmp-step-00000004-*"))
    path, state, loaded = load_latest_checkpoint(tmp_path)
    assert path.name == "step-00000002" and state["step"] == 2 and loaded["model"]["w"][0] == 2


def test_folder_without_marker_is_recomputed(tmp_path):
    done, partial, gone, scores = tmp_path / "done", tmp_path / "partial", tmp_path / "gone", tmp_path / "s.pt"
    done.mkdir()
    (done / COMPLETE_FILE).write_text("")
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    scores.write_bytes(b"x")
    assert cached(steps.slim, tmp_path / "out", str(done), str(scores)).refresh_cache is False
    for missing in (partial, gone):
        assert cached(steps.slim, tmp_path / "out", str(missing)).refresh_cache is True


def test_torn_log_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "losses.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    truncate_jsonl(path, 2)
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 2]


def test_final_model_is_renamed_into_place(tmp_path):
    (tmp_path / ".final.tmp-999").mkdir()  # left by a killed writer
    (tmp_path / ".final.tmp-999" / "model.safetensors").write_bytes(b"torn")
    model = tiny_phimoe(1)
    save_pretrained_atomic(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
