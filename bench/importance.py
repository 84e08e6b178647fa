"""Importance estimation vs a bare forward+backward of the same model and batch.

    .venv/bin/python bench/importance.py            # hidden 256, 4 layers, 8 experts, I=512
    .venv/bin/python bench/importance.py --repeats 9 --batch 8

Prints, measured side by side in one run:
  * time per batch of `estimate_importance` (taylor scores of every expert neuron, KV
    group and expert, KD loss against the model's own top-k) over a bare pass: forward,
    the same loss, backward into .grad of every parameter (target <= 1.2x);
  * peak memory of each, measured in a fresh subprocess per variant as the rise of the
    peak resident set size over the loaded model (target <= 1.1x), and as total peak RSS.
Both variants alternate in the timing loop so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from slimmoe.config import ImportanceConfig
from slimmoe.prune.importance import calibration_loss, estimate_importance


def build(args):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "phimoe", hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=args.vocab,
        max_position_embeddings=args.seq_len,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    icfg = ImportanceConfig(samples=args.batch, batch_size=args.batch, seq_len=args.seq_len, loss="kd_topk_renorm")
    return model, ids, icfg


def bare_pass(model, ids, icfg):
    for p in model.parameters():
        p.requires_grad_(True)
    calibration_loss(model, ids, icfg, teacher=None).backward()
    model.zero_grad(set_to_none=True)


def scored_pass(model, ids, icfg):
    estimate_importance(model, ids, icfg, progress=False)


VARIANTS = {"bare": bare_pass, "importance": scored_pass}


def _status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(key)


def memory_child(args) -> None:
    """Peak RSS of one pass: reset the high-water mark (Linux clear_refs 5), run, read VmHWM."""
    model, ids, icfg = build(args)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mb("VmRSS")
    VARIANTS[args.child](model, ids, icfg)
    peak = _status_mb("VmHWM")
    print(json.dumps({"rise_mb": peak - before, "peak_mb": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return memory_child(args)

    model, ids, icfg = build(args)
    print(f"model: hidden 256, 4 layers, 8 experts, intermediate 512, vocab {args.vocab}; "
          f"batch {args.batch} x {args.seq_len}; experts implementation {model.config._experts_implementation}; "
          f"threads {torch.get_num_threads()}")
    for fn in VARIANTS.values():  # warm-up
        fn(model, ids, icfg)
    times = {k: [] for k in VARIANTS}
    for _ in range(args.repeats):
        for name, fn in VARIANTS.items():
            t0 = time.perf_counter()
            fn(model, ids, icfg)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--child", name, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--vocab", str(args.vocab)]
        mem[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])

    print(f"{'':12s}{'s/batch':>10s}{'peak rise MB':>14s}{'peak RSS MB':>13s}")
    for name in VARIANTS:
        print(f"{name:12s}{med[name]:10.3f}{mem[name]['rise_mb']:14.1f}{mem[name]['peak_mb']:13.1f}")
    t_ratio = med["importance"] / med["bare"]
    m_ratio = mem["importance"]["rise_mb"] / mem["bare"]["rise_mb"]
    total_ratio = mem["importance"]["peak_mb"] / mem["bare"]["peak_mb"]
    print(f"time ratio importance/bare:        {t_ratio:.3f}  (target <= 1.2)")
    print(f"peak memory rise ratio:            {m_ratio:.3f}  (target <= 1.1)")
    print(f"total peak RSS ratio:              {total_ratio:.3f}")


if __name__ == "__main__":
    main()
