"""Step: tokenise and pack the corpus once per content (``blocks-<fingerprint>.pt``)."""

from __future__ import annotations

from pathlib import Path

import torch

from slimmoe.errors import UserError
from slimmoe.io.atomic import atomic_torch_save
from slimmoe.io.data import data_fingerprint, load_blocks
from slimmoe.io.loading import load_tokenizer
from slimmoe.pipeline.steps.refs import TokenBlocks


def prepare_data(source: str, tokenizer_dir: str, out_dir: str | Path, seq_len: int, eval_path: str | None = None,
                 eval_fraction: float = 0.05, text_field: str = "text", max_blocks: int | None = None) -> TokenBlocks:
    """Tokenise and pack the corpus once; ``out_dir/blocks-<fp>.pt`` holds train and eval blocks."""
    tok = load_tokenizer(tokenizer_dir)
    if tok is None:
        raise UserError(f"teacher: {tokenizer_dir} has no tokenizer; the pipeline tokenises data with it")
    fp = data_fingerprint(source, tok, seq_len, eval_fraction=eval_fraction, eval_path=eval_path,
                          max_blocks=max_blocks, text_field=text_field)[:24]
    path = Path(out_dir) / f"blocks-{fp}.pt"
    if not path.exists():
        train, held = load_blocks(source, tok, seq_len, eval_fraction=eval_fraction, eval_path=eval_path,
                                  max_blocks=max_blocks, text_field=text_field)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"train": train, "eval": held}, path)
    blocks = torch.load(path, weights_only=True)
    return TokenBlocks(path=str(path), fingerprint=fp, source=str(source), seq_len=seq_len,
                       train_blocks=int(blocks["train"].shape[0]), eval_blocks=int(blocks["eval"].shape[0]))


def load_prepared(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token blocks of a prepared ``blocks-<fp>.pt``."""
    blocks = torch.load(path, weights_only=True)
    return blocks["train"], blocks["eval"]
