"""Serving a student on CPU: llama.cpp tokens/s next to transformers' ``generate`` tokens/s
for the same model and prompt, measured side by side in one run, and the file size of each
form the model is served in.

    .venv/bin/python bench/serve.py                  # needs scripts/install-llama-cpp first
    .venv/bin/python bench/serve.py --hidden 256 --layers 2 --new-tokens 32 --json

Builds a random phimoe of a Phi-mini-like shape (head_dim = hidden / heads, 8 experts, top-2)
with a SentencePiece tokenizer, exports it with ``slimmoe export --for llama.cpp`` at each
``--gguf-types``, then times greedy decoding of ``--new-tokens`` tokens after a held-out
prompt, median of ``--repeats`` runs after one warm-up, with the same thread count for both
engines. transformers: ``model.generate(do_sample=False)`` in float32; llama.cpp:
``Llama.create_completion(temperature=0, top_k=1)``. The random model's text is noise: this is
a speed and size benchmark; ``make test-engines`` checks that the outputs agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from slimmoe.export import export_model  # noqa: E402
from tests.helpers_engines import CORPUS, held_out_prompt, llama_cpp_model, moe_with_sentencepiece  # noqa: E402


def folder_bytes(folder: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in folder.rglob(f"*{suffix}"))


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-touch pages, kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_transformers(model_dir: Path, prompt: list[int], new_tokens: int, repeats: int) -> tuple[float, int]:
    """Tokens/s of greedy ``generate`` and the model's parameter count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def run():
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0)
        assert out.shape[1] == len(prompt) + new_tokens

    return new_tokens / median_seconds(run, repeats), sum(p.numel() for p in model.parameters())


def time_llama_cpp(gguf: Path, prompt: list[int], new_tokens: int, repeats: int) -> float:
    llm = llama_cpp_model(gguf, logits_all=False, kv_f32=False)  # llama.cpp as served: float16 KV cache

    def run():
        llm.reset()
        done = llm.create_completion(prompt, max_tokens=new_tokens, temperature=0.0, top_k=1)
        assert done["usage"]["completion_tokens"] == new_tokens, done["usage"]

    return new_tokens / median_seconds(run, repeats)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024, help="expert intermediate size")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gguf-types", default="f32,f16,q8_0")
    ap.add_argument("--threads", type=int, default=2, help="torch threads; llama.cpp uses min(2, cores)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = moe_with_sentencepiece(
            Path(tmp) / "student", CORPUS.read_text()[:200_000], hidden_size=args.hidden,
            num_attention_heads=args.heads, num_key_value_heads=args.heads // 2, num_hidden_layers=args.layers,
            num_local_experts=args.experts, intermediate_size=args.width)
        prompt = held_out_prompt(AutoTokenizer.from_pretrained(model_dir))
        result = {"shape": {k: getattr(args, k) for k in ("hidden", "heads", "layers", "experts", "width")},
                  "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "repeats": args.repeats,
                  "safetensors_bytes": folder_bytes(model_dir, ".safetensors"), "llama_cpp": {}}
        result["transformers_tok_s"], result["params"] = time_transformers(model_dir, prompt, args.new_tokens,
                                                                           args.repeats)
        for kind in args.gguf_types.split(","):
            out = Path(tmp) / f"gguf-{kind}"
            export_model(model_dir, out, "llama.cpp", gguf_type=kind)
            gguf = out / "model.gguf"
            tok_s = time_llama_cpp(gguf, prompt, args.new_tokens, args.repeats)
            result["llama_cpp"][kind] = {"bytes": gguf.stat().st_size, "tok_s": tok_s,
                                         "vs_transformers": tok_s / result["transformers_tok_s"]}
    print(f"phimoe {result['shape']} ({result['params'] / 1e6:.1f}M parameters), prompt {len(prompt)} tokens, {args.new_tokens} new, "
          f"median of {args.repeats}, {args.threads} threads")
    print(f"  transformers float32 safetensors {result['safetensors_bytes'] / 2**20:8.1f} MiB "
          f"{result['transformers_tok_s']:8.1f} tok/s")
    for kind, r in result["llama_cpp"].items():
        print(f"  llama.cpp {kind:>6} GGUF         {r['bytes'] / 2**20:8.1f} MiB {r['tok_s']:8.1f} tok/s "
              f"({r['vs_transformers']:.2f}x transformers)")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
