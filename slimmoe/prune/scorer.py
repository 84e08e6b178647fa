"""Carrying out a ScoringPasses on one model: the hooks that accumulate per-structure sums
during the calibration batches, and the scores made from those sums or from the weights alone.

Taylor: gradients are requested only for the tensors being scored, and each one is folded
into its per-structure sums by a post-accumulate-grad hook that then frees it, so scoring
never holds a second full copy of the weights' gradients. Forward statistics (activation,
frequency, reap) are summed by forward hooks together with the token counts they average over.

On a model sharded over several processes (FSDP2), each process folds the rows of every
weight and gradient it holds into the sums at their global positions (shards.py), and
``reduce`` adds the partial sums of all processes once the data passes are over.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from slimmoe.arch import MoEAdapter, MoEBlock
from slimmoe.prune.passes import KINDS, ScoringPasses
from slimmoe.prune.shards import group_sums, local_rows, owned_rows, reduce_sums


def _zeros(*shape) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.float64)


class Scorer:
    """Scores of one model's structures: the hooks and sums of the data passes, and the
    data-free magnitude and random scores. Every score is a float64 tensor on the CPU."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter):
        self.adapter = adapter
        self.blocks = adapter.moe_blocks(model)
        self.layers = adapter.layers(model)
        self.kv = adapter.num_kv_heads(model.config)
        self.signed: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in KINDS}  # taylor sums, signed
        self.stat_sum: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in KINDS}  # activation / reap / frequency
        self.stat_count: dict[tuple[str, int], torch.Tensor] = {}
        self.counting = True  # False during a pass that only keeps the processes in step
        self.handles: list = []

    @contextmanager
    def hooked(self, passes: ScoringPasses):
        """The hooks ``passes`` needs, installed for the duration of the block."""
        try:
            self.add_taylor_hooks(passes.taylor)
            self.add_forward_hooks(passes.activation, passes.expert_statistic)
            yield self
        finally:
            for h in self.handles:
                h.remove()
            self.handles.clear()

    # ---- taylor: per-structure sums of w * dL/dw, folded in as soon as a grad exists ----
    def _grad_hook(self, param: nn.Parameter, fold) -> None:
        """``fold(w * dL/dw, start)`` on the rows held here, ``start`` the global index of the first."""
        def hook(p: torch.Tensor) -> None:
            with torch.no_grad():
                w, start = local_rows(p.detach())
                fold((w * local_rows(p.grad)[0]).double(), start)
            p.grad = None

        param.requires_grad_(True)
        self.handles.append(param.register_post_accumulate_grad_hook(hook))

    def _add(self, kind: str, i: int, value: torch.Tensor, start: int = 0) -> None:
        store = self.signed[kind]
        if i not in store:
            raise KeyError((kind, i))
        store[i][start : start + value.shape[0]] += value.cpu()

    def add_taylor_hooks(self, kinds: frozenset[str]) -> None:
        for b in self.blocks:
            if "neurons" in kinds or "experts" in kinds:
                self._taylor_expert_hooks(b, "neurons" in kinds, "experts" in kinds)
            if "shared" in kinds and b.shared:
                self._taylor_shared_hooks(b)
        if "kv_groups" in kinds:
            for i, layer in enumerate(self.layers):
                self._taylor_kv_hooks(i, layer)

    def _taylor_expert_hooks(self, b: MoEBlock, neurons: bool, experts: bool) -> None:
        E, I2 = b.experts.gate_up_proj.shape[:2]
        I, i = I2 // 2, b.layer_idx
        if neurons:
            self.signed["neurons"][i] = _zeros(E, I)
        if experts:
            self.signed["experts"][i] = _zeros(E)

        def fold_gate_up(wg, start):  # rows of experts start, start + 1, ...
            if neurons:
                self._add("neurons", i, wg[:, :I].sum(-1) + wg[:, I:].sum(-1), start)
            if experts:
                self._add("experts", i, wg.sum((1, 2)), start)

        def fold_down(wg, start):
            if neurons:
                self._add("neurons", i, wg.sum(1), start)
            if experts:
                self._add("experts", i, wg.sum((1, 2)), start)

        self._grad_hook(b.experts.gate_up_proj, fold_gate_up)
        self._grad_hook(b.experts.down_proj, fold_down)

    def _taylor_shared_hooks(self, b: MoEBlock) -> None:
        i = b.layer_idx
        self.signed["shared"][i] = _zeros(sum(m.gate_proj.weight.shape[0] for m in b.shared))
        offset = 0
        for m in b.shared:  # the shared experts' neurons, concatenated; down's rows are hidden units
            self._grad_hook(m.gate_proj.weight, lambda wg, start, o=offset: self._add("shared", i, wg.sum(1), o + start))
            self._grad_hook(m.up_proj.weight, lambda wg, start, o=offset: self._add("shared", i, wg.sum(1), o + start))
            self._grad_hook(m.down_proj.weight, lambda wg, start, o=offset: self._add("shared", i, wg.sum(0), o))
            offset += m.gate_proj.weight.shape[0]

    def _taylor_kv_hooks(self, i: int, layer: nn.Module) -> None:
        attn = self.adapter.attention(layer)
        self.signed["kv_groups"][i] = _zeros(self.kv)

        def fold(rows: int):
            return lambda wg, start: self._add("kv_groups", i, group_sums(wg, start, rows, self.kv))

        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):  # rows laid out group by group
            for p in (proj.weight, proj.bias):
                if p is not None:
                    self._grad_hook(p, fold(p.shape[0]))
        self._grad_hook(attn.o_proj.weight, lambda wg, start: self._add("kv_groups", i, wg.sum(0).reshape(self.kv, -1).sum(1)))

    # ---- forward statistics: activation, frequency, reap -------------------------------
    def _acc(self, kind: str, i: int, total: torch.Tensor, count: torch.Tensor) -> None:
        if not self.counting:  # zeros, so that every process holds the same sums to reduce
            total, count = torch.zeros_like(total), torch.zeros_like(count)
        store = self.stat_sum[kind]
        store[i] = store.get(i, 0) + total.double().cpu()
        self.stat_count[(kind, i)] = self.stat_count.get((kind, i), 0) + count.double().cpu()

    def add_forward_hooks(self, activation: frozenset[str], expert_statistic: str | None) -> None:
        neuron_activation = "neurons" in activation
        for b in self.blocks:
            if neuron_activation or expert_statistic:
                hook = self._experts_hook(b, neuron_activation, expert_statistic)
                self.handles.append(b.experts.register_forward_hook(hook, with_kwargs=True))
            if "shared" in activation and b.shared:
                offset = 0
                for m in b.shared:
                    self.handles.append(m.down_proj.register_forward_pre_hook(self._shared_hook(b.layer_idx, offset, b)))
                    offset += m.gate_proj.weight.shape[0]
        if "kv_groups" in activation:
            for i, layer in enumerate(self.layers):
                o_proj = self.adapter.attention(layer).o_proj
                self.handles.append(o_proj.register_forward_pre_hook(self._o_proj_hook(i)))

    def _experts_hook(self, b: MoEBlock, neuron_activation: bool, expert_statistic: str | None):
        experts = b.experts

        def hook(module, args, kwargs, output):
            hs = args[0] if args else kwargs["hidden_states"]
            top_idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            top_w = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            # the inputs as called: under a device_map they may sit where the parent module runs
            dev = experts.gate_up_proj.device
            hs, top_idx, top_w = hs.to(dev), top_idx.to(dev), top_w.to(dev)
            E, I2, _ = experts.gate_up_proj.shape
            with torch.no_grad():
                act_total, counts, reap_total = _zeros(E, I2 // 2), _zeros(E), _zeros(E)
                for e in range(E):
                    tok, pos = torch.where(top_idx == e)
                    counts[e] = tok.numel()
                    if tok.numel() == 0 or (expert_statistic == "frequency" and not neuron_activation):
                        continue
                    gate, up = torch.nn.functional.linear(hs[tok], experts.gate_up_proj[e]).chunk(2, dim=-1)
                    a = experts.act_fn(gate) * up
                    act_total[e] = a.abs().sum(0).double().cpu()
                    if expert_statistic == "reap":
                        out = torch.nn.functional.linear(a, experts.down_proj[e])
                        reap_total[e] = (top_w[tok, pos].float() * out.float().norm(dim=-1)).sum().double()
                if neuron_activation:
                    self._acc("neurons", b.layer_idx, act_total, counts[:, None].clamp(min=1))
                if expert_statistic == "reap":
                    self._acc("experts", b.layer_idx, reap_total, counts.clamp(min=1))
                elif expert_statistic == "frequency":
                    self._acc("experts", b.layer_idx, counts, torch.ones(()))

        return hook

    def _shared_hook(self, i: int, offset: int, b: MoEBlock):
        total = sum(m.gate_proj.weight.shape[0] for m in b.shared)

        def hook(module, args):
            x = args[0].detach()
            full = _zeros(total)
            full[offset : offset + x.shape[-1]] = x.abs().reshape(-1, x.shape[-1]).sum(0).double().cpu()
            self._acc("shared", i, full, torch.tensor(float(x.numel() // x.shape[-1])) / len(b.shared))

        return hook

    def _o_proj_hook(self, i: int):
        def hook(module, args):
            x = args[0].detach()
            per_group = x.abs().reshape(-1, self.kv, x.shape[-1] // self.kv).mean(-1).sum(0)
            self._acc("kv_groups", i, per_group, torch.tensor(float(x.numel() // x.shape[-1])))

        return hook

    # ---- scores, once the data passes are over --------------------------------------------
    def reduce(self) -> None:
        """Add up the partial sums of every process (nothing to do in one process)."""
        sums = [store[i] for kind in KINDS for store in (self.signed[kind], self.stat_sum[kind]) for i in sorted(store)]
        reduce_sums(sums + [self.stat_count[key] for key in sorted(self.stat_count)])

    def taylor_scores(self, kind: str, absolute: bool = True) -> dict[int, torch.Tensor]:
        return {i: t.abs() if absolute else t.clone() for i, t in self.signed[kind].items()}

    def mean_statistics(self, kind: str) -> dict[int, torch.Tensor]:
        return {i: t / self.stat_count[(kind, i)] for i, t in self.stat_sum[kind].items()}

    def magnitude_scores(self, kinds: frozenset[str]) -> dict[str, dict[int, torch.Tensor]]:
        """L1 norm of each structure's weights, for ``kinds`` (no data needed)."""
        out: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in kinds}
        with torch.no_grad():
            for b in self.blocks:
                if "neurons" in kinds:
                    out["neurons"][b.layer_idx] = self._neuron_magnitude(b)
                if "shared" in kinds and b.shared:
                    out["shared"][b.layer_idx] = torch.cat([self._shared_magnitude(m) for m in b.shared]).double().cpu()
            if "kv_groups" in kinds:
                for i, layer in enumerate(self.layers):
                    out["kv_groups"][i] = self._kv_magnitude(self.adapter.attention(layer))
        reduce_sums([t for kind in KINDS if kind in out for t in out[kind].values()])
        return out

    def _neuron_magnitude(self, b: MoEBlock) -> torch.Tensor:
        E, I = b.experts.gate_up_proj.shape[0], b.experts.gate_up_proj.shape[1] // 2
        gu, start = owned_rows(b.experts.gate_up_proj.detach())
        gu, dn = gu.abs(), owned_rows(b.experts.down_proj.detach())[0].abs()
        out = _zeros(E, I)
        out[start : start + gu.shape[0]] = (gu[:, :I].sum(-1) + gu[:, I:].sum(-1) + dn.sum(1)).double().cpu()
        return out

    @staticmethod
    def _shared_magnitude(m: nn.Module) -> torch.Tensor:
        """One shared expert's neurons (float32, as the weights): gate and up rows held here,
        plus down's columns summed over the rows held here."""
        (gate, start), (up, _) = owned_rows(m.gate_proj.weight.detach()), owned_rows(m.up_proj.weight.detach())
        out = owned_rows(m.down_proj.weight.detach())[0].abs().sum(0).cpu()  # each on the CPU: under a
        out[start : start + gate.shape[0]] += gate.abs().sum(1).cpu() + up.abs().sum(1).cpu()  # device_map they may differ
        return out

    def _kv_magnitude(self, attn: nn.Module) -> torch.Tensor:
        kv, s = self.kv, 0
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            for p in proj.parameters():
                local, start = owned_rows(p.detach())
                s = s + group_sums(local.abs(), start, p.shape[0], kv).double().cpu()
        return s + owned_rows(attn.o_proj.weight.detach())[0].abs().sum(0).reshape(kv, -1).sum(1).double().cpu()

    def random_scores(self, kind: str, generator: torch.Generator) -> dict[int, torch.Tensor]:
        return {i: torch.rand(shape, generator=generator, dtype=torch.float64) for i, shape in self._shapes(kind).items()}

    def _shapes(self, kind: str) -> dict[int, tuple[int, ...]]:
        """The shape of ``kind``'s scores in every layer that has such structures."""
        if kind == "kv_groups":
            return {i: (self.kv,) for i in range(len(self.layers))}
        out = {}
        for b in self.blocks:
            E, I2 = b.experts.gate_up_proj.shape[:2]
            if kind == "neurons":
                out[b.layer_idx] = (E, I2 // 2)
            elif kind == "experts":
                out[b.layer_idx] = (E,)
            elif kind == "shared" and b.shared:
                out[b.layer_idx] = (sum(m.gate_proj.weight.shape[0] for m in b.shared),)
        return out
