"""Distillation benchmarks, measured side by side in one run (CPU or CUDA).

(a) tokens/s of our training step (slimmoe.distill.distill) over a minimal hand-written
    PyTorch KD step on the same model, batch, loss and experts implementation;
(b) peak memory of the chunked top-k KD loss (forward + backward) over a dense
    full-vocabulary KL at vocab 32064, seq 1024, batch 4 -- each variant in a fresh
    subprocess; CUDA: torch.cuda.max_memory_allocated, CPU: peak RSS (VmHWM, reset
    after the inputs are built) minus RSS after the inputs;
(c) step time with the teacher top-k cache over step time with a live teacher;
(d) tokens/s of each transformers experts implementation (eager, batched_mm, grouped_mm).

    .venv/bin/python bench/distill.py [--steps 12] [--batch 4] [--seq 128] [--skip-memory]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimmoe import losses  # noqa: E402
from slimmoe.distill import distill  # noqa: E402
from slimmoe.distill.setup import FASTEST_EXPERTS, lr_lambda, set_experts_implementation  # noqa: E402

IMPLS = ("eager", "batched_mm", "grouped_mm")
# Step time = the FASTEST step after warm-up (min, not mean): on a machine shared with other
# jobs, slow steps measure the neighbours, the fastest one measures the code. Wall clock by
# default; --clock cpu uses process CPU time / threads instead.
CLOCK = time.perf_counter


def build(seed: int, intermediate: int, vocab: int):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "phimoe", hidden_size=256, intermediate_size=intermediate, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=vocab,
        max_position_embeddings=1024, attn_implementation="sdpa",
    )
    return AutoModelForCausalLM.from_config(cfg)


def our_step_times(student, teacher, blocks, args, impl: str, cache_dir=None, between=None) -> list[float]:
    """Seconds per optimizer step of slimmoe.distill (first step dropped as warm-up).

    ``between()`` runs inside the metrics callback after each step (its time excluded): used
    to interleave a minimal step with every one of ours, so load from other jobs on a shared
    machine hits both alike.
    """
    times: list[float] = []
    last = [None]

    def cb(step, metrics):
        if "loss" not in metrics:
            return
        now = CLOCK()
        if last[0] is not None:
            times.append(now - last[0])
        if between is not None:
            between()
        last[0] = CLOCK()

    with tempfile.TemporaryDirectory() as out:
        distill(student, teacher, out, blocks, tokens=args.steps * args.batch * args.seq, batch_size=args.batch,
                experts_implementation=impl, progress=False, metrics_callback=cb, teacher_cache_dir=cache_dir,
                chunk_size=args.chunk)
    return times


class MinimalKD:
    """The same KD step written plainly: no chunking, no accelerate, no logging."""

    def __init__(self, student, teacher, blocks, args, impl: str):
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.student, self.teacher, self.blocks, self.args, self.impl = student, teacher, blocks, args, impl
        student.to(self.dev).train()
        teacher.to(self.dev).eval()
        self.opt = torch.optim.AdamW(student.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(1000, 0.05, 0.1))
        self.gen = torch.Generator().manual_seed(0)
        self.times: list[float] = []

    def step(self) -> None:
        set_experts_implementation(self.student, self.impl, self.dev.type)
        set_experts_implementation(self.teacher, self.impl, self.dev.type)
        cuda = self.dev.type == "cuda"
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        t0 = CLOCK()
        ids = self.blocks[torch.randint(0, self.blocks.shape[0], (self.args.batch,), generator=self.gen)].to(self.dev)
        with torch.no_grad():
            t_lp, t_idx = torch.log_softmax(self.teacher(input_ids=ids).logits.float(), -1).topk(8, dim=-1)
        with amp:
            logits = self.student(input_ids=ids).logits
        s_lp = torch.log_softmax(logits[:, :-1].float(), -1)
        t_lp, t_idx = t_lp[:, :-1], t_idx[:, :-1]
        q_lp = s_lp.gather(-1, t_idx)
        p = t_lp.exp()
        p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
        q_rest = (1 - q_lp.exp().sum(-1)).clamp_min(1e-12)
        loss = ((p * (t_lp - q_lp)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        self.times.append(CLOCK() - t0)


def memory_child(variant: str, vocab: int, seq: int, batch: int, chunk: int) -> None:
    """Run one loss variant (forward + backward) and print the extra peak memory in bytes."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=dev).manual_seed(0)
    student = torch.randn(batch, seq, vocab, device=dev, generator=g).requires_grad_(True)
    if variant == "dense_kl":
        teacher = torch.randn(batch, seq, vocab, device=dev, generator=g)
    else:
        t_lp = torch.log_softmax(torch.randn(batch, seq, 8, device=dev, generator=g), -1) - 1.0
        t_idx = torch.randint(0, vocab, (batch, seq, 8), device=dev, generator=g)
    base = _mem_reset(dev)
    if variant == "dense_kl":
        s_lp = torch.log_softmax(student, -1)
        t_lp_full = torch.log_softmax(teacher, -1)
        loss = (t_lp_full.exp() * (t_lp_full - s_lp)).sum(-1).mean()
    else:
        loss = losses.kd_topk_loss(student, t_lp, t_idx, chunk_size=chunk)
    loss.backward()
    print(json.dumps({"peak_extra": _mem_peak(dev) - base, "input_bytes": student.numel() * 4}))


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _mem_reset(dev) -> int:
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return _rss_kb("VmRSS") * 1024


def _mem_peak(dev) -> int:
    if dev.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss_kb("VmHWM") * 1024


def measure_memory(args) -> dict[str, dict]:
    out = {}
    for variant in ("dense_kl", "chunked_kd_topk"):
        cmd = [sys.executable, __file__, "--memory-child", variant, "--mem-vocab", str(args.mem_vocab),
               "--mem-seq", str(args.mem_seq), "--mem-batch", str(args.mem_batch), "--chunk", str(args.chunk)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per timed run (first is warm-up)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved live/cache runs for (c)")
    ap.add_argument("--impl-rounds", type=int, default=5, help="round-robin steps per experts implementation")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=512, help="loss chunk (positions)")
    ap.add_argument("--mem-vocab", type=int, default=32064)
    ap.add_argument("--mem-seq", type=int, default=1024)
    ap.add_argument("--mem-batch", type=int, default=4)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--memory-child", choices=["dense_kl", "chunked_kd_topk"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.mem_vocab, args.mem_seq, args.mem_batch, args.chunk)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    global CLOCK
    if args.clock == "cpu":
        threads = torch.get_num_threads()
        CLOCK = lambda: time.process_time() / threads  # noqa: E731
    print(f"clock: {'wall' if CLOCK is time.perf_counter else 'process CPU time / threads'}")
    print(f"device: {dev} ({torch.get_num_threads()} threads); model: hidden 256, 4 layers, 8 experts, "
          f"teacher intermediate 512, student 256, vocab {args.vocab}; batch {args.batch} x {args.seq}")
    teacher, student0 = build(0, 512, args.vocab), build(1, 256, args.vocab)
    init = {k: v.clone() for k, v in student0.state_dict().items()}
    blocks = torch.randint(0, args.vocab, (64, args.seq), generator=torch.Generator().manual_seed(0))
    tok = args.batch * args.seq

    def fresh():
        student0.load_state_dict(init)
        return student0

    # (d) experts implementations: minimal KD steps, round-robin over implementations
    per_impl: dict[str, object] = {}
    runners = {impl: MinimalKD(copy.deepcopy(student0), teacher, blocks, args, impl) for impl in IMPLS}
    for r in range(args.impl_rounds):
        for impl, runner in runners.items():
            if impl == "batched_mm" and dev == "cpu" and r >= 2:
                continue  # ~15-25 s per step on 2 CPU cores; two tries are enough to rank it
            try:
                runner.step()
            except Exception as e:  # noqa: BLE001 - report what does not run here
                per_impl[impl] = f"failed: {type(e).__name__}: {e}"
    for impl, runner in runners.items():
        if impl not in per_impl:
            per_impl[impl] = tok / min(runner.times[1:] or runner.times)
    set_experts_implementation(teacher, "eager", dev)
    fastest = max((k for k, v in per_impl.items() if isinstance(v, float)), key=lambda k: per_impl[k])
    # (a) ours vs minimal, interleaved step by step (the minimal step runs in our callback)
    minimal_kd = MinimalKD(copy.deepcopy(student0), teacher, blocks, args, fastest)
    ours_t = our_step_times(fresh(), teacher, blocks, args, fastest, between=minimal_kd.step)
    ours, minimal = tok / min(ours_t), tok / min(minimal_kd.times[1:])
    ratio_a = ours / minimal
    # (c) cache vs live teacher, interleaved run by run (cache built once beforehand)
    live_t, cache_t = [], []
    with tempfile.TemporaryDirectory() as cache:
        our_step_times(fresh(), teacher, blocks, args, fastest, cache_dir=cache)  # builds the cache
        for _ in range(args.rounds):
            live_t += our_step_times(fresh(), teacher, blocks, args, fastest)
            cache_t += our_step_times(fresh(), teacher, blocks, args, fastest, cache_dir=cache)
    cached, live = min(cache_t), min(live_t)
    ratio_c = cached / live

    print("\n(d) experts implementation, tokens/s of a KD training step (fastest step):")
    for impl, v in per_impl.items():
        print(f"    {impl:11s} {v:,.0f}" if isinstance(v, float) else f"    {impl:11s} {v}")
    print(f"    fastest here: {fastest}  (slimmoe 'auto' picks {FASTEST_EXPERTS.get(dev, 'eager')} on {dev})")
    print(f"(a) ours {ours:,.0f} tok/s / minimal hand-written KD step {minimal:,.0f} tok/s = "
          f"{ratio_a:.3f}  (fastest of {len(ours_t)} steps each, interleaved step by step; target >= 0.95)")
    print(f"(c) step time with teacher cache {cached * 1e3:.1f} ms / live teacher {live * 1e3:.1f} ms = "
          f"{ratio_c:.3f}  (cache built beforehand by a separate run)")
    if not args.skip_memory:
        mem = measure_memory(args)
        d, c = mem["dense_kl"]["peak_extra"], mem["chunked_kd_topk"]["peak_extra"]
        mib = 1 << 20
        print(f"(b) loss fwd+bwd extra peak memory at vocab {args.mem_vocab}, seq {args.mem_seq}, batch "
              f"{args.mem_batch} (student logits alone {mem['dense_kl']['input_bytes'] / mib:,.0f} MiB; "
              f"chunk {args.chunk}): chunked kd_topk {c / mib:,.0f} MiB / dense full-vocab KL {d / mib:,.0f} MiB "
              f"= {c / d:.3f}  (target <= 0.35)")


if __name__ == "__main__":
    main()
