"""slimmoe: compress MoE language models by expert slimming and staged distillation."""

__version__ = "0.1.0"
