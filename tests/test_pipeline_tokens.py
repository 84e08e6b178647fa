"""The pipeline's data step writes token shards; later steps read them lazily and get the
same results as from the in-memory blocks of the same corpus."""

import pytest
import torch
from tiny_models import tiny_model, tiny_teacher_with_tokenizer

from slimmoe.config import DistillConfig
from slimmoe.io.data import load_blocks
from slimmoe.io.loading import load_model, load_tokenizer
from slimmoe.io.token_shards import ShardBlocks
from slimmoe.pipeline.steps import distill_stage, evaluate_stage, load_prepared, prepare_data

SEQ = 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Teacher, student, the corpus as the data step prepares it and as in-memory blocks (.pt)."""
    root = tmp_path_factory.mktemp("pipe")
    teacher, corpus = tiny_teacher_with_tokenizer(root / "teacher", corpus_chars=12000)
    tok = load_tokenizer(str(teacher))
    tiny_model("phimoe", seed=3, vocab_size=len(tok)).save_pretrained(root / "student")
    ref = prepare_data(str(corpus), str(teacher), root / "data", SEQ, eval_fraction=0.1)
    mem_train, mem_eval = load_blocks(corpus, tok, SEQ, eval_fraction=0.1, cache_dir=root / "cache")
    torch.save({"train": mem_train, "eval": mem_eval}, root / "blocks.pt")
    return root, teacher, corpus, ref, mem_train, mem_eval


def test_the_data_step_writes_token_shards_equal_to_the_in_memory_blocks(prepared, monkeypatch):
    root, teacher, corpus, ref, mem_train, mem_eval = prepared
    folder = root / "data" / f"tokens-{ref.fingerprint}"
    assert ref.path == str(folder) and (folder / "index.json").is_file() and not list(root.glob("data/*.pt"))
    train, held = load_prepared(ref.path)
    assert isinstance(train, ShardBlocks) and (ref.train_blocks, ref.eval_blocks) == (len(mem_train), len(mem_eval))
    assert torch.equal(train[:], mem_train) and torch.equal(held[:], mem_eval)
    # reused by fingerprint: nothing tokenised again
    from slimmoe.io import token_encode

    monkeypatch.setattr(token_encode, "encode_texts", lambda *a: pytest.fail("tokenised again"))
    assert prepare_data(str(corpus), str(teacher), root / "data", SEQ, eval_fraction=0.1) == ref
    # a tokenised folder as data.train: taken as it is, train capped by max_blocks
    capped = prepare_data(ref.path, str(teacher), root / "data2", SEQ, eval_fraction=0.1, max_blocks=5)
    c_train, c_held = load_prepared(capped.path)
    assert capped.train_blocks == 5 and torch.equal(c_train[:], mem_train[:5]) and torch.equal(c_held[:], mem_eval)


def test_distill_and_evaluate_give_the_same_results_from_shards_and_from_memory(prepared):
    root, teacher, _, ref, _, _ = prepared
    cfg = DistillConfig(tokens=3 * 4 * SEQ, batch_size=4, eval_every=1, eval_batch_size=4, progress=False,
                        keep_best=False)
    results = {}
    for name, blocks_path in (("shards", ref.path), ("memory", str(root / "blocks.pt"))):
        out = root / f"distill-{name}"
        result = distill_stage(str(root / "student"), str(teacher), blocks_path, cfg, out)
        metrics = evaluate_stage(str(out), blocks_path, max_blocks=4, batch_size=2, teacher_dir=str(teacher),
                                 generation=False, throughput_batch_sizes=[1], peak_memory=False)
        results[name] = (result.distill, metrics, load_model(str(out)).state_dict())
    (d_s, m_s, w_s), (d_m, m_m, w_m) = results["shards"], results["memory"]
    assert d_s["steps"] == d_m["steps"] == 3 and d_s["final_eval"] and d_s["final_eval"] == d_m["final_eval"]
    assert m_s["perplexity"] == m_m["perplexity"] and m_s["kl_to_teacher"] == m_m["kl_to_teacher"]
    assert all(torch.equal(w_s[k], w_m[k]) for k in w_m)


def test_a_teacher_cache_built_from_shards_gives_the_memory_run(prepared):
    """The top-k cache keys a lazy reader by its fingerprint (no tokens read to key it); the
    entry it writes holds the same values as the one built from the in-memory tensor."""
    root, teacher, _, ref, _, _ = prepared
    cache = root / "topk"
    cfg = DistillConfig(tokens=3 * 4 * SEQ, batch_size=4, progress=False, keep_best=False, teacher_cache_dir=cache)
    weights = {}
    for name, blocks_path in (("shards", ref.path), ("memory", str(root / "blocks.pt"))):
        out = root / f"cached-{name}"
        assert distill_stage(str(root / "student"), str(teacher), blocks_path, cfg, out).distill["steps"] == 3
        weights[name] = load_model(str(out)).state_dict()
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2  # one entry per block source
    assert all(torch.equal(weights["shards"][k], v) for k, v in weights["memory"].items())
