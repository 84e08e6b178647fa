"""Recipe: one-shot slimming of a small random MoE, calibrated on the bundled corpus.

    .venv/bin/python recipes/prune_tiny.py [--out outputs/prune-tiny]

Builds a phimoe-shaped model (hidden 128, 4 layers, 8 experts of width 256, 8 query heads
in 4 KV groups) with a BPE tokenizer trained on data/tinyshakespeare.txt, then runs the
real CLI: `slimmoe prune` to expert width 64, 2 KV groups and 6 experts, and `slimmoe eval`
on the original and on the slimmed model. Until the demo teacher is trained (`slimmoe
demo`), this is what `make demo` runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "tinyshakespeare.txt"


def build_model(folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimmoe.io.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(CORPUS, vocab_size=2048)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "phimoe", hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=len(tok),
        max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def slimmoe(*args: str) -> str:
    cmd = [sys.executable, "-m", "slimmoe.cli", *args]
    print("$ slimmoe " + " ".join(args), flush=True)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="outputs/prune-tiny")
    out = Path(ap.parse_args().out)
    teacher, slim = out / "random-moe", out / "slim"
    if not (teacher / "config.json").exists():
        build_model(teacher)
    slimmoe("prune", str(teacher), str(slim), "--expert-intermediate-size", "64", "--num-key-value-heads", "2",
            "--num-experts", "6", "--data", str(CORPUS), "--samples", "32", "--seq-len", "128", "--force")
    rows = {name: json.loads(slimmoe("eval", str(path), "--data", str(CORPUS), "--max-blocks", "16"))
            for name, path in (("original", teacher), ("slimmed", slim))}
    print(f"\n{'model':10s}{'total params':>14s}{'active params':>15s}{'perplexity':>12s}{'tok/s':>10s}")
    for name, r in rows.items():
        print(f"{name:10s}{r['total_params']:14,d}{r['active_params']:15,d}{r['perplexity']:12.1f}{r['tokens_per_second']:10.0f}")
    print(f"\nslimmed checkpoint: {slim}  (plan: {slim / 'slim_plan.json'})")
    print("The model is random, so perplexities are near the vocabulary size; `slimmoe demo` trains a real teacher.")


if __name__ == "__main__":
    main()
