"""One-shot slimming of a checkpoint: calibration data -> importance -> plan -> smaller model.

In several processes (``slimmoe prune ... --nproc-per-node N``, or torchrun), every process
loads the model and the teacher, shards both with FSDP2 (the teacher forward-only) and scores
its share of the calibration batches; the scores are reduced over the processes. Rank 0 then
builds the plan, slims and writes OUT; the others leave once the scores are known, and torchrun
ends when rank 0 has written OUT.

Slimming a safetensors folder is streamed layer by layer from disk (stream.py), so it needs
memory for one layer and one output shard, not for the model; the scored copy is released
first. One process can spread the scored model over several devices (``importance.device_map``).
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from slimmoe.arch import get_adapter
from slimmoe.config import PruneConfig
from slimmoe.errors import UserError
from slimmoe.io.data import load_blocks, random_blocks
from slimmoe.io.loading import load_config, load_tokenizer
from slimmoe.parallel import barrier, init_process_group
from slimmoe.prune.checkpoint import is_safetensors_folder
from slimmoe.prune.importance import estimate_importance, load_for_scoring, score_sharded, wanted_for
from slimmoe.prune.plan import PLAN_FILE, resolve_targets
from slimmoe.prune.stream import slim_checkpoint

log = logging.getLogger("slimmoe")
SCORES_FILE = "importance.pt"


def calibration_blocks(cfg: PruneConfig, tokenizer, vocab_size: int) -> torch.Tensor:
    """Token blocks for scoring: the text in ``cfg.data`` or, failing that, random tokens."""
    imp = cfg.importance
    if cfg.data is not None and tokenizer is not None:
        blocks, _ = load_blocks(cfg.data, tokenizer, imp.seq_len, max_blocks=imp.samples, fields=("--data", "--data"))
        if blocks.shape[0] < imp.samples:
            log.warning("data: %s holds %d blocks of %d tokens, fewer than samples=%d", cfg.data, blocks.shape[0], imp.seq_len, imp.samples)
        return blocks
    why = "no --data given" if cfg.data is None else "the checkpoint has no tokenizer"
    log.warning("calibrating on random token sequences (%s); scores from real text are better", why)
    return random_blocks(vocab_size, imp.samples, imp.seq_len, seed=imp.seed)


def check_output(out: Path, force: bool) -> None:
    """Refuse to replace a folder that is not an earlier slimmoe output, unless forced."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / PLAN_FILE).exists() and not force)):
        raise UserError(f"OUT: {out} exists and is not an earlier slimmoe output; pass --force to replace it")


def prune(model_path: str, out: str | Path, cfg: PruneConfig, teacher_path: str | None = None,
          force: bool = False, progress: bool = True) -> dict:
    """Score ``model_path`` and save the slimmed checkpoint plus ``slim_plan.json`` in ``out``.

    Everything is validated (paths, targets, architecture) before any weight is loaded, and
    ``out`` is only replaced once the new checkpoint is fully written.
    """
    out = Path(out)
    check_output(out, force)
    config = load_config(model_path)
    adapter = get_adapter(config)
    resolve_targets(adapter, config, cfg.targets)  # bad targets fail before any weight is loaded
    if cfg.importance.loss != "lm" and cfg.importance.topk > config.vocab_size:
        raise UserError(f"--topk: {cfg.importance.topk} is larger than MODEL's vocabulary ({config.vocab_size} tokens)")
    joined_here = not (dist.is_available() and dist.is_initialized())
    topo = init_process_group()  # one process: nothing to join
    model = load_for_scoring(model_path, "MODEL", cfg.importance, topo.distributed)
    teacher = load_for_scoring(teacher_path, "TEACHER", cfg.importance, topo.distributed) if teacher_path else None
    tokenizer = load_tokenizer(model_path)
    blocks = calibration_blocks(cfg, tokenizer, config.vocab_size)
    want = wanted_for(adapter, config, cfg.targets)  # score only what the plan cuts
    if not topo.distributed:
        scores = estimate_importance(model, blocks, cfg.importance, teacher=teacher, want=want, progress=progress)
    else:
        scores = score_sharded(model, teacher, blocks, cfg.importance, want, topo, progress)
        del model, teacher
        _leave_processes(joined_here)
        if not topo.is_main:
            return {"output": str(out), "rank": topo.rank}
        model = None  # rank 0 slims (a safetensors folder streamed; anything else read again)
    if model is not None and (is_safetensors_folder(model_path) or cfg.importance.device_map is not None):
        model = None  # streamed from disk, or read again in one place: the scored copy goes first
    teacher = None
    gc.collect()  # the scored copies are gone before the slimming reads anything
    done = slim_checkpoint(model_path, scores, cfg.targets, out, score_info=cfg.importance.model_dump(),
                           tokenizer=tokenizer, extra={SCORES_FILE: scores.save}, save_dtype=cfg.save_dtype,
                           max_shard_size=cfg.max_shard_size, model=model)
    plan = done["plan"]
    return {
        "output": str(out),
        "source": plan.source,
        "target": plan.target,
        "params_before": done["before"],
        "params_after": done["after"],
        "calibration_tokens": int(blocks.numel()),
    }


def _leave_processes(joined_here: bool) -> None:
    """Scoring was the last collective: no process waits in one while rank 0 writes OUT (a long
    write cannot time a collective out). The group is closed if this call opened it."""
    barrier()
    if joined_here:
        dist.destroy_process_group()
