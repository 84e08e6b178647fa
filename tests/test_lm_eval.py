"""The lm-evaluation-harness hook, offline: a 6-item multiple-choice task from a local YAML +
jsonl, run by lm-eval on a tiny saved checkpoint, checked against a hand-written
loglikelihood loop over the same items with the same model."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from tiny_models import tiny_teacher_with_tokenizer

from slimmoe.errors import UserError
from slimmoe.evaluation.harness import flatten_results, run_lm_eval

QUESTIONS = ["To be or not", "Good morrow, my", "What say you to", "Thou art a", "My lord, the", "Come hither,"]
CHOICES = [["to be", "the king", "my lord"], ["sweet lady", "good sir", "lord"], ["this", "that", "me"],
           ["villain", "king", "fool"], ["queen", "duke", "people"], ["boy", "sirrah", "friend"]]


def choice_loglikelihoods(model, tok, context: str, choices: list[str]) -> list[float]:
    """log P(" " + choice | context), summed over the choice's tokens: the context's tokens are
    those of the context alone, the choice's the rest of the whole string's tokens."""
    out = []
    for c in choices:
        ctx = tok(context)["input_ids"]
        whole = tok(context + " " + c)["input_ids"]
        assert whole[: len(ctx)] == ctx
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        out.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
    return out


@pytest.fixture
def task_and_model(tmp_path):
    """The checkpoint, and a task folder whose labels make the hand loop right on items 0, 2, 4 only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _ = tiny_teacher_with_tokenizer(tmp_path / "t", corpus_chars=5000)
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    items = []
    for i, (q, ch) in enumerate(zip(QUESTIONS, CHOICES)):
        pred = max(range(3), key=choice_loglikelihoods(model, tok, q, ch).__getitem__)
        items.append({"question": q, "choices": ch, "label": pred if i % 2 == 0 else (pred + 1) % 3})
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (folder / "tiny_mc.yaml").write_text(
        "task: slimmoe_tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'items.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return model_dir, folder, items


def test_lm_eval_accuracy_equals_a_hand_loglikelihood_loop(task_and_model, tmp_path):
    pytest.importorskip("lm_eval")
    from slimmoe.pipeline.steps import evaluate_stage

    model_dir, folder, items = task_and_model
    torch.save({"train": torch.randint(3, 50, (2, 16)), "eval": torch.randint(3, 50, (2, 16))}, tmp_path / "b.pt")
    out = evaluate_stage(str(model_dir), str(tmp_path / "b.pt"), max_blocks=2, batch_size=2, generation=False,
                         lm_eval_tasks=["slimmoe_tiny_mc"], lm_eval_batch_size=4, lm_eval_include_path=str(folder))
    assert out["lm_eval/slimmoe_tiny_mc/acc"] == pytest.approx(3 / 6)
    limited = run_lm_eval(model_dir, ["slimmoe_tiny_mc"], limit=2, batch_size=1, include_path=folder)
    assert limited["slimmoe_tiny_mc/acc"] == pytest.approx(1 / 2)  # items 0 (right) and 1 (wrong)


def test_unknown_task_and_missing_folder_name_the_field(task_and_model):
    pytest.importorskip("lm_eval")
    model_dir, folder, _ = task_and_model
    with pytest.raises(UserError, match=r"eval\.lm_eval_tasks: unknown lm-eval task\(s\) \['no_such_task'\]"):
        run_lm_eval(model_dir, ["no_such_task"], include_path=folder)
    with pytest.raises(UserError, match="eval.lm_eval_include_path: no such folder"):
        run_lm_eval(model_dir, ["slimmoe_tiny_mc"], include_path=folder / "nope")


def test_missing_lm_eval_is_one_line_naming_the_field_and_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(UserError) as e:
        run_lm_eval(tmp_path, ["arc_easy"])
    msg = str(e.value)
    assert msg.startswith("eval.lm_eval_tasks:") and "pip install 'slimmoe[eval]'" in msg and "\n" not in msg


def test_flatten_results_keeps_numbers_and_names_filters():
    res = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strict-match": 1,
                 "sample_len": 4}}
    assert flatten_results(res) == {"t/acc": 0.5, "t/exact_match_strict-match": 1.0}


def test_a_task_whose_data_cannot_be_loaded_is_one_line_naming_the_field(task_and_model):
    """Offline, a task whose dataset is missing (or on the hub) is a one-line error, not lm-eval's traceback."""
    pytest.importorskip("lm_eval")
    model_dir, folder, _ = task_and_model
    text = (folder / "tiny_mc.yaml").read_text().replace("slimmoe_tiny_mc", "slimmoe_lost_mc")
    (folder / "lost_mc.yaml").write_text(text.replace(str(folder / "items.jsonl"), str(folder / "gone.jsonl")))
    with pytest.raises(UserError, match=r"^eval\.lm_eval_tasks: lm-eval could not load the data of \['slimmoe_lost_mc'\]"):
        run_lm_eval(model_dir, ["slimmoe_lost_mc"], include_path=folder)
