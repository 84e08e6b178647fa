"""Byte-level BPE tokenizer: exact round trip, special tokens, determinism, offline save/load."""

from pathlib import Path

import pytest

from slimmoe.errors import UserError
from slimmoe.io.tokenizer import train_bpe_tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
) * 40


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_round_trip_exact_including_unseen_characters(text_file):
    tok = train_bpe_tokenizer(text_file, vocab_size=300)
    samples = [
        "Before we proceed any further, hear me speak.",
        "  leading and trailing spaces  ",
        "tabs\tand\r\nwindows newlines\n\n\n",
        "unseen: héllo ünïcode ßtraße 日本語 😀",
        "",
    ]
    for s in samples:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s
        assert tok.unk_token_id not in ids  # byte-level: nothing is unknown


def test_special_tokens(text_file):
    tok = train_bpe_tokenizer(text_file, vocab_size=300)
    assert tok.eos_token == tok.bos_token == tok.unk_token == "<|endoftext|>"
    assert tok.pad_token == "<|pad|>"
    assert tok.eos_token_id != tok.pad_token_id
    # each special token is one id, also when it appears inside text
    ids = tok("a<|endoftext|>b<|pad|>", add_special_tokens=False)["input_ids"]
    assert ids.count(tok.eos_token_id) == 1 and ids.count(tok.pad_token_id) == 1
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|endoftext|>"


def test_learns_merges_within_vocab_size(text_file):
    tok = train_bpe_tokenizer(text_file, vocab_size=320)
    assert len(tok) <= 320
    assert len(tok) > 258  # at least some merges beyond the 256 bytes + 2 specials
    line = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert len(tok(line, add_special_tokens=False)["input_ids"]) < len(line.encode()) / 2


def test_deterministic(tmp_path, text_file):
    a = train_bpe_tokenizer(text_file, vocab_size=300, out_dir=tmp_path / "a")
    b = train_bpe_tokenizer(text_file, vocab_size=300, out_dir=tmp_path / "b")
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    c = train_bpe_tokenizer(text_file, vocab_size=280)
    assert c.backend_tokenizer.to_str() != a.backend_tokenizer.to_str()


def test_save_and_load_with_auto_tokenizer(tmp_path, text_file):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    tok = train_bpe_tokenizer(text_file, vocab_size=300, out_dir=out)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    loaded = AutoTokenizer.from_pretrained(str(out))
    s = "You are all resolved rather to die than to famish? ünïcode\n"
    assert loaded(s, add_special_tokens=False)["input_ids"] == tok(s, add_special_tokens=False)["input_ids"]
    assert loaded.decode(loaded(s, add_special_tokens=False)["input_ids"]) == s
    assert (loaded.eos_token, loaded.bos_token, loaded.unk_token, loaded.pad_token) == (
        tok.eos_token, tok.bos_token, tok.unk_token, tok.pad_token)
    assert loaded.get_vocab() == tok.get_vocab()
    # save_pretrained of the loaded copy round-trips too
    loaded.save_pretrained(str(tmp_path / "again"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "again"))
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_bundled_corpus_full_vocab():
    tok = train_bpe_tokenizer(CORPUS, vocab_size=4096)
    assert len(tok) == 4096
    text = CORPUS.read_text(encoding="utf-8")[:20000]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 3  # a 4k BPE compresses English > 3 bytes/token


def _write(path, data):
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name, content, kwargs, needle",
    [
        ("missing.txt", None, {}, "missing.txt"),
        ("a_folder", "folder", {}, "a_folder"),
        ("empty.txt", "", {}, "empty.txt"),
        ("bin.txt", b"\xff\xfe\x00abc", {}, "bin.txt"),
        ("ok.txt", "abc", {"vocab_size": 100}, "vocab_size"),
    ],
    ids=["missing", "folder", "empty", "not-utf8", "vocab-too-small"],
)
def test_user_errors_name_the_file_or_field(tmp_path, name, content, kwargs, needle):
    path = tmp_path / name
    if content == "folder":
        path.mkdir()
    elif content is not None:
        _write(path, content)
    with pytest.raises(UserError) as info:
        train_bpe_tokenizer(path, **kwargs)
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg
