"""Scale-out benchmark: FSDP2 vs DDP distillation at 2 processes, measured side by side in one run.

For a phimoe student of a few hundred MB (fp32), trained with ``loss: lm`` so that only the
student's state is compared, each variant runs under torchrun in fresh processes (gloo on
CPU, nccl on GPU) and every rank reports:

(a) the training state it holds: parameters + gradients + AdamW moments, bytes of its local
    tensors (its shards under FSDP, a full replica under DDP);
(b) peak memory while training: CPU peak RSS (VmHWM, reset once the trainer is set up, so it
    excludes loading the model), also less the RSS of the bare interpreter with torch and
    transformers imported (the same in both); CUDA ``max_memory_allocated``. And the set-up
    peak (every rank loads the whole model before sharding it). glibc's dynamic mmap
    threshold would keep freed buffers in the heap and inflate RSS (for both variants), so
    the workers run with ``MALLOC_MMAP_THRESHOLD_=131072``;
(c) step time: the fastest optimizer step after the first (a shared machine slows some steps).

Variants alternate (fsdp, ddp, fsdp, ddp, ...) for ``--rounds`` rounds; memory is the same
every round, step time takes the best round. gloo on CPU is not a speed test.

    .venv/bin/python bench/scale.py [--rounds 2] [--steps 5] [--hidden 512] [--layers 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_student(path: Path, args) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "phimoe", hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=args.vocab, max_position_embeddings=args.seq,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _status_kib("VmHWM") * 1024


def worker(args) -> None:
    """One rank of one variant (under torchrun): set up the trainer, train, report as JSON."""
    from slimmoe.config import DistillConfig
    from slimmoe.distill.loop import Trainer
    from slimmoe.distill.student import local
    from slimmoe.io.data import random_blocks

    torch.set_num_threads(1)
    import transformers  # noqa: F401 - part of the baseline

    baseline = 0 if torch.cuda.is_available() else _status_kib("VmRSS") * 1024
    blocks = random_blocks(args.vocab, 64, args.seq, seed=0)
    cfg = DistillConfig(tokens=args.steps * args.batch * args.seq, batch_size=args.batch, micro_batch_size=1,
                        loss="lm", sharding=args.sharding, progress=False, max_grad_norm=1.0)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(args.student, None, Path(out), blocks, None, cfg, None)
        setup_peak = _peak_bytes()
        _reset_peak()
        times = []
        for _ in range(trainer.geo.total_steps):
            t0 = time.perf_counter()
            trainer.train_step()
            trainer.step += 1
            times.append(time.perf_counter() - t0)
        train_peak = _peak_bytes()
        params = [local(p) for p in trainer.student.model.parameters()]
        opt_state = [local(v) for s in trainer.opt.state.values() for v in s.values() if torch.is_tensor(v)]
        state = 2 * sum(p.numel() * p.element_size() for p in params) + sum(
            v.numel() * v.element_size() for v in opt_state)
    report = {"rank": trainer.rt.rank, "sharding": trainer.rt.sharding, "state": state, "train_peak": train_peak,
              "setup_peak": setup_peak, "baseline": baseline, "step": min(times[1:]) if len(times) > 1 else times[0]}
    Path(f"{args.report}.{trainer.rt.rank}").write_text(json.dumps(report))


def run_variant(sharding: str, student: Path, tmp: Path, args) -> list[dict]:
    report = tmp / f"report-{sharding}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           str(Path(__file__).resolve()), "--worker", "--sharding", sharding, "--student", str(student),
           "--report", str(report), *(f"--{k}={getattr(args, k)}" for k in ("steps", "batch", "seq", "vocab"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "131072"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{sharding} run failed:\n{r.stderr[-3000:]}")
    return [json.loads(Path(f"{report}.{rank}").read_text()) for rank in range(args.nproc)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sharding", default="fsdp", help=argparse.SUPPRESS)
    p.add_argument("--student", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4, help="global sequences per step (micro-batch 1 per rank)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=640)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=16000)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        n = build_student(tmp / "student", args)
        print(f"student: phimoe hidden {args.hidden}, {args.layers} layers, 8 experts x {args.intermediate}, "
              f"vocab {args.vocab}: {n / 1e6:.1f}M parameters, {n * 4 / 2**20:.0f} MiB fp32; {args.nproc} processes, "
              f"batch {args.batch} x {args.seq}, {'cuda' if torch.cuda.is_available() else 'cpu (gloo)'}")
        results: dict[str, list[list[dict]]] = {"fsdp": [], "ddp": []}
        for _ in range(args.rounds):
            for sharding in ("fsdp", "ddp"):
                results[sharding].append(run_variant(sharding, tmp / "student", tmp, args))
    summarize(results)


def summarize(results: dict[str, list[list[dict]]]) -> None:
    mib = 2**20
    keys = ("state", "train_peak", "setup_peak", "above_baseline")
    for runs in results.values():
        for rnd in runs:
            for r in rnd:
                r["above_baseline"] = r["train_peak"] - r["baseline"]
    worst = {s: {k: max(r[k] for rnd in runs for r in rnd) for k in keys} for s, runs in results.items()}
    best_step = {s: min(max(r["step"] for r in rnd) for rnd in runs) for s, runs in results.items()}
    f, d = worst["fsdp"], worst["ddp"]
    print(f"{'per rank (largest rank)':<46}{'fsdp':>12}{'ddp':>12}{'fsdp/ddp':>10}")
    rows = [("(a) training state: params+grads+AdamW, MiB", f["state"] / mib, d["state"] / mib),
            ("(b) peak memory while training, MiB", f["train_peak"] / mib, d["train_peak"] / mib),
            ("    the same, above the bare interpreter, MiB", f["above_baseline"] / mib, d["above_baseline"] / mib),
            ("    peak memory in set-up (full load), MiB", f["setup_peak"] / mib, d["setup_peak"] / mib),
            ("(c) step time (fastest after the first), s", best_step["fsdp"], best_step["ddp"])]
    for name, a, b in rows:
        print(f"{name:<46}{a:>12.2f}{b:>12.2f}{a / b:>10.3f}")
    print("target (a) <= 0.6:", "met" if f["state"] / d["state"] <= 0.6 else "NOT met")


if __name__ == "__main__":
    main()
