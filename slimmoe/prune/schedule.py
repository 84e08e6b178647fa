"""Automatic stage schedule: intermediate sizes between a teacher and the final targets.

Stage ``s`` of ``n`` aims at ``P_teacher * (P_final / P_teacher) ** (s / n)`` total
parameters, so every stage removes the same *fraction* of parameters. Expert count
and KV heads (when the final targets change them) step down along their own geometric
path, rounded to valid values; the expert width of each stage is then solved so the
estimated total hits the stage's parameter target. Total parameters are computed
analytically from the config (no model is built), so a 42B teacher plans instantly.
"""

from __future__ import annotations

import math

from slimmoe.arch import get_adapter
from slimmoe.config import SlimTargets
from slimmoe.errors import UserError
from slimmoe.prune.plan import resolve_targets, source_sizes

# Per-family details of parameters that do not follow from generic config fields.
# norm_bias: LayerNorm with a bias (2*H per norm); shared_gate: a [1, H] gate on the
# shared expert; qk_norm: "head" = q_norm/k_norm of head_dim, "full" = of the whole
# q / k projection width.
_QUIRKS: dict[str, dict] = {
    "phimoe": {"norm_bias": True},
    "qwen2_moe": {"shared_gate": True},
    "qwen3_moe": {"qk_norm": "head"},
    "olmoe": {"qk_norm": "full"},
}


