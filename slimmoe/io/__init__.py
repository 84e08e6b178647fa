"""Reading and writing: checkpoints (safely), token data, the tokenizer, folder locks,
atomic file writes."""

from slimmoe.io.atomic import COMPLETE_FILE, atomic_write_text, is_complete, mark_complete, replace_folder
from slimmoe.io.data import data_fingerprint, load_blocks, random_blocks
from slimmoe.io.loading import load_config, load_model, load_tokenizer, loading_policy
from slimmoe.io.lock import output_lock

__all__ = ["COMPLETE_FILE", "atomic_write_text", "data_fingerprint", "is_complete", "load_blocks", "load_config",
           "load_model", "load_tokenizer", "loading_policy", "mark_complete", "output_lock", "random_blocks",
           "replace_folder"]
