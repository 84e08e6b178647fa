"""A small byte-level BPE tokenizer trained offline (for the demo teacher).

Byte-level means every string round-trips exactly (no unknown characters, no
normalisation), which the perplexity and packing code rely on.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from slimmoe.errors import UserError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]
# 256 byte symbols + the special tokens must fit before any merge is learned.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_bpe_tokenizer(
    text_path: str | Path,
    vocab_size: int = 4096,
    out_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``text_path`` (a UTF-8 text file, or a folder whose
    ``*.txt`` files, in name order, are the texts).

    Special tokens: ``<|endoftext|>`` (eos, bos, unk) and ``<|pad|>`` (pad). The result
    is deterministic for the same text and vocab size. When ``out_dir`` is given the
    tokenizer is saved there with ``save_pretrained`` so ``AutoTokenizer`` loads it
    offline.
    """
    path = Path(text_path)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise UserError(f"{path}: no such text file (or folder of .txt files) to train the tokenizer on")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab_size: must be an integer >= {MIN_VOCAB_SIZE}, got {vocab_size!r}")
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not any(texts):
        raise UserError(f"{path}: file is empty, cannot train a tokenizer on it")

    backend = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    # add_prefix_space=False + no normaliser: decode(encode(s)) == s for every s.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000_000,
    )
    if out_dir is not None:
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{out}: cannot create tokenizer folder ({e.strerror})") from None
        tokenizer.save_pretrained(str(out))
    return tokenizer