def estimate_total_params(
    config,
    expert_intermediate_size: int | None = None,
    num_key_value_heads: int | None = None,
    num_experts: int | None = None,
) -> int:
    """Total parameters of ``config``'s model after slimming to the given sizes (None = unchanged).

    Counts embeddings (once when tied), attention (GQA with biases, or MLA), norms,
    routers, routed experts (3*H*I each), shared experts (whose width scales with the
    expert width, as slimming does) and dense MLP layers.
    """
    adapter = get_adapter(config)
    q = _QUIRKS.get(config.model_type, {})
    H, L, V = int(config.hidden_size), int(config.num_hidden_layers), int(config.vocab_size)
    I0, kv0, E0 = adapter.expert_size(config), adapter.num_kv_heads(config), adapter.num_experts(config)
    I = I0 if expert_intermediate_size is None else int(expert_intermediate_size)
    kv = kv0 if num_key_value_heads is None else int(num_key_value_heads)
    E = E0 if num_experts is None else int(num_experts)
    nq = kv * (int(config.num_attention_heads) // kv0)

    total = V * H * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    if getattr(config, "lm_head_bias", False):
        total += V
    norm = H * (2 if q.get("norm_bias") else 1)
    total += norm  # final norm

    attn = _attention_params(config, adapter, q, H, nq, kv)
    shared = adapter.shared_size(config)
    if shared is not None and I != I0:
        shared = max(1, round(shared * I / I0))  # as plan.resolve_targets scales it
    moe = E * (3 * H * I + H)  # experts + router rows
    if shared is not None:
        moe += 3 * H * shared + (H if q.get("shared_gate") else 0)
    dense = 3 * H * int(getattr(config, "intermediate_size", 0) or 0)
    for i in range(L):
        total += attn + 2 * norm + (moe if _is_moe_layer(config, i) else dense)
    return int(total)


def estimate_active_params(
    config,
    expert_intermediate_size: int | None = None,
    num_key_value_heads: int | None = None,
    num_experts: int | None = None,
) -> int:
    """Active parameters (as slimmoe.evaluation.parameter_counts counts them) after slimming.

    The total minus the routed experts a token does not pass through: in every MoE layer,
    ``E - min(top_k, E)`` experts of 3*H*I each (top-k is capped at the expert count, as
    slimming caps it). Embeddings, attention, routers, shared experts and norms are active.
    """
    adapter = get_adapter(config)
    H = int(config.hidden_size)
    I = adapter.expert_size(config) if expert_intermediate_size is None else int(expert_intermediate_size)
    E = adapter.num_experts(config) if num_experts is None else int(num_experts)
    idle = E - min(adapter.top_k(config), E)
    moe_layers = sum(_is_moe_layer(config, i) for i in range(int(config.num_hidden_layers)))
    total = estimate_total_params(config, expert_intermediate_size, num_key_value_heads, num_experts)
    return int(total - moe_layers * idle * 3 * H * I)


def _attention_params(config, adapter, q: dict, H: int, nq: int, kv: int) -> int:
    kv_lora = getattr(config, "kv_lora_rank", None)
    if kv_lora:  # multi-head latent attention (DeepSeek)
        nope, rope, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        q_lora = getattr(config, "q_lora_rank", None)
        qp = H * nq * (nope + rope) if not q_lora else H * q_lora + q_lora + q_lora * nq * (nope + rope)
        return int(qp + H * (kv_lora + rope) + kv_lora + kv_lora * nq * (nope + v) + nq * v * H)
    hd = adapter.head_dim(config)
    n = 2 * H * nq * hd + 2 * H * kv * hd
    if getattr(config, "attention_bias", False):
        n += nq * hd + 2 * kv * hd + H
    elif getattr(config, "qkv_bias", False):
        n += nq * hd + 2 * kv * hd
    if q.get("qk_norm") == "head":
        n += 2 * hd
    elif q.get("qk_norm") == "full":
        n += nq * hd + kv * hd
    return int(n)


def _is_moe_layer(config, i: int) -> bool:
    k = getattr(config, "first_k_dense_replace", None)
    if k is not None:
        return i >= k
    step = getattr(config, "decoder_sparse_step", None)
    if step is not None:
        return i not in (getattr(config, "mlp_only_layers", None) or []) and (i + 1) % step == 0
    return True


def interpolate_stages(teacher_config, final: SlimTargets, num_stages: int) -> list[SlimTargets]:
    """``num_stages`` targets from ``teacher_config`` down to ``final`` (the last one, exactly).

    Fields ``final`` leaves None stay None in every stage. Sizes never grow from one stage
    to the next; expert width is a multiple of 8 when >= 8; every KV-head count divides
    the previous stage's query heads and leaves ``final``'s count reachable. Rounding
    can make two consecutive stages equal when there are more stages than sizes.
    """
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise UserError(f"num_stages: must be an integer >= 1, got {num_stages!r}")
    if not isinstance(final, SlimTargets):
        raise UserError(f"final: expected SlimTargets, got {type(final).__name__}")
    adapter = get_adapter(teacher_config)
    try:
        tgt = resolve_targets(adapter, teacher_config, final)
    except UserError as e:
        raise UserError(f"final.{e}") from None
    src = source_sizes(adapter, teacher_config)
    I0, kv0, E0 = src["expert_intermediate_size"], src["num_key_value_heads"], src["num_experts"]
    If, kvf, Ef = tgt["expert_intermediate_size"], tgt["num_key_value_heads"], tgt["num_experts"]
    group = src["num_attention_heads"] // kv0
    p0 = estimate_total_params(teacher_config)
    pf = estimate_total_params(teacher_config, If, kvf, Ef)

    stages: list[SlimTargets] = []
    I, kv, E = I0, kv0, E0
    for s in range(1, num_stages):
        t = s / num_stages
        E = max(Ef, min(E, round(_geo(E0, Ef, t))))
        kv = _pick_kv(_geo(kv0, kvf, t), kv, kvf, group)
        if If != I0:
            I = max(If, min(I, _round_width(_solve_width(teacher_config, _geo(p0, pf, t), I0, If, kv, E))))
        stages.append(SlimTargets(
            expert_intermediate_size=None if final.expert_intermediate_size is None else I,
            num_key_value_heads=None if final.num_key_value_heads is None else kv,
            num_experts=None if final.num_experts is None else E,
        ))
    stages.append(final.model_copy())
    return stages


def _geo(a: float, b: float, t: float) -> float:
    return a * (b / a) ** t


def _solve_width(config, target: float, I0: int, If: int, kv: int, E: int) -> float:
    """Expert width whose estimated total is ``target`` at (kv, E); total is affine in width."""
    lo = estimate_total_params(config, If, kv, E)
    hi = estimate_total_params(config, I0, kv, E)
    return If + (target - lo) * (I0 - If) / (hi - lo)


# Expert widths are multiples of 8 from 8 up: transformers 5 runs fused experts with
# torch's grouped_mm, whose kernels need 16-byte row strides (8 bf16 values); on CPU with
# torch > 2.10 a width of e.g. 15 fails in a stock forward ("strides should be multiple of 16 bytes").
WIDTH_ALIGN = 8


def _round_width(width: float) -> int:
    if width >= WIDTH_ALIGN:
        return int(WIDTH_ALIGN * round(width / WIDTH_ALIGN))
    return max(1, int(round(width)))


def valid_widths(source_width: int) -> list[int]:
    """Expert widths a plan may cut ``source_width`` to, ascending: 1..7, multiples of 8, and the source's."""
    small = range(1, min(source_width, WIDTH_ALIGN - 1) + 1)
    return sorted({*small, *range(WIDTH_ALIGN, source_width + 1, WIDTH_ALIGN), source_width})


def _pick_kv(target: float, prev: int, final: int, group: int) -> int:
    """The valid KV count closest (in ratio) to ``target``: final <= kv <= prev, kv divides the
    previous stage's query heads (prev * group), and ``final`` divides kv's query heads."""
    ok = [v for v in range(final, prev + 1) if (prev * group) % v == 0 and (v * group) % final == 0]
    return min(ok, key=lambda v: (abs(math.log(v / target)), -v))


def format_schedule(stages: list[SlimTargets], teacher_config, names: list[str] | None = None) -> str:
    """A plain-text table of the teacher and every stage: sizes, estimated total and active parameters.

    ``names`` labels the stages (default ``stage1`` ... ``final``).
    """
    adapter = get_adapter(teacher_config)
    src = source_sizes(adapter, teacher_config)
    cur = {"expert_intermediate_size": src["expert_intermediate_size"],
           "num_key_value_heads": src["num_key_value_heads"], "num_experts": src["num_experts"]}
    p0 = estimate_total_params(teacher_config)
    rows = [("teacher", cur["expert_intermediate_size"], cur["num_key_value_heads"], cur["num_experts"], p0,
             estimate_active_params(teacher_config))]
    for i, st in enumerate(stages, 1):
        cur = {k: (v if v is not None else cur[k]) for k, v in st.model_dump().items()}
        p = estimate_total_params(teacher_config, **cur)
        name = names[i - 1] if names else ("final" if i == len(stages) else f"stage{i}")
        rows.append((name, cur["expert_intermediate_size"], cur["num_key_value_heads"], cur["num_experts"], p,
                     estimate_active_params(teacher_config, **cur)))
    header = ("stage", "expert width", "KV heads", "experts", "est. total params", "vs teacher", "est. active params")
    body = [(r[0], str(r[1]), str(r[2]), str(r[3]), _human(r[4]), f"{r[4] / p0:.3f}", _human(r[5])) for r in rows]
    widths = [max(len(x[c]) for x in [header, *body]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *body]]
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
