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

import os
from pathlib import Path

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

    from slimmoe.errors import UserError
    from slimmoe.io.loading import load_model, load_tokenizer

    src = str(Path(model_dir).resolve())  # absolute: never mistaken for a hub repo id
    model = load_model(src)  # the stored dtype, on CPU, under the flow's loading policy
    tokenizer = load_tokenizer(src)
    if tokenizer is None:
        raise UserError(f"cannot register {src} as a text-generation model: the folder has no tokenizer")
    mlflow.transformers.save_model(
        {"model": model, "tokenizer": tokenizer}, str(dest), task=TASK, signature=signature(),
        pip_requirements=requirements(), model_card=ModelCard("---\nlicense: other\n---\n" + card))
    return Path(dest)
