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


def load_model(path: str, field: str = "MODEL", dtype="auto", device: str | None = None):
    from transformers import AutoModelForCausalLM

    load_config(path, field)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:
        raise UserError(f"{field}: cannot load the model in {path} ({str(e).splitlines()[0][:200]})") from None
    if device:
        model.to(device)
    return model.eval()


def load_tokenizer(path: str):
    """The checkpoint's tokenizer, or None (with a warning) when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:
        return None
