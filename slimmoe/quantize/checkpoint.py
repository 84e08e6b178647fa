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


# transformers 5.24 merges quantized per-expert weights into its fused experts only for FP8
# ("float-quantized") and packed int4 ("pack-quantized"): CompressedTensorsDequantize reads
# int8 experts ("int-quantized", W8A8) as nothing, and loading fails with "Concatenate on
# tensors destined for ...experts.gate_up_proj. Ckpt contains: 0".
FORMATS_TRANSFORMERS_MERGES = ("float-quantized", "pack-quantized")


def quantization_format(folder: str | Path) -> str | None:
    """The compressed-tensors format of a checkpoint folder, None when it is not one."""
    path = Path(folder) / "config.json"
    try:
        qc = json.loads(path.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if qc.get("quant_method") != "compressed-tensors":
        return None
    groups = list((qc.get("config_groups") or {}).values())
    return (groups[0].get("format") if len(groups) == 1 else None) or qc.get("format")


def needs_dequantized_copy(folder: str | Path) -> bool:
    """A compressed-tensors MoE checkpoint transformers cannot load (int8 experts)."""
    fmt = quantization_format(folder)
    if fmt is None or fmt in FORMATS_TRANSFORMERS_MERGES:
        return False
    return any(EXPERT.search(name) for name in tensor_dtypes(Path(folder)))


def dequantize_checkpoint(src: str | Path, out: str | Path) -> Path:
    """A plain (unquantized) copy of a compressed-tensors checkpoint, made with compressed-tensors'
    own decompressors: every quantized weight becomes ``weight`` in the config's dtype, the
    quantization parameters and ``quantization_config`` are dropped, other files are copied.
    For evaluating what transformers cannot load (``needs_dequantized_copy``); one shard in memory at a time."""
    import shutil

    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    from slimmoe.errors import UserError
    from slimmoe.io.atomic import replace_folder

    src, out = Path(src), Path(out)
    cfg = json.loads((src / "config.json").read_text())
    qc = QuantizationConfig.model_validate(cfg.pop("quantization_config"))
    if len(qc.config_groups) != 1:
        raise UserError(f"MODEL: {src} has {len(qc.config_groups)} quantization groups; only one is supported")
    scheme = next(iter(qc.config_groups.values()))
    compressor = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
    dtype = getattr(torch, str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"))
    with replace_folder(out) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.suffix != ".safetensors" and f.name != "config.json":
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        weight_map = {}
        for shard in sorted(src.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as fh:
                tensors = _dequantized({k: fh.get_tensor(k) for k in fh.keys()}, compressor, scheme, dtype)
            save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard.name))
        index = tmp / "model.safetensors.index.json"
        if index.is_file():  # the copied index names the quantization parameters: list what is there now
            index.write_text(json.dumps({**json.loads(index.read_text()), "weight_map": weight_map}, indent=2) + "\n")
    return out


def _dequantized(tensors: dict, compressor, scheme, dtype) -> dict:
    groups: dict[str, dict] = {}
    for name, t in tensors.items():
        module, _, param = name.rpartition(".")
        groups.setdefault(module, {})[param] = t
    out = {}
    for module, params in groups.items():
        prefix = f"{module}." if module else ""
        if "weight_scale" not in params:
            out.update({prefix + p: t for p, t in params.items()})
            continue
        out[prefix + "weight"] = compressor.decompress(dict(params), scheme)["weight"].to(dtype).contiguous()
        out.update({prefix + p: t for p, t in params.items() if not p.startswith(("weight", "input_", "output_"))})
    return out


def load_evaluable(path: str | Path, **kwargs):
    """The model of a checkpoint folder for evaluation: :func:`slimmoe.io.loading.load_model`,
    or, where transformers cannot load it (:func:`needs_dequantized_copy`), the same from a
    dequantized copy in a temporary folder (removed once loaded)."""
    import logging
    import tempfile

    from slimmoe.io.loading import load_model

    if not needs_dequantized_copy(path):
        return load_model(path, **kwargs)
    logging.getLogger("slimmoe").warning("%s: int8 experts, which transformers does not dequantize: "
                                         "evaluating a dequantized copy", path)
    with tempfile.TemporaryDirectory(prefix="slimmoe-eval-") as tmp:
        return load_model(dequantize_checkpoint(path, Path(tmp) / "model"), **kwargs)
