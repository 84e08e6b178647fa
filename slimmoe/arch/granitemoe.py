"""Granite MoE: the MoE block is ``block_sparse_moe`` with a ``router`` (softmax over top-k logits)."""

from slimmoe.arch.base import MoEAdapter, register


@register("granitemoe")
class GraniteMoeAdapter(MoEAdapter):
    moe_attr = "block_sparse_moe"
    router_attr = "router"
