"""Token shards written in-process and read lazily: equal to the in-memory blocks and to the
tokenizer called directly; the reader's tensor interface; bad folders refused clearly."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers_tokens import reference_stream, save_tokenizer, shard_stream, write_jsonl_corpus

from slimmoe.errors import UserError
from slimmoe.io.data import load_blocks
from slimmoe.io.token_shards import ShardBlocks, open_splits
from slimmoe.io.token_sources import SourceSpec
from slimmoe.io.token_writer import TokenizeJob, tokenize_corpus


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    docs = write_jsonl_corpus(folder, 400, files=3, seed=1)
    (folder / "zz-whole.txt").write_text("A whole file is one document.\nSecond line.\n")  # sorts last
    return folder, docs + ["A whole file is one document.\nSecond line.\n"]


def tokenize(src, out, tok, tok_dir, seq_len=32, **kw):
    shard_tokens = kw.pop("shard_tokens", 2000)
    job = TokenizeJob(train=SourceSpec(str(src)), tokenizer_dir=str(tok_dir), seq_len=seq_len,
                      shard_tokens=shard_tokens, **kw)
    return tokenize_corpus(job, out, tok, progress=False)


@pytest.mark.parametrize("seq_len,shard_tokens", [(32, 2000), (37, 5000)])
def test_blocks_equal_the_in_memory_blocks_and_the_tokenizer(tmp_path, corpus, tok, tok_dir, seq_len, shard_tokens):
    src, docs = corpus
    index = tokenize(src, tmp_path / "t", tok, tok_dir, seq_len, eval_fraction=0.1, shard_tokens=shard_tokens)
    assert len(index["shards"]) > 3 and index["dtype"] == "uint16"
    # the flat stream equals each document tokenised alone, EOS between non-empty ones
    expected = reference_stream(tok, docs)
    assert np.array_equal(shard_stream(tmp_path / "t"), expected)
    assert index["num_tokens"] == expected.size
    # blocks equal today's in-memory load_blocks, train and held-out
    mem_train, mem_eval = load_blocks(src, tok, seq_len, eval_fraction=0.1, cache_dir=tmp_path / "c")
    train, held = load_blocks(tmp_path / "t", tok, seq_len, eval_fraction=0.1)
    assert isinstance(train, ShardBlocks) and train.shape == mem_train.shape and held.shape == mem_eval.shape
    assert (index["train_blocks"], index["eval_blocks"]) == (mem_train.shape[0], mem_eval.shape[0])
    assert torch.equal(train[:], mem_train) and torch.equal(held[:], mem_eval)


def test_reader_indexing_matches_a_tensor(tmp_path, corpus, tok, tok_dir):
    index = tokenize(corpus[0], tmp_path / "t", tok, tok_dir, 16, eval_fraction=0.2)
    train, held = open_splits(tmp_path / "t", 16)
    ref = torch.from_numpy(shard_stream(tmp_path / "t")[: (index["train_blocks"] + index["eval_blocks"]) * 16]).view(-1, 16)
    ref_train, ref_held = ref[: index["train_blocks"]], ref[index["train_blocks"]:]
    n = len(train)
    assert train.shape == ref_train.shape and train.dim() == 2 and train.size(0) == n and train.size(1) == 16
    assert train.numel() == ref_train.numel() and train.dtype == torch.long
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, n, (300,), generator=gen)
    for key in (5, -1, slice(None), slice(3, 40, 7), slice(None, None, -3), idx, idx.tolist(), torch.tensor(7)):
        rows = torch.from_numpy(np.arange(n)[key].copy()) if isinstance(key, slice) else key  # torch: no step < 0
        got, want = train[key], ref_train[rows]
        assert got.dtype == torch.int64 and torch.equal(got, want), key
    assert torch.equal(train[idx[:4], :5], ref_train[idx[:4], :5]) and torch.equal(train[:, :3], ref_train[:, :3])
    assert torch.equal(held[:], ref_held)
    batches = train.split(50)
    assert len(batches) == len(ref_train.split(50))
    assert all(torch.equal(a, b) for a, b in zip(batches, ref_train.split(50)))
    assert torch.equal(train.head(10)[:], ref_train[:10]) and int(train.max()) == int(ref_train.max())
    with pytest.raises(IndexError):
        train[n]
    # the fingerprint names exactly these blocks
    again, _ = open_splits(tmp_path / "t")
    fps = {train.fingerprint, held.fingerprint, train.head(10).fingerprint, train.head(n).fingerprint}
    assert again.fingerprint == train.fingerprint and len(fps) == 3 and train.head(n).fingerprint == train.fingerprint


def test_separate_eval_source_and_caps(tmp_path, corpus, tok, tok_dir):
    src, _ = corpus
    held_src = tmp_path / "held.jsonl"
    held_docs = ["To be, or not to be, that is the question.", "", "Whether 'tis nobler in the mind to suffer."] * 5
    held_src.write_text("".join(json.dumps({"text": d}) + "\n" for d in held_docs))
    job = TokenizeJob(train=SourceSpec(str(src)), eval=SourceSpec(str(held_src)), tokenizer_dir=str(tok_dir),
                      seq_len=16, shard_tokens=1000, max_train_blocks=20)
    index = tokenize_corpus(job, tmp_path / "t", tok, progress=False)
    mem_train, mem_eval = load_blocks(src, tok, 16, eval_path=held_src, max_blocks=20, cache_dir=tmp_path / "c")
    train, held = load_blocks(tmp_path / "t", tok, 16, max_blocks=50)
    assert index["train_blocks"] == 20 and len(train) == 20 and torch.equal(train[:], mem_train)
    assert held.stream == "eval" and torch.equal(held[:], mem_eval)
    assert np.array_equal(shard_stream(tmp_path / "t", "eval"), reference_stream(tok, held_docs))
    # max_tokens caps the train stream exactly
    capped = tokenize(src, tmp_path / "cap", tok, tok_dir, 16, max_tokens=3000)
    assert capped["num_tokens"] == 3000 and capped["train_blocks"] == 3000 // 16


def test_distill_and_eval_accept_the_reader(tmp_path, corpus, tok, tok_dir):
    from tiny_models import tiny_model

    from slimmoe.config import DistillConfig
    from slimmoe.distill.setup import validate_inputs
    from slimmoe.evaluation.quality import perplexity

    tokenize(corpus[0], tmp_path / "t", tok, tok_dir, 16, eval_fraction=0.1)
    train, held = load_blocks(tmp_path / "t", tok, 16)
    model = tiny_model("phimoe", vocab_size=len(tok))
    validate_inputs(model, None, train, DistillConfig(tokens=64, loss="lm"))
    few = train.head(6)
    assert perplexity(model, few, batch_size=4) == pytest.approx(perplexity(model, few[:], batch_size=4), rel=1e-6)


def test_bad_folders_are_refused_naming_the_file_or_field(tmp_path, corpus, tok, tok_dir):
    tokenize(corpus[0], tmp_path / "t", tok, tok_dir, 16, eval_fraction=0.1)
    with pytest.raises(UserError, match=r"--data: .* seq_len=16, not seq_len=32"):
        load_blocks(tmp_path / "t", tok, 32, fields=("--data", "--eval-data"))
    other = save_tokenizer(tmp_path / "other", vocab_size=280)
    from transformers import AutoTokenizer

    with pytest.raises(UserError, match="another tokenizer"):
        load_blocks(tmp_path / "t", AutoTokenizer.from_pretrained(other), 16)
    with pytest.raises(UserError, match="--eval-data: .* its own held-out blocks"):
        load_blocks(tmp_path / "t", tok, 16, eval_path=tmp_path / "x.txt", fields=("--data", "--eval-data"))
    with pytest.raises(UserError, match="eval_fraction: 0.3 asks for"):
        load_blocks(tmp_path / "t", tok, 16, eval_fraction=0.3)
    # a truncated shard, an index that does not match its shards, an index that is not JSON
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "t", bad)
    with open(bad / "train-00001.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=r"train-00001\.bin: has 100 bytes"):
        load_blocks(bad, tok, 16)
    shutil.rmtree(bad)
    shutil.copytree(tmp_path / "t", bad)
    index = json.loads((bad / "index.json").read_text())
    index["shards"][0]["tokens"] += 16
    (bad / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"train-00000\.bin: has \d+ bytes, index.json says"):
        load_blocks(bad, tok, 16)
    (bad / "index.json").write_text("{not json")
    with pytest.raises(UserError, match=r"index\.json: cannot be read as JSON"):
        load_blocks(bad, tok, 16)


def test_a_glob_source_reads_its_files_in_order(tmp_path, corpus, tok, tok_dir):
    from slimmoe.io.data import data_fingerprint

    src, docs = corpus
    tokenize(f"{src}/part-*.jsonl", tmp_path / "g", tok, tok_dir, 16)
    assert np.array_equal(shard_stream(tmp_path / "g"), reference_stream(tok, docs[:-1]))  # not zz-whole.txt
    assert data_fingerprint(f"{src}/part-*.jsonl", tok, 16) != data_fingerprint(f"{src}/part-[01].jsonl", tok, 16)
    with pytest.raises(UserError, match=r"SOURCE: .*nothing-\*\.jsonl: the glob matches no"):
        tokenize(f"{src}/nothing-*.jsonl", tmp_path / "n", tok, tok_dir, 16)
