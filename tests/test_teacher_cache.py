"""Teacher top-k cache: same student with and without it; built once, keyed by its inputs."""

from __future__ import annotations

import json

import torch
from helpers_distill import (
    VOCAB,
    load_params,
    one_torch_thread,  # noqa: F401 - autouse fixture
    tiny_phimoe,
)

from slimmoe import losses
from slimmoe.distill.loop import distill
from slimmoe.distill.teacher_cache import (
    INDEX_FILE,
    build,
    fingerprint_model,
    teacher_fingerprint,
)
from slimmoe.io.data import random_blocks
from slimmoe.parallel import Topology

SEQ = 16


def test_cache_on_and_off_give_identical_students(tmp_path):
    """A float32 cache (values bit for bit as the teacher's float32 top-k) trains the same student."""
    teacher, train = tiny_phimoe(0, scale=1.0), random_blocks(VOCAB, 48, SEQ, seed=0)
    kw = {"tokens": 12 * 8 * SEQ, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-3, "progress": False}
    distill(tiny_phimoe(1), teacher, tmp_path / "live", train, **kw)
    cache = tmp_path / "cache"
    kw["teacher_cache_dtype"] = "float32"
    distill(tiny_phimoe(1), teacher, tmp_path / "cached", train, teacher_cache_dir=cache, **kw)
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / INDEX_FILE).is_file()
    index = json.loads((entries[0] / INDEX_FILE).read_text())
    assert index["shape"] == [48, SEQ, 8] and index["teacher_fingerprint"] == teacher_fingerprint(teacher)
    assert index["teacher_fingerprint"] == fingerprint_model(teacher)
    assert (index["logprobs_dtype"], index["indices_dtype"]) == ("float32", "uint16")  # vocab 128
    assert sorted(p.name for p in entries[0].glob("part-*")) == [  # 48 blocks: one part of the default size
        "part-000000.indices.u16", "part-000000.json", "part-000000.logprobs.f32"]
    # identical up to float reassociation: the live teacher sees other batch compositions than
    # the cache builder, which changes tokens-per-expert matmul shapes (differences ~1e-8)
    live, cached = load_params(tmp_path / "live"), load_params(tmp_path / "cached")
    for k in live:
        torch.testing.assert_close(cached[k], live[k], rtol=0, atol=1e-6)
    a = (tmp_path / "live" / "losses.jsonl").read_text().splitlines()
    b = (tmp_path / "cached" / "losses.jsonl").read_text().splitlines()
    torch.testing.assert_close(torch.tensor([json.loads(x)["loss"] for x in b]),
                               torch.tensor([json.loads(x)["loss"] for x in a]), rtol=1e-6, atol=0)
    start = tiny_phimoe(1).state_dict()
    assert max((live[k] - start[k]).abs().max().item() for k in live) > 1e-3  # it did train

    # a second run on the same teacher and data reads the entry back instead of running the teacher
    mtimes = {p.name: p.stat().st_mtime_ns for p in entries[0].iterdir()}
    calls = []
    orig = teacher.forward
    teacher.forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    distill(tiny_phimoe(1), teacher, tmp_path / "cached2", train, teacher_cache_dir=cache, **kw)
    assert calls == []  # no eval configured, so the teacher never ran
    assert {p.name: p.stat().st_mtime_ns for p in entries[0].iterdir()} == mtimes  # nothing rewritten


def test_cache_contents_and_key(tmp_path):
    teacher, blocks = tiny_phimoe(0, scale=1.0).eval(), random_blocks(VOCAB, 10, SEQ, seed=2)
    fp = fingerprint_model(teacher)

    def run(ids):
        return teacher(input_ids=ids).logits

    def build_or_open(cache_dir, blocks, fn, **key):  # 4 parts of 3, 3, 3 and 1 blocks, float32: exact
        return build(cache_dir, blocks, fn, topo=Topology(), part_size=3, logprobs_dtype="float32", **key)

    c = build_or_open(tmp_path, blocks, run, teacher_fp=fp, k=4, temperature=2.0, batch_size=2)
    with torch.no_grad():
        ref_lp, ref_idx = losses.teacher_topk(teacher(input_ids=blocks[[7, 2]]).logits, k=4, temperature=2.0)
    lp, idx = c.get(torch.tensor([7, 2]))  # two parts, out of order
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-6)
    assert torch.equal(idx, ref_idx) and idx.dtype == torch.long
    with torch.no_grad():
        all_lp, all_idx = losses.teacher_topk(teacher(input_ids=blocks).logits, k=4, temperature=2.0)
    lp, idx = c.get(torch.arange(10))  # every part, the last one short
    torch.testing.assert_close(lp, all_lp, rtol=0, atol=1e-6)
    assert torch.equal(idx, all_idx) and c.verify()
    other_k = build_or_open(tmp_path, blocks, run, teacher_fp=fp, k=2, temperature=2.0, batch_size=3)
    other_data = build_or_open(tmp_path, blocks[:5], run, teacher_fp=fp, k=4, temperature=2.0, batch_size=3)
    other_t = build_or_open(tmp_path, blocks, run, teacher_fp=fp, k=4, temperature=1.0, batch_size=3)
    named = build_or_open(tmp_path, blocks, run, teacher_fp=fp, k=4, temperature=2.0, batch_size=3, data_fp="d1")
    assert len({c.path, other_k.path, other_data.path, other_t.path, named.path}) == 5
    assert json.loads((named.path / INDEX_FILE).read_text())["data_fingerprint"] == "d1"
    assert fingerprint_model(tiny_phimoe(5)) != fp
