"""Text corpora -> fixed-length token blocks, cached by Hugging Face ``datasets``.

Sources: a .txt / .jsonl / .json / .parquet file, a folder of such files (recursively,
sorted by relative path), or a hub dataset id. Each file is loaded with the matching
``datasets`` builder (arrow files in ``cache_dir``) and tokenised with a batched
``Dataset.map`` whose result is written next to it as ``cache-<fingerprint>.arrow``.
The map fingerprint is derived from the loaded dataset's own fingerprint plus the
tokenizer's identity, so a re-run with the same file and tokenizer loads the cached
token ids instead of calling the tokenizer again.

Documents are joined with the tokenizer's EOS token (when it has one), concatenated in
file order and cut into non-overlapping blocks of ``seq_len``; the tail that does not
fill a block is dropped.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from slimmoe.errors import UserError

# file suffix -> datasets packaged builder
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# bump when the tokenised layout changes, so old cache files are not reused
_FORMAT_VERSION = "slimmoe-data-v1"
_HASH_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$SLIMMOE_CACHE/datasets`` or ``~/.cache/slimmoe/datasets``."""
    root = os.environ.get("SLIMMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "slimmoe")
    return Path(root) / "datasets"


def load_blocks(
    source: str | os.PathLike,
    tokenizer: Any,
    seq_len: int,
    eval_fraction: float = 0.0,
    eval_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_blocks: int | None = None,
    text_field: str = "text",
    fields: tuple[str, str] = ("source", "eval_path"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise ``source`` and pack it into (train [N, seq_len], eval [M, seq_len]) blocks.

    ``fields`` are the names errors give ``source`` and ``eval_path`` (the caller's option
    names, e.g. ``("data.train", "data.eval")`` or ``("--data", "--eval-data")``).

    Eval blocks come from ``eval_path`` when given; otherwise they are the last
    ``eval_fraction`` of the corpus's blocks (contiguous at the end, so no train text
    is also eval text; at least one block when eval_fraction > 0 and there are >= 2).
    ``max_blocks`` caps the number of train blocks (the first ones); eval is not capped.

    A tokenised folder (``slimmoe tokenize``'s output, with ``index.json``) gives lazy
    :class:`~slimmoe.io.token_shards.ShardBlocks` instead of tensors: its ``seq_len`` and
    tokenizer (when ``tokenizer`` is given) must match the index, and its held-out blocks are
    the folder's own: ``eval_path`` is refused, and an ``eval_fraction`` other than 0 must
    match the folder's split (``train_blocks`` / ``eval_blocks`` in index.json).
    """
    _check_seq_len(seq_len)
    _check_eval_fraction(eval_fraction)
    if max_blocks is not None and (isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1):
        raise UserError(f"max_blocks: must be a positive integer or None, got {max_blocks!r}")
    if _is_token_folder(source):
        return _token_folder_blocks(source, tokenizer, seq_len, eval_fraction, eval_path, max_blocks, fields)
    if (Path(source).expanduser() / "tokenize.json").is_file():
        raise UserError(f"{fields[0]}: {source} is an unfinished slimmoe tokenize folder (no index.json); "
                        "run the same slimmoe tokenize command again to finish it")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    blocks = _blocks_from(source, fields[0], tokenizer, seq_len, cache, text_field)
    if eval_path is not None:
        eval_blocks = _blocks_from(eval_path, fields[1], tokenizer, seq_len, cache, text_field)
        train_blocks = blocks
    else:
        n = blocks.shape[0]
        n_eval = 0
        if eval_fraction > 0 and n >= 2:
            n_eval = min(n - 1, max(1, int(math.floor(n * eval_fraction + 0.5))))
        train_blocks, eval_blocks = blocks[: n - n_eval], blocks[n - n_eval :]
    if max_blocks is not None:
        train_blocks = train_blocks[:max_blocks]
    return train_blocks.contiguous(), eval_blocks.contiguous()


def _is_token_folder(source) -> bool:
    from slimmoe.io.token_shards import is_token_folder

    return isinstance(source, (str, os.PathLike)) and is_token_folder(source)


def _token_folder_blocks(source, tokenizer, seq_len, eval_fraction, eval_path, max_blocks, fields):
    """(train, eval) ShardBlocks of a tokenised folder; see ``load_blocks``."""
    from slimmoe.io.token_shards import open_splits

    if eval_path is not None:
        raise UserError(f"{fields[1]}: {source} is a tokenised folder with its own held-out blocks "
                        f"(tokenise with --eval {eval_path} instead)")
    tok_fp = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
    train, held = open_splits(source, seq_len, tok_fp, fields[0])
    n = len(train) + (len(held) if held.stream == "train" else 0)
    if eval_fraction and held.stream == "train":
        expected = min(n - 1, max(1, int(math.floor(n * eval_fraction + 0.5)))) if n >= 2 else 0
        if expected != len(held):
            raise UserError(f"eval_fraction: {eval_fraction} asks for {expected} held-out blocks; the tokenised folder "
                            f"{source} holds {len(held)} (index.json eval_blocks); tokenise with --eval-fraction "
                            f"{eval_fraction} or leave eval_fraction at 0")
    if max_blocks is not None:
        train = train.head(max_blocks)
    return train, held


def random_blocks(vocab_size: int, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Uniform random token ids [n, seq_len], the same for the same seed (no-data fallback)."""
    for name, value, low in (("vocab_size", vocab_size, 1), ("n", n, 0), ("seq_len", seq_len, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{name}: must be an integer >= {low}, got {value!r}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randint(0, vocab_size, (n, seq_len), generator=gen, dtype=torch.long)


def data_fingerprint(
    source: str | os.PathLike,
    tokenizer: Any,
    seq_len: int,
    eval_fraction: float = 0.0,
    eval_path: str | os.PathLike | None = None,
    max_blocks: int | None = None,
    text_field: str = "text",
) -> str:
    """Stable sha256 hex of everything that determines ``load_blocks``' output.

    Local files are hashed by their bytes (folders: every file's relative name and
    bytes), not by size or mtime. A hub id is hashed by its name only, since its
    contents cannot be read offline.
    """
    h = hashlib.sha256()
    _update(h, _FORMAT_VERSION)
    _hash_source(h, source, "source")
    _update(h, f"eval_path={'-' if eval_path is None else ''}")
    if eval_path is not None:
        _hash_source(h, eval_path, "eval_path")
    _update(h, tokenizer_fingerprint(tokenizer))
    _update(h, json.dumps({"seq_len": seq_len, "eval_fraction": float(eval_fraction),
                           "max_blocks": max_blocks, "text_field": text_field}, sort_keys=True))
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 hex of a tokenizer's identity: its backend serialisation (or vocab) and EOS."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        _update(h, backend.to_str())
    else:
        _update(h, json.dumps(sorted(tokenizer.get_vocab().items())))
    _update(h, f"{type(tokenizer).__name__}|eos={getattr(tokenizer, 'eos_token_id', None)}")
    return h.hexdigest()


# ---------------------------------------------------------------------------- internals


def _check_seq_len(seq_len: Any) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise UserError(f"seq_len: must be an integer >= 2, got {seq_len!r}")


def _check_eval_fraction(eval_fraction: Any) -> None:
    ok = isinstance(eval_fraction, (int, float)) and not isinstance(eval_fraction, bool)
    if not ok or not (0.0 <= float(eval_fraction) < 1.0):
        raise UserError(f"eval_fraction: must be a number in [0, 1), got {eval_fraction!r}")


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _looks_like_path(source: str) -> bool:
    """True for strings that cannot be a hub id, so no network lookup is tried."""
    return (
        source.startswith((".", "/", "~", "\\"))
        or os.path.splitext(source)[1].lower() in _BUILDERS
        or source.count("/") > 1
    )


def _list_files(path: Path, field: str) -> list[Path]:
    """The supported files of a file or folder source, in a stable order."""
    if path.is_file():
        if path.suffix.lower() not in _BUILDERS:
            raise UserError(f"{field}: {path}: unsupported file type (use {', '.join(sorted(_BUILDERS))})")
        return [path]
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS
         and not any(part.startswith(".") for part in p.relative_to(path).parts)),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise UserError(f"{field}: {path}: folder has no {', '.join(sorted(_BUILDERS))} files")
    return files


def is_glob(source: str) -> bool:
    return any(c in source for c in "*?[")


def glob_files(pattern: str, field: str) -> list[Path]:
    """The supported files a glob matches, sorted; an error when it matches none."""
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if Path(p).is_file() and Path(p).suffix.lower() in _BUILDERS)
    if not files:
        raise UserError(f"{field}: {pattern}: the glob matches no {', '.join(sorted(_BUILDERS))} file")
    return files


def _hash_source(h: "hashlib._Hash", source: str | os.PathLike, field: str) -> None:
    path = Path(source).expanduser()
    if _is_token_folder(path):  # its index.json fingerprint covers every shard's sha256
        from slimmoe.io.token_shards import read_index

        _update(h, f"tokens:{read_index(path)['fingerprint']}")
        return
    if not path.exists() and is_glob(str(source)):  # a glob (slimmoe tokenize)
        for f in glob_files(str(source), field):
            _update(h, f"file:{f.as_posix()}:{f.stat().st_size}")
            with open(f, "rb") as fh:
                while chunk := fh.read(_HASH_CHUNK):
                    h.update(chunk)
        return
    if not path.exists():
        if _looks_like_path(str(source)):
            raise UserError(f"{field}: no such file or folder: {source}")
        _update(h, f"hub:{source}")
        return
    root = path if path.is_dir() else path.parent
    for f in _list_files(path, field):
        _update(h, f"file:{f.relative_to(root).as_posix()}:{f.stat().st_size}")
        with open(f, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                h.update(chunk)


def _update(h: "hashlib._Hash", text: str) -> None:
    data = text.encode("utf-8")
    h.update(len(data).to_bytes(8, "little"))  # length prefix: no ambiguity between fields
    h.update(data)


def _blocks_from(source, field, tokenizer, seq_len, cache: Path, text_field: str) -> torch.Tensor:
    tokens = _corpus_tokens(source, field, tokenizer, cache, text_field)
    n = tokens.shape[0] // seq_len
    if n == 0:
        raise UserError(
            f"{field}: {source}: corpus has {tokens.shape[0]} tokens, fewer than seq_len={seq_len} needed for one block"
        )
    return torch.from_numpy(tokens[: n * seq_len].astype(np.int64)).view(n, seq_len)


def _corpus_tokens(source, field, tokenizer, cache: Path, text_field: str) -> np.ndarray:
    """All token ids of a source, documents separated by EOS, as one int array."""
    eos = getattr(tokenizer, "eos_token_id", None)
    path = Path(source).expanduser()
    if path.exists():
        datasets_ = [(_load_file(f, field, cache, text_field), str(f)) for f in _list_files(path, field)]
    else:
        if _looks_like_path(str(source)):
            raise UserError(f"{field}: no such file or folder: {source}")
        datasets_ = [(_load_hub(str(source), field, cache, text_field), str(source))]
    tok_id = tokenizer_fingerprint(tokenizer)
    parts = [_tokenize(ds, name, field, tokenizer, tok_id, eos, text_field) for ds, name in datasets_]
    parts = [p for p in parts if p.size]
    if not parts:
        return np.zeros(0, dtype=np.int32)
    tokens = np.concatenate(parts)
    if eos is not None:
        tokens = tokens[:-1]  # EOS goes *between* documents, not after the last one
    return tokens


def _load_file(path: Path, field: str, cache: Path, text_field: str):
    import datasets

    builder = _BUILDERS[path.suffix.lower()]
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache), **kwargs)
    except Exception as e:  # datasets raises many types for unreadable files
        raise UserError(f"{field}: {path}: cannot be read as {builder} ({_one_line(e)})") from None
    return _select_text(ds, f"{field}: {path}", "text" if builder == "text" else text_field)


def _load_hub(source: str, field: str, cache: Path, text_field: str):
    import datasets

    try:
        ds = datasets.load_dataset(source, split="train", cache_dir=str(cache))
    except Exception as e:
        raise UserError(
            f"{field}: no such file or folder: {source}; as a hub dataset id it could not be loaded "
            f"(hub unreachable or no such dataset: {_one_line(e)})"
        ) from None
    return _select_text(ds, f"{field}: {source}", text_field)


def _select_text(ds, where: str, text_field: str):
    """Check the text column exists and holds strings (map reads only that column)."""
    if text_field not in ds.column_names:
        raise UserError(f"{where}: has no field {text_field!r} (text_field); columns: {', '.join(ds.column_names)}")
    dtype = getattr(ds.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise UserError(f"{where}: field {text_field!r} (text_field) is not text (type {ds.features[text_field]})")
    return ds


def _tokenize(ds, name: str, field: str, tokenizer, tok_id: str, eos, text_field: str) -> np.ndarray:
    import datasets

    fp = hashlib.sha256(
        f"{_FORMAT_VERSION}|{ds._fingerprint}|{tok_id}|{eos}|{text_field}".encode()
    ).hexdigest()[:32]
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    try:
        tokenized = ds.map(
            _encode_batch,
            batched=True,
            batch_size=1000,
            input_columns=[text_field],
            remove_columns=ds.column_names,
            fn_kwargs={"tokenizer": tokenizer, "eos": eos},
            features=features,
            new_fingerprint=fp,
            load_from_cache_file=True,
            desc=f"Tokenising {Path(name).name}",
        )
    except OSError as e:
        raise UserError(f"{field}: cannot write the token cache for {name} ({_one_line(e)})") from None
    # a freshly mapped dataset has no indices mapping, so its table is the data in order
    return pc.list_flatten(tokenized.data.column("input_ids")).to_numpy()


def _encode_batch(texts: list, tokenizer, eos) -> dict:
    texts = [t if t is not None else "" for t in texts]
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if eos is not None:
        ids = [x + [eos] if x else x for x in ids]  # empty docs add nothing
    return {"input_ids": ids}
