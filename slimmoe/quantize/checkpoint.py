"""What a compressed-tensors checkpoint holds, read from its safetensors headers only.

A weight is quantized when it is stored with a ``weight_scale``: as ``weight`` in FP8 or
int8 (FP8_DYNAMIC, W8A8), or as ``weight_packed`` (eight 4-bit values per int32, W4A16)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

EXPERT = re.compile(r"\.experts\.\d+\.")
SUFFIXES = ("weight_packed", "weight")


def tensor_dtypes(folder: Path) -> dict[str, str]:
    """Every tensor's stored dtype (``F8_E4M3``, ``I32``, ``BF16`` ...), from the headers."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        out.update({k: v["dtype"] for k, v in header.items() if k != "__metadata__"})
    return out


def describe_checkpoint(folder: str | Path) -> dict:
    """Sizes and which weights are quantized: counts, stored dtypes, expert weights apart,
    and the names of the 2-D weights left unquantized (head, routers, embeddings)."""
    folder = Path(folder)
    dtypes = tensor_dtypes(folder)
    quantized, kept = {}, []
    for name, dtype in dtypes.items():
        for suffix in SUFFIXES:
            if name.endswith("." + suffix):
                module = name[: -len(suffix) - 1]
                if f"{module}.weight_scale" in dtypes:
                    quantized[module] = dtype
                elif suffix == "weight":
                    kept.append(module)
                break
    experts = [m for m in quantized if EXPERT.search(m)]
    kept_experts = [m for m in kept if EXPERT.search(m)]
    return {
        "safetensors_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "quantized_weights": len(quantized),
        "quantized_expert_weights": len(experts),
        "quantized_dtypes": dict(Counter(quantized.values())),
        "unquantized_expert_weights": len(kept_experts),
        "unquantized_weights": sorted(m for m in kept if not EXPERT.search(m) and not m.endswith("norm")),
    }
