"""Checks ``slimmoe run`` and ``slimmoe ablate`` make before any flow starts (called by
``resolve.check_inputs`` and ``arms.check_ablation_inputs``).

Each raises a one-line UserError naming the config field. They read only; the one that
costs work (tokenising the corpus) leaves its result in the ``datasets`` cache, keyed by
the same fingerprint the flow's prepare-data step uses, so the flow reuses it.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from slimmoe.errors import UserError
from slimmoe.io.data import load_blocks
from slimmoe.io.loading import check_weights, load_tokenizer
from slimmoe.prune.plan import resolve_targets

CONNECT_TIMEOUT_S = 3.0


def check_data_paths(data) -> None:
    """``data.train`` / ``data.eval`` that look like local paths must exist (else: hub ids)."""
    for field, value in (("data.train", data.train), ("data.eval", data.eval)):
        if value and not Path(value).exists() and (Path(value).suffix or value.startswith((".", "/", "~"))):
            raise UserError(f"{field}: no such file or folder: {value}")


def cut(adapter, current, targets, where: str) -> dict:
    """Resolve ``targets`` against the config ``current`` and update it in place to the cut
    shape; an impossible target is an error prefixed with ``where`` (e.g. ``stages.1.``)."""
    try:
        t = resolve_targets(adapter, current, targets)
    except UserError as e:
        raise UserError(f"{where}{e}") from None
    adapter.update_config(current, expert_size=t["expert_intermediate_size"], num_experts=t["num_experts"],
                          kv_heads=t["num_key_value_heads"], shared_size=t["shared_intermediate_size"])
    return t


def check_teacher_and_data(teacher: str, teacher_config, data, tracking_uri: str) -> None:
    """What needs more than config.json: the teacher's weights (present, intact, safetensors),
    the tracking server, the tokenizer against the vocabulary, and a corpus filling a block."""
    check_weights(teacher, "teacher")
    check_tracking_uri(tracking_uri)
    check_corpus(data, check_tokenizer(teacher, teacher_config), teacher_config.vocab_size, teacher)


def check_tracking_uri(uri: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """An http(s) MLflow server must accept a connection within ``timeout`` seconds.

    MLflow's own client retries with backoff for minutes before failing, so an unreachable
    server is caught here instead, in seconds.
    """
    u = urlparse(uri)
    if u.scheme not in ("http", "https"):
        return
    if not u.hostname:
        raise UserError(f"tracking.uri: {uri!r} has no host")
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        raise UserError(f"tracking.uri: {uri!r} has an invalid port") from None
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except OSError as e:
        why = e.strerror or (f"no answer within {timeout:g} s" if isinstance(e, TimeoutError) else str(e) or type(e).__name__)
        raise UserError(f"tracking.uri: cannot reach the MLflow server at {uri} ({why}); start it or fix tracking.uri") from None


def check_topk(stages, vocab_size: int) -> None:
    """Top-k teacher logits cannot outnumber the vocabulary."""
    for i, stage in enumerate(stages):
        for part in ("importance", "distill"):
            settings = getattr(stage, part, None)
            if settings is not None and settings.topk > vocab_size:
                raise UserError(f"stages.{i}.{part}.topk: {settings.topk} is larger than the teacher's vocabulary "
                                f"({vocab_size} tokens)")


def check_smaller(i: int, before: dict, after: dict, earlier: str) -> None:
    """A stage must cut at least one size of its predecessor."""
    keys = ("expert_intermediate_size", "num_key_value_heads", "num_experts")
    if all(after[k] == before[k] for k in keys):
        sizes = ", ".join(f"{k}={before[k]}" for k in keys)
        raise UserError(f"stages.{i}: makes the model no smaller than {earlier} ({sizes}); "
                        "every stage must reduce a size")


def check_exports(i: int, engines: list[str], student) -> None:
    """Every engine ``stages.i.export`` names must serve the stage's model, whose config
    (``student``, the teacher's cut to the stage's sizes) is known before any work: the
    limits ``slimmoe export`` would refuse at the end of the stage (vLLM PhiMoE top-2 only,
    llama.cpp PhiMoE head_dim = hidden / heads, a family the engine lacks), and llama.cpp's
    converter, which must be there."""
    from slimmoe.export.engines import check_config, get_engine
    from slimmoe.export.writer import find_converter

    cfg = student.to_dict() if hasattr(student, "to_dict") else dict(student)
    for j, name in enumerate(engines):
        try:
            engine = get_engine(name)
            check_config(engine, cfg)
            if engine.name == "llama.cpp":
                find_converter()
        except UserError as e:
            msg = str(e)
            if msg.startswith("--for "):  # the CLI's field; here the config's names it
                msg = msg.split(": ", 1)[-1]
            raise UserError(f"stages.{i}.export.{j}: {msg}") from None


def check_quantize(i: int, cfg, student) -> None:
    """A stage's ``quantize:`` must be able to run at the end of the stage: llm-compressor's
    environment is there and has llmcompressor, and the scheme fits the stage's model, whose
    config (``student``) is known before any work (W4A16's group must divide every input width)."""
    if cfg is None:
        return
    from slimmoe.quantize import check_shapes, engine_identity, find_python

    data = student.to_dict() if hasattr(student, "to_dict") else dict(student)
    try:
        check_shapes(data, cfg)
        engine_identity(find_python(cfg))
    except UserError as e:
        msg = str(e).replace("use --group-size ", "use group_size ")
        field = msg.split(":", 1)[0]
        where = f"stages.{i}.quantize"
        raise UserError(f"{where}.{msg}" if field in type(cfg).model_fields else f"{where}: {msg}") from None


def check_tokenizer(teacher: str, config):
    """The teacher's tokenizer, which must exist and fit its vocabulary."""
    tok = load_tokenizer(teacher)
    if tok is None:
        raise UserError(f"teacher: {teacher} has no tokenizer; the pipeline tokenises data.train with it")
    if len(tok) > config.vocab_size:
        raise UserError(f"teacher: its tokenizer has {len(tok)} tokens but config.json's vocab_size is "
                        f"{config.vocab_size} (ids >= {config.vocab_size} would index past the embeddings)")
    return tok


def check_corpus(data, tokenizer, vocab_size: int, tokenizer_dir: str) -> None:
    """Tokenise the corpus into token shards as the flow will (cached, read lazily); refuse an
    empty or too short one."""
    from slimmoe.io.token_shards import is_token_folder
    from slimmoe.pipeline.steps.data import tokenize_cached

    given = is_token_folder(data.train)  # already tokenised: its own held-out split, checked against the config
    source = data.train if given else tokenize_cached(
        data.train, tokenizer, tokenizer_dir, data.seq_len, eval_path=data.eval, eval_fraction=data.eval_fraction,
        text_field=data.text_field, max_blocks=data.max_blocks, name=data.name, split=data.split,
        data_files=data.data_files, streaming=data.streaming, max_tokens=data.max_tokens, num_proc=data.num_proc)
    held = dict(eval_fraction=data.eval_fraction, eval_path=data.eval) if given else {}
    train, _ = load_blocks(source, tokenizer, data.seq_len, max_blocks=data.max_blocks,
                           fields=("data.train", "data.eval"), **held)
    if train.shape[0] == 0:
        raise UserError(f"data.train: {data.train} leaves no training block of data.seq_len={data.seq_len} tokens "
                        f"once data.eval_fraction={data.eval_fraction} is held out")
    top = int(train.max())
    if top >= vocab_size:
        raise UserError(f"data.train: token id {top} >= the teacher's vocab_size {vocab_size} (tokenizer mismatch)")
