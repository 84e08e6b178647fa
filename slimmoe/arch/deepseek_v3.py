"""DeepSeek-V3: sigmoid router with a score-correction bias, shared experts, MLA attention."""

from slimmoe.arch.base import MoEAdapter, register
from slimmoe.errors import UserError


@register("deepseek_v3")
class DeepseekV3Adapter(MoEAdapter):
    expert_size_field = "moe_intermediate_size"
    num_experts_field = "n_routed_experts"
    shared_attrs = ("shared_experts",)
    # shared experts' width is moe_intermediate_size * n_shared_experts: no field of its own
    kv_refusal = "its multi-head latent attention (MLA) has no KV groups to remove"

    def shared_size(self, config) -> int:
        return int(config.moe_intermediate_size * config.n_shared_experts)

    def check_expert_dropping(self, config, num_experts: int) -> None:
        super().check_expert_dropping(config, num_experts)
        if getattr(config, "n_group", 1) not in (None, 1):
            raise UserError(
                f"num_experts: expert dropping with group-limited routing (n_group={config.n_group}) is not "
                "supported: dropping experts per layer would break the equal-size expert groups"
            )
        if num_experts < config.num_experts_per_tok:
            raise UserError(
                f"num_experts: {num_experts} is fewer than num_experts_per_tok={config.num_experts_per_tok}"
            )
