"""Distillation loop: learning, held-out selection, LM-only mode, callbacks, CLI errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from helpers_distill import (
    VOCAB,
    load_params,
    one_torch_thread,  # noqa: F401 - autouse fixture
    save_pair,
    tiny_phimoe,
)

from slimmoe.cli import distill as cli_distill
from slimmoe.distill.determinism import step_sample_ids
from slimmoe.distill.loop import DONE_FILE, LOSSES_FILE, distill
from slimmoe.distill.setup import lr_lambda
from slimmoe.errors import UserError
from slimmoe.io.data import random_blocks

SEQ = 16


def test_student_gets_closer_to_teacher(tmp_path):
    """150 steps of default kd_topk: held-out KL(teacher || student) falls at least 5x."""
    teacher, student = tiny_phimoe(0, scale=1.0), tiny_phimoe(1, intermediate_size=32)
    train, held = random_blocks(VOCAB, 256, SEQ, seed=0), random_blocks(VOCAB, 16, SEQ, seed=1)
    seen = []
    res = distill(student, teacher, tmp_path / "out", train, held, tokens=150 * 8 * SEQ, batch_size=8,
                  lr=3e-3, eval_every=50, progress=False, metrics_callback=lambda s, m: seen.append((s, m)))
    before, after = res.initial_eval["held_out_kl"], res.final_eval["held_out_kl"]
    assert after * 5 < before, (before, after)
    assert res.steps == 150 and res.best_step == 150
    eval_steps = [s for s, m in seen if "held_out_kl" in m]
    assert eval_steps == [0, 50, 100, 150]
    assert [s for s, m in seen if "loss" in m] == list(range(1, 151))
    # the written model is the trained student, loadable by stock transformers
    written = load_params(tmp_path / "out")
    for k, v in student.state_dict().items():
        torch.testing.assert_close(written[k], v)
    again = distill(student, teacher, tmp_path / "out", train, held, tokens=150 * 8 * SEQ)
    assert again.already_done and again.steps == 150


def test_lm_loss_without_teacher_and_early_stopping(tmp_path):
    """loss='lm' trains with no teacher; a too-high lr makes held-out loss rise -> early stop,
    and the final model is the best held-out one (step 0 here)."""
    model = tiny_phimoe(2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train, held = random_blocks(VOCAB, 64, SEQ, seed=3), random_blocks(VOCAB, 8, SEQ, seed=4)
    res = distill(model, None, tmp_path / "lm", train, held, loss="lm", tokens=40 * 8 * SEQ, lr=0.5,
                  warmup_fraction=0.0, eval_every=2, early_stopping_patience=2, progress=False)
    assert res.stopped_early and res.steps < 40
    assert res.best_step == 0 and res.final_eval["held_out_nll"] > res.initial_eval["held_out_nll"]
    written = load_params(tmp_path / "lm")
    for k, v in start.items():
        torch.testing.assert_close(written[k], v)
    lines = (tmp_path / "lm" / LOSSES_FILE).read_text().splitlines()
    assert len(lines) == res.steps


def test_lm_loss_with_a_teacher_keeps_the_best_by_held_out_nll(tmp_path):
    """A teacher given to an `lm` run (the ablation's from-scratch arm) is only measured
    against: the best checkpoint is chosen by held-out next-token loss, not by KL."""
    teacher, model = tiny_phimoe(0, scale=1.0), tiny_phimoe(5)
    train, held = random_blocks(VOCAB, 64, SEQ, seed=3), random_blocks(VOCAB, 8, SEQ, seed=4)
    seen = {}
    res = distill(model, teacher, tmp_path / "lm", train, held, loss="lm", tokens=12 * 8 * SEQ, lr=3e-3,
                  eval_every=4, progress=False, metrics_callback=lambda s, m: seen.update({s: m}) if "held_out_nll" in m else None)
    assert set(seen) == {0, 4, 8, 12} and all("held_out_kl" in m for m in seen.values())
    nll = {s: m["held_out_nll"] for s, m in seen.items()}
    assert res.best_step == min(nll, key=nll.get)
    assert res.best_metric == pytest.approx(nll[res.best_step])


def test_data_order_and_schedule():
    seen = torch.cat([step_sample_ids(s, 8, 20, seed=5) for s in range(5)])  # 40 samples = 2 epochs
    assert sorted(seen[:20].tolist()) == list(range(20)) and sorted(seen[20:].tolist()) == list(range(20))
    assert not torch.equal(seen[:20], seen[20:])  # each epoch reshuffled
    assert torch.equal(step_sample_ids(3, 8, 20, seed=5), seen[24:32])
    f = lr_lambda(100, 0.1, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1) and 0.1 < f(55) < 1.0


def _args(s, t, out, *extra):
    parser = argparse.ArgumentParser()
    cli_distill.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["distill", str(s), str(t), str(out), "--no-progress", *extra])


def test_cli_bad_input_names_the_field(tmp_path):
    s, t = save_pair(tmp_path)
    cases = [
        (_args(tmp_path / "nope", t, tmp_path / "o", "--tokens", "64"), "STUDENT"),
        (_args(s, tmp_path / "nope", tmp_path / "o", "--tokens", "64"), "TEACHER"),
        (_args(s, t, tmp_path / "o", "--tokens", "0"), "tokens"),
        (_args(s, t, tmp_path / "o", "--tokens", "64", "--data", str(tmp_path / "missing.txt")), "--data"),
        (_args(s, "none", tmp_path / "o", "--tokens", "64"), "TEACHER"),
    ]
    other = tmp_path / "other_vocab"
    cfg = json.loads((t / "config.json").read_text())
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**cfg, "vocab_size": VOCAB * 2}))
    cases.append((_args(s, other, tmp_path / "o", "--tokens", "64"), "vocab size"))
    for args, needle in cases:
        with pytest.raises(UserError, match=needle):
            cli_distill.run(args)
    assert not (tmp_path / "o").exists()


def test_cli_runs_then_reports_done(tmp_path, capsys):
    s, t = save_pair(tmp_path)
    out = tmp_path / "out"
    args = _args(s, t, out, "--tokens", str(4 * 8 * SEQ), "--seq-len", str(SEQ), "--random-blocks", "32",
                 "--eval-fraction", "0.25", "--eval-every", "2")
    assert cli_distill.run(args) == 0
    assert (out / DONE_FILE).is_file() and (out / "config.json").is_file()
    assert len((out / LOSSES_FILE).read_text().splitlines()) == 4
    capsys.readouterr()
    assert cli_distill.run(args) == 0
    assert "already done" in capsys.readouterr().err


def test_gradient_checkpointing_same_losses_and_aux_loss_counts(tmp_path):
    """Recomputation under gradient checkpointing replays the router's Gumbel noise exactly;
    a positive router aux-loss coefficient adds the load-balancing term to the loss."""
    teacher, train = tiny_phimoe(0, scale=1.0), random_blocks(VOCAB, 32, SEQ, seed=0)
    kw = dict(tokens=4 * 4 * SEQ, batch_size=4, progress=False, lr=3e-3)
    runs = {}
    for name, extra in {"plain": {}, "gc": {"gradient_checkpointing": True},
                        "aux": {"router_aux_loss_coef": 0.5}}.items():
        distill(tiny_phimoe(1, scale=0.15, intermediate_size=32), teacher, tmp_path / name, train, **kw, **extra)
        runs[name] = [json.loads(x)["loss"] for x in (tmp_path / name / LOSSES_FILE).read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(runs["gc"]), torch.tensor(runs["plain"]), rtol=1e-5, atol=1e-7)
    # load-balancing loss of top-2 of 4 experts is >= 1 (its minimum at perfect balance): 0.5 * it
    assert runs["aux"][0] > runs["plain"][0] + 0.4


def test_cli_on_text_data_saves_tokenizer(tmp_path):
    """--data is tokenised with the teacher's tokenizer, which is saved beside the student."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimmoe.io.tokenizer import train_bpe_tokenizer

    root = Path(__file__).resolve().parents[1]
    text = tmp_path / "corpus.txt"
    text.write_text((root / "data" / "tinyshakespeare.txt").read_text()[:20000])
    tok = train_bpe_tokenizer(text, vocab_size=300)
    vocab = len(tok)
    t_dir, s_dir = tmp_path / "teacher", tmp_path / "student"
    tiny_phimoe(0, vocab=vocab).save_pretrained(t_dir)
    tok.save_pretrained(t_dir)
    tiny_phimoe(1, vocab=vocab).save_pretrained(s_dir)
    out = tmp_path / "out"
    args = _args(s_dir, t_dir, out, "--data", str(text), "--tokens", str(3 * 8 * SEQ), "--seq-len", str(SEQ),
                 "--eval-fraction", "0.1", "--eval-every", "3")
    assert cli_distill.run(args) == 0
    assert AutoTokenizer.from_pretrained(out)("to be").input_ids == tok("to be").input_ids
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == vocab
    assert len((out / LOSSES_FILE).read_text().splitlines()) == 3
