"""Qwen2-MoE (a dense shared expert behind a sigmoid gate) and Qwen3-MoE (per-head q/k norms)."""

from slimmoe.arch.base import MoEAdapter, register


@register("qwen2_moe")
class Qwen2MoeAdapter(MoEAdapter):
    expert_size_field = "moe_intermediate_size"
    num_experts_field = "num_experts"
    shared_attrs = ("shared_expert",)  # its scalar gate `shared_expert_gate` keeps its shape
    shared_size_field = "shared_expert_intermediate_size"


@register("qwen3_moe")
class Qwen3MoeAdapter(MoEAdapter):
    expert_size_field = "moe_intermediate_size"
    num_experts_field = "num_experts"
    # q_norm / k_norm act on head_dim only, so whole heads can be removed
