"""A corpus of whole books split into training text and held-out book tails.

The corpus is one UTF-8 text (plain or ``.gz``) whose books are laid end to end, joined by a
separator (a blank line), with a catalogue listing every book in order: ``name<TAB>chars``
per line (``gutenberg-books.tsv`` beside ``gutenberg-en.txt.gz``). The separator cannot mark
the books by itself (paragraphs inside a book are separated the same way), so the catalogue's
lengths cut the text; a catalogue that does not add up to the corpus is an error.

Every book keeps its first ``1 - held_out`` for training and gives its last ``held_out`` to
the held-out set, the cut moved forward to the next paragraph break so neither side starts
mid-sentence. The output folder holds one file per book and side,

    OUT/train/NNN-<name>.txt      the head of book NNN
    OUT/eval/NNN-<name>.txt       its tail
    OUT/split.json                what was split, and how (written last)

so ``--data``, a config's ``data.train`` / ``data.eval`` and the teacher's ``corpus`` /
``eval_corpus`` take ``OUT/train`` and ``OUT/eval``, one document per book (EOS between
books). The folder is written atomically: it is either absent, an older split, or complete.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

from pydantic import Field

from slimmoe.config import StrictModel
from slimmoe.errors import UserError
from slimmoe.io.atomic import is_complete, replace_folder

SPLIT_FILE = "split.json"
_FORMAT = 1


class BookSplitConfig(StrictModel):
    """Which corpus to split and how much of every book to hold out."""

    source: Path = Field(..., description="the books laid end to end: UTF-8 text, plain or .gz")
    books: Path = Field(..., description="catalogue: one 'name<TAB>chars' line per book, in corpus order")
    held_out: float = Field(0.03, gt=0, lt=0.5, description="share of every book (its tail) held out")
    separator: str = Field("\n\n", description="what joins two books in source")
    output_dir: Path = Field(..., description="where train/ and eval/ are written")


def read_books(source: Path, books: Path, separator: str = "\n\n") -> list[tuple[str, str]]:
    """(name, text) of every book of ``source``, cut by the catalogue's lengths."""
    text = _read_text(source, "source")
    catalogue = _read_catalogue(books)
    out, pos = [], 0
    for i, (name, n) in enumerate(catalogue):
        if pos + n > len(text):
            raise UserError(f"books: {books}: book {i + 1} ({name}) ends at character {pos + n:,}, "
                            f"past the end of {source} ({len(text):,} characters)")
        out.append((name, text[pos:pos + n]))
        pos += n
        if i < len(catalogue) - 1:
            if text[pos:pos + len(separator)] != separator:
                raise UserError(f"books: {books}: book {i + 1} ({name}) is not followed by the separator "
                                f"{separator!r} in {source}; the catalogue's lengths do not match the text")
            pos += len(separator)
    if pos != len(text):
        raise UserError(f"books: {books}: the catalogue covers {pos:,} of the {len(text):,} characters of {source}")
    return out


def tail_cut(text: str, held_out: float) -> int:
    """Where the held-out tail of ``text`` starts: at ``(1 - held_out)`` of it, moved to just
    after the next paragraph break (or kept where it is when there is none)."""
    cut = int(len(text) * (1 - held_out))
    brk = text.find("\n\n", cut)
    if brk == -1 or brk + 2 >= len(text):
        return cut
    return brk + 2


def split_fingerprint(cfg: BookSplitConfig) -> str:
    """sha256 of the split's inputs: source and catalogue by content, the held-out share, the separator."""
    h = hashlib.sha256(json.dumps({"format": _FORMAT, "held_out": cfg.held_out, "separator": cfg.separator}).encode())
    for path, field in ((cfg.source, "source"), (cfg.books, "books")):
        if not Path(path).is_file():
            raise UserError(f"{field}: no such file: {path}")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def split_books(cfg: BookSplitConfig) -> dict:
    """Write ``cfg.output_dir/{train,eval}/`` (see the module docstring); a complete split of
    the same inputs is returned as it is. Returns the paths, the fingerprint and the counts."""
    out = Path(cfg.output_dir)
    fp = split_fingerprint(cfg)
    done = _finished(out, fp)
    if done is not None:
        return done
    if out.exists() and not (out / SPLIT_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output_dir: {out} exists and is not a book split; refusing to overwrite it")
    books = read_books(cfg.source, cfg.books, cfg.separator)
    rows = []
    with replace_folder(out) as tmp:
        for sub in ("train", "eval"):
            (tmp / sub).mkdir()
        for i, (name, text) in enumerate(books):
            cut = tail_cut(text, cfg.held_out)
            fname = f"{i:03d}-{_slug(name)}.txt"
            (tmp / "train" / fname).write_text(text[:cut], encoding="utf-8")
            (tmp / "eval" / fname).write_text(text[cut:], encoding="utf-8")
            rows.append({"book": name, "file": fname, "chars": len(text), "train_chars": cut,
                         "eval_chars": len(text) - cut})
        doc = {"format": _FORMAT, "fingerprint": fp, "config": cfg.model_dump(mode="json"), "books": rows,
               "train_chars": sum(r["train_chars"] for r in rows), "eval_chars": sum(r["eval_chars"] for r in rows)}
        (tmp / SPLIT_FILE).write_text(json.dumps(doc, indent=1))
    return _result(out, doc)


def _finished(out: Path, fp: str) -> dict | None:
    try:
        doc = json.loads((out / SPLIT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if doc.get("fingerprint") != fp or not is_complete(out):
        return None
    return _result(out, doc)


def _result(out: Path, doc: dict) -> dict:
    return {"train": str(out / "train"), "eval": str(out / "eval"), "fingerprint": doc["fingerprint"],
            "books": len(doc["books"]), "train_chars": doc["train_chars"], "eval_chars": doc["eval_chars"]}


def _read_text(path: Path, field: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{field}: no such file: {path}")
    try:
        if p.suffix == ".gz":
            with gzip.open(p, "rt", encoding="utf-8", newline="") as f:
                return f.read()
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"{field}: {path}: cannot be read as UTF-8 text ({e})") from None


def _read_catalogue(books: Path) -> list[tuple[str, int]]:
    rows = []
    for n, line in enumerate(_read_text(books, "books").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip().isdigit():
            raise UserError(f"books: {books}: line {n} is not 'name<TAB>chars': {line[:80]!r}")
        rows.append((parts[0].strip(), int(parts[1])))
    if not rows:
        raise UserError(f"books: {books}: lists no book")
    return rows


def _slug(name: str) -> str:
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem)[:60] or "book"
