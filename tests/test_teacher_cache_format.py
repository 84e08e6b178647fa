"""Teacher cache format 3: 16-bit log-probs and ids, their precision, the bytes on disk, the
float32 mode, and block sources that are not tensors (a lazy reader with a fingerprint)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slimmoe import losses
from slimmoe.distill.teacher_cache import (
    FORMAT,
    INDEX_FILE,
    LOGPROB_FLOOR,
    build,
    bytes_per_token,
    find_complete,
    fingerprint_blocks,
)
from slimmoe.parallel import Topology

N, SEQ, K = 10, 12, 8


def _logits_fn(vocab: int, seed: int = 0, scale: float = 4.0):
    """A stand-in teacher: fixed random logits per (block, position), a pure function of the ids."""
    rows = min(vocab, 64)  # a [vocab, vocab] table at Phi's vocabulary would be 4 GB
    table = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale

    def run(ids: torch.Tensor) -> torch.Tensor:
        return table[ids % rows]  # [b, T, V], depends on each token only

    return run


def _blocks(vocab: int, n: int = N, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _build(tmp_path, blocks, fn, vocab, dtype="float16", k=K, **kw):
    return build(tmp_path, blocks, fn, teacher_fp="t", k=k, temperature=1.0, batch_size=3, topo=Topology(),
                 part_size=4, logprobs_dtype=dtype, vocab_size=vocab, **kw)


def _data_bytes(entry) -> int:
    return sum(p.stat().st_size for p in entry.glob("part-*") if not p.name.endswith(".json"))


def test_float16_entry_is_32_bytes_per_token_and_rounds_once(tmp_path):
    vocab = 32064  # Phi's
    blocks, fn = _blocks(vocab), _logits_fn(vocab)
    cache = _build(tmp_path, blocks, fn, vocab)
    index = json.loads((cache.path / INDEX_FILE).read_text())
    assert (index["format"], index["logprobs_dtype"], index["indices_dtype"]) == (FORMAT, "float16", "uint16")
    assert sorted(p.name for p in cache.path.glob("part-000000.*")) == [
        "part-000000.indices.u16", "part-000000.json", "part-000000.logprobs.f16"]
    per_token = _data_bytes(cache.path) / (N * SEQ)
    assert per_token == 32 == bytes_per_token(K, "float16", vocab)  # measured: k x (2 + 2)
    lp, idx = cache.get(torch.arange(N))
    assert lp.dtype == torch.float32 and idx.dtype == torch.int64
    # independent reference: top-k of the log-softmax in float64
    ref = torch.log_softmax(fn(blocks).double(), dim=-1)
    ref_lp, ref_idx = ref.topk(K, dim=-1)
    assert torch.equal(idx, ref_idx)  # ids exact
    # within one float16 rounding (half a unit in the last place, 2^-11 relative) plus float32's own error
    err = (lp.double() - ref_lp).abs()
    assert bool((err <= ref_lp.abs() * 2.0**-11 + 1e-6).all()), err.max()
    assert err.max() > 0  # it did round
    # and exactly the float32 top-k (what the live teacher feeds the loss) rounded once to float16
    f32_lp, f32_idx = losses.teacher_topk(fn(blocks), k=K)
    assert torch.equal(lp, f32_lp.to(torch.float16).float()) and torch.equal(idx, f32_idx)
    assert cache.verify()


def test_float32_entry_keeps_todays_values_bit_for_bit(tmp_path):
    vocab = 128
    blocks, fn = _blocks(vocab), _logits_fn(vocab)
    cache = _build(tmp_path, blocks, fn, vocab, dtype="float32")
    lp, idx = cache.get(torch.tensor([9, 0, 5]))
    ref_lp, ref_idx = losses.teacher_topk(fn(blocks[[9, 0, 5]]), k=K)
    assert torch.equal(lp, ref_lp) and torch.equal(idx, ref_idx)
    assert _data_bytes(cache.path) == N * SEQ * K * (4 + 2)  # float32 log-probs, uint16 ids
    raw = np.fromfile(cache.path / "part-000000.logprobs.f32", dtype=np.float32).reshape(4, SEQ, K)
    assert np.array_equal(raw, losses.teacher_topk(fn(blocks[:4]), k=K)[0].numpy())


def test_bfloat16_entry_rounds_once(tmp_path):
    vocab = 128
    blocks, fn = _blocks(vocab), _logits_fn(vocab)
    cache = _build(tmp_path, blocks, fn, vocab, dtype="bfloat16")
    assert sorted(p.name for p in cache.path.glob("part-000000.*"))[-1] == "part-000000.logprobs.bf16"
    lp, idx = cache.get(torch.arange(N))
    ref_lp, ref_idx = losses.teacher_topk(fn(blocks), k=K)
    assert torch.equal(lp, ref_lp.to(torch.bfloat16).float()) and torch.equal(idx, ref_idx)
    assert _data_bytes(cache.path) / (N * SEQ) == 32


def test_vocab_over_65536_uses_32_bit_ids(tmp_path):
    vocab, blocks = 70_000, _blocks(70_000, n=3, seq=4)

    def fn(ids):  # every position's largest logit on an id above 65535
        z = torch.randn(*ids.shape, vocab, generator=torch.Generator().manual_seed(int(ids[0, 0])))
        z[..., 69_999] = 20.0
        z[..., 65_536] = 19.0
        return z

    cache = _build(tmp_path, blocks, fn, vocab, k=4)
    index = json.loads((cache.path / INDEX_FILE).read_text())
    assert index["indices_dtype"] == "int32" and (cache.path / "part-000000.indices.i32").is_file()
    assert _data_bytes(cache.path) / (3 * 4) == bytes_per_token(4, "float16", vocab) == 4 * (2 + 4)
    _, idx = cache.get(torch.arange(3))
    assert bool((idx[..., 0] == 69_999).all()) and bool((idx[..., 1] == 65_536).all())
    # an entry created for a small vocabulary refuses a teacher with more logits than uint16 ids hold
    with pytest.raises(ValueError, match="uint16"):
        _build(tmp_path / "small", blocks, fn, 1000, k=4)


def test_very_negative_and_infinite_logprobs_are_clamped_in_16_bit(tmp_path):
    vocab = 16
    blocks = _blocks(vocab, n=2, seq=3)

    def fn(ids):
        z = torch.zeros(*ids.shape, vocab)
        z[..., 0], z[..., 1], z[..., 2] = 5.0, -1e6, float("-inf")
        return z

    lp, idx = _build(tmp_path, blocks, fn, vocab, k=vocab).get(torch.arange(2))
    assert bool(torch.isfinite(lp).all()) and float(lp.min()) == LOGPROB_FLOOR
    assert bool((lp[..., -2:] == LOGPROB_FLOOR).all()) and set(idx[..., -2:].flatten().tolist()) == {1, 2}
    # the losses read them as probability 0, as they would the unclamped values
    s = torch.randn(2, 3, vocab)
    loss = losses.kd_topk_loss(s, lp, idx)
    assert torch.isfinite(loss)


def test_dtype_is_part_of_the_key_and_other_formats_are_not_read(tmp_path):
    vocab = 128
    blocks, fn = _blocks(vocab), _logits_fn(vocab)
    f16 = _build(tmp_path, blocks, fn, vocab)
    f32 = _build(tmp_path, blocks, fn, vocab, dtype="float32")
    assert f16.path != f32.path
    key = {"teacher_fp": "t", "k": K, "temperature": 1.0}
    assert find_complete(tmp_path, blocks, **key).path == f16.path  # float16 is the default
    assert find_complete(tmp_path, blocks, logprobs_dtype="float32", **key).path == f32.path
    assert find_complete(tmp_path, blocks, vocab_size=vocab, **key) is not None
    assert find_complete(tmp_path, blocks, vocab_size=100_000, **key) is None  # would need int32 ids
    index = json.loads((f16.path / INDEX_FILE).read_text())
    for bad in ({"format": "slimmoe-teacher-topk/2"}, {"logprobs_dtype": "float8"}, {"indices_dtype": "uint8"}):
        (f16.path / INDEX_FILE).write_text(json.dumps({**index, **bad}))
        assert find_complete(tmp_path, blocks, **key) is None, bad
    with pytest.raises(ValueError, match="teacher_cache_dtype"):
        _build(tmp_path, blocks, fn, vocab, dtype="int8")


class LazyBlocks:
    """What a lazy token-block reader offers: shape, len, slicing to int64 tensors, a fingerprint."""

    def __init__(self, data: torch.Tensor, fingerprint: str):
        self._data, self.fingerprint, self.reads = data, fingerprint, 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self._data.shape)

    def __len__(self) -> int:
        return self._data.shape[0]

    def __getitem__(self, item) -> torch.Tensor:
        self.reads += 1
        return self._data[item].to(torch.int64)


def test_a_block_source_with_a_fingerprint_is_not_read_to_key_it(tmp_path):
    vocab = 128
    data, fn = _blocks(vocab), _logits_fn(vocab)
    lazy = LazyBlocks(data.to(torch.int32), "tokens-v1")
    fp = fingerprint_blocks(lazy)
    assert lazy.reads == 0 and fp != fingerprint_blocks(data)
    assert fingerprint_blocks(LazyBlocks(data, "tokens-v1")) == fp
    assert fingerprint_blocks(LazyBlocks(data, "tokens-v2")) != fp
    assert fingerprint_blocks(LazyBlocks(data[:5], "tokens-v1")) != fp  # the shape counts too
    with pytest.raises(TypeError, match="fingerprint"):
        fingerprint_blocks(np.zeros((2, 3)))
    cache = _build(tmp_path, lazy, fn, vocab)
    assert lazy.reads == 2 + 2 + 1  # parts of 4, 4, 2 blocks in batches of 3: slices only
    assert find_complete(tmp_path, lazy, teacher_fp="t", k=K, temperature=1.0).path == cache.path
    ref = _build(tmp_path / "tensor", data, fn, vocab)
    for a, b in zip(cache.get(torch.arange(N)), ref.get(torch.arange(N))):
        assert torch.equal(a, b)


def test_config_flag_and_pipeline_accept_the_dtype():
    from slimmoe.cli import build_parser
    from slimmoe.cli import distill as cli_distill
    from slimmoe.config import DistillConfig
    from slimmoe.pipeline.schema import PipelineConfig

    assert DistillConfig(tokens=1).teacher_cache_dtype == "float16"
    with pytest.raises(ValueError, match="teacher_cache_dtype"):
        DistillConfig(tokens=1, teacher_cache_dtype="int8")
    parser = build_parser()._subparsers._group_actions[0].choices["distill"]
    args = parser.parse_args(["s", "t", "o", "--tokens", "64", "--teacher-cache-dtype", "bfloat16"])
    assert cli_distill.DISTILL_FLAGS.build(args).teacher_cache_dtype == "bfloat16"
    cfg = PipelineConfig.model_validate({"name": "x", "teacher": "t", "output_dir": "o", "data": {"train": "d.txt"},
                                         "stages": [{"name": "a", "expert_intermediate_size": 8,
                                                     "distill": {"tokens": 64, "teacher_cache_dtype": "float32"}}]})
    assert cfg.stages[0].distill.teacher_cache_dtype == "float32"


def test_reads_across_more_parts_than_stay_mapped(tmp_path, monkeypatch):
    """A cache keeps at most OPEN_PARTS parts mapped; reading rows from every part in a
    scattered order still returns each row's own top-k (checked against the stand-in teacher)."""
    from slimmoe.distill.teacher_cache import TeacherTopkCache

    vocab, n = 128, 30  # 8 parts of 4 rows
    blocks, fn = _blocks(vocab, n=n), _logits_fn(vocab)
    cache = _build(tmp_path, blocks, fn, vocab, dtype="float32")
    monkeypatch.setattr(TeacherTopkCache, "OPEN_PARTS", 2)
    for rows in ([29, 0, 13], [5, 21, 2, 17, 9], [0, 29], list(range(n))[::-1]):
        lp, idx = cache.get(torch.tensor(rows))
        ref_lp, ref_idx = losses.teacher_topk(fn(blocks[rows]), k=K)
        assert torch.equal(lp, ref_lp) and torch.equal(idx, ref_idx)
        assert len(cache._parts) <= 2
