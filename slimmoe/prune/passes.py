"""What a scoring run computes, decided from the config alone, before any model is touched.

``plan_passes`` turns an ImportanceConfig and the structure kinds a plan cuts (``Wanted``)
into a ``ScoringPasses``: how each kind gets its scores, hence which hooks are installed and
whether the calibration data is run through the model at all (with or without gradients).
``estimate_importance`` (importance.py) only carries that decision out.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimmoe.arch import MoEAdapter
from slimmoe.config import ImportanceConfig
from slimmoe.prune.plan import resolve_targets

# Structure kinds, in the order their scores are made (random scores draw from one generator
# in this order, so it is part of the result). Shared-expert neurons are scored like expert neurons.
KINDS = ("neurons", "shared", "kv_groups", "experts")


@dataclass
class Wanted:
    """The structure kinds to score: expert (and shared-expert) neurons, KV groups, whole experts."""

    neurons: bool = True
    kv: bool = True
    experts: bool = True


def wanted_for(adapter: MoEAdapter, config, targets) -> Wanted:
    """Which structure kinds a plan to ``targets`` (SlimTargets) cuts, so only those are scored."""
    t = resolve_targets(adapter, config, targets)
    return Wanted(
        neurons=t["expert_intermediate_size"] < adapter.expert_size(config),
        kv=t["num_key_value_heads"] < adapter.num_kv_heads(config),
        experts=t["num_experts"] < adapter.num_experts(config),
    )


@dataclass(frozen=True)
class ScoringPasses:
    """How every scored kind gets its scores; a kind in none of the sets is not scored."""

    taylor: frozenset[str] = frozenset()  # sums of w * dL/dw, folded in post-accumulate-grad hooks
    activation: frozenset[str] = frozenset()  # mean |activation|, from forward hooks
    expert_statistic: str | None = None  # "frequency" or "reap": whole experts, from forward hooks
    magnitude: frozenset[str] = frozenset()  # L1 norm of the structure's weights: no data
    random: frozenset[str] = frozenset()  # seeded random numbers: no data

    @property
    def forward_statistics(self) -> frozenset[str]:
        """Kinds scored by the mean of what forward hooks sum over the calibration tokens."""
        return self.activation | ({"experts"} if self.expert_statistic else set())

    @property
    def gradient_pass(self) -> bool:
        """The calibration batches are run forward and backward through the loss."""
        return bool(self.taylor)

    @property
    def data_pass(self) -> bool:
        """The calibration batches are run through the model at all (forward only without taylor)."""
        return self.gradient_pass or bool(self.forward_statistics)


def plan_passes(cfg: ImportanceConfig, want: Wanted, adapter: MoEAdapter) -> ScoringPasses:
    """Decide how each wanted kind is scored. KV groups are never scored for an architecture
    whose adapter refuses KV slimming (``adapter.kv_refusal``)."""
    kv = want.kv and adapter.kv_refusal is None
    how = {kind: cfg.score for kind, wanted in (("neurons", want.neurons), ("shared", want.neurons), ("kv_groups", kv)) if wanted}
    if want.experts:
        how["experts"] = cfg.expert_score

    def scored_by(method: str) -> frozenset[str]:
        return frozenset(kind for kind, m in how.items() if m == method)

    magnitude = scored_by("magnitude")
    if cfg.score == "magnitude":  # reading the weights is cheap: neurons always come along (as they always have)
        magnitude |= {"neurons", "shared"}
    return ScoringPasses(
        taylor=scored_by("taylor"),
        activation=scored_by("activation"),
        expert_statistic=how["experts"] if how.get("experts") in ("frequency", "reap") else None,
        magnitude=magnitude,
        random=scored_by("random"),
    )
