"""Data benchmarks (token shards on disk), measured side by side in one run (CPU only).

(a) tokens/s of ``slimmoe tokenize`` (one process) over calling the fast tokenizer directly
    on the same documents in one process, in batches of 1,000, timed two ways: the calls
    alone (texts already in memory), and with what tokenize also has to do before them
    (load the tokenizer, read and parse the jsonl); neither writes anything. Imports are
    outside every timing. Wall clock and CPU time (user + sys of the process and its
    children), since the machine may be shared. Target: >= 0.9x per process.
(b) the same with ``--num-proc 2`` (wall clock), and whether its output is byte-identical.
(c) peak RSS (VmHWM) of ``slimmoe tokenize`` on a corpus and on twice that corpus.
(d) peak RSS of reading 1,000 random blocks through ``load_blocks(folder)`` from a ~50M- and
    a ~100M-token folder, and their ratio (target <= 1.1). These folders hold random ids
    written directly (tokenising 150M tokens would take most of an hour on 2 cores); the
    reader does not depend on where the ids came from.
(e) teacher-cache bytes/token at topk 8: a cache entry built for Phi's vocabulary (32,064) from
    a stand-in teacher, bytes of its data files over its tokens, per log-prob dtype (target <= 32).

Every measurement runs in a fresh subprocess, so peak RSS is that measurement's alone.

    .venv/bin/python bench/data.py [--docs 10000] [--read-tokens 50000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1",
       "HF_HUB_OFFLINE": "1"}

# child programs: each prints one JSON line {seconds, cpu_seconds, tokens, peak_rss_kib}
PRELUDE = """
import json, resource, sys, time
def cpu():
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime
def peak_kib():
    return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
"""
DIRECT = PRELUDE + """
from transformers import AutoTokenizer
import transformers.tokenization_utils_tokenizers
t_load, c_load = time.perf_counter(), cpu()  # what slimmoe tokenize also does: load the tokenizer, read the text
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = [json.loads(l)["text"] for f in sys.argv[2:] for l in open(f)]
t0, c0, n = time.perf_counter(), cpu(), 0
for i in range(0, len(texts), 1000):
    ids = tok(texts[i:i + 1000], add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    n += sum(map(len, ids))
t1, c1 = time.perf_counter(), cpu()
print(json.dumps({"seconds": t1 - t0, "cpu_seconds": c1 - c0, "tokens": n, "peak_rss_kib": peak_kib(),
                  "with_load": {"seconds": t1 - t_load, "cpu_seconds": c1 - c_load}}))
"""
TOKENIZE = PRELUDE + """
from slimmoe.cli.main import main
import slimmoe.io.token_writer, datasets  # imports outside the timing, as in DIRECT
from transformers import AutoTokenizer
import transformers.tokenization_utils_tokenizers
t0, c0 = time.perf_counter(), cpu()
assert main(["tokenize", *sys.argv[1:]]) == 0
index = json.load(open(sys.argv[2] + "/index.json"))
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": cpu() - c0, "tokens": index["num_tokens"],
                  "peak_rss_kib": peak_kib()}))
"""
READ = PRELUDE + """
import torch
from slimmoe.io.data import load_blocks
train, _ = load_blocks(sys.argv[1], None, int(sys.argv[2]))
g = torch.Generator().manual_seed(0)
t0, c0 = time.perf_counter(), cpu()
for i in torch.randint(0, len(train), (1000,), generator=g).tolist():
    assert train[i].shape[0] == int(sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": cpu() - c0, "tokens": train.numel(),
                  "peak_rss_kib": peak_kib()}))
