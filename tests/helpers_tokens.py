"""Corpora and a tokenizer for the token-shard tests, generated inside the tests (nothing committed)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = next(p for p in (Path("/work/shared/data/tinyshakespeare.txt"), ROOT / "data" / "tinyshakespeare.txt")
                   if p.is_file())


def save_tokenizer(folder: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer (slimmoe.io.tokenizer) trained on the corpus's start, saved to ``folder``."""
    from slimmoe.io.tokenizer import train_bpe_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "train.txt"
    text.write_text(SHAKESPEARE.read_text()[:20000])
    train_bpe_tokenizer(text, vocab_size=vocab_size).save_pretrained(folder)
    text.unlink()
    return folder


def documents(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of 1-12 shuffled Shakespeare lines; every 9th is empty."""
    rng = random.Random(seed)
    lines = [ln for ln in SHAKESPEARE.read_text().splitlines() if ln.strip()]
    docs = []
    for i in range(n_docs):
        docs.append("" if i % 9 == 4 else "\n".join(rng.choice(lines) for _ in range(rng.randint(1, 12))))
    return docs


def write_jsonl_corpus(folder: Path, n_docs: int, files: int = 3, seed: int = 0, field: str = "text") -> list[str]:
    """``folder/part-<k>.jsonl`` holding ``n_docs`` documents in order; returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = documents(n_docs, seed)
    per = -(-n_docs // files)
    for k in range(files):
        with open(folder / f"part-{k}.jsonl", "w", encoding="utf-8") as f:
            for i, d in enumerate(docs[k * per : (k + 1) * per]):
                f.write(json.dumps({field: d, "id": k * per + i}) + "\n")
    return docs


def reference_stream(tokenizer, docs: list[str]) -> np.ndarray:
    """Independent expectation: each document tokenised alone, EOS between non-empty ones."""
    eos, out = tokenizer.eos_token_id, []
    for d in docs:
        ids = tokenizer(d, add_special_tokens=False)["input_ids"]
        if ids:
            if out and eos is not None:
                out.append(eos)
            out.extend(ids)
    return np.array(out, dtype=np.int64)


def shard_stream(folder: Path, stream: str = "train") -> np.ndarray:
    """All tokens of a stream's shards, read with numpy (not the reader under test)."""
    index = json.loads((folder / "index.json").read_text())
    dtype = np.dtype(index["dtype"])
    parts = [np.fromfile(folder / s["file"], dtype=dtype) for s in index["shards"] if s["stream"] == stream]
    return np.concatenate(parts).astype(np.int64)


def synthetic_token_folder(folder: Path, tokens: int, seq_len: int, shard_tokens: int = 1 << 22, seed: int = 0) -> Path:
    """A tokenised folder of random uint16 ids written directly (for reader memory tests)."""
    from slimmoe.io.token_writer import content_fingerprint

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shard_tokens = shard_tokens // seq_len * seq_len
    shards, left, k = [], tokens, 0
    while left > 0:
        n = min(shard_tokens, left)
        arr = rng.integers(0, 50000, n, dtype=np.uint16)
        arr.tofile(folder / f"train-{k:05d}.bin")
        shards.append({"file": f"train-{k:05d}.bin", "stream": "train", "tokens": n,
                       "sha256": hashlib.sha256(arr.tobytes()).hexdigest(), "max_token_id": int(arr.max())})
        left, k = left - n, k + 1
    n_blocks = tokens // seq_len
    index = {"format": "slimmoe-tokens-v1", "dtype": "uint16", "seq_len": seq_len, "num_tokens": tokens,
             "train_blocks": n_blocks, "eval_blocks": 0, "train": {"stream": "train", "start": 0, "stop": n_blocks},
             "eval": {"stream": "train", "start": n_blocks, "stop": n_blocks}, "shards": shards,
             "tokenizer": "synthetic", "vocab_size": 50000, "eos_token_id": None}
    index["fingerprint"] = content_fingerprint(index)
    (folder / "index.json").write_text(json.dumps(index))
    return folder
