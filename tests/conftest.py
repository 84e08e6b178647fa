import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models and other test helpers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_offline(tmp_path, monkeypatch):
    """Caches of HF, datasets and slimmoe under the test's tmp_path; hubs offline."""
    import datasets.config
    import huggingface_hub.constants

    for var, value in (("HF_HOME", tmp_path / "hf"), ("HF_DATASETS_CACHE", tmp_path / "hfds"),
                       ("SLIMMOE_CACHE", tmp_path / "slimmoe"), ("HF_HUB_OFFLINE", "1"),
                       ("HF_DATASETS_OFFLINE", "1")):
        monkeypatch.setenv(var, str(value))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
