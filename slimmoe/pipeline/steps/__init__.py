"""The pipeline's steps as library calls from paths to paths (no Prefect, no MLflow).

Each step reads its inputs from folders/files, writes its output atomically, and returns
a small typed record (``refs``) with the output path and a content fingerprint. The Prefect tasks
in ``tasks/`` wrap exactly one of these each; ``bench/pipeline.py`` calls them directly.
One module per step, so what a step's code reaches (its cache key) is what it imports.
"""

from slimmoe.pipeline.steps.data import load_prepared, prepare_data
from slimmoe.pipeline.steps.distill import INPUTS_FILE, distill_stage
from slimmoe.pipeline.steps.evaluate import evaluate_stage
from slimmoe.pipeline.steps.quantize import quantize_engine, quantize_stage
from slimmoe.pipeline.steps.refs import (
    DistilledModel,
    ImportanceRef,
    ModelRef,
    QuantizedModel,
    QuantizeEngine,
    SlimmedModel,
    StepRecord,
    TokenBlocks,
    folder_fingerprint,
)
from slimmoe.pipeline.steps.score import score
from slimmoe.pipeline.steps.slim import slim

__all__ = ["INPUTS_FILE", "DistilledModel", "ImportanceRef", "ModelRef", "QuantizeEngine", "QuantizedModel",
           "SlimmedModel", "StepRecord", "TokenBlocks", "distill_stage", "evaluate_stage", "folder_fingerprint",
           "load_prepared", "prepare_data", "quantize_engine", "quantize_stage", "score", "slim"]
