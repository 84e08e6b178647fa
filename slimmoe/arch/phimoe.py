"""Phi-3.5-MoE: ``mlp.router`` with SparseMixer routing (always top-2), attention with biases."""

from slimmoe.arch.base import MoEAdapter, register


@register("phimoe")
class PhimoeAdapter(MoEAdapter):
    router_attr = "router"
    # sparsemixer selects two experts whatever num_experts_per_tok says
    min_experts = 2
