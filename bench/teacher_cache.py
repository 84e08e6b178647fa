"""Does the compact (float16) teacher cache change distillation? Side by side, same seeds:

(a) float32 cache (format 3, bit for bit the teacher's float32 top-k), (b) float16 cache (the
default: log-probs rounded once to float16, uint16 ids), (c) no cache (live teacher), and a
control (d) "float32-mb4": the float32 cache with 2 micro-batches of 4 instead of 1 of 8, the
same arithmetic up to float summation order (~1e-7), which shows how far training amplifies a
perturbation that changes nothing. 2 seeds each by default (the seed draws the student's
slimmed neurons and the batch order). Prints per run the held-out perplexity and
full-vocabulary KL(teacher || student) of the final student; per mode the mean and the spread
(max - min over seeds); the paired difference to float32 (same seed) of every other mode next
to the seed spread; the cached values' rounding error and each cache's bytes per token.

Model: a phimoe teacher (hidden 64, 2 layers, 4 experts top-2, expert width 128, vocab 2048,
embeddings widened so its outputs are peaked, expert weights widened to std 0.05 so its experts
matter: slimming them costs ~20% perplexity); the student is the teacher slimmed to expert
width 32 (a random 32 of each expert's 128 neurons, drawn by the seed), the regime the cache
serves (a pruned student recovering close to its teacher, where rounding the targets matters
most); data: sequences sampled from the teacher (so perplexity measures imitation), 128 train
blocks and 16 held-out blocks of 64 tokens. A few minutes on 2 CPU cores.

    .venv/bin/python bench/teacher_cache.py [--seeds 0 1] [--epochs 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimmoe import losses  # noqa: E402
from slimmoe.distill import distill  # noqa: E402
from slimmoe.distill.teacher_cache import find_complete, teacher_fingerprint  # noqa: E402

VOCAB, SEQ, TRAIN, HELD, K, BATCH = 2048, 64, 128, 16, 8, 8
MODES = ("float32", "float16", "live", "float32-mb4")


def slimmed(teacher, seed: int, width: int = 32):
    """The teacher with a random ``width`` of each expert's neurons (the same set in gate, up, down)."""
    student = model(0, width)
    inter = teacher.config.intermediate_size
    gen = torch.Generator().manual_seed(1000 + seed)
    sd = {}
    for name, t in teacher.state_dict().items():
        if name.endswith("experts.gate_up_proj"):  # [E, 2I, H]: gate rows, then up rows
            keep = torch.stack([torch.randperm(inter, generator=gen)[:width].sort().values for _ in range(t.shape[0])])
            sd[name] = torch.cat([t[e, torch.cat([keep[e], keep[e] + inter])][None] for e in range(t.shape[0])])
            sd[name.replace("gate_up_proj", "down_proj")] = torch.cat(
                [teacher.state_dict()[name.replace("gate_up_proj", "down_proj")][e][:, keep[e]][None]
                 for e in range(t.shape[0])])
        elif not name.endswith("experts.down_proj"):
            sd[name] = t
    student.load_state_dict(sd)
    return student


def model(seed: int, intermediate: int, scale: float | None = None):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "phimoe", hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=VOCAB,
        max_position_embeddings=SEQ, attn_implementation="sdpa")
    m = AutoModelForCausalLM.from_config(cfg)
    if scale is not None:
        with torch.no_grad():
            m.get_input_embeddings().weight.normal_(0, scale)
            m.get_output_embeddings().weight.normal_(0, scale)
    return m


@torch.no_grad()
def sample(teacher, n: int, seed: int) -> torch.Tensor:
    """n sequences of SEQ tokens sampled from the teacher (temperature 1) after a random first token."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 1), generator=gen)
    for _ in range(SEQ - 1):
        p = torch.softmax(teacher(input_ids=ids).logits[:, -1].float(), dim=-1)
        ids = torch.cat([ids, torch.multinomial(p, 1, generator=gen)], dim=1)
    return ids


def run(mode: str, seed: int, teacher, train, held, cache_dir: Path, out: Path, args) -> dict:
    kw = dict(tokens=args.epochs * TRAIN * SEQ, batch_size=BATCH, lr=args.lr, seed=seed, progress=False,
              eval_every=10**6, keep_best=False, eval_batch_size=HELD)
    if mode != "live":
        kw.update(teacher_cache_dir=cache_dir, teacher_cache_dtype=mode.split("-")[0])
    if mode == "float32-mb4":
        kw.update(micro_batch_size=BATCH // 2)
    t0 = time.perf_counter()
    res = distill(slimmed(teacher, seed), teacher, out, train, held, **kw)
    losses_ = [json.loads(x)["loss"] for x in (out / "losses.jsonl").read_text().splitlines() if '"loss"' in x]
    return {"mode": mode, "seed": seed, "ppl": res.final_eval["held_out_ppl"], "kl": res.final_eval["held_out_kl"],
            "initial_ppl": res.initial_eval["held_out_ppl"] if res.initial_eval else None,
            "last_loss": losses_[-1], "steps": res.steps, "seconds": time.perf_counter() - t0}


def cache_stats(cache_dir: Path, teacher, train) -> dict:
    """Bytes per token of each entry, and float16's rounding error against the float32 entry."""
    key = dict(teacher_fp=teacher_fingerprint(teacher), k=K, temperature=1.0)
    out, got = {}, {}
    for dtype in ("float32", "float16"):
        c = find_complete(cache_dir, train, logprobs_dtype=dtype, **key)
        files = list(c.path.iterdir())
        data = sum(f.stat().st_size for f in files if ".logprobs." in f.name or ".indices." in f.name)
        out[dtype] = {"bytes_per_token": data / (TRAIN * SEQ),
                      "bytes_per_token_with_index_and_markers": sum(f.stat().st_size for f in files) / (TRAIN * SEQ),
                      "index": json.loads((c.path / "index.json").read_text())}
        got[dtype] = c.get(torch.arange(TRAIN))
    (lp32, i32), (lp16, i16) = got["float32"], got["float16"]
    err = (lp16 - lp32).abs()
    p32 = lp32.exp()
    out["float16_vs_float32"] = {
        "ids_equal": bool(torch.equal(i32, i16)), "max_abs_logprob_error": err.max().item(),
        "max_rel_logprob_error": (err / lp32.abs().clamp_min(1e-30)).max().item(),
        "max_abs_prob_error": (lp16.exp() - p32).abs().max().item(),
        "mean_topk_mass": p32.sum(-1).mean().item(), "min_logprob": lp32.min().item()}
    student = slimmed(teacher, 7)  # the KD loss of one fixed student against both caches
    with torch.no_grad():
        logits = student(input_ids=train[:16]).logits
    a, b = (losses.kd_topk_loss(logits, lp[:16], idx[:16]).item() for lp, idx in (got["float32"], got["float16"]))
    out["float16_vs_float32"].update(kd_loss_float32=a, kd_loss_float16=b, kd_loss_rel_diff=abs(a - b) / a)
    return out


