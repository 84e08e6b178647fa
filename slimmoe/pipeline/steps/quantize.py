"""Step: a compressed-tensors checkpoint of a stage's final model (a stage's ``quantize:``),
made by llm-compressor in its own environment (:mod:`slimmoe.quantize`)."""

from __future__ import annotations

from pathlib import Path

from slimmoe.pipeline.steps.refs import ModelRef, QuantizedModel, QuantizeEngine
from slimmoe.quantize import QuantizeConfig, engine_identity, find_python, quantize_model


def quantize_engine(cfg: QuantizeConfig) -> QuantizeEngine:
    """llm-compressor's interpreter for ``cfg`` and what of it decides the result; a one-line
    ``UserError`` when there is none or it lacks llmcompressor."""
    python = find_python(cfg)
    return QuantizeEngine(python=str(python), **engine_identity(python))


def quantize_stage(model_dir: str | Path, out_dir: str | Path, cfg: QuantizeConfig,
                   python: str | Path | None = None) -> QuantizedModel:
    """Quantize ``model_dir`` into ``out_dir`` (written whole or not at all) as ``slimmoe quantize``
    does; ``python`` (llm-compressor's interpreter) overrides ``cfg.python``."""
    if python is not None:
        cfg = cfg.model_copy(update={"python": Path(python)})
    report = quantize_model(model_dir, out_dir, cfg)
    return QuantizedModel(**ModelRef.of(out_dir).model_dump(), scheme=cfg.scheme, report=report)
