"""Serving the result: what vLLM, SGLang and llama.cpp load, and the limits each engine's
implementation puts on a slimmed model (``slimmoe export MODEL OUT --for ENGINE``)."""

from slimmoe.export.engines import ENGINES, Engine, check_config, get_engine
from slimmoe.export.writer import GGUF_NAME, GGUF_TYPES, export_model, read_model_config

__all__ = ["ENGINES", "Engine", "GGUF_NAME", "GGUF_TYPES", "check_config", "export_model", "get_engine", "read_model_config"]
