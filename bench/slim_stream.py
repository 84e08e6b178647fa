"""Peak memory of slimming a checkpoint streamed from safetensors vs slimming it in memory.

    .venv/bin/python bench/slim_stream.py                 # phimoe, ~370 MB fp32 in 32 MB shards
    .venv/bin/python bench/slim_stream.py --hidden 256 --layers 4 --width 1024 --shard 8MB --no-in-memory

Writes a random phimoe checkpoint in small shards, then measures, each in a fresh subprocess,
the peak resident set size (VmHWM in /proc/self/status) of:
  * ``imports``: a process that only imports torch, transformers and slimmoe;
  * ``code``: the streamed slimming of a tiny checkpoint of the same family (2 layers, hidden 64):
    what the code costs whatever the checkpoint's size (the model's modules imported, the
    kernels' pages touched), about 100-150 MB above ``imports``;
  * ``streamed``: the streamed slimming (slimmoe.prune.stream.slim_streamed);
  * ``in_memory``: load_model + apply_plan + save_slimmed.
Every expert keeps every other neuron (width halved). Prints the source size, each peak, and
the streamed and in-memory peaks above each baseline as a share of the source size; ``--json``
prints one JSON object as the last line. The streamed peak grows with one layer plus one
output shard, not with the number of layers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch, transformers  # noqa: F401  (the baseline pays for these imports too)
from slimmoe.prune.plan import LayerPlan, SlimPlan
from slimmoe.prune.stream import slim_streamed

def peak():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

mode, src, out, shard = sys.argv[1:5]
t0 = time.perf_counter()
if mode != "baseline":
    cfg = json.loads((Path(src) / "config.json").read_text())
    E, I, kv = cfg["num_local_experts"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    plan = SlimPlan("phimoe", {}, {}, [LayerPlan(i, list(range(E)), [list(range(0, I, 2))] * E, None, list(range(kv)))
                                       for i in range(cfg["num_hidden_layers"])])
    if mode == "streamed":
        slim_streamed(src, plan, out, max_shard_size=shard)
    else:
        from slimmoe.io.loading import load_model
        from slimmoe.prune.slim import apply_plan, save_slimmed
        save_slimmed(apply_plan(load_model(src), plan), plan, out, max_shard_size=shard)
print(json.dumps({"peak": peak(), "seconds": time.perf_counter() - t0}))
"""


def build_source(folder: Path, hidden: int, width: int, layers: int, experts: int, vocab: int, shard: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "phimoe", hidden_size=hidden, intermediate_size=width, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=experts, num_experts_per_tok=2,
        vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder, max_shard_size=shard)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure(mode: str, src: Path, out: Path, shard: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out), shard],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--width", type=int, default=1024, help="expert intermediate size")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--shard", default="32MB", help="max_shard_size of the source and of the output")
    p.add_argument("--no-in-memory", dest="in_memory", action="store_false", help="skip the in-memory run")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    src, tiny = work / "source", work / "tiny"
    size = build_source(src, args.hidden, args.width, args.layers, args.experts, args.vocab, args.shard)
    build_source(tiny, 64, 64, 2, args.experts, 256, args.shard)
    m = {"source_bytes": size, "source_shards": len(list(src.glob("*.safetensors"))),
         "baseline_rss": measure("baseline", src, work / "none", args.shard)["peak"],
         "code_rss": measure("streamed", tiny, work / "tiny_out", args.shard)["peak"]}
    for kind in ("streamed", "in_memory") if args.in_memory else ("streamed",):
        run = measure(kind, src, work / kind, args.shard)
        m[f"{kind}_peak_rss"], m[f"{kind}_seconds"] = run["peak"], round(run["seconds"], 2)
    mb = 1 << 20
    print(f"source checkpoint      {size / mb:8.1f} MiB in {m['source_shards']} shards of <= {args.shard}")
    print(f"baseline: imports      {m['baseline_rss'] / mb:8.1f} MiB peak RSS")
    print(f"baseline: code         {m['code_rss'] / mb:8.1f} MiB peak RSS (streamed slimming of a tiny checkpoint)")
    for kind in ("streamed", "in_memory"):
        if f"{kind}_peak_rss" in m:
            peak = m[f"{kind}_peak_rss"]
            for base in ("baseline", "code"):
                m[f"{kind}_over_{base}_per_source"] = round((peak - m[f"{base}_rss"]) / size, 3)
            print(f"{kind:<22} {peak / mb:8.1f} MiB peak RSS; above imports {(peak - m['baseline_rss']) / mb:6.1f} MiB "
                  f"= {(peak - m['baseline_rss']) / size:.2f}x the checkpoint, above code "
                  f"{(peak - m['code_rss']) / mb:6.1f} MiB = {(peak - m['code_rss']) / size:.2f}x; "
                  f"{m[f'{kind}_seconds']:.1f} s")
    if args.json:
        print(json.dumps(m))


if __name__ == "__main__":
    main()
