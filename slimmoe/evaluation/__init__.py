"""Measuring a model: parameter counts, held-out quality, speed and memory, lm-eval tasks."""

from slimmoe.evaluation.harness import run_lm_eval
from slimmoe.evaluation.params import parameter_counts
from slimmoe.evaluation.quality import kl_to_teacher, perplexity
from slimmoe.evaluation.speed import PeakMemory, generation_throughput, resident_bytes, tokens_per_second
from slimmoe.evaluation.summary import evaluate

__all__ = ["PeakMemory", "evaluate", "generation_throughput", "kl_to_teacher", "parameter_counts", "perplexity",
           "resident_bytes", "run_lm_eval", "tokens_per_second"]
