"""``slimmoe tokenize``: resumable after SIGKILL, independent of --num-proc, streaming with a
token cap, bad input as one ``error:`` line, memory that does not grow with the corpus."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_tokens import reference_stream, save_tokenizer, shard_stream, synthetic_token_folder, write_jsonl_corpus

from slimmoe.cli.main import main
from slimmoe.io.token_sources import SourceSpec
from slimmoe.io.token_writer import TokenizeJob, tokenize_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model_dir(tok_dir, tmp_path_factory):
    """A tiny checkpoint with the test tokenizer (for ``slimmoe eval --data``)."""
    from tiny_models import tiny_model
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("model")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tiny_model("phimoe", vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_jsonl_corpus(folder, 400, files=3, seed=2)


def cli(*argv, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SLIMMOE_CRASH_AT", None)
    if crash_at:
        env["SLIMMOE_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "slimmoe.cli.main", "tokenize", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=300)


def result_files(folder: Path) -> dict[str, bytes]:
    """Every file a reader uses (hidden progress files aside), by name."""
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")}


def test_sigkill_then_rerun_keeps_complete_shards_and_equals_other_runs(tmp_path, corpus, tok_dir, model_dir, capsys):
    src, docs = corpus
    args = [src, tmp_path / "out", "--tokenizer", tok_dir, "--seq-len", 32, "--eval-fraction", 0.05,
            "--shard-tokens", 8192]
    killed = cli(*args, crash_at="tokenize:shard=0")
    assert killed.returncode == -9, killed.stderr
    out = tmp_path / "out"
    first = out / "train-00000.bin"
    kept = (first.stat().st_ino, first.stat().st_mtime_ns, first.read_bytes())
    assert not (out / "index.json").exists()
    killed = cli(*args, crash_at="tokenize:partial=2")  # resumes after shard 0, dies inside shard 2
    assert killed.returncode == -9, killed.stderr
    assert (out / "train-00001.bin").is_file() and (out / ".train-00002.bin.tmp").stat().st_size > 0
    assert not (out / "train-00002.bin").exists() and not (out / "index.json").exists()
    line = error_of(capsys, ["eval", str(model_dir), "--data", str(out)])  # an unfinished folder is not data
    assert f"--data: {out} is an unfinished slimmoe tokenize folder" in line
    argv = ["tokenize", *map(str, args)]
    assert main(argv) == 0  # the same command, finishing the job
    assert (first.stat().st_ino, first.stat().st_mtime_ns, first.read_bytes()) == kept  # not rewritten
    # the same as an uninterrupted run with --num-proc 2, and as one through the library
    assert main(["tokenize", str(src), str(tmp_path / "par"), *map(str, args[2:]), "--num-proc", "2"]) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    job = TokenizeJob(train=SourceSpec(str(src)), tokenizer_dir=str(tok_dir), seq_len=32, eval_fraction=0.05,
                      shard_tokens=8192)
    tokenize_corpus(job, tmp_path / "here", tok, progress=False)
    files = result_files(out)
    assert len([f for f in files if f.endswith(".bin")]) >= 4
    assert files == result_files(tmp_path / "par") == result_files(tmp_path / "here")
    assert np.array_equal(shard_stream(out), reference_stream(tok, docs))
    # a rerun of a complete folder checks it and changes nothing
    assert main(argv) == 0 and result_files(out) == files


def test_streaming_a_local_jsonl_folder_stops_at_the_cap(tmp_path, corpus, tok_dir, capsys):
    src, docs = corpus
    code = main(["tokenize", "json", str(tmp_path / "s"), "--tokenizer", str(tok_dir), "--seq-len", "16",
                 "--data-files", str(src / "*.jsonl"), "--streaming", "--max-tokens", "5000",
                 "--shard-tokens", "2048"])
    assert code == 0, capsys.readouterr().err
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["num_tokens"] == 5000 and index["train_blocks"] == 5000 // 16
    from transformers import AutoTokenizer

    expected = reference_stream(AutoTokenizer.from_pretrained(tok_dir), docs)
    assert np.array_equal(shard_stream(tmp_path / "s"), expected[:5000])
    # the same builder id downloaded whole (not streamed) gives the same tokens
    assert main(["tokenize", "json", str(tmp_path / "d"), "--tokenizer", str(tok_dir), "--seq-len", "16",
                 "--data-files", str(src / "*.jsonl"), "--max-tokens", "5000"]) == 0
    assert np.array_equal(shard_stream(tmp_path / "d"), expected[:5000])


def error_of(capsys, argv) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln.lower() or "Traceback" in ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_input_is_one_error_line_naming_the_file_or_field(tmp_path, corpus, tok_dir, model_dir, capsys):
    src, _ = corpus
    base = ["--tokenizer", str(tok_dir), "--seq-len", "16", "--shard-tokens", "4096"]
    assert "--tokenizer: no such folder" in error_of(capsys, ["tokenize", str(src), str(tmp_path / "a"),
                                                              "--tokenizer", str(tmp_path / "nope")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = error_of(capsys, ["tokenize", str(empty), str(tmp_path / "b"), *base])
    assert f"SOURCE: {empty}" in line and "0 tokens" in line
    line = error_of(capsys, ["tokenize", str(src), str(tmp_path / "c"), *base, "--text-field", "body"])
    assert "has no field 'body' (--text-field)" in line and "part-0.jsonl" in line
    for name in ("b", "c"):
        assert not (tmp_path / name / "index.json").exists()  # nothing reads as complete
    # a finished folder whose shard is truncated, or whose index does not match its shards
    out = tmp_path / "ok"
    assert main(["tokenize", str(src), str(out), *base]) == 0
    data = (out / "train-00001.bin").read_bytes()
    (out / "train-00001.bin").write_bytes(data[:100])
    assert "train-00001.bin: has 100 bytes" in error_of(capsys, ["tokenize", str(src), str(out), *base])
    (out / "train-00001.bin").write_bytes(data[::-1])  # same size, other content
    assert "train-00001.bin: sha256 differs" in error_of(capsys, ["tokenize", str(src), str(out), *base])
    (out / "train-00001.bin").write_bytes(data)
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["tokens"] -= 1
    (out / "index.json").write_text(json.dumps(index))
    line = error_of(capsys, ["eval", str(model_dir), "--data", str(out), "--seq-len", "16"])
    assert f"{out / 'train-00000.bin'}: has" in line
    # another command's settings into the same folder
    assert "OUT: " in error_of(capsys, ["tokenize", str(src), str(out), *base[:2], "--seq-len", "32"])


def test_reading_with_another_tokenizer_is_refused(tmp_path, corpus, tok_dir, capsys):
    from tiny_models import tiny_teacher_with_tokenizer

    model, _ = tiny_teacher_with_tokenizer(tmp_path / "teacher", corpus_chars=6000)
    out = tmp_path / "t"
    assert main(["tokenize", str(corpus[0]), str(out), "--tokenizer", str(tok_dir), "--seq-len", "16"]) == 0
    line = error_of(capsys, ["eval", str(model), "--data", str(out), "--seq-len", "16"])
    assert line.startswith(f"error: --data: {out} was tokenised with another tokenizer")


PEAK_RSS = """
import sys, torch
from slimmoe.io.data import load_blocks
{body}
print([int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""
READ = """train, _ = load_blocks(sys.argv[1], None, 64)
g = torch.Generator().manual_seed(0)
for i in torch.randint(0, len(train), (1000,), generator=g).tolist():
    assert train[i].shape == (64,)
"""
TOKENIZE = """from slimmoe.cli.main import main
assert main(["tokenize", sys.argv[1], sys.argv[2], "--tokenizer", sys.argv[3], "--seq-len", "64",
             "--shard-tokens", "65536"]) == 0
"""


def peak_rss_kib(*runs: tuple) -> list[int]:
    """Peak RSS (VmHWM, KiB) of each (body, *args) run, each in its own process, run side by side."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([sys.executable, "-c", PEAK_RSS.format(body=body), *map(str, args)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for body, *args in runs]
    peaks = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        peaks.append(int(out.split()[-1]))
    return peaks


@pytest.mark.slow  # a memory measurement (~20 s): `make test-slow`; bench/data.py measures it side by side
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, tok_dir):
    # reading 1,000 random blocks: 8M vs 16M tokens (an int64 copy would be 64 vs 128 MiB);
    # tokenising: a corpus and one twice as large
    r8 = synthetic_token_folder(tmp_path / "r8", 8 << 20, 64)
    r16 = synthetic_token_folder(tmp_path / "r16", 16 << 20, 64, seed=1)
    write_jsonl_corpus(tmp_path / "c1", 600, files=2, seed=3)
    write_jsonl_corpus(tmp_path / "c2", 1200, files=4, seed=3)
    small, large, one, two = peak_rss_kib((READ, r8), (READ, r16), (TOKENIZE, tmp_path / "c1", tmp_path / "o1", tok_dir),
                                          (TOKENIZE, tmp_path / "c2", tmp_path / "o2", tok_dir))
    assert large <= small * 1.1 and large - small < 16 << 10, (small, large)
    tokens = [json.loads((tmp_path / o / "index.json").read_text())["num_tokens"] for o in ("o1", "o2")]
    assert tokens[1] > 1.9 * tokens[0]
    assert two <= one * 1.1, (one, two)


def test_eval_and_prune_take_the_folder_as_data_with_the_text_paths_results(tmp_path, corpus, model_dir, capsys):
    src, _ = corpus
    out = tmp_path / "t"
    assert main(["tokenize", str(src), str(out), "--tokenizer", str(model_dir), "--seq-len", "16"]) == 0
    results = {}
    for name, data in (("shards", out), ("text", src)):
        capsys.readouterr()
        assert main(["eval", str(model_dir), "--data", str(data), "--seq-len", "16", "--max-blocks", "6"]) == 0
        ppl = json.loads(capsys.readouterr().out)["perplexity"]
        assert main(["prune", str(model_dir), str(tmp_path / f"p-{name}"), "--data", str(data), "--seq-len", "16",
                     "--samples", "4", "--expert-intermediate-size", "8"]) == 0
        results[name] = (ppl, json.loads((tmp_path / f"p-{name}" / "slim_plan.json").read_text())["layers"])
    assert results["shards"] == results["text"]
