"""Loading checkpoints and their tokenizers, safely, with one-line errors for bad paths.

Safe by default: no ``trust_remote_code`` (a checkpoint's own Python never runs) and
weights from safetensors only (a pickle ``pytorch_model.bin`` can run code when
unpickled). Both are opt-ins of the :class:`LoadPolicy`, set for a block with
:func:`loading_policy`. The policy lives in environment variables so that processes the
library starts (``torchrun`` for multi-process distillation) inherit it.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from slimmoe.errors import UserError

log = logging.getLogger("slimmoe")

ENV_TRUST_REMOTE_CODE = "SLIMMOE_TRUST_REMOTE_CODE"
ENV_ALLOW_PICKLE = "SLIMMOE_ALLOW_PICKLE"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pth", "*.ckpt")
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class LoadPolicy:
    trust_remote_code: bool = False
    allow_pickle: bool = False


def load_policy() -> LoadPolicy:
    """The policy in force (environment variables; both off when unset)."""
    on = lambda var: os.environ.get(var, "").strip().lower() in ("1", "true", "yes")  # noqa: E731
    return LoadPolicy(trust_remote_code=on(ENV_TRUST_REMOTE_CODE), allow_pickle=on(ENV_ALLOW_PICKLE))


@contextmanager
def loading_policy(trust_remote_code: bool = False, allow_pickle: bool = False) -> Iterator[LoadPolicy]:
    """Loads inside the block (and in processes started from it) follow this policy."""
    saved = {v: os.environ.get(v) for v in (ENV_TRUST_REMOTE_CODE, ENV_ALLOW_PICKLE)}
    os.environ[ENV_TRUST_REMOTE_CODE] = "1" if trust_remote_code else "0"
    os.environ[ENV_ALLOW_PICKLE] = "1" if allow_pickle else "0"
    try:
        yield load_policy()
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def load_config(path: str, field: str = "MODEL"):
    """The transformers config of a local folder or hub id; UserError naming ``field`` if absent."""
    from transformers import AutoConfig

    p = Path(path)
    if not p.exists() and (p.is_absolute() or path.startswith(".") or path.count("/") != 1):
        raise UserError(f"{field}: no such checkpoint folder: {path}")
    if p.exists() and not p.is_dir():
        raise UserError(f"{field}: {path} is a file, not a checkpoint folder")
    if p.exists() and not (p / "config.json").is_file():
        raise UserError(f"{field}: {path} has no config.json (not a transformers checkpoint)")
    trust = load_policy().trust_remote_code
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust)
    except Exception as e:  # hub id offline, malformed config, remote code refused
        why = _first_line(e)
        if not trust and ("trust_remote_code" in str(e) or "custom code" in str(e)):
            why = "it needs its own Python code; set trust_remote_code: true only if you trust its source"
        raise UserError(f"{field}: cannot load a config from {path} ({why})") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt")


def check_weights(path: str | Path, field: str = "MODEL") -> None:
    """Refuse a local checkpoint whose weights are missing, truncated, or pickle-only (unless allowed).

    Reads only the safetensors headers, so it costs milliseconds on any checkpoint size.
    """
    p = Path(path)
    if not p.is_dir():
        return  # a hub id: transformers checks what it downloads (use_safetensors=True)
    index = p / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise UserError(f"{field}: {index} is not a valid safetensors index ({_first_line(e)})") from None
    else:
        shards = sorted(f.name for f in p.glob("*.safetensors"))
    if not shards:
        pickles = sorted({f.name for pat in PICKLE_PATTERNS for f in p.glob(pat)})
        if not pickles:
            raise UserError(f"{field}: {path} has no weights (no model.safetensors)")
        if not load_policy().allow_pickle:
            raise UserError(
                f"{field}: {path} holds only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
                "convert them to safetensors, or opt in with --allow-pickle (pipeline config: allow_pickle: true)")
        log.warning("%s: loading pickle weights from %s (allow_pickle is on)", field, path)
        return
    for name in shards:
        _check_safetensors(p / name, field)


def _check_safetensors(f: Path, field: str) -> None:
    """The file exists and its size matches what its header says (catches truncation)."""
    if not f.is_file():
        raise UserError(f"{field}: {f} is missing (listed in {SAFETENSORS_INDEX})")
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise ValueError("no valid header")
            header = json.loads(fh.read(n))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise UserError(f"{field}: {f} is not a safetensors file ({_first_line(e)})") from None
    if size != 8 + n + end:
        raise UserError(f"{field}: {f} is truncated or corrupt ({size} bytes, its header says {8 + n + end})")


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
    check_weights(path, field)
    policy = load_policy()
    kwargs.setdefault("use_safetensors", None if policy.allow_pickle else True)
    kwargs.setdefault("trust_remote_code", policy.trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except Exception as e:
        raise UserError(f"{field}: cannot load the model in {path} ({_first_line(e)})") from None
    if device:
        model.to(device)
    return model.eval()


def has_tokenizer(path) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def read_config_json(model: str | Path, field: str = "MODEL") -> dict:
    """A model folder's config.json as a dict, without transformers (no model code imported);
    a one-line ``UserError`` naming ``field`` and the file when it is missing or not a JSON object."""
    path = Path(model) / "config.json"
    if not Path(model).is_dir():
        raise UserError(f"{field}: {model} is not a folder")
    if not path.is_file():
        raise UserError(f"{field}: {path} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{field}: {path} is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{field}: {path} is not a JSON object")
    return cfg


def save_tokenizer(tokenizer, out: str | Path) -> None:
    """``tokenizer.save_pretrained(out)``, plus the vocabulary files of the folder it was loaded
    from that transformers 5 does not write back. A SentencePiece ``tokenizer.model`` (Phi-3.5-MoE
    and Mixtral ship one) is read into the fast tokenizer on load and never saved again, while
    llama.cpp's converter reads the ``.model`` file (``Phi3MiniModel.set_vocab``)."""
    out = Path(out)
    tokenizer.save_pretrained(str(out))
    src = Path(getattr(tokenizer, "name_or_path", "") or "")
    if src.is_dir() and src.resolve() != out.resolve():
        copy_missing_files(src, out, TOKENIZER_FILES)


def copy_missing_files(src: str | Path, out: str | Path, names) -> None:
    """Each of ``names`` that ``src`` has and ``out`` lacks, copied into ``out`` under a
    temporary name and renamed, so a reader never sees half a file."""
    import shutil

    src, out = Path(src), Path(out)
    for name in names:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / f".{name}.tmp")
            os.replace(out / f".{name}.tmp", out / name)


def load_tokenizer(path: str):
    """The checkpoint's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=load_policy().trust_remote_code)
    except Exception:
        return None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]
