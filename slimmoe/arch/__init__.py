"""Architecture adapters, found through a registry keyed by ``config.model_type``."""

# Importing the family modules registers them.
from slimmoe.arch import deepseek_v3, granitemoe, mixtral, olmoe, phimoe, qwen_moe  # noqa: E402,F401
from slimmoe.arch.base import MoEAdapter, MoEBlock, get_adapter, register, supported_model_types

__all__ = ["MoEAdapter", "MoEBlock", "get_adapter", "register", "supported_model_types"]
