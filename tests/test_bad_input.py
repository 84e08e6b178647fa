"""The catalogue of bad inputs: one row per case, each answered with exit code 2, exactly one
`error: ...` line naming the field or file, no traceback, and every file already in the output
folder byte-identical afterwards. Rows run the CLI in-process; two run as real subprocesses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_models import tiny_config, tiny_model, tiny_teacher_with_tokenizer
from transformers import AutoConfig

from slimmoe.cli import main


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Every kind of input a row needs, good and bad, built once."""
    root = tmp_path_factory.mktemp("bad_input")
    teacher, corpus = tiny_teacher_with_tokenizer(root / "t", corpus_chars=4000)  # vocab 300, width 16, 4 heads / 2 KV
    paths = {"root": root, "teacher": teacher, "corpus": corpus}

    def folder(name):
        d = root / name
        d.mkdir()
        paths[name] = d
        return d

    trunc = folder("truncated")
    for f in teacher.iterdir():
        shutil.copy2(f, trunc / f.name)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    tiny_config("phimoe").save_pretrained(folder("no_weights"))
    (folder("no_config") / "model.safetensors").write_bytes(b"")
    AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, vocab_size=300).save_pretrained(folder("dense"))
    AutoConfig.for_model("jamba", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_experts=4,
                         vocab_size=300).save_pretrained(folder("jamba"))
    tiny_config("phimoe", num_attention_heads=8, num_key_value_heads=4).save_pretrained(folder("kv4"))
    small_vocab = folder("small_vocab")  # tokenizer of 300 tokens, embeddings for 96
    tiny_model("phimoe").save_pretrained(small_vocab)
    for f in teacher.iterdir():
        if f.name.startswith(("tokenizer", "special")):
            shutil.copy2(f, small_vocab / f.name)
    (root / "not_a_checkpoint.txt").write_text("hello")
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("To be")
    (root / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (root / "broken.yaml").write_text("name: [unclosed\nteacher: t\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    return paths


def pipeline(w, out, **changes) -> dict:
    """A valid pipeline config (its check_inputs passes), with top-level or dotted changes."""
    cfg = {"name": "p", "teacher": str(w["teacher"]), "output_dir": str(out),
           "data": {"train": str(w["corpus"]), "seq_len": 16, "eval_fraction": 0.1},
           "stages": [{"name": "a", "expert_intermediate_size": 12, "distill": {"tokens": 1000}},
                      {"name": "b", "expert_intermediate_size": 8, "distill": {"tokens": 1000}}]}
    for key, value in changes.items():
        node, parts = cfg, key.split("__")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    return cfg


def run_cfg(**changes):
    """A `slimmoe run` row: the config with ``changes`` (``a__b=v`` sets a.b), extra CLI args in ``argv``."""
    extra = changes.pop("argv", [])

    def build(w, tmp):
        (tmp / "p.yaml").write_text(yaml.safe_dump(pipeline(w, tmp / "out", **changes)))
        return ["run", str(tmp / "p.yaml"), *extra]
    return build


def cli(*args):
    """A row of literal arguments; ``{name}`` is a path from the fixture, ``{out}`` the output folder."""
    def build(w, tmp):
        return [str(a).format(out=tmp / "out", **{k: str(v) for k, v in w.items()}) for a in args]
    return build


ROWS = [
    # --- slimmoe run: the YAML file itself
    ("run-config-missing", cli("run", "{root}/nope.yaml"), "nope.yaml: no such config file"),
    ("run-yaml-does-not-parse", cli("run", "{root}/broken.yaml"), "broken.yaml: not valid YAML"),
    ("run-yaml-not-a-mapping", cli("run", "{root}/list.yaml"), "list.yaml: expected a mapping"),
    ("run-yaml-not-utf8", cli("run", "{root}/latin1.yaml"), "latin1.yaml: cannot be read as UTF-8"),
    ("run-unknown-key", run_cfg(stages__0__distil={"tokens": 5}),
     "stages.0.distil: unknown key (did you mean 'distill'?)"),
    ("run-unknown-top-key", run_cfg(trackin={"uri": "x"}), "trackin: unknown key (did you mean 'tracking'?)"),
    ("run-wrong-type", run_cfg(stages__0__distill={"tokens": "lots"}), "stages.0.distill.tokens: Input should be a valid integer"),
    ("run-set-bad-index", run_cfg(argv=["--set", "stages.5.name=x"]), "--set stages.5.name: index 5 is out of range"),
    # --- numbers
    ("run-zero-tokens", run_cfg(stages__0__distill={"tokens": 0}), "stages.0.distill.tokens: Input should be greater than 0"),
    ("run-negative-lr", run_cfg(stages__0__distill={"tokens": 9, "lr": -1e-3}), "stages.0.distill.lr: Input should be greater than 0"),
    ("run-zero-batch", run_cfg(stages__0__distill={"tokens": 9, "batch_size": 0}), "stages.0.distill.batch_size: Input should be greater"),
    ("run-zero-samples", run_cfg(stages__0__importance={"samples": 0}), "stages.0.importance.samples: Input should be greater"),
    ("run-zero-width", run_cfg(stages__0__expert_intermediate_size=0), "stages.0.expert_intermediate_size: Input should be greater"),
    ("run-seq-len-1", run_cfg(data__seq_len=1), "data.seq_len: Input should be greater than 1"),
    # --- the teacher
    ("run-teacher-missing", run_cfg(teacher="/nonexistent/teacher"), "teacher: no such checkpoint folder: /nonexistent/teacher"),
    ("run-teacher-is-a-file", lambda w, t: run_cfg(teacher=str(w["root"] / "not_a_checkpoint.txt"))(w, t),
     "teacher: {root}/not_a_checkpoint.txt is a file, not a checkpoint folder"),
    ("run-teacher-no-config", lambda w, t: run_cfg(teacher=str(w["no_config"]))(w, t), "teacher: {no_config} has no config.json"),
    ("run-teacher-truncated", lambda w, t: run_cfg(teacher=str(w["truncated"]))(w, t),
     "teacher: {truncated}/model.safetensors is truncated or corrupt"),
    ("run-teacher-no-weights", lambda w, t: run_cfg(teacher=str(w["no_weights"]))(w, t), "teacher: {no_weights} has no weights"),
    ("run-dense-teacher", lambda w, t: run_cfg(teacher=str(w["dense"]))(w, t),
     "model_type 'llama' is not a Mixture-of-Experts model"),
    ("run-unsupported-moe", lambda w, t: run_cfg(teacher=str(w["jamba"]))(w, t),
     "model_type 'jamba' is not supported yet; supported: deepseek_v3, granitemoe, mixtral, olmoe, phimoe, qwen2_moe, qwen3_moe"),
    ("run-tokenizer-mismatch", lambda w, t: run_cfg(teacher=str(w["small_vocab"]))(w, t),
     "teacher: its tokenizer has 300 tokens but config.json's vocab_size is 96"),
    # --- stage targets
    ("run-target-larger", run_cfg(stages__0__expert_intermediate_size=32),
     "stages.0.expert_intermediate_size: target 32 is larger than the source's 16"),
    ("run-targets-increase", run_cfg(stages__1__expert_intermediate_size=14),
     "stages.1.expert_intermediate_size: target 14 is larger than the source's 12"),
    ("run-stage-not-smaller", run_cfg(stages__1__expert_intermediate_size=12), "stages.1: makes the model no smaller than stages.0"),
    ("run-export-unknown-engine", run_cfg(stages__1__export=["vllm", "trt"]), "stages.1.export.1: unknown engine 'trt'"),
    ("run-export-llama-cpp-head-dim", run_cfg(stages__1__num_key_value_heads=1, stages__1__export=["llama.cpp"]),
     "stages.1.export.0: llama.cpp's PhiMoE converter ignores head_dim"),
    ("run-kv-not-dividing", lambda w, t: run_cfg(teacher=str(w["kv4"]), stages__1={"name": "b", "num_key_value_heads": 3})(w, t),
     "stages.1.num_key_value_heads: 3 does not divide the 8 query heads"),
    ("run-importance-topk-over-vocab", run_cfg(stages__0__importance={"topk": 301}),
     "stages.0.importance.topk: 301 is larger than the teacher's vocabulary (300 tokens)"),
    ("run-distill-topk-over-vocab", run_cfg(stages__1__distill={"tokens": 9, "topk": 1000}),
     "stages.1.distill.topk: 1000 is larger than the teacher's vocabulary (300 tokens)"),
    # --- data
    ("run-data-missing", run_cfg(data={"train": "/nonexistent/corpus.txt"}), "data.train: no such file or folder: /nonexistent/corpus.txt"),
    ("run-empty-corpus", lambda w, t: run_cfg(data={"train": str(w["root"] / "empty.txt")})(w, t),
     "data.train: {root}/empty.txt: corpus has 0 tokens"),
    ("run-corpus-shorter-than-a-block", lambda w, t: run_cfg(data={"train": str(w["root"] / "short.txt"), "seq_len": 16})(w, t),
     "fewer than seq_len=16 needed for one block"),
    # --- output folder and tracking
    ("run-folder-of-another-pipeline", run_cfg(name="other"), "output_dir: {out} holds the results of pipeline 'p', not 'other'"),
    ("run-unreachable-tracking", run_cfg(tracking={"uri": "http://127.0.0.1:9"}),
     "tracking.uri: cannot reach the MLflow server at http://127.0.0.1:9"),
    # --- slimmoe prune
    ("prune-model-missing", cli("prune", "/nonexistent/m", "{out}/slim", "--expert-intermediate-size", 8), "MODEL: no such checkpoint folder"),
    ("prune-not-a-checkpoint", cli("prune", "{root}/not_a_checkpoint.txt", "{out}/slim", "--expert-intermediate-size", 8),
     "MODEL: {root}/not_a_checkpoint.txt is a file"),
    ("prune-truncated", cli("prune", "{truncated}", "{out}/slim", "--expert-intermediate-size", 8, "--samples", 2),
     "MODEL: {truncated}/model.safetensors is truncated or corrupt"),
    ("prune-dense", cli("prune", "{dense}", "{out}/slim", "--expert-intermediate-size", 8), "is not a Mixture-of-Experts model"),
    ("prune-target-larger", cli("prune", "{teacher}", "{out}/slim", "--expert-intermediate-size", 17), "expert_intermediate_size: target 17 is larger"),
    ("prune-zero-samples", cli("prune", "{teacher}", "{out}/slim", "--expert-intermediate-size", 8, "--samples", 0),
     "importance.samples: Input should be greater than 0"),
    ("prune-topk-over-vocab", cli("prune", "{teacher}", "{out}/slim", "--expert-intermediate-size", 8, "--topk", 301),
     "--topk: 301 is larger than MODEL's vocabulary (300 tokens)"),
    ("prune-data-missing", cli("prune", "{teacher}", "{out}/slim", "--expert-intermediate-size", 8, "--data", "/nonexistent.txt"),
     "data: no such file or folder: /nonexistent.txt"),
    ("prune-data-shorter-than-a-block", cli("prune", "{teacher}", "{out}/slim", "--expert-intermediate-size", 8, "--data", "{root}/short.txt",
                                            "--samples", 2, "--seq-len", 64), "--data: {root}/short.txt: corpus has"),
    ("prune-out-not-slimmoe", cli("prune", "{teacher}", "{out}/foreign", "--expert-intermediate-size", 8), "pass --force"),
    # --- slimmoe eval
    ("eval-model-missing", cli("eval", "/nonexistent/m"), "MODEL: no such checkpoint folder"),
    ("eval-truncated", cli("eval", "{truncated}"), "MODEL: {truncated}/model.safetensors is truncated or corrupt"),
    ("eval-zero-seq-len", cli("eval", "{teacher}", "--seq-len", 0), "--seq-len: must be positive"),
    ("eval-empty-corpus", cli("eval", "{teacher}", "--data", "{root}/empty.txt"), "--data: {root}/empty.txt: corpus has 0 tokens"),
    # --- slimmoe distill
    ("distill-student-missing", cli("distill", "/nonexistent/s", "{teacher}", "{out}/d", "--tokens", 64), "STUDENT: /nonexistent/s"),
    ("distill-zero-tokens", cli("distill", "{teacher}", "{teacher}", "{out}/d", "--tokens", 0), "tokens: Input should be greater than 0"),
    ("distill-negative-lr", cli("distill", "{teacher}", "{teacher}", "{out}/d", "--tokens", 64, "--lr", -1), "lr: Input should be greater than 0"),
    ("distill-zero-batch", cli("distill", "{teacher}", "{teacher}", "{out}/d", "--tokens", 64, "--batch-size", 0), "batch_size: Input should be greater"),
    ("distill-topk-over-vocab", cli("distill", "{teacher}", "{teacher}", "{out}/d", "--tokens", 64, "--topk", 400),
     "--topk: 400 is larger than the vocabulary (300 tokens)"),
    ("distill-vocab-mismatch", cli("distill", "{small_vocab}", "{teacher}", "{out}/d", "--tokens", 64), "TEACHER: vocab size 300 differs"),
]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def earlier_output(out: Path) -> None:
    """What an earlier run of pipeline 'p' (and a foreign folder) left: must survive every row."""
    (out / "foreign").mkdir(parents=True)
    (out / "foreign" / "notes.txt").write_text("mine, not slimmoe's")
    (out / ".slimmoe-pipeline.json").write_text(json.dumps({"name": "p", "teacher": "t"}))
    (out / "summary.json").write_text('{"stages": []}')
    (out / "a" / "model").mkdir(parents=True)
    (out / "a" / "model" / "config.json").write_text("{}")
    (out / "slim").mkdir()  # an earlier `slimmoe prune` output
    (out / "slim" / "slim_plan.json").write_text('{"layers": []}')
    (out / "slim" / "model.safetensors").write_bytes(b"weights")


@pytest.mark.parametrize("build,needle", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_with_one_line_naming_it(w, tmp_path, capsys, build, needle):
    out = tmp_path / "out"
    earlier_output(out)
    before = snapshot(out)
    argv = build(w, tmp_path)
    capsys.readouterr()
    t0 = time.monotonic()
    code = main(argv)
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln.lower() or "Traceback" in ln]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.format(out=out, **{k: str(v) for k, v in w.items()}) in lines[0], lines[0]
    assert snapshot(out) == before  # nothing already written is damaged, nothing added
    assert elapsed < 20


def test_the_base_config_passes_every_check_and_its_tokens_are_reused_by_the_flow(w, tmp_path, monkeypatch):
    """The rows fail for their own reason only; check_inputs' tokenisation is the flow's cache."""
    from slimmoe.io import token_encode
    from slimmoe.pipeline import steps as stages
    from slimmoe.pipeline.resolve import check_inputs
    from slimmoe.pipeline.schema import PipelineConfig

    cfg = PipelineConfig.model_validate(pipeline(w, tmp_path / "out"))
    check_inputs(cfg)
    assert not (tmp_path / "out").exists()  # checks write nothing

    def no_tokenising(*a, **k):
        raise AssertionError("the corpus was tokenised again")

    monkeypatch.setattr(token_encode, "encode_texts", no_tokenising)
    d = cfg.data
    ref = stages.prepare_data(d.train, str(cfg.teacher), tmp_path / "blocks", d.seq_len, eval_path=d.eval,
                              eval_fraction=d.eval_fraction, text_field=d.text_field, max_blocks=d.max_blocks)
    assert ref.train_blocks > 0


def test_force_lets_run_claim_a_foreign_folder(w, tmp_path):
    from slimmoe.io.lock import check_output_owner

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("1")
    with pytest.raises(Exception, match="not empty"):
        check_output_owner(tmp_path / "x", "p")
    check_output_owner(tmp_path / "x", "p", force=True)
    check_output_owner(tmp_path / "new", "p")  # a folder that does not exist yet is fine


@pytest.mark.parametrize("build,needle", [
    (cli("prune", "{truncated}", "{out}/x", "--expert-intermediate-size", 8), "MODEL: {truncated}/model.safetensors is truncated"),
    (run_cfg(tracking={"uri": "http://127.0.0.1:9"}), "tracking.uri: cannot reach"),
], ids=["prune-truncated", "run-unreachable-tracking"])
def test_no_traceback_reaches_stderr_of_the_real_command(w, tmp_path, build, needle):
    argv = build(w, tmp_path)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "slimmoe.cli", *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert needle.format(out=tmp_path / "out", **{k: str(v) for k, v in w.items()}) in res.stderr
    assert time.monotonic() - t0 < 60  # no minutes of MLflow retries
