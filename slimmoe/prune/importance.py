"""Importance of every expert neuron, shared-expert neuron, KV group and whole expert.

The paper's score (``taylor``) is the first-order sensitivity of a loss to removing a
structure S: |sum over w in S of w * dL/dw|. The signed sums are accumulated over the
calibration batches (so the result is the sensitivity of the summed loss) and the
absolute value is taken at the end.

``estimate_importance`` first decides which passes run (``plan_passes``, passes.py: a
gradient pass, a forward-only pass or none, and which hooks), then runs them with a
``Scorer`` (scorer.py: the hooks, and the sums they fold every gradient and activation into).

Several processes: on a model sharded with FSDP2 (``slimmoe.parallel.shard_decoder_layers``),
or replicated, in a process group of N, call ``estimate_importance`` in every process. The
calibration batches are dealt out over the processes (batch j to rank j mod N), FSDP's gradient
reduce-scatter is made a plain sum, each process folds the rows it holds, and the partial sums
are all-reduced at the end: every process returns the scores one process would have computed.

One process, several devices (``importance.device_map``, e.g. ``auto``): the model is placed by
``from_pretrained(device_map=...)`` (accelerate's hooks move activations between devices); the
hooks fold every partial sum into float64 tensors on the CPU, wherever the weights are.

Baselines: ``magnitude`` (L1 norm of the structure's weights), ``activation`` (mean
|activation| of a neuron / of a KV group's attention output, Minitron-style), ``random``.
Whole experts: ``taylor`` (over the expert's gate/up/down weights; the router row is not
part of the structure), ``frequency`` (routing counts, SEER-MoE), ``reap`` (mean router
weight x expert output norm over the tokens routed to it), ``random``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from slimmoe import losses
from slimmoe.arch import get_adapter
from slimmoe.config import ImportanceConfig, parse_device_map
from slimmoe.errors import UserError
from slimmoe.io.atomic import atomic_torch_save
from slimmoe.parallel import Topology, device_mesh, shard_decoder_layers
from slimmoe.prune.passes import KINDS, ScoringPasses, Wanted, plan_passes, wanted_for
from slimmoe.prune.scorer import Scorer
from slimmoe.prune.shards import rank_batches, summed_gradients
from slimmoe.resources import oom_hint

__all__ = ["ImportanceScores", "Wanted", "calibration_loss", "estimate_importance", "load_for_scoring", "score_sharded",
           "scoring_placement", "wanted_for"]


@dataclass
class ImportanceScores:
    """Scores per layer index; higher means more important. Float64 tensors on the CPU."""

    neurons: dict[int, torch.Tensor] = field(default_factory=dict)  # [E, I] per MoE layer
    shared: dict[int, torch.Tensor] = field(default_factory=dict)  # [S] per MoE layer with shared experts
    kv_groups: dict[int, torch.Tensor] = field(default_factory=dict)  # [KV] per layer
    experts: dict[int, torch.Tensor] = field(default_factory=dict)  # [E] per MoE layer
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        flat = {f"{kind}.{i}": t for kind in KINDS for i, t in getattr(self, kind).items()}
        atomic_torch_save({"scores": flat, "meta": self.meta}, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> "ImportanceScores":
        blob = torch.load(path, weights_only=True)
        out = cls(meta=blob["meta"])
        for key, t in blob["scores"].items():
            kind, i = key.rsplit(".", 1)
            getattr(out, kind)[int(i)] = t
        return out


def calibration_loss(model: nn.Module, ids: torch.Tensor, cfg: ImportanceConfig, teacher: nn.Module | None) -> torch.Tensor:
    """The loss whose sensitivity is scored. With no teacher, the model is its own teacher."""
    logits = model(input_ids=ids).logits
    if cfg.loss == "lm":
        return losses.lm_loss(logits[:, :-1], ids[:, 1:])
    with torch.no_grad():
        t_logits = logits.detach() if teacher is None else teacher(input_ids=ids.to(teacher.device)).logits.to(logits.device)
        t_lp, t_idx = losses.teacher_topk(t_logits, k=cfg.topk, temperature=cfg.temperature)
    fn = losses.kd_topk_renorm_loss if cfg.loss == "kd_topk_renorm" else losses.kd_topk_loss
    return fn(logits, t_lp, t_idx, temperature=cfg.temperature)


def estimate_importance(
    model: nn.Module,
    blocks: torch.Tensor,
    cfg: ImportanceConfig,
    teacher: nn.Module | None = None,
    want: Wanted | None = None,
    progress: bool = True,
    absolute: bool = True,
) -> ImportanceScores:
    """Score ``model`` on calibration token blocks [N, T] (the first ``cfg.samples`` are used).

    ``want`` limits the work to the structure kinds a plan will actually cut.
    ``absolute=False`` returns taylor scores signed (sum of w * dL/dw), for checking.
    """
    adapter = get_adapter(model.config)
    _refuse_loss_without_gradient(cfg, teacher)
    blocks = blocks[: cfg.samples]
    if blocks.shape[0] == 0:
        raise UserError("importance.samples: no calibration samples")
    passes = plan_passes(cfg, want or Wanted(), adapter)
    scorer = Scorer(model, adapter)
    with _scoring_mode(model), scorer.hooked(passes):
        if passes.data_pass:
            _run_calibration(model, blocks, cfg, teacher, scorer, passes.gradient_pass, progress)
    scorer.reduce()  # the partial sums of every process added (nothing to do in one process)
    return _finish(scorer, passes, cfg, absolute)


def _refuse_loss_without_gradient(cfg: ImportanceConfig, teacher: nn.Module | None) -> None:
    """A taylor score from a loss whose gradient is zero would be all zeros, silently."""
    if cfg.loss == "kd_topk" and teacher is None and (cfg.score == "taylor" or cfg.expert_score == "taylor"):
        raise UserError(
            "importance.loss: kd_topk (residual bucket) has zero gradient when the model is its own teacher; "
            "use kd_topk_renorm or lm"
        )


@contextmanager
def _scoring_mode(model: nn.Module):
    """Eval mode, no parameter requiring a gradient (the taylor hooks ask for the scored ones)
    and no gradient left over; each parameter's requires_grad and the mode restored after."""
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None  # a stale gradient would be folded into the scores
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)


