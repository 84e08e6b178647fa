"""Zero biases for a PhiMoE that has none, so that every engine loads it unchanged in function.

Phi-3.5-MoE has attention and lm_head biases, and vLLM, SGLang and llama.cpp build their
PhiMoE with them as required parameters (sources in ``slimmoe/export/engines.py``); a PhiMoE
configured without them (``attention_bias`` / ``lm_head_bias`` false, as transformers'
defaults are) fails to load there. A zero bias adds nothing, so the exported folder gets the
missing biases as zeros in one extra safetensors file, listed in the weight index next to the
untouched (hard-linked) weight files, and config.json says the biases are there.
"""

from __future__ import annotations

import json
from pathlib import Path

from slimmoe.errors import UserError

EXTRA_FILE = "model-zero-biases.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def missing_phimoe_biases(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of every bias a PhiMoE of ``cfg`` lacks (names as saved on disk)."""
    if cfg.get("model_type") != "phimoe":
        return {}
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    shapes: dict[str, tuple[int, ...]] = {}
    if not cfg.get("attention_bias"):
        for i in range(cfg["num_hidden_layers"]):
            prefix = f"model.layers.{i}.self_attn"
            shapes[f"{prefix}.q_proj.bias"] = (heads * head_dim,)
            shapes[f"{prefix}.k_proj.bias"] = (kv * head_dim,)
            shapes[f"{prefix}.v_proj.bias"] = (kv * head_dim,)
            shapes[f"{prefix}.o_proj.bias"] = (hidden,)
    if not cfg.get("lm_head_bias"):
        shapes["lm_head.bias"] = (cfg["vocab_size"],)
    return shapes


def _weight_map(folder: Path) -> tuple[dict, dict[str, str], str]:
    """The folder's safetensors index (metadata, weight map) and the name for the extra file.
    A single-file model becomes shard 1 of 2 (renaming the copy's link, not the source), since
    transformers reads ``model.safetensors`` alone, ignoring an index, whenever it exists."""
    from safetensors import safe_open

    index_path = folder / INDEX_FILE
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        return index.get("metadata", {}), dict(index["weight_map"]), EXTRA_FILE
    if not (folder / SINGLE_FILE).is_file():
        raise UserError(f"MODEL: {folder} has neither {INDEX_FILE} nor {SINGLE_FILE}")
    first, extra = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    (folder / SINGLE_FILE).rename(folder / first)
    with safe_open(str(folder / first), "pt") as f:
        return {}, {name: first for name in f.keys()}, extra


def add_zero_biases(folder: Path, cfg: dict) -> dict:
    """Write the biases ``cfg`` lacks as zeros into ``folder`` (an export's staged copy) and
    index them; returns the config.json to write. Files of the copy that are hard links to the
    source are never written through: the index is replaced, not edited."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    shapes = missing_phimoe_biases(cfg)
    if not shapes:
        return cfg
    metadata, weight_map, extra = _weight_map(folder)
    first = next(iter(weight_map.items()))
    with safe_open(str(folder / first[1]), "pt") as f:
        dtype = f.get_slice(first[0]).get_dtype()
    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(dtype, torch.float32)
    save_file({name: torch.zeros(shape, dtype=torch_dtype) for name, shape in shapes.items()},
              str(folder / extra), metadata={"format": "pt"})
    weight_map.update({name: extra for name in shapes})
    index = folder / INDEX_FILE
    index.unlink(missing_ok=True)
    index.write_text(json.dumps({"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return {**cfg, "attention_bias": True, "lm_head_bias": True}