def summarise(runs: list[dict]) -> dict:
    """Per mode and metric: mean and spread over seeds; per other mode: paired differences to float32."""
    by = {m: [r for r in runs if r["mode"] == m] for m in MODES}
    summary = {}
    for m, rs in by.items():
        for metric in ("ppl", "kl"):
            v = [r[metric] for r in rs]
            summary[f"{m}.{metric}"] = {"mean": statistics.fmean(v), "spread": max(v) - min(v)}
    for m in MODES[1:]:
        for metric in ("ppl", "kl"):
            paired = [a[metric] - b[metric] for a, b in zip(by[m], by["float32"])]
            spread = summary[f"float32.{metric}"]["spread"]
            summary[f"{m}-float32.{metric}"] = {
                "per_seed": paired, "mean_diff": statistics.fmean(paired), "float32_seed_spread": spread,
                "mean_diff_over_seed_spread": abs(statistics.fmean(paired)) / spread if spread else float("nan")}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--teacher-scale", type=float, default=0.5)
    ap.add_argument("--expert-std", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    teacher = model(0, 128, scale=args.teacher_scale).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if ".experts." in name:
                p.normal_(0, args.expert_std, generator=gen)
    data = sample(teacher, TRAIN + HELD, seed=12345)
    train, held = data[:TRAIN].contiguous(), data[TRAIN:].contiguous()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in args.seeds:  # modes interleaved per seed
            for mode in MODES:
                runs.append(run(mode, seed, teacher, train, held, tmp / "cache", tmp / f"{mode}-{seed}", args))
                r = runs[-1]
                print(f"{mode:8s} seed {seed}: held-out ppl {r['ppl']:.4f}  KL {r['kl']:.5f}  last loss "
                      f"{r['last_loss']:.5f}  ({r['steps']} steps, {r['seconds']:.1f} s)", flush=True)
        stats = cache_stats(tmp / "cache", teacher, train)
    summary = summarise(runs)
    with torch.no_grad():
        t_nll = losses.lm_loss(teacher(input_ids=held).logits[:, :-1], held[:, 1:]).item()
    print(f"\nteacher held-out ppl {torch.tensor(t_nll).exp().item():.4f}; student before training "
          f"{runs[0]['initial_ppl']:.2f}; top-{K} mass {stats['float16_vs_float32']['mean_topk_mass']:.3f}")
    for m in MODES:
        p, k = summary[f"{m}.ppl"], summary[f"{m}.kl"]
        print(f"{m:8s} ppl {p['mean']:.4f} (spread {p['spread']:.4f})  KL {k['mean']:.5f} (spread {k['spread']:.5f})")
    for m in MODES[1:]:
        for metric in ("ppl", "kl"):
            d = summary[f"{m}-float32.{metric}"]
            print(f"{m} - float32 {metric:3s}: mean {d['mean_diff']:+.2e} (per seed "
                  f"{', '.join(f'{x:+.1e}' for x in d['per_seed'])}); float32 seed spread "
                  f"{d['float32_seed_spread']:.2e}; |mean| / spread {d['mean_diff_over_seed_spread']:.3f}")
    for dtype in ("float32", "float16"):
        s = stats[dtype]
        print(f"{dtype} cache: {s['bytes_per_token']:.1f} B/token of data "
              f"({s['bytes_per_token_with_index_and_markers']:.2f} with index and markers), "
              f"ids {s['index']['indices_dtype']}")
    print("float16 vs float32 cache:", json.dumps(stats["float16_vs_float32"]))
    if args.json:
        print(json.dumps({"runs": runs, "summary": summary, "cache": {k: v for k, v in stats.items()}}, default=str))


if __name__ == "__main__":
    main()
