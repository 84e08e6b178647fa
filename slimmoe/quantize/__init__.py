"""Optional quantization of a compressed model for serving: llm-compressor's data-free
schemes (FP8_DYNAMIC, W4A16, W8A8), run in llm-compressor's own environment, written as a
compressed-tensors checkpoint that vLLM serves and transformers loads
(``slimmoe quantize MODEL OUT --scheme ...``)."""

from slimmoe.quantize.checkpoint import dequantize_checkpoint, describe_checkpoint, load_evaluable
from slimmoe.quantize.config import DEFAULT_IGNORE, INSTALL_SCRIPT, PYTHON_ENV, SCHEMES, QuantizeConfig, resolve_python
from slimmoe.quantize.runner import check_shapes, engine_identity, find_python, quantize_model

__all__ = ["DEFAULT_IGNORE", "INSTALL_SCRIPT", "PYTHON_ENV", "SCHEMES", "QuantizeConfig", "check_shapes",
           "dequantize_checkpoint", "describe_checkpoint", "engine_identity", "find_python", "load_evaluable", "quantize_model",
           "resolve_python"]
