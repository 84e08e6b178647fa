"""Quantize a model folder with llm-compressor, run in its own environment.

llm-compressor pins transformers to a narrower range than slimmoe does (0.14.0.1:
``transformers<=5.17.0 and >=5.15.0``, while slimmoe runs 5.24), so it cannot install
beside slimmoe. It lives in its own virtual environment (``scripts/install-llmcompressor``)
and :mod:`slimmoe.quantize.worker` runs there as a separate process, the way
``slimmoe export --for llama.cpp`` runs llama.cpp's converter. slimmoe itself needs only
``compressed-tensors`` to load the result.

Everything that can be checked is checked before the worker starts; OUT is filled in a
temporary sibling and renamed into place (:func:`slimmoe.io.atomic.replace_folder`), so a
refusal or a failed run leaves no OUT behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from slimmoe.errors import UserError
from slimmoe.quantize.config import INSTALL_SCRIPT, PYTHON_ENV, QuantizeConfig, python_candidates, resolve_python

WORKER = Path(__file__).with_name("worker.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def read_model_config(model: Path) -> dict:
    """config.json of a model folder that is not quantized yet; a one-line ``UserError`` otherwise."""
    from slimmoe.io.loading import read_config_json  # slimmoe.io imports torch; the CLI builds without it

    cfg = read_config_json(model)
    if "quantization_config" in cfg:
        raise UserError(f"MODEL: {Path(model) / 'config.json'} is already quantized (quantization_config); "
                        f"quantize the unquantized model")
    return cfg


def input_widths(cfg: dict) -> dict[str, int]:
    """The input width of every kind of Linear a recipe quantizes, by the config field it comes
    from: attention q/k/v and expert gate/up read ``hidden_size``, o_proj reads heads x head_dim,
    an expert's down projection reads its intermediate size."""
    widths = {"hidden_size": cfg.get("hidden_size")}
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    head_dim = cfg.get("head_dim") or (hidden // heads if heads and hidden else None)
    if heads and head_dim:
        widths["num_attention_heads x head_dim"] = heads * head_dim
    for key in ("moe_intermediate_size", "intermediate_size", "shared_expert_intermediate_size"):
        if isinstance(cfg.get(key), int):
            widths[key] = cfg[key]
            if key == "moe_intermediate_size":
                break  # intermediate_size is then a dense MLP's, which an MoE layer does not have
    return {k: v for k, v in widths.items() if isinstance(v, int)}


def check_shapes(cfg: dict, config: QuantizeConfig) -> None:
    """W4A16 shares one scale between ``group_size`` input columns: every quantized layer's input
    width must be a multiple (llm-compressor stops half-way otherwise, and vLLM's kernels need it)."""
    if config.scheme != "W4A16":
        return
    for field, width in input_widths(cfg).items():
        if width % config.group_size:
            raise UserError(f"group_size: W4A16 groups {config.group_size} input columns, but {field} = {width} "
                            f"is not a multiple of {config.group_size}; use --group-size "
                            f"{_fitting_group(width) or 32} if it divides every width, or FP8_DYNAMIC / W8A8")


def _fitting_group(width: int) -> int | None:
    return next((g for g in (128, 64, 32) if width % g == 0), None)


def find_python(config: QuantizeConfig) -> Path:
    """llm-compressor's interpreter, or a one-line ``UserError`` saying how to install it."""
    python = resolve_python(config.python)
    if python is None:
        looked = ", ".join(str(p) for p in python_candidates())
        raise UserError(f"python: no llm-compressor environment (looked for ${PYTHON_ENV}, {looked}); "
                        f"run {INSTALL_SCRIPT} (llm-compressor cannot install beside slimmoe's pinned transformers)")
    if not python.is_file():
        field = "python" if config.python else PYTHON_ENV
        raise UserError(f"{field}: {python} does not exist; run {INSTALL_SCRIPT} "
                        "or point it at llm-compressor's Python")
    return python


VERSIONS = ("llmcompressor", "compressed-tensors", "transformers", "torch")
_VERSIONS_CODE = ("import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n in %r}))"
                  % (VERSIONS,))


def engine_identity(python: Path) -> dict:
    """What of llm-compressor's environment decides a quantized checkpoint (for cache and run
    keys; the interpreter's path is not part of it): the worker script's hash (a file run by
    path is code no import analysis sees) and the versions of llmcompressor, compressed-tensors,
    transformers and torch there. Reads package metadata only (no import of llmcompressor);
    a one-line ``UserError`` when llmcompressor is not installed there."""
    import hashlib

    done = subprocess.run([str(python), "-I", "-c", _VERSIONS_CODE], capture_output=True, text=True)
    if done.returncode != 0:
        last = ((done.stderr or "").strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        if "PackageNotFoundError" in last:
            missing = next((n for n in VERSIONS if n in last), "llmcompressor")
            raise UserError(f"python: {python} has no {missing}; run {INSTALL_SCRIPT}")
        raise UserError(f"python: {python} cannot report its packages ({last})")
    return {"worker": hashlib.sha256(WORKER.read_bytes()).hexdigest()[:24],
            "versions": json.loads(done.stdout.strip().splitlines()[-1])}


def run_worker(python: Path, args: dict) -> dict:
    """Run :mod:`slimmoe.quantize.worker` (by path: it imports no slimmoe) in llm-compressor's
    environment; its last stdout line is its JSON report. A failure is one ``UserError`` line
    naming the worker's last line of output; the whole output is kept in a log file."""
    env = {"TOKENIZERS_PARALLELISM": "false", **os.environ}
    # -I: isolated, so neither the worker's own folder (slimmoe/quantize/) nor PYTHONPATH shadows a module
    done = subprocess.run([str(python), "-I", str(WORKER), json.dumps(args)], capture_output=True, text=True, env=env)
    lines = (done.stdout or "").strip().splitlines()
    if done.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except ValueError:
            pass
    fd, log = tempfile.mkstemp(prefix="slimmoe-quantize-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(done.stdout or "")
        f.write(done.stderr or "")
    errs = [ln for ln in (done.stderr or "").strip().splitlines() if ln.strip()]
    last = errs[-1].strip() if errs else f"exit code {done.returncode}"
    if "No module named 'llmcompressor'" in last:
        raise UserError(f"python: {python} has no llmcompressor; run {INSTALL_SCRIPT}")
    raise UserError(f"llm-compressor failed: {last} (full output: {log})")


def finish_config(folder: Path, ignore: list[str]) -> None:
    """Add the requested ignore patterns to the checkpoint's quantization_config next to the
    module names llm-compressor resolved them to. Those names are the linearized model's
    (``block_sparse_moe.router`` for phimoe), which neither transformers (``mlp.router``) nor
    vLLM (``block_sparse_moe.gate``) uses: measured, transformers 5.24 then takes the router
    as quantized, reads an FP8 router weight without a scale and loses the routing."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    qc = cfg.get("quantization_config") or {}
    qc["ignore"] = list(dict.fromkeys([*qc.get("ignore", []), *ignore]))
    cfg["quantization_config"] = qc
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def copy_tokenizer(model: Path, folder: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (model / name).is_file():
            shutil.copy2(model / name, folder / name)
            copied.append(name)
    return copied


def quantize_model(model: str | Path, out: str | Path, config: QuantizeConfig) -> dict:
    """Write a compressed-tensors checkpoint of ``model`` to ``out`` (plus the tokenizer files);
    returns what was quantized (:func:`slimmoe.quantize.checkpoint.describe_checkpoint`)."""
    from slimmoe.io.atomic import replace_folder  # torch; not needed to build the CLI
    from slimmoe.io.loading import check_weights
    from slimmoe.quantize.checkpoint import describe_checkpoint

    model, out = Path(model), Path(out)
    cfg = read_model_config(model)
    check_weights(model)
    check_shapes(cfg, config)
    if out.resolve() == model.resolve():
        raise UserError("OUT: must differ from MODEL")
    python = find_python(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replace_folder(out) as tmp:
        worker = run_worker(python, {"model": str(model.resolve()), "out": str(tmp), "scheme": config.scheme,
                                     "group_size": config.group_size, "ignore": config.ignore})
        finish_config(tmp, config.ignore)
        copy_tokenizer(model, tmp)
    report = describe_checkpoint(out)
    report.update(scheme=config.scheme, source=str(model), out=str(out), llmcompressor=worker.get("versions", {}))
    return report
