"""Loading text / jsonl / parquet / folders into token blocks; splits, caching, fingerprints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from slimmoe.errors import UserError
from slimmoe.io.data import data_fingerprint, load_blocks, random_blocks
from slimmoe.io.tokenizer import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "tinyshakespeare.txt"
EOS = "<|endoftext|>"
DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "All:\nSpeak, speak.",
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.",
    "MENENIUS:\nWhat work's, my countrymen, in hand? where go you\nWith bats and clubs?",
    "Second Citizen:\nWould you proceed especially against Caius Marcius?",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    p = tmp_path_factory.mktemp("tok") / "train.txt"
    p.write_text("".join(DOCS) * 20, encoding="utf-8")
    return train_bpe_tokenizer(p, vocab_size=300)


def reference(tok, docs, seq_len):
    """Independent expectation: tokenise the EOS-joined text in one go and slice."""
    ids = tok(EOS.join(docs), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def write_parquet(path, docs, field="text"):
    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path)
    return path


def test_txt_whole_file_is_one_document(tmp_path, tok):
    p = tmp_path / "c.txt"
    text = "".join(DOCS) * 3
    p.write_text(text, encoding="utf-8")
    train, ev = load_blocks(p, tok, 8)
    expected = reference(tok, [text], 8)
    assert train.dtype == torch.long and train.shape == expected.shape and train.shape[0] > 10
    assert torch.equal(train, expected)
    assert ev.shape == (0, 8)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_structured_files_use_text_field_with_eos_between_docs(tmp_path, tok, kind):
    field = "content"
    if kind == "parquet":
        p = write_parquet(tmp_path / "d.parquet", DOCS, field)
    elif kind == "jsonl":
        p = write_jsonl(tmp_path / "d.jsonl", DOCS, field)
    else:
        p = tmp_path / "d.json"
        p.write_text(json.dumps([{field: d} for d in DOCS]), encoding="utf-8")
    train, _ = load_blocks(p, tok, 6, text_field=field)
    expected = reference(tok, DOCS, 6)
    assert torch.equal(train, expected)
    assert (train == tok.eos_token_id).sum() == len(DOCS) - 1
    # EOS goes between documents only: the corpus is exactly the joined text's tokens
    n_tokens = len(tok(EOS.join(DOCS), add_special_tokens=False)["input_ids"])
    one, _ = load_blocks(p, tok, n_tokens, text_field=field)
    assert one.shape == (1, n_tokens) and int(one[0, -1]) != tok.eos_token_id
    with pytest.raises(UserError, match="seq_len"):
        load_blocks(p, tok, n_tokens + 1, text_field=field)


def test_folder_reads_all_supported_files_sorted_by_name(tmp_path, tok):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text(DOCS[2], encoding="utf-8")
    write_jsonl(d / "a.jsonl", DOCS[:2])
    write_parquet(d / "c.parquet", DOCS[3:4])
    (d / "sub" / "d.txt").write_text(DOCS[4], encoding="utf-8")
    (d / "README.md").write_text("not corpus text")  # unsupported suffix: skipped
    (d / ".hidden.txt").write_text("hidden files are skipped")
    train, _ = load_blocks(d, tok, 5)
    assert torch.equal(train, reference(tok, DOCS, 5))


def test_eval_fraction_takes_the_tail_without_overlap(tmp_path, tok):
    p = tmp_path / "c.txt"
    p.write_text("".join(DOCS) * 4, encoding="utf-8")
    full, _ = load_blocks(p, tok, 8)
    n = full.shape[0]
    train, ev = load_blocks(p, tok, 8, eval_fraction=0.25)
    k = ev.shape[0]
    assert k >= 1 and abs(k - n * 0.25) <= 0.5 and ev.shape == (k, 8) and train.shape == (n - k, 8)
    assert torch.equal(train, full[: n - k]) and torch.equal(ev, full[n - k :])
    # tiny fraction still gives one eval block; train keeps the rest
    train, ev = load_blocks(p, tok, 8, eval_fraction=1e-6)
    assert ev.shape == (1, 8) and torch.equal(ev[0], full[-1]) and train.shape[0] == n - 1


def test_eval_fraction_with_single_block_gives_empty_eval(tmp_path, tok):
    p = tmp_path / "c.txt"
    p.write_text(DOCS[0], encoding="utf-8")
    n_tokens = len(tok(DOCS[0], add_special_tokens=False)["input_ids"])
    train, ev = load_blocks(p, tok, n_tokens, eval_fraction=0.5)
    assert train.shape == (1, n_tokens) and ev.shape == (0, n_tokens)


def test_eval_path_and_max_blocks(tmp_path, tok):
    src = tmp_path / "train.txt"
    src.write_text("".join(DOCS[:3]) * 3, encoding="utf-8")
    held = write_jsonl(tmp_path / "held.jsonl", DOCS[3:])
    train, ev = load_blocks(src, tok, 4, eval_path=held, eval_fraction=0.5)
    assert torch.equal(train, reference(tok, ["".join(DOCS[:3]) * 3], 4))  # eval_path wins: no split
    assert torch.equal(ev, reference(tok, DOCS[3:], 4))
    capped, ev2 = load_blocks(src, tok, 4, eval_path=held, max_blocks=3)
    assert torch.equal(capped, train[:3]) and torch.equal(ev2, ev)


def _cache_files(root):
    return sorted(p for p in Path(root).rglob("cache-*.arrow"))


def test_second_call_reuses_datasets_cache(tmp_path, tok, monkeypatch):
    p = tmp_path / "c.jsonl"
    write_jsonl(p, DOCS * 3)
    cache = tmp_path / "cache"
    first, _ = load_blocks(p, tok, 8, cache_dir=cache)
    files = _cache_files(cache)
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("tokenizer called although the cache should be used")

    with monkeypatch.context() as m:
        m.setattr(type(tok), "__call__", boom)
        second, _ = load_blocks(p, tok, 8, cache_dir=cache)
    assert torch.equal(first, second)
    assert _cache_files(cache) == files and files[0].stat().st_mtime_ns == stamp
    # default cache location follows $SLIMMOE_CACHE
    load_blocks(p, tok, 8)
    assert len(_cache_files(tmp_path / "slimmoe")) == 1


def test_cache_not_reused_for_other_tokenizer_or_changed_file(tmp_path, tok):
    p = tmp_path / "c.txt"
    text = "".join(DOCS)
    p.write_text(text, encoding="utf-8")
    cache = tmp_path / "cache"
    load_blocks(p, tok, 4, cache_dir=cache)
    other_src = tmp_path / "other.txt"
    other_src.write_text("completely different words for another vocabulary " * 30)
    other = train_bpe_tokenizer(other_src, vocab_size=270)
    b_other, _ = load_blocks(p, other, 4, cache_dir=cache)
    assert torch.equal(b_other, reference(other, [text], 4))
    changed = text.swapcase()  # same size, different bytes
    p.write_text(changed, encoding="utf-8")
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    b_changed, _ = load_blocks(p, tok, 4, cache_dir=cache)
    assert torch.equal(b_changed, reference(tok, [changed], 4))


def test_fingerprint_hashes_bytes_not_size_or_mtime(tmp_path, tok):
    p = tmp_path / "c.txt"
    p.write_text("abcdefgh" * 10, encoding="utf-8")
    fp = data_fingerprint(p, tok, 8)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert data_fingerprint(p, tok, 8) == fp
    assert data_fingerprint(str(p), tok, 8) == fp
    assert data_fingerprint(p, tok, 16) != fp
    assert data_fingerprint(p, tok, 8, eval_fraction=0.1) != fp
    assert data_fingerprint(p, tok, 8, text_field="body") != fp
    other = train_bpe_tokenizer(p, vocab_size=270)
    assert data_fingerprint(p, other, 8) != fp
    st = p.stat()
    p.write_text("abcdefgH" * 10, encoding="utf-8")  # same size
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # and same mtime
    assert p.stat().st_size == st.st_size
    assert data_fingerprint(p, tok, 8) != fp


def test_fingerprint_of_folder_covers_names_and_bytes(tmp_path, tok):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("one two three")
    (d / "b.txt").write_text("four five six")
    fp = data_fingerprint(d, tok, 4)
    assert data_fingerprint(d, tok, 4) == fp
    (d / "b.txt").rename(d / "c.txt")
    renamed = data_fingerprint(d, tok, 4)
    assert renamed != fp
    (d / "c.txt").write_text("four five siX")
    assert data_fingerprint(d, tok, 4) != renamed
    assert data_fingerprint("someorg/some-dataset", tok, 4) != data_fingerprint("someorg/other", tok, 4)


def test_random_blocks_deterministic():
    a = random_blocks(50, 4, 16, seed=3)
    assert a.shape == (4, 16) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < 50
    assert torch.equal(a, random_blocks(50, 4, 16, seed=3))
    assert not torch.equal(a, random_blocks(50, 4, 16, seed=4))
    with pytest.raises(UserError, match="vocab_size"):
        random_blocks(0, 4, 16)


def _make(tmp_path, spec):
    kind, name = spec
    p = tmp_path / name
    if kind == "txt":
        p.write_text("".join(DOCS), encoding="utf-8")
    elif kind == "jsonl":
        write_jsonl(p, DOCS)
    elif kind == "dir":
        p.mkdir()
        (p / "notes.md").write_text("no corpus here")
    elif kind == "bad":
        p.write_text("{not json", encoding="utf-8")
    elif kind == "tiny":
        p.write_text("hi", encoding="utf-8")
    return p


@pytest.mark.parametrize(
    "spec, kwargs, needles",
    [
        (("txt", "c.txt"), {"seq_len": 1}, ["seq_len"]),
        (("txt", "c.txt"), {"eval_fraction": 1.0}, ["eval_fraction"]),
        (("txt", "c.txt"), {"eval_fraction": -0.1}, ["eval_fraction"]),
        (("txt", "c.txt"), {"max_blocks": 0}, ["max_blocks"]),
        (("tiny", "tiny.txt"), {}, ["tiny.txt", "seq_len"]),
        (("jsonl", "d.jsonl"), {"text_field": "body"}, ["d.jsonl", "body"]),
        (("bad", "bad.jsonl"), {}, ["bad.jsonl"]),
        (("dir", "empty_dir"), {}, ["empty_dir"]),
        (("none", "missing.txt"), {}, ["missing.txt", "no such file"]),
        (("none", "someorg/no-such-dataset"), {}, ["no such file", "hub", "someorg/no-such-dataset"]),
        (("txt", "c.txt"), {"eval_path": "held_missing.jsonl"}, ["eval_path", "held_missing.jsonl"]),
    ],
    ids=["seq_len", "eval_fraction_1", "eval_fraction_neg", "max_blocks", "too_small", "missing_field",
         "bad_json", "empty_folder", "missing_file", "hub_offline", "missing_eval_path"],
)
def test_user_errors_name_field_or_file(tmp_path, tok, monkeypatch, spec, kwargs, needles):
    monkeypatch.chdir(tmp_path)  # relative names resolve inside tmp_path
    src = _make(tmp_path, spec) if spec[0] != "none" else spec[1]
    kwargs = {"seq_len": 16, **kwargs}
    with pytest.raises(UserError) as info:
        load_blocks(src, tok, kwargs.pop("seq_len"), **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg


def test_bundled_corpus(tmp_path):
    tok = train_bpe_tokenizer(CORPUS, vocab_size=1024)
    train, ev = load_blocks(CORPUS, tok, 256, eval_fraction=0.05)
    ids = tok(CORPUS.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    n = len(ids) // 256
    k = ev.shape[0]
    assert abs(k - n * 0.05) <= 0.5 and train.shape == (n - k, 256) and ev.shape == (k, 256)
    full = torch.tensor(ids[: n * 256]).view(n, 256)
    assert torch.equal(torch.cat([train, ev]), full)


def test_library_does_not_import_pipeline_engines():
    code = ("import sys, slimmoe.io.data, slimmoe.io.tokenizer; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
