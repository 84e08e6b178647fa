"""Non-finite losses in distillation: stop after the last good checkpoint (default), or skip
the batch's update (`nonfinite: skip`) and give up after `max_nonfinite_skips`."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_distill import (
    VOCAB,
    load_params,
    one_torch_thread,  # noqa: F401 - autouse fixture
    save_pair,
    tiny_phimoe,
)

from slimmoe.cli import main
from slimmoe.distill.checkpoint import read_train_state
from slimmoe.distill.loop import DONE_FILE, distill
from slimmoe.errors import UserError
from slimmoe.faults import NAN_ENV
from slimmoe.io.data import random_blocks

SEQ = 16
KW = dict(tokens=6 * 4 * SEQ, batch_size=4, checkpoint_every=2, keep_checkpoints=10, lr=3e-3, progress=False)


def _ck(out, step: int) -> dict:
    return read_train_state(out / "checkpoints" / f"step-{step:08d}")  # {"model", "optimizer"} (DCP)


def _assert_same(a, b, same=True) -> None:
    """Model and optimizer tensors of two checkpoints equal (or not)."""
    flat = lambda ck: {**ck["model"], **{f"opt.{i}.{k}": v for i, s in ck["optimizer"]["state"].items()  # noqa: E731
                                         for k, v in s.items()}}
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    equal = all(torch.equal(fa[k], fb[k]) for k in fa)
    assert equal == same


@pytest.fixture
def pair():
    return tiny_phimoe(0, scale=1.0), random_blocks(VOCAB, 32, SEQ, seed=0)


def test_nan_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, pair, monkeypatch):
    teacher, train = pair
    distill(tiny_phimoe(1), teacher, tmp_path / "ref", train, **KW)
    monkeypatch.setenv(NAN_ENV, "5")
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        distill(tiny_phimoe(1), teacher, out, train, **KW)
    ck4 = out / "checkpoints" / "step-00000004"
    assert str(e.value) == (f"distill: non-finite loss at step 5; last good checkpoint: step 4 ({ck4}); "
                            "lower distill.lr (or set distill.nonfinite: skip to skip such batches)")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert not (out / DONE_FILE).exists() and not (out / "model.safetensors").exists()
    assert [json.loads(ln)["step"] for ln in (out / "losses.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    _assert_same(_ck(out, 4), _ck(tmp_path / "ref", 4))  # exactly the uninterrupted run's state

    monkeypatch.delenv(NAN_ENV)  # a transient fault: running again resumes and ends like the clean run
    res = distill(tiny_phimoe(1), teacher, out, train, **KW)
    assert res.resumed_from_step == 4
    ref = load_params(tmp_path / "ref")
    for k, v in load_params(out).items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6)


def test_nan_at_step_one_names_no_checkpoint(tmp_path, pair, monkeypatch):
    monkeypatch.setenv(NAN_ENV, "1")
    with pytest.raises(UserError, match=r"non-finite loss at step 1; no checkpoint written yet"):
        distill(tiny_phimoe(1), pair[0], tmp_path / "out", pair[1], **KW)


def test_skip_mode_drops_exactly_the_bad_updates(tmp_path, pair, monkeypatch):
    teacher, train = pair
    monkeypatch.setenv(NAN_ENV, "3,5")
    out = tmp_path / "out"
    res = distill(tiny_phimoe(1), teacher, out, train, **{**KW, "checkpoint_every": 1}, nonfinite="skip")
    assert res.steps == 6 and res.nonfinite_skips == 2
    _assert_same(_ck(out, 2), _ck(out, 3))  # step 3 changed neither weights nor optimizer state
    _assert_same(_ck(out, 4), _ck(out, 5))
    _assert_same(_ck(out, 3), _ck(out, 4), same=False)  # good steps still train
    records = [json.loads(ln) for ln in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "skipped" in r] == [3, 5]
    assert all(r["loss"] is None for r in records if "skipped" in r)
    assert all(torch.isfinite(v).all() for v in load_params(out).values())
    assert json.loads((out / "checkpoints" / "step-00000005" / "state.json").read_text())["nonfinite_skips"] == 2


def test_skip_mode_gives_up_after_max_skips(tmp_path, pair, monkeypatch):
    monkeypatch.setenv(NAN_ENV, "2,3,4")
    with pytest.raises(UserError, match=r"non-finite loss at step 4; last good checkpoint: step 2 .*"
                                        r"skipped 2 bad steps already \(distill.max_nonfinite_skips: 2\)"):
        distill(tiny_phimoe(1), pair[0], tmp_path / "out", pair[1], **KW, nonfinite="skip", max_nonfinite_skips=2)


def test_cli_distill_nan_is_one_error_line_exit_2(tmp_path, monkeypatch, capsys):
    s, t = save_pair(tmp_path)
    monkeypatch.setenv(NAN_ENV, "3")
    rc = main(["distill", str(s), str(t), str(tmp_path / "out"), "--tokens", str(4 * 8 * SEQ), "--seq-len", str(SEQ),
               "--random-blocks", "16", "--checkpoint-every", "2", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: distill: non-finite loss at step 3; last good checkpoint: step 2 (")
    assert not any("Traceback" in ln for ln in err)
