"""Step: tokenise the corpus once per content into token shards (``tokens-<fingerprint>/``).

The folder is ``slimmoe tokenize``'s output (:mod:`slimmoe.io.token_writer`): flat token-id
shards plus ``index.json``; later steps read it lazily (:func:`load_prepared`), so memory
does not grow with the corpus. A ``data.train`` that is already a tokenised folder is
taken as it is (its shards hard-linked into the step's folder, train capped at max_blocks).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from slimmoe.errors import UserError
from slimmoe.io.data import data_fingerprint, load_blocks
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
    hub = dict(name=name, split=split, streaming=streaming, data_files=tuple(data_files) if data_files else None)
    fp = data_fingerprint(source, tok, seq_len, eval_fraction=eval_fraction, eval_path=eval_path,
                          max_blocks=max_blocks, text_field=text_field)
    extra = json.dumps({**hub, "data_files": data_files, "max_tokens": max_tokens}, sort_keys=True)
    fp = hashlib.sha256(f"{fp}|{extra}".encode()).hexdigest()[:24]
    folder = Path(out_dir) / f"tokens-{fp}"
    if not (folder / INDEX_FILE).is_file():
        if is_token_folder(source):
            load_blocks(source, tok, seq_len, eval_fraction=eval_fraction, eval_path=eval_path,
                        fields=("data.train", "data.eval"))  # checks seq_len, tokenizer and the held-out split
            write_view(source, folder, max_blocks)
        else:
            job = TokenizeJob(train=SourceSpec(str(source), text_field, **hub), tokenizer_dir=str(tokenizer_dir),
                              seq_len=seq_len, eval=SourceSpec(str(eval_path), text_field) if eval_path else None,
                              eval_fraction=eval_fraction, max_tokens=max_tokens, max_train_blocks=max_blocks,
                              num_proc=num_proc, fields=("data.train", "data.eval"))
            tokenize_corpus(job, folder, tok)
    index = read_index(folder)
    return TokenBlocks(path=str(folder), fingerprint=fp, source=str(source), seq_len=seq_len,
                       train_blocks=int(index["train_blocks"]), eval_blocks=int(index["eval_blocks"]))


def load_prepared(path: str | Path):
    """(train, held-out) token blocks of a prepared ``tokens-<fp>/`` folder, read lazily
    (:class:`~slimmoe.io.token_shards.ShardBlocks`); a ``blocks-<fp>.pt`` of earlier versions
    is loaded whole."""
    if is_token_folder(path):
        return open_splits(path)
    blocks = torch.load(path, weights_only=True)
    return blocks["train"], blocks["eval"]
