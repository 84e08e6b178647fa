"""The from-scratch baseline: a randomly initialised model of a given checkpoint's shape.

The ablation trains it on the same tokens as the compressed arms (LM loss, no teacher),
to answer "does compressing beat training a model of the target size from scratch?".
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from slimmoe.io.atomic import replace_folder
from slimmoe.io.loading import load_config, load_tokenizer, save_tokenizer
from slimmoe.pipeline.steps.refs import ModelRef


def init_scratch(shape_dir: str | Path, out_dir: str | Path, seed: int) -> ModelRef:
    """Save a model with ``shape_dir``'s config (and tokenizer) and fresh weights from
    transformers' own initialisation under ``torch.manual_seed(seed)``; atomic (a failed
    save leaves ``out_dir`` as it was)."""
    config = load_config(str(shape_dir), "shape")
    config.architectures = None  # from_config writes its own
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tokenizer = load_tokenizer(str(shape_dir))
    with replace_folder(Path(out_dir)) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return ModelRef.of(out_dir)
