"""``slimmoe tokenize SOURCE OUT --tokenizer DIR``: a corpus as token-id shards on disk.

OUT gets flat ``uint16`` / ``uint32`` shards (``train-00000.bin`` ...) and ``index.json``
(``num_tokens``, ``dtype``, ``seq_len``, ``train_blocks``, ``eval_blocks``, the shards with
their token counts and sha256, ``fingerprint``, ``tokenizer``). ``--data`` of prune, distill
and eval and a pipeline's ``data.train`` accept OUT. A rerun of the same command resumes a
killed one (complete shards are kept) or, when OUT is complete, checks every shard's sha256.
"""

from __future__ import annotations

import json
from pathlib import Path

from slimmoe.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("tokenize", help="tokenise a corpus into token-id shards on disk (read lazily by --data)",
                       description="Tokenise SOURCE (a .txt/.jsonl/.json/.parquet file or folder, a glob, or a hub "
                                   "dataset id) with the tokenizer in DIR into flat token-id shards plus index.json "
                                   "in OUT. Documents are joined with EOS as --data reads text. Resumable: run the "
                                   "same command again after a kill.")
    p.add_argument("source", metavar="SOURCE", help="file, folder, glob, hub dataset id or builder name (json, text)")
    p.add_argument("out", metavar="OUT", help="folder to write the shards and index.json to")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="folder with the tokenizer (e.g. the teacher)")
    p.add_argument("--seq-len", type=int, default=256, metavar="T", help="tokens per block (default 256)")
    p.add_argument("--text-field", default="text", metavar="F", help="text column of jsonl/json/parquet/hub data")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--eval-fraction", type=float, default=0.0, metavar="X",
                      help="held-out: the last X of the blocks (recorded as a block range)")
    held.add_argument("--eval", metavar="PATH", help="held-out: tokenise this source separately")
    p.add_argument("--num-proc", type=int, default=1, metavar="N", help="tokenising processes (output does not change)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="stop the train stream after N tokens")
    p.add_argument("--name", default=None, metavar="CONFIG", help="hub dataset configuration name")
    p.add_argument("--split", default="train", metavar="S", help="hub dataset split (default train)")
    p.add_argument("--data-files", nargs="+", default=None, metavar="FILE", help="data_files of a hub id or builder")
    p.add_argument("--streaming", action="store_true", help="stream a hub dataset instead of downloading it whole")
    p.add_argument("--shard-tokens", type=int, default=None, metavar="N", help="tokens per shard (default 32Mi)")
    p.set_defaults(func=run)


def run(args) -> int:
    from slimmoe.io.loading import load_tokenizer
    from slimmoe.io.token_sources import SourceSpec
    from slimmoe.io.token_writer import SHARD_TOKENS, TokenizeJob, tokenize_corpus

    tok_dir = Path(args.tokenizer).expanduser()
    if not tok_dir.is_dir():
        raise UserError(f"--tokenizer: no such folder: {args.tokenizer}")
    tokenizer = load_tokenizer(str(tok_dir))
    if tokenizer is None:
        raise UserError(f"--tokenizer: {args.tokenizer} holds no tokenizer that can be loaded")
    hub = dict(name=args.name, split=args.split, streaming=args.streaming,
               data_files=tuple(args.data_files) if args.data_files else None)
    job = TokenizeJob(
        train=SourceSpec(args.source, args.text_field, **hub),
        eval=SourceSpec(args.eval, args.text_field, **hub) if args.eval else None,
        tokenizer_dir=str(tok_dir), seq_len=args.seq_len, eval_fraction=args.eval_fraction,
        max_tokens=args.max_tokens, shard_tokens=args.shard_tokens or SHARD_TOKENS, num_proc=args.num_proc,
    )
    index = tokenize_corpus(job, args.out, tokenizer, verify=True)
    summary = {k: index[k] for k in ("num_tokens", "dtype", "seq_len", "train_blocks", "eval_blocks", "fingerprint")}
    print(json.dumps({"out": str(args.out), **summary, "shards": len(index["shards"])}))
    return 0
