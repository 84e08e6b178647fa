"""What slimming needs to know about one architecture family, and the registry of them.

An adapter answers "where": where the decoder layers, MoE blocks, fused expert tensors,
router, shared experts and attention projections are, and which config fields a plan
changes. Everything else in slimmoe is architecture-agnostic and asks the adapter.
Adding a family is one new file with a subclass decorated by ``@register("model_type")``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from slimmoe.errors import UserError

_REGISTRY: dict[str, type["MoEAdapter"]] = {}


def register(*model_types: str):
    """Class decorator: make an adapter the one used for these ``config.model_type`` values."""

    def wrap(cls: type[MoEAdapter]) -> type[MoEAdapter]:
        for t in model_types:
            _REGISTRY[t] = cls
        cls.model_types = model_types
        return cls

    return wrap


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(config) -> "MoEAdapter":
    """The adapter for a transformers config; a clear UserError for dense or unknown models."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        kinds = ", ".join(supported_model_types())
        if not any(hasattr(config, f) for f in ("num_local_experts", "num_experts", "n_routed_experts")):
            raise UserError(
                f"model_type {model_type!r} is not a Mixture-of-Experts model (no experts in its config); "
                f"slimmoe compresses MoE models: {kinds}"
            )
        raise UserError(f"model_type {model_type!r} is not supported yet; supported: {kinds}")
    return _REGISTRY[model_type]()


@dataclass
class MoEBlock:
    """One MoE layer, resolved to its modules."""

    layer_idx: int
    block: nn.Module
    experts: nn.Module  # holds gate_up_proj [E, 2I, H] and down_proj [E, H, I]
    router: nn.Module  # holds weight [E, H] (and optionally bias / e_score_correction_bias)
    shared: list[nn.Module]  # dense gated MLPs (gate_proj, up_proj, down_proj) always applied


class MoEAdapter:
    """Defaults fit the Mixtral family; subclasses override the attributes that differ."""

    model_types: tuple[str, ...] = ()
    moe_attr = "mlp"  # attribute of a decoder layer holding the MoE block
    router_attr = "gate"  # attribute of the MoE block holding the router
    shared_attrs: tuple[str, ...] = ()  # attributes of the MoE block holding shared experts
    attn_attr = "self_attn"
    expert_size_field = "intermediate_size"
    num_experts_field = "num_local_experts"
    shared_size_field: str | None = None  # config field of the shared experts' width, if own
    kv_refusal: str | None = None  # why KV-group slimming cannot be done, if it cannot
    min_experts = 1

    # ---- where things are -------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_decoder().layers

    def moe_blocks(self, model: nn.Module) -> list[MoEBlock]:
        blocks = []
        for i, layer in enumerate(self.layers(model)):
            block = getattr(layer, self.moe_attr, None)
            experts = getattr(block, "experts", None)
            if experts is None or not hasattr(experts, "gate_up_proj"):
                continue  # a dense layer (DeepSeek's first layers, Qwen's mlp_only_layers)
            shared = [getattr(block, a) for a in self.shared_attrs if getattr(block, a, None) is not None]
            blocks.append(MoEBlock(i, block, experts, getattr(block, self.router_attr), shared))
        return blocks

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn_attr)

    # ---- sizes read from the config -----------------------------------------------------
    def num_experts(self, config) -> int:
        return int(getattr(config, self.num_experts_field))

    def expert_size(self, config) -> int:
        return int(getattr(config, self.expert_size_field))

    def head_dim(self, config) -> int:
        hd = getattr(config, "head_dim", None)
        return int(hd) if hd else config.hidden_size // config.num_attention_heads

    def num_kv_heads(self, config) -> int:
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)

    def shared_size(self, config) -> int | None:
        """Total width of a layer's shared experts (None when the family has none)."""
        if self.shared_size_field is None:
            return None
        return int(getattr(config, self.shared_size_field))

    # ---- checks ----------------------------------------------------------------------
    def check_kv_slimming(self, config) -> None:
        if self.kv_refusal:
            raise UserError(f"num_key_value_heads: KV-group slimming is not supported for {config.model_type}: {self.kv_refusal}")

    def check_expert_dropping(self, config, num_experts: int) -> None:
        if num_experts < self.min_experts:
            raise UserError(
                f"num_experts: {config.model_type} needs at least {self.min_experts} experts per layer, got {num_experts}"
            )

    # ---- config after slimming ------------------------------------------------------------
    def update_config(self, config, *, expert_size=None, shared_size=None, kv_heads=None, num_experts=None):
        """Write the new sizes into ``config`` (a copy owned by the caller)."""
        if expert_size is not None:
            setattr(config, self.expert_size_field, expert_size)
        if shared_size is not None and self.shared_size_field is not None:
            setattr(config, self.shared_size_field, shared_size)
        if kv_heads is not None:
            head_dim = self.head_dim(config)
            group = config.num_attention_heads // self.num_kv_heads(config)
            config.head_dim = head_dim  # explicit: hidden_size / heads no longer gives it
            config.num_attention_heads = kv_heads * group
            config.num_key_value_heads = kv_heads
        if num_experts is not None:
            setattr(config, self.num_experts_field, num_experts)
            config.num_experts_per_tok = min(self.top_k(config), num_experts)
        return config
