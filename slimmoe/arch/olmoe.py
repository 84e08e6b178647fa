"""OLMoE: like Mixtral for experts, but q_norm / k_norm normalise the whole q / k projection."""

from slimmoe.arch.base import MoEAdapter, register


@register("olmoe")
class OlmoeAdapter(MoEAdapter):
    num_experts_field = "num_experts"
    # The RMS of q_norm/k_norm is taken over all heads at once and its size is fixed to
    # hidden_size by the stock model, so removing heads neither preserves the function nor
    # yields a checkpoint stock transformers can load.
    kv_refusal = (
        "its q_norm/k_norm normalise over all heads together (sized by hidden_size), so removing "
        "KV groups changes every head and cannot be loaded by stock transformers"
    )
