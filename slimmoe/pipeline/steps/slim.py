"""Step: cut a model to a stage's sizes by its importance scores."""

from __future__ import annotations

from pathlib import Path

from slimmoe.config import SaveDtype, SlimTargets
from slimmoe.io.loading import load_tokenizer
from slimmoe.pipeline.steps.refs import ModelRef, SlimmedModel
from slimmoe.prune.importance import ImportanceScores
from slimmoe.prune.stream import slim_checkpoint


def slim(model_dir: str, scores_path: str, targets: SlimTargets, out_dir: str | Path, score_info: dict | None = None,
         save_dtype: SaveDtype = "auto", max_shard_size: str = "5GB") -> SlimmedModel:
    """Apply the plan the scores imply; the tokenizer of ``model_dir`` travels along. A safetensors
    folder is slimmed streamed, layer by layer (slimmoe.prune.stream), in ``save_dtype`` (auto:
    the source's, so a bfloat16 teacher gives a bfloat16 slimmed model)."""
    done = slim_checkpoint(model_dir, ImportanceScores.load(scores_path), targets, out_dir, score_info=score_info,
                           tokenizer=load_tokenizer(model_dir), save_dtype=save_dtype, max_shard_size=max_shard_size)
    return SlimmedModel(**ModelRef.of(out_dir).model_dump(), **done["after"], target=done["plan"].target)
