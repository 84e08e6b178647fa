"""The quality benchmark's teacher on the Gutenberg corpus: the books split into training heads
and held-out tails (no training text in the held-out set), and the teacher flow, killed in the
middle of training, resumes from its checkpoint when the same command runs again (a tiny slice
of the corpus, a tiny model, a few steps)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slimmoe.errors import UserError
from slimmoe.io.books import BookSplitConfig, read_books, split_books, tail_cut
from slimmoe.pipeline.demo_teacher import MARKER_FILE

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CORPUS, CATALOGUE = SHARED / "gutenberg-en.txt.gz", SHARED / "gutenberg-books.tsv"
BOOK_CHARS = 3000  # per book of the slice
STEPS = 12  # training steps of the tiny teacher; checkpoints every 3


@pytest.fixture(scope="module")
def gutenberg_slice(tmp_path_factory) -> tuple[Path, Path]:
    """The first paragraphs of 5 Gutenberg books, in the real corpus's layout (gz + catalogue)."""
    if not CORPUS.is_file() or not CATALOGUE.is_file():
        pytest.skip(f"{CORPUS} not in this checkout's workplace")
    books = read_books(CORPUS, CATALOGUE)
    assert len(books) == 81
    picked = [(name, text[:text.rfind("\n\n", 0, BOOK_CHARS)].rstrip("\n")) for name, text in books[:5]]
    root = tmp_path_factory.mktemp("gutenberg")
    with gzip.open(root / "slice.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join(text for _, text in picked))
    (root / "slice.tsv").write_text("".join(f"{name}\t{len(text)}\n" for name, text in picked))
    return root / "slice.txt.gz", root / "slice.tsv"


def test_held_out_tails_hold_no_training_text(gutenberg_slice, tmp_path):
    source, books = gutenberg_slice
    res = split_books(BookSplitConfig(source=source, books=books, held_out=0.1, output_dir=tmp_path / "split"))
    originals = read_books(source, books)
    train_files = sorted(Path(res["train"]).iterdir())
    eval_files = sorted(Path(res["eval"]).iterdir())
    assert res["books"] == len(train_files) == len(eval_files) == 5
    train_text = "\n".join(p.read_text() for p in train_files)
    for (name, text), tr, ev in zip(originals, train_files, eval_files):
        head, tail = tr.read_text(), ev.read_text()
        assert tr.name == ev.name and name.rsplit("/", 1)[-1].split(".")[0] in tr.name
        assert head + tail == text  # nothing lost, nothing doubled
        assert 0 < len(tail) < 0.3 * len(text)  # the last 10%, the cut moved to the next paragraph
        # the cut lies just after a paragraph break (where the tail has one)
        assert head.endswith("\n\n") or "\n\n" not in text[len(head):-2]
        assert len(head) == tail_cut(text, 0.1)
        # no paragraph of the held-out tail appears anywhere in the training text
        for para in (p.strip() for p in tail.split("\n\n")):
            if len(para) >= 40:
                assert para not in train_text, para[:60]
    # a second call finds the finished split and leaves it as it is
    stamp = (tmp_path / "split" / "split.json").stat().st_mtime_ns
    again = split_books(BookSplitConfig(source=source, books=books, held_out=0.1, output_dir=tmp_path / "split"))
    assert again == res and (tmp_path / "split" / "split.json").stat().st_mtime_ns == stamp


def test_a_catalogue_that_does_not_match_the_text_is_refused(gutenberg_slice, tmp_path):
    source, books = gutenberg_slice
    bad = tmp_path / "bad.tsv"
    lines = books.read_text().splitlines()
    name, n = lines[1].split("\t")
    bad.write_text("\n".join([lines[0], f"{name}\t{int(n) + 7}", *lines[2:]]) + "\n")
    with pytest.raises(UserError, match=r"^books: .*book 2"):
        split_books(BookSplitConfig(source=source, books=bad, output_dir=tmp_path / "split"))
    assert not (tmp_path / "split").exists()


def _teacher_yaml(root: Path, source: Path, books: Path) -> Path:
    params = {"split": {"source": str(source), "books": str(books), "held_out": 0.1, "output_dir": str(root / "data")},
              "config": {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "intermediate_size": 32, "num_local_experts": 4, "seq_len": 32,
                         "tokens": STEPS * 8 * 32, "batch_size": 8, "lr": 3e-3, "checkpoints": STEPS // 3,
                         "evals": 2, "eval_max_blocks": 8, "seed": 0},
              "output_dir": str(root / "teacher"), "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
              "experiment": "gutenberg-test"}
    path = root / "teacher.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _run(config: Path, api: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": api, "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("SLIMMOE_CRASH_AT", None)
    if crash_at:
        env["SLIMMOE_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "flows.teacher", str(config)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(900)
def test_teacher_flow_on_gutenberg_resumes_after_a_kill(gutenberg_slice, tmp_path):
    from helpers_prefect import last_task_states
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    config = _teacher_yaml(tmp_path, *gutenberg_slice)
    with prefect_test_harness(server_startup_timeout=60):
        api = PREFECT_API_URL.value()
        killed = _run(config, api, crash_at="distill:step=7")  # after step 7: the checkpoint of step 6 is on disk
        assert killed.returncode == -9, killed.stderr[-3000:]
        assert not (tmp_path / "teacher").exists()  # no half teacher
        assert (tmp_path / "data" / "split.json").is_file()  # the split finished before training
        done = _run(config, api)
        assert done.returncode == 0, done.stderr[-3000:]
        states = {name.rsplit("-", 1)[0]: state for name, state in last_task_states().items()}
    assert states == {"split-books": "Cached", "train-teacher": "Completed"}, states
    result = json.loads((tmp_path / "teacher" / MARKER_FILE).read_text())["result"]
    assert result["resumed_from_step"] == 6
    assert result["tokens"] == STEPS * 8 * 32
    assert result["perplexity"] < result["initial_perplexity"]
    # the teacher trained on the heads and was evaluated on the held-out tails
    doc = json.loads((tmp_path / "teacher" / MARKER_FILE).read_text())["config"]
    assert doc["corpus"] == str(tmp_path / "data" / "train") and doc["eval_corpus"] == str(tmp_path / "data" / "eval")


def test_a_corpus_given_besides_the_split_is_refused(gutenberg_slice, tmp_path):
    from flows.teacher import main

    config = _teacher_yaml(tmp_path, *gutenberg_slice)
    data = yaml.safe_load(config.read_text())
    data["config"]["corpus"] = "data/tinyshakespeare.txt"
    config.write_text(yaml.safe_dump(data))
    assert main([str(config)]) == 2
    assert main([str(config), "--set", "config.nope=1"]) == 2