def _run_calibration(model: nn.Module, blocks: torch.Tensor, cfg: ImportanceConfig, teacher: nn.Module | None,
                     scorer: Scorer, gradient: bool, progress: bool) -> None:
    """This process's calibration batches through the model (and the loss backward when
    ``gradient``); the hooks score. A batch that does not count (shards.rank_batches) only
    keeps the processes in step: its loss is zeroed and its statistics are not kept."""
    device = model.get_input_embeddings().weight.device  # spread over devices: where the first layer is
    with oom_hint("importance", {"batch_size": cfg.batch_size, "seq_len": blocks.shape[1]}), summed_gradients(model):
        for ids, counts in tqdm(rank_batches(blocks, cfg.batch_size), desc="importance", unit="batch", disable=not progress):
            ids, scorer.counting = ids.to(device), counts
            if gradient:
                loss = calibration_loss(model, ids, cfg, teacher)
                (loss if counts else loss * 0).backward()
            else:
                with torch.no_grad():
                    model(input_ids=ids)
    scorer.counting = True


def _finish(scorer: Scorer, passes: ScoringPasses, cfg: ImportanceConfig, absolute: bool) -> ImportanceScores:
    out = ImportanceScores(meta={"score": cfg.score, "expert_score": cfg.expert_score, "loss": cfg.loss, "samples": cfg.samples})
    for kind, per_layer in scorer.magnitude_scores(passes.magnitude).items():
        setattr(out, kind, per_layer)
    gen = torch.Generator().manual_seed(cfg.seed)
    for kind in KINDS:  # in this order: the random scores share one generator
        if kind in passes.taylor:
            setattr(out, kind, scorer.taylor_scores(kind, absolute))
        elif kind in passes.forward_statistics:
            setattr(out, kind, scorer.mean_statistics(kind))
        elif kind in passes.random:
            setattr(out, kind, scorer.random_scores(kind, gen))
    return out


def score_sharded(model, teacher, blocks: torch.Tensor, cfg: ImportanceConfig, want, topo: Topology,
                  progress: bool = True):
    """Scores of ``model`` sharded over every process with FSDP2 (and the teacher too, forward-only:
    each layer's weights are gathered for its forward and freed after), from this process's
    share of the calibration batches; every process gets the scores of all of them."""
    mesh = device_mesh(topo)
    shard_decoder_layers(model, mesh)
    if teacher is not None:
        shard_decoder_layers(teacher.requires_grad_(False), mesh)
    return estimate_importance(model, blocks, cfg, teacher=teacher, want=want,
                               progress=progress and topo.is_main)


def scoring_placement(cfg: ImportanceConfig, distributed: bool) -> dict:
    """``from_pretrained`` keywords placing the scored model (``importance.device_map``); with
    several processes each one holds its FSDP shard instead."""
    if cfg.device_map is None:
        return {}
    if distributed:
        raise UserError("importance.device_map: not with several processes (each process holds its FSDP shard)")
    return {"device_map": parse_device_map(cfg.device_map)}


def load_for_scoring(path, field: str, cfg: ImportanceConfig, distributed: bool) -> nn.Module:
    """The model at ``path`` placed as ``importance.device_map`` says, refused if any weight was
    offloaded: next to GPUs, accelerate keeps the modules mapped to ``cpu`` on the meta device and
    moves their weights to a GPU for each forward (``accelerate.dispatch_model``: ``offload``), so
    they never hold a gradient to score."""
    from slimmoe.io.loading import load_model

    model = load_model(path, field, **scoring_placement(cfg, distributed))
    offloaded = [name for name, p in model.named_parameters() if p.is_meta]
    if offloaded:
        raise UserError(
            f"importance.device_map: {len(offloaded)} weights of {field} (the first: {offloaded[0]}) are offloaded "
            "(kept off the GPUs and moved in for each forward), so they get no gradient to score; give the whole "
            "model room on the GPUs (more GPUs, or a map that names only GPUs) or use --nproc-per-node")
    return model
