"""`slimmoe plan`: memory per process and disk per step, from config.json files only.

The expected numbers are computed here by hand from the published shapes (parameter
counts from the tensor shapes, then the memory model of slimmoe/pipeline/footprint.py
written out again), never by calling the module under test.

Where the shapes come from:
* Phi-3.5-MoE: DESIGN.md's table and transformers' PhimoeConfig defaults as the released
  config.json sets them (hidden 4096, 32 layers, 16 experts of width 6400, top-2, 32 query
  heads x 128, 8 KV heads, vocab 32064, untied embeddings, attention and lm_head biases,
  LayerNorm with bias, bfloat16): 41,873,153,344 parameters.
* Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1 config.json): hidden 4096, 32 layers, 8 experts
  x 14336, top-2, 32 heads, 8 KV, vocab 32000, untied, RMSNorm, no biases: 46,702,792,704
  parameters (the "46.7B" of its model card).
* Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B config.json): hidden 2048, 48 layers, 128 experts x 768,
  top-8, 32 heads, 4 KV, head_dim 128, vocab 151936, untied, per-head q/k RMSNorm:
  30,532,122,624 parameters (the "30.5B" of its model card).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from slimmoe.cli.main import main

GiB = 1 << 30
W = 8  # processes of the 8 x 80 GiB case
T = 4096  # data.seq_len of the Phi pipeline
V_PHI = 32064

PHI_CONFIG = {"architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "vocab_size": V_PHI,
              "hidden_size": 4096, "intermediate_size": 6400, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "num_local_experts": 16, "num_experts_per_tok": 2,
              "max_position_embeddings": 131072, "attention_bias": True, "lm_head_bias": True,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-05}
MIXTRAL_CONFIG = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
                  "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                  "num_experts_per_tok": 2, "max_position_embeddings": 32768, "tie_word_embeddings": False,
                  "torch_dtype": "bfloat16"}
QWEN3_CONFIG = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
                "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "norm_topk_prob": True, "attention_bias": False, "tie_word_embeddings": False,
                "torch_dtype": "bfloat16"}


# ---- by hand: parameters from the tensor shapes --------------------------------------------
def hand_params(H, L, V, nq, kv, hd, E, I, *, attn_bias=False, norm_bias=False, qk_norm=False, lm_head_bias=False):
    """(total, root, one decoder layer, largest tensor) of a GQA MoE model with fused experts."""
    attn = H * nq * hd + 2 * H * kv * hd + nq * hd * H  # q, k, v, o weights
    if attn_bias:
        attn += nq * hd + 2 * kv * hd + H
    if qk_norm:
        attn += 2 * hd
    norm = H * (2 if norm_bias else 1)
    layer = attn + 2 * norm + E * H + E * 3 * H * I  # two norms, router, experts (gate, up, down)
    root = 2 * V * H + norm + (V if lm_head_bias else 0)  # embeddings, lm_head, final norm
    largest = max(E * 2 * I * H, H * nq * hd)  # the fused gate_up, or q
    return L * layer + root, root, layer, largest


def hand_acts(H, nq, kv, hd, E, k, I):
    """Activation elements per token of one decoder layer (footprint.py's docstring, by hand)."""
    return (2 * H + (nq + 2 * kv) * hd + nq * hd) + (2 * H + E + k * (2 * H + 3 * I))


def sharded(nbytes, world=W):
    return -(-nbytes // world)


def totalled(d):
    return {**d, "total": sum(d.values())}


PHI = hand_params(4096, 32, V_PHI, 32, 8, 128, 16, 6400, attn_bias=True, norm_bias=True, lm_head_bias=True)
MINI = hand_params(4096, 32, V_PHI, 32, 8, 128, 16, 960, attn_bias=True, norm_bias=True, lm_head_bias=True)
TINY = hand_params(4096, 32, V_PHI, 16, 4, 128, 16, 448, attn_bias=True, norm_bias=True, lm_head_bias=True)
ACT_PHI, ACT_MINI, ACT_TINY = (hand_acts(4096, 32, 8, 128, 16, 2, 6400), hand_acts(4096, 32, 8, 128, 16, 2, 960),
                               hand_acts(4096, 16, 4, 128, 16, 2, 448))


def test_hand_counts_match_the_published_totals():
    assert PHI[0] == 41_873_153_344 and PHI[2] == 1_300_326_400 and PHI[1] == 262_708_544
    assert MINI[0] == 7_647_632_704 and TINY[0] == 3_755_220_288  # Phi-mini-MoE 7.6B, Phi-tiny-MoE 3.8B
    assert (ACT_PHI, ACT_MINI, ACT_TINY) == (81_424, 48_784, 40_592)


# ---- the pipeline under test ---------------------------------------------------------------
def write_teacher(root: Path, config: dict) -> Path:
    """A teacher folder with config.json and nothing else: no weights, no tokenizer."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    return root


def phi_pipeline(tmp_path: Path, **extra) -> Path:
    teacher = write_teacher(tmp_path / "phi", PHI_CONFIG)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a" * (4 * T * 21))  # 21 blocks of 4096 tokens at 4 bytes/token: 20 train, 1 held out
    distill = {"tokens": 10**9, "batch_size": 64, "micro_batch_size": 1, "gradient_checkpointing": True}
    cfg = {"name": "phi", "teacher": str(teacher), "output_dir": str(tmp_path / "out"),
           "data": {"train": str(corpus), "seq_len": T},
           "stages": [{"name": "mini", "expert_intermediate_size": 960, "importance": {"batch_size": 1},
                       "distill": distill},
                      {"name": "tiny", "expert_intermediate_size": 448, "num_key_value_heads": 4,
                       "importance": {"batch_size": 1},
                       "distill": {**distill, "batch_size": 8, "teacher_cache_dir": str(tmp_path / "cache")}}],
           **extra}
    path = tmp_path / "phi.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def plan_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["plan", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def fsdp_weights(model, nbytes, gathered):
    P, R, Lmax, _ = model
    return sharded(P * nbytes) + gathered * (R + 2 * Lmax)


def live_teacher(tokens):
    """The bf16 teacher sharded 8 ways, plus a forward of ``tokens`` tokens and one top-k chunk."""
    return fsdp_weights(PHI, 2, 2) + tokens * 2 * (ACT_PHI + V_PHI) + min(4096, tokens) * V_PHI * 8


def hand_phi_plan():
    """per_rank_bytes of every step, 8 processes, bf16 compute, micro-batch 1 x 4096."""
    P_s = TINY[0]
    logits = T * V_PHI * 2  # one micro-batch of bf16 logits
    ckpt = lambda act: T * 2 * (32 * 4096 + act)
    eval_b = 8 * T  # eval.batch_size 8 = max(throughput_batch_sizes)
    # evaluate: one process, each bf16 model spread over the node's 8 GPUs (device_map="auto"):
    # an eighth of its bytes plus one more decoder layer for the uneven split
    spread = lambda model: sharded(2 * model[0]) + 2 * model[2]  # noqa: E731
    evaluate = lambda model, act: {"weights": spread(model), "grads": 0, "optimizer": 0,  # noqa: E731
                                   "teacher": spread(PHI) + eval_b * 2 * (ACT_PHI + V_PHI) + 1024 * V_PHI * 8,
                                   "activations": eval_b * 2 * (act + V_PHI) + 1024 * V_PHI * 8}

    def distill(model, act, teacher, accumulate):
        P, R, Lmax, _ = model
        # mini: batch 64 = 8 micro-batches x 1 x 8 processes, FSDP keeps every unsharded fp32 gradient until the
        # last; tiny: batch 8 = one micro-batch per step, only the root's and one layer's before reduce-scatter
        return {"weights": fsdp_weights(model, 4, 2), "grads": sharded(4 * P) + 4 * (P if accumulate else R + Lmax),
                "optimizer": sharded(8 * P), "teacher": teacher,
                "activations": ckpt(act) + 2 * logits + 512 * V_PHI * 8}

    def importance(model, act, teacher):
        return {"weights": fsdp_weights(model, 2, 2), "grads": 2 * model[2] + (2 + 8) * sharded(model[3]),
                "optimizer": 0,
                "teacher": teacher, "activations": T * 2 * 32 * act + 2 * logits + 4096 * V_PHI * 8}

    teacher_eval = evaluate(PHI, ACT_PHI)
    teacher_eval["teacher"] = 0
    return {"teacher": {"evaluate": teacher_eval},
            "mini": {"importance": importance(PHI, ACT_PHI, 0),  # stage 1: the teacher scores itself
                     "distill": distill(MINI, ACT_MINI, live_teacher(T), accumulate=True),
                     "evaluate": evaluate(MINI, ACT_MINI)},
            "tiny": {"importance": importance(MINI, ACT_MINI, live_teacher(T)),
                     "teacher_cache": {"weights": sharded(4 * P_s), "grads": 0, "optimizer": 0,
                                       "teacher": live_teacher(T), "activations": 0},
                     # top-k from the cache; the teacher that built it stays loaded (Trainer.open_teacher)
                     "distill": distill(TINY, ACT_TINY, fsdp_weights(PHI, 2, 2), accumulate=False),
                     "evaluate": evaluate(TINY, ACT_TINY)}}


def test_phi_at_8_x_80gib_matches_the_hand_computation(tmp_path, capsys):
    out = plan_json(capsys, phi_pipeline(tmp_path), "--nproc-per-node", 8, "--device-memory", "80GiB")
    assert out["teacher"]["total_params"] == out["teacher"]["estimated_total_params"] == 41_873_153_344
    assert [s["total_params"] for s in out["stages"]] == [MINI[0], TINY[0]]
    assert [s["estimated_total_params"] for s in out["stages"]] == [MINI[0], TINY[0]]
    assert out["device_memory_bytes"] == 80 * GiB and out["launch"]["world_size"] == 8
    got = {"teacher": {k: v["per_rank_bytes"] for k, v in out["teacher"]["steps"].items()}}
    got.update({s["name"]: {k: v["per_rank_bytes"] for k, v in s["steps"].items()} for s in out["stages"]})
    want = {stage: {step: totalled(d) for step, d in steps.items()} for stage, steps in hand_phi_plan().items()}
    assert got == want
    usable = 80 * GiB - GiB - 0.05 * 80 * GiB
    fits = {(st, step): d["total"] <= usable for st, steps in want.items() for step, d in steps.items()}
    assert {(s["name"], k): v["fits"] for s in out["stages"] for k, v in s["steps"].items()} == \
        {k: v for k, v in fits.items() if k[0] != "teacher"}
    # the 42B bf16 teacher (78 GiB) alone fills one 80 GiB device; spread over 8 its evaluate fits
    assert out["teacher"]["steps"]["evaluate"]["fits"] is True
    assert out["stages"][0]["steps"]["distill"]["fits"] is True
    disk = out["stages"][1]["disk_bytes"]
    # teacher cache: 8 float16 log-probs (2 B) and 8 uint16 ids (2 B: vocab 32,064 <= 65,536) per token
    assert out["data"]["train_blocks"] == 20 and disk["teacher_cache"] == 20 * T * 8 * (2 + 2)
    assert out["disk"]["teacher_cache_bytes_per_million_tokens"] == {"tiny": 8 * (2 + 2) * 10**6}
    assert disk["model"] == disk["pruned"] == 2 * TINY[0] and disk["checkpoints"] == 0


def test_teacher_cache_disk_follows_its_dtypes(tmp_path, capsys):
    from types import SimpleNamespace

    from slimmoe.pipeline.disk import cache_bytes_per_token

    out = plan_json(capsys, phi_pipeline(tmp_path), "--set", "stages.1.distill.teacher_cache_dtype=float32")
    assert out["stages"][1]["disk_bytes"]["teacher_cache"] == 20 * T * 8 * (4 + 2)  # float32, uint16 ids
    for dtype, vocab, want in (("bfloat16", 65_536, 2 + 2), ("float16", 65_537, 2 + 4), ("float16", 151_936, 2 + 4),
                               ("float32", 151_936, 4 + 4)):
        assert cache_bytes_per_token(SimpleNamespace(topk=8, teacher_cache_dtype=dtype), vocab) == 8 * want


def test_text_report_names_every_step_and_verdict(tmp_path, capsys):
    capsys.readouterr()
    assert main(["plan", str(phi_pipeline(tmp_path)), "--nproc-per-node", "8", "--device-memory", "80GiB"]) == 0
    text = capsys.readouterr().out
    for needle in ("41,873,153,344 parameters", "75.0 GiB usable", "mini     distill", "tiny     teacher_cache",
                   "tiny     evaluate", "disk (GiB)"):
        assert needle in text, needle


@pytest.mark.parametrize("config, total, stage_width", [(MIXTRAL_CONFIG, 46_702_792_704, 4096),
                                                       (QWEN3_CONFIG, 30_532_122_624, 384)])
def test_mixtral_and_qwen3_shapes(config, total, stage_width, tmp_path, capsys):
    from transformers import AutoConfig

    from slimmoe.prune.schedule import estimate_total_params

    teacher = write_teacher(tmp_path / "t", config)
    qwen = config["model_type"] == "qwen3_moe"
    H, L, V = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    E, k, kv = config.get("num_local_experts") or config["num_experts"], config["num_experts_per_tok"], 8 - 4 * qwen
    shape = {"H": H, "L": L, "V": V, "nq": 32, "kv": kv, "hd": 128, "E": E, "qk_norm": qwen}
    width = config.get("moe_intermediate_size") or config["intermediate_size"]  # the teacher's expert width
    hand_t, hand_s = hand_params(I=width, **shape), hand_params(I=stage_width, **shape)
    assert hand_t[0] == total == estimate_total_params(AutoConfig.from_pretrained(teacher))
    cfg = {"name": "x", "teacher": str(teacher), "output_dir": str(tmp_path / "out"),
           "data": {"train": "some/hub-dataset", "seq_len": 2048},
           "stages": [{"name": "s", "expert_intermediate_size": stage_width, "importance": {"batch_size": 2},
                       "distill": {"micro_batch_size": 1, "batch_size": 16}}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = plan_json(capsys, tmp_path / "c.yaml", "--nproc-per-node", 8, "--device-memory", "141GiB")
    assert out["teacher"]["total_params"] == total and out["stages"][0]["total_params"] == hand_s[0]
    steps = out["stages"][0]["steps"]
    tokens, act_t = 2 * 2048, hand_acts(H, 32, kv, 128, E, k, width)
    assert steps["importance"]["per_rank_bytes"] == totalled({
        "weights": fsdp_weights(hand_t, 2, 2), "grads": 2 * hand_t[2] + 10 * sharded(hand_t[3]), "optimizer": 0,
        "teacher": 0,
        "activations": tokens * 2 * L * act_t + 2 * tokens * V * 2 + 4096 * V * 8})
    P = hand_s[0]
    act_s, t_fwd = hand_acts(H, 32, kv, 128, E, k, stage_width), 2048 * 2 * (act_t + V) + 2048 * V * 8
    assert steps["distill"]["per_rank_bytes"] == totalled({  # no checkpointing: every layer's activations
        # batch 16 = 2 micro-batches x 1 x 8: the unsharded fp32 gradients are kept between them
        "weights": fsdp_weights(hand_s, 4, 2), "grads": sharded(4 * P) + 4 * P, "optimizer": sharded(8 * P),
        "teacher": fsdp_weights(hand_t, 2, 2) + t_fwd,
        "activations": 2048 * 2 * L * act_s + 2 * 2048 * V * 2 + 512 * V * 8})
    # a hub dataset: no block count, so the data's disk is per million tokens
    assert out["data"]["train_blocks"] is None and out["disk"]["total_bytes"] is None
    assert out["disk"]["data_bytes_per_million_tokens"] == 8 * 10**6


def test_one_process_does_not_fit_but_eight_do(tmp_path, capsys):
    path = phi_pipeline(tmp_path)
    one = plan_json(capsys, path, "--device-memory", "80GiB")["stages"][0]["steps"]["distill"]
    assert one["processes"] == 1 and one["fits"] is False
    # by hand, in GB: 206.1 / W sharded (fp32 weights, grads and AdamW, bf16 teacher) + 41.9 per process (the
    # unsharded fp32 gradients kept across micro-batches 30.6, gathered layers 1.4 + 5.7, forwards 2.0 + 2.1)
    # <= 80.5 usable: W >= 5.3
    assert one["advice"] == "use more processes (needs >= 6 at this size)"
    assert plan_json(capsys, path, "--nproc-per-node", 6, "--device-memory", "80GiB")["stages"][0]["steps"][
        "distill"]["fits"] is True
    assert plan_json(capsys, path, "--nproc-per-node", 5, "--device-memory", "80GiB")["stages"][0]["steps"][
        "distill"]["fits"] is False
    eight = plan_json(capsys, path, "--nproc-per-node", 8, "--device-memory", "80GB")["stages"][0]["steps"]
    assert eight["distill"]["fits"] is True and eight["distill"]["advice"] is None


@pytest.mark.parametrize("overrides, step, advice", [
    (["distill.micro_batch_size=4", "distill.gradient_checkpointing=false"], "distill",
     "set distill.gradient_checkpointing: true"),
    (["distill.batch_size=128", "distill.micro_batch_size=16"], "distill", "set distill.teacher_cache_dir"),
    # held-out KL (eval_every) keeps the live teacher even with a cache. 16 x 8 processes = 128: one micro-batch
    # per step. At 8 the step accumulates two, and FSDP keeps the 28.5 GiB of unsharded fp32 gradients in
    # between: that does not fit, 4 does (12 would, but does not divide 128 / 8 processes)
    (["distill.batch_size=128", "distill.micro_batch_size=16", "distill.teacher_cache_dir=/tmp/c",
      "distill.eval_every=10"], "distill", "lower distill.micro_batch_size to 4 (now 16)"),
    # 15.1 GiB weights + 10.2 GiB gradients + ~20 GiB per sequence of 4096 tokens: 2 fit 75 GiB, 3 do not
    (["importance.batch_size=8"], "importance", "lower importance.batch_size to 2 (now 8)"),
    (["distill.sharding=ddp"], "distill", "set distill.sharding: fsdp"),
])
def test_advice_names_the_setting_to_change(overrides, step, advice, tmp_path, capsys):
    sets = [a for o in overrides for a in ("--set", f"stages.0.{o}")]
    out = plan_json(capsys, phi_pipeline(tmp_path), "--nproc-per-node", 8, "--device-memory", "80GiB", *sets)
    assert out["stages"][0]["steps"][step]["fits"] is False
    assert out["stages"][0]["steps"][step]["advice"] == advice


def test_check_fits_raises_one_line_naming_the_step(tmp_path):
    from slimmoe.config import LaunchConfig
    from slimmoe.errors import UserError
    from slimmoe.pipeline.fit import check_fits
    from slimmoe.pipeline.schema import load_pipeline_config

    cfg = load_pipeline_config(phi_pipeline(tmp_path))
    check_fits(cfg, LaunchConfig(nproc_per_node=8), None)  # no device memory known: nothing to check
    check_fits(cfg, LaunchConfig(nproc_per_node=8), 141 * GiB)  # everything fits on 8 x 141 GiB
    with pytest.raises(UserError) as e:
        check_fits(cfg, LaunchConfig(nproc_per_node=1), 141 * GiB)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("stages.0 (mini): the distill step needs ~210.0 GiB")
    assert msg.endswith("; use more processes (needs >= 3 at this size) (slimmoe plan CONFIG shows every step)")
    # one GPU of 80 GiB: the teacher alone does not fit, not even spread (there is nothing to spread over)
    with pytest.raises(UserError, match=r"^teacher: the evaluate step .* needs a device of >= 84\.3 GiB"):
        check_fits(cfg, LaunchConfig(nproc_per_node=1), 80 * GiB)
    check_fits(cfg, LaunchConfig(nproc_per_node=8), 80 * GiB)  # everything fits 8 x 80 GiB
    with pytest.raises(UserError, match=r"^stages.0 \(mini\): the importance step needs .*\(needs >= 2 at this size\)"):
        check_fits(cfg, LaunchConfig(nproc_per_node=1), 80 * GiB, skip=["evaluate"])


def test_reads_config_json_only(tmp_path, capsys, monkeypatch):
    from slimmoe.io import loading

    def refuse(*a, **k):
        raise AssertionError("slimmoe plan must not read weights or tokenizers")

    for name in ("load_model", "check_weights", "load_tokenizer"):
        monkeypatch.setattr(loading, name, refuse)
    monkeypatch.setattr("transformers.PreTrainedModel.from_pretrained", refuse)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    path = phi_pipeline(tmp_path)
    out = plan_json(capsys, path, "--nproc-per-node", 8)  # no --device-memory, no GPU: no verdicts
    assert out["device_memory_bytes"] is None and out["fits"] is None
    assert all(s["fits"] is None and s["advice"] is None for st in out["stages"] for s in st["steps"].values())
    assert sorted(p.name for p in (tmp_path / "phi").iterdir()) == ["config.json"]
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("argv, needle", [
    (["plan", "missing.yaml"], "error: missing.yaml: no such config file"),
    (["plan", "{cfg}", "--device-memory", "80 apples"], "error: --device-memory: expected a size like 80GiB"),
    (["plan", "{cfg}", "--device-memory", "0"], "error: --device-memory: must be at least one byte"),
    (["plan", "{cfg}", "--set", "teacher={tmp}/nowhere"], "error: teacher: no such checkpoint folder"),
])
def test_bad_input_exits_2_with_one_error_line(argv, needle, tmp_path, capsys):
    cfg = phi_pipeline(tmp_path)
    capsys.readouterr()
    code = main([a.format(cfg=cfg, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and [line for line in err if line.startswith("error:")] == err[-1:]
    assert err[-1].startswith(needle.format(tmp=tmp_path))


def test_parse_size():
    from slimmoe.errors import UserError
    from slimmoe.resources import parse_size

    assert parse_size("80GiB") == parse_size("85899345920") == parse_size("80 gib") == 80 * GiB
    assert parse_size("80GB") == 80 * 10**9 and parse_size("1.5TiB") == 3 * (1 << 39)
    for bad in ("", "GiB", "-1GB", "80 apples", "0"):
        with pytest.raises(UserError, match="^size: "):
            parse_size(bad)


def test_slimmoe_run_refuses_a_pipeline_that_cannot_fit_before_starting(tmp_path, capsys):
    """The same check runs before `slimmoe run`: a device memory given in launch.device_memory
    that one step cannot fit stops the run with one error line, before any output exists."""
    from tiny_models import tiny_teacher_with_tokenizer

    teacher, corpus = tiny_teacher_with_tokenizer(tmp_path / "teacher", corpus_chars=4000)
    cfg = {"name": "tight", "teacher": str(teacher), "output_dir": str(tmp_path / "out"),
           "data": {"train": str(corpus), "seq_len": 32}, "stages": [{"name": "s", "expert_intermediate_size": 8}],
           "launch": {"device_memory": "1MB"}}
    path = tmp_path / "tight.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "step needs" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
