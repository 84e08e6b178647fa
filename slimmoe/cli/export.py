"""``slimmoe export MODEL OUT --for vllm|sglang|llama.cpp``: write what a serving engine
loads, or exit 2 naming the engine limit the model would break (``slimmoe/export/``)."""

from __future__ import annotations

from slimmoe.export import ENGINES, GGUF_NAME, GGUF_TYPES, export_model


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a model folder (or GGUF) that vLLM, SGLang or llama.cpp loads",
                       description="Copy MODEL to OUT (hard links where possible) with config.json's "
                                   "'architectures' set to the name the engine registers, after checking the "
                                   "engine's limits; for llama.cpp, convert to OUT/" + GGUF_NAME + " with "
                                   "llama.cpp's convert_hf_to_gguf.py (set SLIMMOE_LLAMA_CPP_CONVERT).")
    p.add_argument("model", metavar="MODEL", help="a model folder (config.json + safetensors)")
    p.add_argument("out", metavar="OUT", help="the folder to write")
    p.add_argument("--for", dest="engine", required=True, choices=list(ENGINES), metavar="|".join(ENGINES),
                   help="the serving engine")
    p.add_argument("--gguf-type", default="auto", choices=GGUF_TYPES,
                   help="llama.cpp only: the GGUF's weight type (default: auto, 16-bit floats like the "
                        "checkpoint's; f32 keeps float32 weights exactly)")
    p.set_defaults(func=run)


def run(args) -> int:
    out = export_model(args.model, args.out, args.engine, args.gguf_type)
    print(f"wrote {out} for {args.engine}")
    return 0
