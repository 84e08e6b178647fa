"""The offline demo teacher: trains, learns, loads with stock transformers, caches, resumes."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import slimmoe.pipeline.demo_teacher as demo_teacher
from slimmoe.errors import UserError
from slimmoe.evaluation.quality import perplexity
from slimmoe.io.data import load_blocks
from slimmoe.pipeline.demo_teacher import MARKER_FILE, TeacherConfig, phimoe_config, train_teacher

CORPUS = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"


class Crash(Exception):
    pass


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: intra-op threads cost more than they gain, and on a busy 2-core machine
    OpenMP spin-waiting made this module 10x slower (measured: 155 s vs 11 s per training)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "shakespeare_head.txt"
    path.write_text(CORPUS.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return path


def tiny_cfg(corpus: Path, **kw) -> TeacherConfig:
    base = dict(corpus=corpus, vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=32, num_local_experts=4, seq_len=32,
                tokens=100 * 8 * 32, batch_size=8, lr=3e-3, eval_fraction=0.1, seed=0)
    return TeacherConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory):
    """Train once, crashing midway first: the crash leaves nothing at out_dir, the rerun resumes."""
    root = tmp_path_factory.mktemp("teacher")
    out = root / "teacher"
    cfg = tiny_cfg(small_corpus)

    def crash_at_60(step, metrics):
        if step == 60 and "loss" in metrics:
            raise Crash()

    with pytest.raises(Crash):
        train_teacher(cfg, out, progress=False, metrics_callback=crash_at_60)
    crashed_left_out_dir = out.exists()
    resumed_from = []
    orig = demo_teacher.distill

    def spy(*args, **kwargs):
        res = orig(*args, **kwargs)
        resumed_from.append(res.resumed_from_step)
        return res

    demo_teacher.distill = spy
    try:
        result = train_teacher(cfg, out, progress=False)
    finally:
        demo_teacher.distill = orig
    return dict(cfg=cfg, out=out, root=root, result=result, crashed_left_out_dir=crashed_left_out_dir,
                resumed_from=resumed_from)


def test_crash_leaves_no_half_teacher_and_rerun_resumes(trained):
    assert not trained["crashed_left_out_dir"]
    assert trained["resumed_from"] and trained["resumed_from"][0] is not None
    assert 0 < trained["resumed_from"][0] <= 60
    # after success only the teacher folder remains: no work, temp or old folders
    assert sorted(p.name for p in trained["root"].iterdir()) == ["teacher"]
    assert (trained["out"] / MARKER_FILE).is_file()


def test_loads_with_stock_transformers_and_learned(trained):
    cfg, out, result = trained["cfg"], trained["out"], trained["result"]
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.model_type == "phimoe"
    assert model.config.vocab_size == len(tok) <= cfg.vocab_size
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    text = "ROMEO: But soft, what light through yonder window breaks?"
    assert tok.decode(tok(text)["input_ids"]) == text

    _, eval_blocks = load_blocks(cfg.corpus, tok, cfg.seq_len, eval_fraction=cfg.eval_fraction)
    assert eval_blocks.shape[0] >= 2
    torch.manual_seed(cfg.seed)
    untrained = AutoModelForCausalLM.from_config(phimoe_config(cfg, len(tok), tok))
    before = perplexity(untrained, eval_blocks)
    after = perplexity(model, eval_blocks)
    assert before > 0.5 * len(tok)  # a random init is near uniform over the vocabulary
    assert after < 0.5 * before, (before, after)
    assert result["perplexity"] == pytest.approx(after, rel=1e-4)
    assert result["total_params"] == sum(p.numel() for p in model.parameters())
    assert result["active_params"] < result["total_params"]
    assert result["tokens"] >= cfg.tokens and not result["already_done"]


def test_second_call_returns_without_training(trained, monkeypatch):
    out = trained["out"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def no_training(*a, **k):
        raise AssertionError("distill must not run for a finished teacher")

    monkeypatch.setattr(demo_teacher, "distill", no_training)
    again = train_teacher(trained["cfg"], out, progress=False)
    assert again["already_done"]
    assert again["perplexity"] == trained["result"]["perplexity"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_changed_config_is_not_taken_for_the_finished_one(trained, monkeypatch):
    def training_started(*a, **k):
        raise Crash()

    monkeypatch.setattr(demo_teacher, "distill", training_started)
    with pytest.raises(Crash):  # it goes on to train, instead of returning the old teacher
        train_teacher(tiny_cfg(trained["cfg"].corpus, seed=1), trained["out"], progress=False)
    assert json.loads((trained["out"] / MARKER_FILE).read_text())["config"]["seed"] == 0  # old one intact


def test_refuses_foreign_folder_and_missing_corpus(tmp_path, small_corpus):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="out_dir"):
        train_teacher(tiny_cfg(small_corpus), foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="corpus"):
        train_teacher(tiny_cfg(tmp_path / "missing.txt"), tmp_path / "t", progress=False)


@pytest.mark.parametrize(
    "kw, field",
    [(dict(num_key_value_heads=3), "num_key_value_heads"), (dict(num_experts_per_tok=1), "num_experts_per_tok"),
     (dict(vocab_size=100), "vocab_size"), (dict(unknown=1), "unknown")],
)
def test_config_validation_names_field(kw, field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        TeacherConfig(**kw)
