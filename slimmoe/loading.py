"""Loading checkpoints and their tokenizers, with one-line errors for bad paths."""

from __future__ import annotations

import logging
from pathlib import Path

from slimmoe.errors import UserError

log = logging.getLogger("slimmoe")


def load_config(path: str, field: str = "MODEL"):
    """The transformers config of a local folder or hub id; UserError naming ``field`` if absent."""
    from transformers import AutoConfig

    p = Path(path)
    if not p.exists() and (p.is_absolute() or path.startswith(".") or path.count("/") != 1):
        raise UserError(f"{field}: no such checkpoint folder: {path}")
    if p.exists() and not (p / "config.json").is_file():
        raise UserError(f"{field}: {path} has no config.json (not a transformers checkpoint)")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # hub id offline, malformed config
        raise UserError(f"{field}: cannot load a config from {path} ({str(e).splitlines()[0][:200]})") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt")


def load_model(path, field: str = "MODEL", dtype="auto", device: str | None = None, **kwargs):
    """A causal LM from a folder or hub id (a model object passes through), in eval mode.

    ``dtype="auto"`` keeps the stored dtype; ``kwargs`` go to ``from_pretrained``
    (e.g. ``device_map``).
    """
    from transformers import AutoModelForCausalLM, PreTrainedModel

    if isinstance(path, PreTrainedModel):
        return path
    path = str(path)
    load_config(path, field)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except Exception as e:
        raise UserError(f"{field}: cannot load the model in {path} ({str(e).splitlines()[0][:200]})") from None
    if device:
        model.to(device)
    return model.eval()


def has_tokenizer(path) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str):
    """The checkpoint's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:
        return None
