"""A stage's checkpoint folder as an MLflow Model of the transformers flavour (task
``text-generation``), so ``mlflow.pyfunc.load_model("models:/NAME/V")``,
``mlflow.transformers.load_model(...)`` and ``mlflow models serve`` work on a registered
version.

What MLflow 3.17 offers and why this path (``mlflow/transformers/__init__.py``, ``save_model``):

* a local checkpoint folder given as a string copies the *whole* folder (``shutil.copytree``
  in ``mlflow/transformers/model_io.py``, so training leftovers would travel too) and fails
  with transformers 5 (``build_flavor_config_from_local_checkpoint`` reads
  ``task_metadata[1]["impl"].__name__``, a string in transformers 5);
* ``save_pretrained=False`` (log by reference) is accepted only for a Hugging Face hub repo
  id; for a local model MLflow switches it back to True;
* so the model and tokenizer are loaded on CPU and handed over as a dict: MLflow writes
  them with ``save_pretrained`` (``model/`` and ``components/tokenizer/``), i.e. only the
  Hugging Face files: no ``best_student.pt``, losses, checkpoints. Cost: one full copy of
  the weights in bytes, and the time of one load plus one save (about a second for the
  tests' tiny models).

Nothing here touches the hub: the model card is given (MLflow would otherwise fetch one),
the pip requirements are given (MLflow would otherwise load the model in a subprocess to
infer them), and the signature is given (no example is run).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
# What a checkpoint folder without a tokenizer registers: the model's Hugging Face files only.
HF_MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json")

TASK = "text-generation"
# Generation settings a caller may pass to predict(params=...) (and to a served model).
DEFAULT_PARAMS = {"max_new_tokens": 64, "do_sample": False}


def signature():
    from mlflow.models import infer_signature

    return infer_signature(["a prompt"], ["a prompt and its continuation"], params=dict(DEFAULT_PARAMS))


def requirements() -> list[str]:
    import torch
    import transformers

    return [f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}"]


def save_text_generation_model(model_dir: str | os.PathLike, dest: str | os.PathLike, card: str = "") -> Path:
    """Write ``model_dir`` (a Hugging Face causal-LM folder with its tokenizer) as an MLflow
    Model at ``dest`` (which must not exist); returns ``dest``."""
    import mlflow.transformers
    from huggingface_hub import ModelCard

    from slimmoe.io.loading import load_model, load_tokenizer

    src = str(Path(model_dir).resolve())  # absolute: never mistaken for a hub repo id
    tokenizer = load_tokenizer(src)
    if tokenizer is None:
        return _weights_only(Path(src), Path(dest))
    model = load_model(src)  # the stored dtype, on CPU, under the flow's loading policy
    mlflow.transformers.save_model(
        {"model": model, "tokenizer": tokenizer}, str(dest), task=TASK, signature=signature(),
        pip_requirements=requirements(), model_card=ModelCard("---\nlicense: other\n---\n" + card))
    return Path(dest)


def _weights_only(src: Path, dest: Path) -> Path:
    """A model with no tokenizer cannot be a text-generation MLflow Model: register its Hugging
    Face files (no MLmodel, no training leftovers) and say so."""
    log.warning("%s has no tokenizer: registering its weights and config only (not an MLflow Model; "
                "mlflow.pyfunc cannot load it)", src)
    dest.mkdir(parents=True)
    for pattern in HF_MODEL_FILES:
        for f in src.glob(pattern):
            shutil.copy2(f, dest / f.name)
    return dest


def save_checkpoint_files(model_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """A compressed-tensors (quantized) checkpoint registered as its files, what vLLM serves
    (``mlflow artifacts download`` then ``vllm serve``): not an MLflow Model. MLflow's
    transformers flavour re-saves the loaded model through ``save_pretrained``, which cannot
    write quantized fused experts back (measured, transformers 5.24, FP8_DYNAMIC phimoe:
    ``revert_weight_conversion`` raises "Undefined Operation encountered!"), and W8A8 MoE
    experts do not load in transformers at all."""
    src, dest = Path(model_dir), Path(dest)
    dest.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            shutil.copy2(f, dest / f.name)
    return dest
