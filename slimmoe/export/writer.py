"""Write what a serving engine loads: a copy of the model folder (hard links where the file
system allows, copies elsewhere) whose config.json names the engine's ``architectures``,
or, for llama.cpp, a GGUF converted by llama.cpp's own ``convert_hf_to_gguf.py``.

Everything is checked before anything is written; the result is filled in a temporary
sibling of OUT and renamed into place (:func:`slimmoe.io.atomic.replace_folder`), so a
refusal or a failed conversion leaves no OUT folder behind."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from slimmoe.errors import UserError
from slimmoe.export.biases import add_zero_biases
from slimmoe.export.engines import check_config, engine_caveat, engine_config, get_engine

CONVERTER_ENV = "SLIMMOE_LLAMA_CPP_CONVERT"  # path to llama.cpp's convert_hf_to_gguf.py
GGUF_NAME = "model.gguf"
# convert_hf_to_gguf.py's --outtype choices that keep the model's weights as they are, or round
# them once (q8_0); "auto" is the converter's default: 16-bit floats of the checkpoint's kind.
GGUF_TYPES = ("auto", "f32", "f16", "bf16", "q8_0")


def read_model_config(model: Path) -> dict:
    """config.json of a model folder, as a dict; a one-line ``UserError`` when it is missing."""
    from slimmoe.io.loading import read_config_json  # slimmoe.io imports torch; the CLI builds without it

    return read_config_json(model)


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Every file under ``src`` into ``dst`` (created), hard-linked where possible. A symlink
    (a Hugging Face cache snapshot is one per file) is followed: OUT holds the file itself."""
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # temporaries of slimmoe's writers
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if name.startswith(".") and name != ".gitattributes":  # .complete markers, temporaries
                continue
            s, d = Path(root) / name, dst / rel / name
            try:
                os.link(os.path.realpath(s), d)
            except OSError:
                shutil.copy2(s, d)


def write_config(folder: Path, cfg: dict, architecture: str) -> None:
    """config.json with ``architectures`` replaced, the other keys as they were, in their order;
    a fresh file, never written through a hard link into the source folder."""
    path = folder / "config.json"
    path.unlink(missing_ok=True)
    path.write_text(json.dumps({**cfg, "architectures": [architecture]}, indent=2) + "\n")


def installed_converter() -> Path:
    """Where ``scripts/install-llama-cpp`` puts the converter vendored in the
    ``llama-cpp-python`` source distribution it builds: the same llama.cpp commit as the
    installed runtime, so the GGUF it writes is one that runtime reads."""
    return Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py"


def find_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py (``$SLIMMOE_LLAMA_CPP_CONVERT``, else the one
    ``scripts/install-llama-cpp`` installed) and the ``gguf`` package it needs (the checkout's
    own ``gguf-py`` next to it, else the installed one), or a ``UserError`` saying what is missing."""
    where = os.environ.get(CONVERTER_ENV)
    if not where:
        path = installed_converter()
        if not path.is_file():
            raise UserError(f"--for llama.cpp: llama.cpp's convert_hf_to_gguf.py is not installed: run "
                            f"scripts/install-llama-cpp (or set {CONVERTER_ENV} to a llama.cpp checkout's)")
    else:
        path = Path(where)
        if not path.is_file():
            raise UserError(f"--for llama.cpp: {CONVERTER_ENV}={where} is not a file")
    if not (path.parent / "gguf-py").is_dir() and importlib.util.find_spec("gguf") is None:
        raise UserError("--for llama.cpp: the gguf package is missing (no gguf-py next to the converter); "
                        "pip install gguf")
    return path


def convert_to_gguf(converter: Path, model_dir: Path, outfile: Path, outtype: str = "auto") -> None:
    """Run llama.cpp's converter in its own process; its last line of output names a failure."""
    cmd = [sys.executable, str(converter), str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not outfile.is_file():
        lines = (done.stderr or done.stdout or "").strip().splitlines()
        last = lines[-1] if lines else f"exit code {done.returncode}"
        raise UserError(f"--for llama.cpp: convert_hf_to_gguf.py failed: {last}")


def export_model(model: str | Path, out: str | Path, engine_name: str, gguf_type: str = "auto") -> Path:
    """Write ``out`` for ``engine_name`` from the model folder ``model``; returns ``out``.
    Refuses (``UserError``, nothing written) a family or a shape the engine cannot serve.
    ``gguf_type`` is the GGUF's weight type (llama.cpp only)."""
    from slimmoe.io.atomic import replace_folder  # torch; not needed to build the CLI

    engine = get_engine(engine_name)
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type: {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    model, out = Path(model), Path(out)
    cfg = read_model_config(model)
    architecture = check_config(engine, cfg)
    if out.resolve() == model.resolve():
        raise UserError("OUT: must differ from MODEL")
    converter = find_converter() if engine.name == "llama.cpp" else None
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = engine_config(engine, cfg)
    with replace_folder(out) as tmp:
        if converter is None:
            link_or_copy_tree(model, tmp)
            write_config(tmp, add_zero_biases(tmp, cfg), architecture)
        else:
            staged = tmp / ".hf"  # the renamed copy the converter reads; inside tmp, so a killed
            link_or_copy_tree(model, staged)  # run's leftovers are removed with it
            write_config(staged, add_zero_biases(staged, cfg), architecture)
            convert_to_gguf(converter, staged, tmp / GGUF_NAME, gguf_type)
            shutil.rmtree(staged)
    caveat = engine_caveat(engine, cfg)
    if caveat:
        print(f"warning: --for {engine.name}: {caveat}", file=sys.stderr)
    return out
