"""A slimming plan: what every layer keeps, in the original numbering (``slim_plan.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slimmoe.errors import UserError
from slimmoe.io.atomic import atomic_write_text

PLAN_FILE = "slim_plan.json"
PLAN_FORMAT = 1


@dataclass
class LayerPlan:
    """Kept structures of one decoder layer. None means "this layer has none of these"."""

    layer: int
    experts: list[int] | None = None  # kept expert indices (sorted, original numbering)
    expert_neurons: list[list[int]] | None = None  # per kept expert (same order): kept neurons
    shared_neurons: list[int] | None = None  # kept neurons of the shared experts (concatenated)
    kv_groups: list[int] | None = None  # kept KV groups (one KV head and its query heads)


@dataclass
class SlimPlan:
    model_type: str
    source: dict  # sizes before: expert_intermediate_size, num_key_value_heads, num_experts, ...
    target: dict  # sizes after
    layers: list[LayerPlan] = field(default_factory=list)
    scores: dict = field(default_factory=dict)  # how it was scored (for the record)

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, **asdict(self)}, indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "SlimPlan":
        d = dict(d)
        d.pop("format", None)
        layers = [LayerPlan(**lp) for lp in d.pop("layers")]
        return cls(layers=layers, **d)

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/slim_plan.json`` atomically."""
        path = Path(folder) / PLAN_FILE
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, folder_or_file: str | Path) -> "SlimPlan":
        p = Path(folder_or_file)
        if p.is_dir():
            p = p / PLAN_FILE
        return cls.from_dict(json.loads(p.read_text()))


def top_indices(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, returned in ascending (original) order.

    Ties are broken towards the lower index so plans are deterministic.
    """
    if keep >= scores.numel():
        return list(range(scores.numel()))
    # stable sort on -score keeps lower indices first among equals
    order = torch.sort(-scores.double(), stable=True).indices[:keep]
    return sorted(order.tolist())


def source_sizes(adapter, cfg) -> dict:
    return {
        "expert_intermediate_size": adapter.expert_size(cfg),
        "num_key_value_heads": adapter.num_kv_heads(cfg),
        "num_attention_heads": int(cfg.num_attention_heads),
        "num_experts": adapter.num_experts(cfg),
        "num_experts_per_tok": adapter.top_k(cfg),
        "shared_intermediate_size": adapter.shared_size(cfg),
    }


def resolve_targets(adapter, cfg, targets) -> dict:
    """Check ``targets`` (a SlimTargets) against a model config; fill unset sizes with the source's.

    Raises UserError naming the field for a target larger than its source, a KV-head count
    that does not divide the query heads, or a change the architecture cannot make.
    """
    src = source_sizes(adapter, cfg)
    out = dict(src)
    for field_name, src_key in (
        ("expert_intermediate_size", "expert_intermediate_size"),
        ("num_key_value_heads", "num_key_value_heads"),
        ("num_experts", "num_experts"),
    ):
        value = getattr(targets, field_name)
        if value is None:
            continue
        if value > src[src_key]:
            raise UserError(f"{field_name}: target {value} is larger than the source's {src[src_key]}")
        out[src_key] = value
    kv = out["num_key_value_heads"]
    if kv != src["num_key_value_heads"]:
        adapter.check_kv_slimming(cfg)
        if src["num_attention_heads"] % kv != 0:
            raise UserError(
                f"num_key_value_heads: {kv} does not divide the {src['num_attention_heads']} query heads"
            )
    group = src["num_attention_heads"] // src["num_key_value_heads"]
    out["num_attention_heads"] = kv * group
    if out["num_experts"] != src["num_experts"]:
        adapter.check_expert_dropping(cfg, out["num_experts"])
    out["num_experts_per_tok"] = min(src["num_experts_per_tok"], out["num_experts"])
    if src["shared_intermediate_size"] is not None:
        ratio = out["expert_intermediate_size"] / src["expert_intermediate_size"]
        out["shared_intermediate_size"] = max(1, round(src["shared_intermediate_size"] * ratio))
    return out


def build_plan(adapter, model, scores, targets, score_info: dict | None = None) -> SlimPlan:
    """Keep the highest-scoring structures of every layer, to the uniform target sizes.

    ``scores`` is an ImportanceScores; a structure kind whose target equals its source
    size is kept whole without looking at its scores.
    """
    src = source_sizes(adapter, model.config)
    tgt = resolve_targets(adapter, model.config, targets)
    blocks = {b.layer_idx: b for b in adapter.moe_blocks(model)}
    layers = []
    for i in range(len(adapter.layers(model))):
        lp = LayerPlan(layer=i)
        if i in blocks:
            E, I = src["num_experts"], src["expert_intermediate_size"]
            lp.experts = (
                top_indices(scores.experts[i], tgt["num_experts"]) if tgt["num_experts"] < E else list(range(E))
            )
            lp.expert_neurons = [
                top_indices(scores.neurons[i][e], tgt["expert_intermediate_size"])
                if tgt["expert_intermediate_size"] < I
                else list(range(I))
                for e in lp.experts
            ]
            if blocks[i].shared:
                S = src["shared_intermediate_size"]
                keep = tgt["shared_intermediate_size"]
                lp.shared_neurons = top_indices(scores.shared[i], keep) if keep < S else list(range(S))
        kv = src["num_key_value_heads"]
        lp.kv_groups = (
            top_indices(scores.kv_groups[i], tgt["num_key_value_heads"])
            if tgt["num_key_value_heads"] < kv
            else list(range(kv))
        )
        layers.append(lp)
    return SlimPlan(model_type=model.config.model_type, source=src, target=tgt, layers=layers, scores=score_info or {})
