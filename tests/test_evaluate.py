"""The evaluation stage: KL to the teacher, throughput, peak memory, EvalConfig, the evaluate
step and task (tiny random models; every measurement a few forward passes)."""

from __future__ import annotations

import json
import time

import pytest
import torch
import yaml
from tiny_models import tiny_model

from slimmoe.cli import main
from slimmoe.evaluation.quality import kl_to_teacher
from slimmoe.evaluation.speed import PeakMemory, generation_throughput, resident_bytes
from slimmoe.evaluation.summary import evaluate
from slimmoe.pipeline.schema import EvalConfig

CONTRACT = {"perplexity", "total_params", "active_params", "tokens_per_second"}


def blocks(n=5, seq=12, vocab=96, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def reference_kl(student, teacher, ids) -> float:
    """Mean over positions of sum_v p_t (log p_t - log p_s), softmaxes in float64, all blocks at once."""
    with torch.no_grad():
        s = torch.log_softmax(student(input_ids=ids).logits.double(), -1)
        t = torch.log_softmax(teacher(input_ids=ids).logits.double(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


@pytest.mark.parametrize("model_type", ["phimoe", "qwen2_moe"])
def test_kl_matches_a_float64_full_softmax_reference(model_type):
    student, teacher = tiny_model(model_type, seed=0), tiny_model(model_type, seed=1)
    ids = blocks()
    got = kl_to_teacher(student, teacher, ids, batch_size=2, chunk_size=7)  # uneven batches and chunks
    want = reference_kl(student, teacher, ids)
    assert want > 0.05
    assert got == pytest.approx(want, rel=1e-5)


def test_kl_of_a_model_to_itself_is_zero():
    m = tiny_model("mixtral")
    assert abs(kl_to_teacher(m, m, blocks(), batch_size=3)) < 1e-6


def test_generation_makes_exactly_the_asked_tokens_per_row():
    m = tiny_model("phimoe")
    prompts = blocks(n=3, seq=64)  # longer than max positions - new tokens: the prompt is cut to fit
    one = generation_throughput(m, prompts, new_tokens=5, batch_size=1)
    eight = generation_throughput(m, prompts, new_tokens=5, batch_size=8)
    assert one["tokens"] == 5 and eight["tokens"] == 8 * 5
    assert one["tokens_per_second"] > 0 and eight["tokens_per_second"] > 0
    assert eight["tokens_per_second"] == pytest.approx(eight["tokens"] / eight["seconds"])


def test_peak_memory_sees_a_transient_allocation_on_cpu():
    with PeakMemory("cpu") as mem:
        x = torch.ones(16 << 20)  # 64 MiB, touched, held for a while, then freed
        time.sleep(0.1)
        del x
    assert mem.growth is not None and mem.growth >= 0.8 * (64 << 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_on_cuda_counts_allocations_made_inside_only():
    before = torch.ones(8 << 20, device="cuda")  # allocated before: not growth
    with PeakMemory("cuda") as mem:
        x = torch.ones(16 << 20, device="cuda")
        del x
    assert (64 << 20) <= mem.growth < (64 << 20) + (8 << 20)
    del before


def test_evaluate_defaults_keep_the_contract_and_options_add_keys():
    m, t = tiny_model("olmoe", seed=0), tiny_model("olmoe", seed=1)
    ids = blocks(n=4, seq=16)
    assert set(evaluate(m, ids, batch_size=2)) == CONTRACT
    out = evaluate(m, ids, batch_size=2, teacher=t, throughput_batch_sizes=(1, 8), generation_tokens=3,
                   generation_prompt_tokens=4, peak_memory=True)
    assert set(out) == CONTRACT | {"kl_to_teacher", "peak_memory_bytes", "forward_tokens_per_second_b1",
                                   "forward_tokens_per_second_b8", "generate_tokens_per_second_b1",
                                   "generate_tokens_per_second_b8"}
    assert out["kl_to_teacher"] == pytest.approx(reference_kl(m, t, ids), rel=1e-5)
    weights = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    assert out["peak_memory_bytes"] >= resident_bytes(m) == weights
    assert all(out[k] > 0 for k in out if "per_second" in k)


@pytest.mark.parametrize("override,field", [
    ("generation_tokens=0", "stages.0.eval.generation_tokens"),
    ("throughput_batch_sizes=[1,0]", "stages.0.eval.throughput_batch_sizes"),
    ("throughput_batch_sizes=[8,8]", "stages.0.eval.throughput_batch_sizes"),
    ("lm_eval_limit=0", "stages.0.eval.lm_eval_limit"),
    ("lm_eval_batch_size=-1", "stages.0.eval.lm_eval_batch_size"),
    ("lm_eval_tasks=['']", "stages.0.eval.lm_eval_tasks"),
    ("kl_to_teacher=maybe", "stages.0.eval.kl_to_teacher"),
])
def test_bad_eval_settings_exit_2_naming_the_field(tmp_path, capsys, override, field):
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "teacher": "t", "output_dir": str(tmp_path / "o"),
                                    "data": {"train": "d.txt"}, "stages": [{"name": "a"}]}))
    assert main(["run", str(path), "--set", f"stages.0.eval.{override}"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and field in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_eval_config_defaults_and_yaml_values():
    cfg = EvalConfig()
    assert cfg.kl_to_teacher and cfg.generation and cfg.throughput_batch_sizes == [1, 8] and cfg.lm_eval_tasks == []
    cfg = EvalConfig(lm_eval_tasks=["arc_easy"], lm_eval_limit=0.5, throughput_batch_sizes=[4])
    assert cfg.lm_eval_limit == 0.5 and cfg.throughput_batch_sizes == [4]


@pytest.fixture
def saved(tmp_path):
    """A teacher, a different student (same shapes) and prepared blocks, saved as the pipeline has them."""
    teacher, student = tiny_model("phimoe", seed=0), tiny_model("phimoe", seed=3)
    teacher.save_pretrained(tmp_path / "teacher")
    student.save_pretrained(tmp_path / "student")
    torch.save({"train": blocks(n=6, seq=16, seed=1), "eval": blocks(n=4, seq=16, seed=2)}, tmp_path / "blocks.pt")
    return tmp_path, teacher, student


SMALL = dict(max_blocks=3, batch_size=2, throughput_batch_sizes=[1, 8], generation_tokens=3, generation_prompt_tokens=4)


def test_evaluate_stage_measures_kl_on_held_out_blocks_and_skips_it_for_the_teacher(saved):
    from slimmoe.pipeline.steps import evaluate_stage

    root, teacher, student = saved
    out = evaluate_stage(str(root / "student"), str(root / "blocks.pt"), teacher_dir=str(root / "teacher"), **SMALL)
    held = blocks(n=4, seq=16, seed=2)[:3]
    assert out["perplexity_split"] == "eval"
    assert out["kl_to_teacher"] == pytest.approx(reference_kl(student, teacher, held), rel=1e-5)
    for key in ("generate_tokens_per_second_b1", "generate_tokens_per_second_b8", "forward_tokens_per_second_b8",
                "peak_memory_bytes", *CONTRACT):
        assert out[key] > 0, key
    own = evaluate_stage(str(root / "teacher"), str(root / "blocks.pt"), teacher_dir=str(root / "teacher"), **SMALL)
    assert own["kl_to_teacher"] == 0.0
    off = evaluate_stage(str(root / "student"), str(root / "blocks.pt"), teacher_dir=str(root / "teacher"),
                         **{**SMALL, "kl_to_teacher": False, "generation": False, "peak_memory": False})
    assert not {"kl_to_teacher", "generate_tokens_per_second_b1", "peak_memory_bytes"} & set(off)


def test_evaluate_task_passes_the_teacher_and_logs_every_number(saved, monkeypatch):
    pytest.importorskip("prefect")
    import tasks.steps as steps
    from flows.common import _metrics  # imported before the patches: tasks.lineage binds steps.tracker

    root, teacher, student = saved
    logged, tables = {}, []

    class FakeTracker:
        def log_dataset(self, *a, **k):
            pass

        def log_metrics(self, run_id, metrics):
            logged.update(metrics)

        def run_url(self, run_id):
            return "http://mlflow/" + run_id

    monkeypatch.setattr(steps, "tracker", lambda tracking: FakeTracker())
    monkeypatch.setattr(steps, "create_table_artifact", lambda **kw: tables.append(kw["table"]))
    monkeypatch.setattr(steps, "create_markdown_artifact", lambda **kw: None)
    from slimmoe.pipeline.steps import ModelRef, TokenBlocks
    from tasks.tracking import TrackingSettings

    settings = EvalConfig(**SMALL)
    ref = ModelRef(path=str(root / "teacher"), fingerprint="t")
    blocks_ref = TokenBlocks(path=str(root / "blocks.pt"), eval_blocks=4, train_blocks=6, source="d.txt",
                             fingerprint="f", seq_len=16)
    student = ModelRef(path=str(root / "student"), fingerprint="s")
    tracking = TrackingSettings(uri="sqlite:///unused.db", experiment="unused")
    metrics = steps.evaluate.fn("mid", student, blocks_ref, settings, tracking, "run1", teacher=ref)
    assert metrics["kl_to_teacher"] > 0.05
    assert logged["eval/kl_to_teacher"] == metrics["kl_to_teacher"]
    assert logged["eval/generate_tokens_per_second_b8"] == metrics["generate_tokens_per_second_b8"]
    assert "eval/perplexity_split" not in logged
    assert tables[0][0]["stage"] == "mid" and tables[0][0]["kl_to_teacher"] == metrics["kl_to_teacher"]

    row = _metrics(metrics)
    assert list(row)[:4] == ["total_params", "active_params", "perplexity", "tokens_per_second"]
    assert row["kl_to_teacher"] == metrics["kl_to_teacher"] and "perplexity_split" not in row
    json.dumps(row)


def test_cli_eval_prints_the_contract_keys(saved, capsys):
    root, _, _ = saved
    assert main(["eval", str(root / "student"), "--seq-len", "8", "--max-blocks", "2", "--batch-size", "2"]) == 0
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) == CONTRACT
