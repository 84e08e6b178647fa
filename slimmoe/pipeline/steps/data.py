"""Step: tokenise the corpus once per content into token shards (``tokens-<fingerprint>/``).

The folder is ``slimmoe tokenize``'s output (:mod:`slimmoe.io.token_writer`): flat token-id
shards plus ``index.json``; later steps read it lazily (:func:`load_prepared`), so memory
does not grow with the corpus. A ``data.train`` that is already a tokenised folder is
taken as it is (its shards hard-linked into the step's folder, train capped at max_blocks).
Text is tokenised once into ``$SLIMMOE_CACHE/tokens/`` (the pre-flight check's tokenisation
is the flow's) and hard-linked (copied across file systems) into the step's folder.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path

import torch

from slimmoe.errors import UserError
from slimmoe.io.data import data_fingerprint, default_cache_dir, is_glob, load_blocks
from slimmoe.io.loading import load_tokenizer
from slimmoe.io.token_shards import INDEX_FILE, is_token_folder, open_splits, read_index
from slimmoe.io.token_sources import SourceSpec
from slimmoe.io.token_writer import TokenizeJob, tokenize_corpus, write_view
from slimmoe.pipeline.steps.refs import TokenBlocks


def prepare_data(source: str, tokenizer_dir: str, out_dir: str | Path, seq_len: int, eval_path: str | None = None,
                 eval_fraction: float = 0.05, text_field: str = "text", max_blocks: int | None = None,
                 name: str | None = None, split: str = "train", data_files: list[str] | None = None,
                 streaming: bool = False, max_tokens: int | None = None, num_proc: int = 1) -> TokenBlocks:
    """Tokenise the corpus once; ``out_dir/tokens-<fp>/`` holds the shards and index.json."""
    tok = load_tokenizer(tokenizer_dir)
    if tok is None:
        raise UserError(f"teacher: {tokenizer_dir} has no tokenizer; the pipeline tokenises data with it")
    settings = dict(eval_path=eval_path, eval_fraction=eval_fraction, text_field=text_field, max_blocks=max_blocks,
                    name=name, split=split, data_files=data_files, streaming=streaming, max_tokens=max_tokens,
                    num_proc=num_proc)
    fp = prepared_fingerprint(source, tok, seq_len, **settings)
    folder = Path(out_dir) / f"tokens-{fp}"
    if not (folder / INDEX_FILE).is_file():
        if is_token_folder(source):
            load_blocks(source, tok, seq_len, eval_fraction=eval_fraction, eval_path=eval_path,
                        fields=("data.train", "data.eval"))  # checks seq_len, tokenizer and the held-out split
            write_view(source, folder, max_blocks)
        else:  # tokenised once into the cache (the pre-flight check fills it), linked here
            cached = tokenize_cached(source, tok, tokenizer_dir, seq_len, **settings)
            write_view(cached, folder, None, copy_across_devices=True)
    index = read_index(folder)
    return TokenBlocks(path=str(folder), fingerprint=fp, source=str(source), seq_len=seq_len,
                       train_blocks=int(index["train_blocks"]), eval_blocks=int(index["eval_blocks"]))


def prepared_fingerprint(source: str, tok, seq_len: int, eval_path=None, eval_fraction=0.05, text_field="text",
                         max_blocks=None, name=None, split="train", data_files=None, streaming=False,
                         max_tokens=None, num_proc: int = 1) -> str:
    """24 hex digits of everything that determines the prepared blocks (not ``num_proc``)."""
    fp = data_fingerprint(source, tok, seq_len, eval_fraction=eval_fraction, eval_path=eval_path,
                          max_blocks=max_blocks, text_field=text_field)
    local = [data_fingerprint(p, tok, seq_len) for p in data_files or () if _is_local(p)]  # their bytes
    extra = json.dumps({"name": name, "split": split, "data_files": data_files, "streaming": streaming,
                        "max_tokens": max_tokens, "local_data_files": local}, sort_keys=True)
    return hashlib.sha256(f"{fp}|{extra}".encode()).hexdigest()[:24]


def _is_local(pattern: str) -> bool:
    """A data_files entry naming local files (a path, or a glob that matches some)."""
    return Path(pattern).expanduser().exists() or (is_glob(pattern) and bool(glob.glob(os.path.expanduser(pattern))))


def tokenize_cached(source: str, tok, tokenizer_dir: str, seq_len: int, eval_path=None, eval_fraction=0.05,
                    text_field="text", max_blocks=None, name=None, split="train", data_files=None, streaming=False,
                    max_tokens=None, num_proc: int = 1) -> Path:
    """``$SLIMMOE_CACHE/tokens/tokens-<fp>/``, tokenised (or finished) with slimmoe tokenize's writer."""
    fp = prepared_fingerprint(source, tok, seq_len, eval_path, eval_fraction, text_field, max_blocks, name, split,
                              data_files, streaming, max_tokens)
    folder = default_cache_dir().parent / "tokens" / f"tokens-{fp}"
    if not (folder / INDEX_FILE).is_file():
        hub = dict(name=name, split=split, streaming=streaming, data_files=tuple(data_files) if data_files else None)
        job = TokenizeJob(train=SourceSpec(str(source), text_field, **hub), tokenizer_dir=str(tokenizer_dir),
                          seq_len=seq_len, eval=SourceSpec(str(eval_path), text_field) if eval_path else None,
                          eval_fraction=eval_fraction, max_tokens=max_tokens, max_train_blocks=max_blocks,
                          num_proc=num_proc, fields=("data.train", "data.eval"))
        tokenize_corpus(job, folder, tok)
    return folder


def load_prepared(path: str | Path):
    """(train, held-out) token blocks of a prepared ``tokens-<fp>/`` folder, read lazily
    (:class:`~slimmoe.io.token_shards.ShardBlocks`); a ``blocks-<fp>.pt`` of earlier versions
    is loaded whole."""
    if is_token_folder(path):
        return open_splits(path)
    blocks = torch.load(path, weights_only=True)
    return blocks["train"], blocks["eval"]
