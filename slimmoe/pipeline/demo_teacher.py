"""The offline demo teacher: a small phimoe-shaped MoE trained from scratch on a text corpus.

Training goes through :func:`slimmoe.distill.distill` with ``loss="lm"`` and no teacher,
so a crashed run resumes from its last checkpoint. The work happens in a hidden folder
next to ``out_dir`` (named by the config's fingerprint); the finished teacher is
assembled in a temporary folder and renamed into place, with ``teacher.json`` written
last, so ``out_dir`` is either absent, an older complete teacher, or the new one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from transformers import AutoModelForCausalLM, PhimoeConfig

from slimmoe.config import DistillConfig, StrictModel
from slimmoe.distill import distill
from slimmoe.errors import UserError
from slimmoe.evaluation import parameter_counts, perplexity
from slimmoe.io.atomic import replace_folder
from slimmoe.io.data import load_blocks
from slimmoe.io.tokenizer import EOS_TOKEN, MIN_VOCAB_SIZE, PAD_TOKEN, SPECIAL_TOKENS, train_bpe_tokenizer

BUNDLED_CORPUS = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
MARKER_FILE = "teacher.json"  # written last: its presence means "complete teacher"
_FORMAT = 1


class TeacherConfig(StrictModel):
    """Shape and training budget of the demo teacher.

    The defaults give a 3.6M-parameter model (8 experts of width 256, top-2, tied
    embeddings) whose training budget fits a few minutes on 2 CPU cores.
    """

    corpus: Path = Field(BUNDLED_CORPUS, description="UTF-8 text file, or folder of .txt files (one document "
                                                     "each), to train tokenizer and model on")
    eval_corpus: Path | None = Field(None, description="held-out text (file or folder); default: the last "
                                                       "eval_fraction of corpus")
    vocab_size: int = Field(2048, ge=MIN_VOCAB_SIZE, description="BPE vocabulary size (upper bound)")
    hidden_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(4, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(256, gt=0, description="width of every expert")
    num_local_experts: int = Field(8, ge=2)
    num_experts_per_tok: int = Field(2, ge=2, le=2, description="phimoe's sparsemixer always routes to 2")
    seq_len: int = Field(128, gt=1)
    tokens: int = Field(1_000_000, gt=0, description="training token budget (measured: 2.5-3.5 min on 2 CPU cores)")
    batch_size: int = Field(16, gt=0, description="sequences per optimizer step")
    lr: float = Field(3.0e-3, gt=0)
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="held-out share of the corpus (without eval_corpus)")
    checkpoints: int = Field(5, gt=0, description="checkpoints over the run (a killed run resumes from the last)")
    evals: int = Field(4, gt=0, description="held-out evaluations over the run (the best one is kept)")
    eval_max_blocks: int | None = Field(None, gt=0, description="held-out blocks per evaluation (default: all)")
    seed: int = 0

    @model_validator(mode="after")
    def _shapes(self) -> "TeacherConfig":
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads: {self.num_attention_heads} does not divide hidden_size {self.hidden_size}"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("num_attention_heads: head_dim (hidden_size / heads) must be even for rotary embeddings")
        return self


def phimoe_config(cfg: TeacherConfig, vocab_size: int, tokenizer: Any = None) -> PhimoeConfig:
    """The transformers config of the teacher; special-token ids come from ``tokenizer``
    (default: the ids :func:`slimmoe.io.tokenizer.train_bpe_tokenizer` assigns)."""
    if tokenizer is not None:
        eos, bos, pad = tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id
    else:
        eos = bos = SPECIAL_TOKENS.index(EOS_TOKEN)
        pad = SPECIAL_TOKENS.index(PAD_TOKEN)
    return PhimoeConfig(
        vocab_size=int(vocab_size),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        num_local_experts=cfg.num_local_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        # rotary positions work past seq_len; leave room for longer eval/pipeline blocks
        max_position_embeddings=max(4096, cfg.seq_len),
        # tied: the same parameter budget buys more expert width at this tiny scale
        tie_word_embeddings=True,
        attention_bias=True,  # as Phi-3.5-MoE
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        use_cache=True,
    )


def teacher_fingerprint(cfg: TeacherConfig) -> str:
    """sha256 of everything that determines the teacher: the config (corpus by content, not path)."""
    h = hashlib.sha256()
    # fields left at their defaults that older versions did not have are left out, so a
    # teacher trained before they existed keeps its fingerprint
    new = {"eval_corpus": None, "checkpoints": 5, "evals": 4, "eval_max_blocks": None}
    fields = {k: v for k, v in cfg.model_dump(mode="json", exclude={"corpus"}).items()
              if not (k in new and v == new[k])}
    h.update(json.dumps({"format": _FORMAT, **fields}, sort_keys=True).encode())
    _hash_text(h, _check_corpus(cfg.corpus, "corpus"))
    if cfg.eval_corpus is not None:
        h.update(b"eval_corpus")
        _hash_text(h, _check_corpus(cfg.eval_corpus, "eval_corpus"))
    return h.hexdigest()


def _hash_text(h, path: Path) -> None:
    """A file by its bytes; a folder by each .txt file's name and bytes, in name order."""
    for f in sorted(path.glob("*.txt")) if path.is_dir() else [path]:
        if path.is_dir():
            h.update(f"file:{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)


def load_finished(out_dir: str | Path, cfg: TeacherConfig | None = None) -> dict | None:
    """The result dict of a complete teacher at ``out_dir`` (built from ``cfg``, when given), or None."""
    marker = Path(out_dir) / MARKER_FILE
    if not marker.is_file():
        return None
    try:
        doc = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if cfg is not None and doc.get("fingerprint") != teacher_fingerprint(cfg):
        return None
    return doc.get("result")


def train_teacher(
    cfg: TeacherConfig,
    out_dir: str | Path,
    progress: bool = True,
    metrics_callback=None,
) -> dict:
    """Train the demo teacher and save it (model + tokenizer) as an HF checkpoint at ``out_dir``.

    Returns ``total_params``, ``active_params``, held-out ``perplexity`` (and
    ``initial_perplexity`` of the random init), ``tokens`` trained, ``vocab_size``,
    ``train_seconds``, ``out_dir`` and ``already_done``. When ``out_dir`` already holds a
    teacher of the same config and corpus, returns its stored result without training.
    A teacher of another config at ``out_dir`` is replaced; any other non-empty folder
    there is refused.
    """
    out = Path(out_dir)
    fp = teacher_fingerprint(cfg)
    done = load_finished(out, cfg)
    if done is not None:
        return {**done, "out_dir": str(out), "already_done": True}
    if out.exists() and not (out / MARKER_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out_dir: {out} exists and is not a slimmoe teacher folder; refusing to overwrite it")

    work = out.parent / f".{out.name}.work-{fp[:16]}"
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"out_dir: cannot create {work} ({e.strerror})") from None
    t0 = time.perf_counter()
    tokenizer = train_bpe_tokenizer(cfg.corpus, vocab_size=cfg.vocab_size, out_dir=work / "tokenizer")
    if cfg.eval_corpus is not None:
        train_blocks, eval_blocks = load_blocks(cfg.corpus, tokenizer, cfg.seq_len, eval_path=cfg.eval_corpus,
                                                fields=("corpus", "eval_corpus"))
    else:
        train_blocks, eval_blocks = load_blocks(cfg.corpus, tokenizer, cfg.seq_len, eval_fraction=cfg.eval_fraction,
                                                fields=("corpus", "corpus"))
    if eval_blocks.shape[0] == 0:
        raise UserError(f"corpus: {cfg.corpus} is too small for a held-out split of {cfg.seq_len}-token blocks")
    if cfg.eval_max_blocks is not None:
        eval_blocks = eval_blocks[: cfg.eval_max_blocks]

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(phimoe_config(cfg, len(tokenizer), tokenizer), dtype=torch.float32)
    initial_ppl = perplexity(model, eval_blocks)
    total_steps = -(-cfg.tokens // (cfg.batch_size * cfg.seq_len))
    dcfg = DistillConfig(
        loss="lm",
        tokens=cfg.tokens,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        eval_every=max(1, total_steps // cfg.evals),
        keep_best=True,
        checkpoint_every=max(1, total_steps // cfg.checkpoints),
        keep_checkpoints=1,
        progress=progress,
        # measured: transformers' batched_mm gathers one weight matrix per token and is
        # 10-30x slower than eager for 2k-token batches on CPU; grouped_mm is best on GPU
        experts_implementation="auto" if torch.cuda.is_available() else "eager",
    )
    result = distill(model, None, work / "train", train_blocks, eval_blocks, dcfg, metrics_callback=metrics_callback)
    del model

    trained = AutoModelForCausalLM.from_pretrained(str(work / "train"), dtype=torch.float32)
    counts = parameter_counts(trained)
    final = {
        **counts,
        "perplexity": perplexity(trained, eval_blocks),
        "initial_perplexity": initial_ppl,
        "tokens": result.tokens,
        "vocab_size": len(tokenizer),
        "eval_blocks": int(eval_blocks.shape[0]),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "resumed_from_step": result.resumed_from_step,
    }
    _publish(out, trained, tokenizer, {"format": _FORMAT, "fingerprint": fp,
                                       "config": cfg.model_dump(mode="json"), "result": final})
    shutil.rmtree(work, ignore_errors=True)
    return {**final, "out_dir": str(out), "already_done": False}


def _check_corpus(corpus: Path, field: str = "corpus") -> Path:
    p = Path(corpus).expanduser()
    if not (p.is_file() or (p.is_dir() and any(p.glob("*.txt")))):
        raise UserError(f"{field}: no such text file (or folder of .txt files): {corpus}")
    return p


def _publish(out: Path, model, tokenizer, doc: dict) -> None:
    """Write model, tokenizer and (last) the marker into a temp folder, then swap it into ``out``."""
    with replace_folder(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / MARKER_FILE).write_text(json.dumps(doc, indent=1))