"""Mixtral: ``mlp.gate`` router (softmax, top-k renormalised), fused experts, GQA attention."""

from slimmoe.arch.base import MoEAdapter, register


@register("mixtral")
class MixtralAdapter(MoEAdapter):
    pass