"""


def child(program: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", program, *map(str, args)], env=ENV, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_corpus(folder: Path, n_docs: int, seed: int, files: int = 4) -> list[Path]:
    """jsonl files of documents of 1-40 shuffled Shakespeare lines."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = [ln for ln in SHAKESPEARE.read_text().splitlines() if ln.strip()]
    paths, per = [], -(-n_docs // files)
    for k in range(files):
        path = folder / f"part-{seed}-{k}.jsonl"
        with open(path, "w") as f:
            for _ in range(min(per, n_docs - k * per)):
                f.write(json.dumps({"text": "\n".join(rng.choice(lines) for _ in range(rng.randint(1, 40)))}) + "\n")
        paths.append(path)
    return paths


def random_token_folder(folder: Path, tokens: int, seq_len: int, vocab: int, shard_tokens: int = 1 << 25) -> Path:
    """A tokenised folder (index.json + uint16 shards) of uniform random ids, written directly."""
    from slimmoe.io.token_writer import content_fingerprint

    folder.mkdir(parents=True, exist_ok=True)
    rng, shards, left = np.random.default_rng(0), [], tokens
    while left > 0:
        n = min(shard_tokens // seq_len * seq_len, left)
        arr = rng.integers(0, vocab, n, dtype=np.uint16)
        name = f"train-{len(shards):05d}.bin"
        arr.tofile(folder / name)
        shards.append({"file": name, "stream": "train", "tokens": n, "sha256": hashlib.sha256(arr).hexdigest(),
                       "max_token_id": int(arr.max())})
        left -= n
    blocks = tokens // seq_len
    index = {"format": "slimmoe-tokens-v1", "dtype": "uint16", "seq_len": seq_len, "num_tokens": tokens,
             "train_blocks": blocks, "eval_blocks": 0, "train": {"stream": "train", "start": 0, "stop": blocks},
             "eval": {"stream": "train", "start": blocks, "stop": blocks}, "shards": shards, "tokenizer": "random",
             "vocab_size": vocab, "eos_token_id": None}
    index["fingerprint"] = content_fingerprint(index)
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def cache_bytes_per_token(folder: Path, dtype: str, vocab: int = 32064, blocks: int = 8, seq: int = 64) -> float:
    """Build a top-k cache entry from a stand-in teacher (random logits) and measure its data files."""
    import torch

    from slimmoe.distill.teacher_cache import build
    from slimmoe.parallel import Topology

    ids = torch.randint(0, vocab, (blocks, seq), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    cache = build(folder, ids, lambda b: torch.randn(*b.shape, vocab, generator=gen), teacher_fp="bench", k=8,
                  temperature=1.0, batch_size=4, topo=Topology(), logprobs_dtype=dtype, vocab_size=vocab)
    data = sum(p.stat().st_size for p in cache.path.glob("part-*") if not p.name.endswith(".json"))
    return data / ids.numel()


def same_files(a: Path, b: Path) -> bool:
    names = sorted(f.name for f in a.iterdir() if f.is_file() and not f.name.startswith("."))
    return names == sorted(f.name for f in b.iterdir() if f.is_file() and not f.name.startswith(".")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=10000, help="documents of the throughput corpus (~200 tokens each)")
    p.add_argument("--read-tokens", type=int, default=50_000_000, help="tokens of the smaller read corpus")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="slimmoe-bench-data-"))
    sys.path.insert(0, str(ROOT))
    from slimmoe.io.tokenizer import train_bpe_tokenizer

    tok_dir = work / "tok"
    if not (tok_dir / "tokenizer.json").is_file():
        train_bpe_tokenizer(SHAKESPEARE, vocab_size=8000).save_pretrained(tok_dir)
    one = write_corpus(work / "c1", args.docs, seed=1)
    two = one + write_corpus(work / "extra", args.docs, seed=2)  # the corpus twice over (other documents)
    (work / "c2").mkdir(exist_ok=True)
    for f in two:
        if not (work / "c2" / f.name).exists():
            os.link(f, work / "c2" / f.name)
    for name in ("o1", "o1p", "o2"):  # every run tokenises from scratch
        shutil.rmtree(work / name, ignore_errors=True)
    flags = ["--tokenizer", tok_dir, "--seq-len", args.seq_len]
    direct = child(DIRECT, tok_dir, *one)
    ours = child(TOKENIZE, work / "c1", work / "o1", *flags)
    par = child(TOKENIZE, work / "c1", work / "o1p", *flags, "--num-proc", 2)
    double = child(TOKENIZE, work / "c2", work / "o2", *flags)
    assert ours["tokens"] == direct["tokens"] + args.docs - 1, (ours, direct)  # + the EOS between documents
    direct_all = {**direct, **direct["with_load"]}
    rows = {"direct: tokenizer calls only": direct, "direct: + load tokenizer, read": direct_all,
            "slimmoe tokenize": ours, "slimmoe tokenize --num-proc 2": par, "slimmoe tokenize, corpus x2": double}
    print(f"(a-c) tokenising {ours['tokens']:,} tokens ({args.docs} documents, vocab 8000, seq_len {args.seq_len}); "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (wall clock needs idle cores; cpu tok/s "
          "counts every process of a run, workers included)")
    print(f"{'':32} {'wall tok/s':>12} {'cpu tok/s':>12} {'peak RSS MiB':>13}")
    for name, r in rows.items():
        print(f"{name:32} {r['tokens'] / r['seconds']:12,.0f} {r['tokens'] / r['cpu_seconds']:12,.0f} "
              f"{r['peak_rss_kib'] / 1024:13.1f}")
    for name, d in (("tokenizer calls only", direct), ("+ load tokenizer, read the jsonl", direct_all)):
        ratio_wall = (ours["tokens"] / ours["seconds"]) / (direct["tokens"] / d["seconds"])
        ratio_cpu = (ours["tokens"] / ours["cpu_seconds"]) / (direct["tokens"] / d["cpu_seconds"])
        print(f"slimmoe tokenize / direct ({name}), one process: {ratio_wall:.2f}x wall, {ratio_cpu:.2f}x cpu "
              "(target >= 0.9)")
    print(f"--num-proc 2 / --num-proc 1 wall: {ours['seconds'] / par['seconds']:.2f}x; byte-identical: "
          f"{same_files(work / 'o1', work / 'o1p')}")
    print(f"peak RSS tokenising 2x corpus / 1x: {double['peak_rss_kib'] / ours['peak_rss_kib']:.3f} "
          f"({double['tokens']:,} vs {ours['tokens']:,} tokens)")
    small = random_token_folder(work / "r1", args.read_tokens, args.seq_len, 8000)
    large = random_token_folder(work / "r2", 2 * args.read_tokens, args.seq_len, 8000)
    r1, r2 = child(READ, small, args.seq_len), child(READ, large, args.seq_len)
    print(f"(d) reading 1,000 random blocks of {args.seq_len} tokens")
    for name, r in ((f"{r1['tokens']:,} tokens", r1), (f"{r2['tokens']:,} tokens", r2)):
        print(f"{name:32} peak RSS {r['peak_rss_kib'] / 1024:8.1f} MiB, {1000 / r['seconds']:,.0f} blocks/s")
    print(f"peak RSS ratio 2x / 1x: {r2['peak_rss_kib'] / r1['peak_rss_kib']:.3f} (target <= 1.1)")
    print("(e) teacher-cache bytes per token on disk, topk 8, vocab 32,064")
    for dtype in ("float16", "bfloat16", "float32"):
        print(f"{dtype:32} {cache_bytes_per_token(work / f'cache-{dtype}', dtype):6.1f} B/token"
              + ("  (target <= 32)" if dtype == "float16" else ""))


if __name__ == "__main__":
    main()
