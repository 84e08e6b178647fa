"""The half of ``slimmoe quantize`` that runs inside llm-compressor's own environment.

Run as a script by path (``<llm-compressor python> worker.py '<json>'``), never imported by
slimmoe: it imports only the standard library, torch, transformers and llmcompressor, which
is all that environment has. Arguments come as one JSON object (``model``, ``out``,
``scheme``, ``group_size``, ``ignore``); the last line on stdout is a JSON report.

MoE experts: transformers 5 keeps them as fused 3-D parameters (``mlp.experts.gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I]), which a ``targets="Linear"`` recipe would never see.
llm-compressor's ``linearize_moe`` (``llmcompressor.modeling.moe.linearize``) turns every
fused experts module into per-expert ``nn.Linear`` gate/up/down projections after loading,
so every expert weight is quantized, and saved one tensor per expert.
"""

from __future__ import annotations

import json
import sys

# Families whose checkpoints store expert N as experts.N.w1 (gate), w3 (up), w2 (down): the
# released Phi-3.5-MoE / Mixtral layout, what vLLM's and transformers' loaders read. Without
# this, llm-compressor saves them as experts.N.gate_proj/up_proj/down_proj, which neither
# loader maps onto these families' experts (measured: transformers 5.24 loads them as
# unexpected keys and leaves the experts random). qwen2_moe / qwen3_moe checkpoints already
# name them experts.N.gate_proj/up_proj/down_proj.
W123_FAMILIES = ("phimoe", "mixtral")
FUSED = ("experts.gate_up_proj", "experts.down_proj")  # the fused experts' targets


def save_mappings(model_type: str) -> list:
    """How save_pretrained writes the linearized experts, one tensor per expert: the family's
    checkpoint -> model conversions without the fusing of experts, plus, for phimoe / mixtral,
    one renaming per projection (experts.N.w1 <-> experts.N.gate_proj, ...); save_pretrained
    applies them in reverse. This is what llm-compressor's ``load_quantizable_moe`` sets
    (``set_save_conversion_mapping``) for the families it has 2-D mappings for."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    keep = [c for c in get_checkpoint_conversion_mapping(model_type) or []
            if not any(t.replace("\\", "").endswith(FUSED) for t in c.target_patterns)]
    if model_type not in W123_FAMILIES:
        return keep
    pairs = [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")]
    return keep + [WeightRenaming(source_patterns=rf"\.experts\.(\d+)\.{a}\.", target_patterns=rf".experts.\1.{b}.")
                   for a, b in pairs]


def recipe(scheme: str, group_size: int, ignore: list[str]):
    """A data-free QuantizationModifier on every Linear; W4A16 with its group size."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if scheme != "W4A16" or group_size == 128:  # the preset as llm-compressor ships it
        return QuantizationModifier(targets="Linear", scheme=scheme, ignore=list(ignore))
    chosen = preset_name_to_scheme(scheme, ["Linear"])
    chosen.weights.group_size = group_size
    return QuantizationModifier(config_groups={"group_0": chosen}, ignore=list(ignore))


def quantize(model_dir: str, out: str, scheme: str, group_size: int, ignore: list[str]) -> dict:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    # Load as transformers does (fused experts), then linearize: llm-compressor's load_context()
    # would load qwen2_moe-style checkpoints straight into 2-D experts, but through transformers'
    # monkey patching, which imports every model module, torchvision-only ones included.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    linearize_moe(model)  # fused 3-D experts -> per-expert nn.Linear gate/up/down
    model._weight_conversions = save_mappings(model.config.model_type)
    oneshot(model=model, recipe=recipe(scheme, group_size, ignore))  # no dataset: DataFreePipeline
    model.save_pretrained(out, save_compressed=True)
    quantized = [n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None]
    return {"quantized_modules": len(quantized), "versions": versions()}


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("llmcompressor", "compressed-tensors", "transformers", "torch")}


def main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    report = quantize(args["model"], args["out"], args["scheme"], int(args.get("group_size", 128)),
                      args.get("ignore", []))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
