"""What ``slimmoe quantize`` (and, later, a stage's ``quantize:``) asks llm-compressor for.

Only data-free schemes: every one of them needs the weights alone, no calibration text.

- ``FP8_DYNAMIC``: FP8 (e4m3) weights with one scale per output channel; activations are
  quantized per token at run time (``dynamic``), so nothing is observed beforehand.
- ``W4A16``: 4-bit integer weights, symmetric, one scale per ``group_size`` input columns,
  round-to-nearest (the min/max of each group); activations stay 16-bit.
- ``W8A8``: 8-bit integer weights per output channel, activations per token at run time.
"""

from __future__ import annotations

import os
import re
import sys
import typing
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from slimmoe.config import StrictModel

Scheme = Literal["FP8_DYNAMIC", "W4A16", "W8A8"]
SCHEMES: tuple[str, ...] = typing.get_args(Scheme)

PYTHON_ENV = "SLIMMOE_LLMCOMPRESSOR_PYTHON"  # the interpreter of llm-compressor's environment
VENV_NAME = ".venv-llmcompressor"
INSTALL_SCRIPT = "scripts/install-llmcompressor"

# Never quantized: the output head, and every MoE router. A router is tiny, its few logits
# pick the experts, and vLLM builds it unquantized. Names as transformers 5 holds them in
# memory (phimoe ``mlp.router``, mixtral / qwen2_moe / qwen3_moe / olmoe ``mlp.gate``, qwen2_moe
# ``mlp.shared_expert_gate``) and as the released checkpoints (and vLLM) name them
# (``block_sparse_moe.gate``), so a quantized config's ignore list matches in both.
DEFAULT_IGNORE = [
    "lm_head",
    r"re:.*mlp\.router$",
    r"re:.*mlp\.gate$",
    r"re:.*block_sparse_moe\.gate$",
    r"re:.*shared_expert_gate$",
]


class QuantizeConfig(StrictModel):
    """One quantization: the scheme, what stays unquantized, where llm-compressor lives."""

    scheme: Scheme = Field(description="FP8_DYNAMIC | W4A16 | W8A8 (all data-free)")
    group_size: Literal[32, 64, 128] = Field(
        128, description="W4A16 only: input columns that share one scale; every quantized "
                         "layer's input width must be a multiple of it")
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE),
                              description="module names, or 're:' regular expressions, left unquantized")
    python: Path | None = Field(
        None, description=f"the Python of llm-compressor's environment (default: ${PYTHON_ENV}, "
                          f"else {VENV_NAME}/bin/python next to the repository's .venv)")

    @field_validator("ignore")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        for i, name in enumerate(v):
            if not name.strip():
                raise ValueError(f"entry {i} is empty")
            if name.startswith("re:"):
                try:
                    re.compile(name[3:])
                except re.error as e:
                    raise ValueError(f"entry {i} ({name!r}) is not a regular expression: {e}") from None
        return v

    @field_validator("group_size")
    @classmethod
    def _group_size_is_w4a16s(cls, v: int, info) -> int:
        """Runs only when group_size is given (defaults are not validated), so the error names the field
        wherever the config sits (``stages.N.quantize.group_size`` in a pipeline)."""
        scheme = info.data.get("scheme")
        if scheme is not None and scheme != "W4A16":
            raise ValueError(f"applies to W4A16 only, not {scheme}")
        return v

    def cache_identity(self) -> dict:
        """What a cache or run key may hash: every field but ``python``, which names where
        llm-compressor lives on this machine, not what it computes (the engine's versions do:
        :func:`slimmoe.quantize.runner.engine_identity`)."""
        return self.model_dump(mode="json", exclude={"python"})


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def python_candidates() -> list[Path]:
    """Where llm-compressor's interpreter is looked for, in order (the env variable wins)."""
    found = [repo_root() / VENV_NAME / "bin" / "python",
             Path(sys.prefix).parent / VENV_NAME / "bin" / "python"]  # beside the running venv
    return list(dict.fromkeys(found))


def resolve_python(explicit: Path | str | None = None) -> Path | None:
    """The interpreter to run the worker with: ``explicit``, else ``$SLIMMOE_LLMCOMPRESSOR_PYTHON``,
    else the first candidate that exists; None when there is none."""
    chosen = explicit or os.environ.get(PYTHON_ENV)
    if chosen:
        return Path(chosen)
    return next((p for p in python_candidates() if p.is_file()), None)
