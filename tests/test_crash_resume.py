"""`slimmoe run` killed with SIGKILL at every kind of point, then started again, ends with the
models of an uninterrupted run; finished steps are not recomputed, a torn distillation
checkpoint is skipped, a torn Prefect cache record is recomputed, MLflow keeps one run per stage.

Every run is a subprocess talking to one Prefect test server shared by the module (a kill
must not orphan a temporary server); PREFECT_HOME, MLflow and caches live under tmp paths.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers_prefect import last_task_states as settled_states
from prefect.testing.utilities import prefect_test_harness
from safetensors.torch import load_file
from tiny_models import tiny_teacher_with_tokenizer

from slimmoe.faults import CRASH_ENV
from slimmoe.io.atomic import COMPLETE_FILE

STEPS = 8  # 2048 tokens / (8 x 32); checkpoints every 2 steps
STEP_TASKS = ("importance-s1", "slim-s1", "distill-s1", "evaluate-s1", "evaluate-teacher")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    teacher, corpus = tiny_teacher_with_tokenizer(root / "teacher", corpus_chars=12000)
    old = os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # its first write races the test server's db
    try:
        with prefect_test_harness(server_startup_timeout=60):
            from prefect.settings import PREFECT_API_URL

            yield root, teacher, corpus, PREFECT_API_URL.value()
    finally:
        if old is None:
            os.environ.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)
        else:
            os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = old


def write_config(world, name: str) -> Path:
    root, teacher, corpus, _ = world
    cfg = {"name": "crashy", "teacher": str(teacher), "output_dir": str(root / name),
           "data": {"train": str(corpus), "eval_fraction": 0.1, "seq_len": 32},
           "stages": [{"name": "s1", "expert_intermediate_size": 8, "num_key_value_heads": 1,
                       "importance": {"samples": 4}, "eval": {"max_blocks": 4},
                       "distill": {"tokens": STEPS * 8 * 32, "batch_size": 8, "checkpoint_every": 2, "lr": 1e-3,
                                   "progress": False}}],
           # one MLflow database for all runs of the module: creating one costs ~6 s of migrations
           "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": name, "register_models": False}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


PRELOAD = ["torch", "transformers", "mlflow", "prefect", "flows.compress", "tasks.tracking", "slimmoe.cli"]


@pytest.fixture(scope="module")
def forkserver():
    """Runs fork from one process that imported torch, transformers, Prefect and MLflow once
    (a fresh interpreter spends ~10 s importing them on a loaded 2-core machine)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _child(config: str, api: str, home: str, crash_at: str | None, log: str) -> None:
    """`slimmoe run CONFIG` in a forked child: output to ``log``, exit code as the CLI's."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.pop(CRASH_ENV, None)
    if crash_at:
        os.environ[CRASH_ENV] = crash_at
    os.environ.update(TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    torch.set_num_threads(1)
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_LOGGING_LEVEL, temporary_settings

    from slimmoe.cli import main

    with temporary_settings({PREFECT_API_URL: api, PREFECT_HOME: home, PREFECT_LOGGING_LEVEL: "WARNING"}):
        code = main(["run", config])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Run:
    def __init__(self, ctx, world, config: Path, crash_at: str | None = None):
        root, _, _, api = world
        self.log = root / f"run-{time.monotonic_ns()}.log"
        self.proc = ctx.Process(target=_child, args=(str(config), api, str(root / "prefect-home"), crash_at,
                                                     str(self.log)))
        self.proc.start()

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        self.proc.join(timeout)
        return self.proc.exitcode, self.log.read_text() if self.log.exists() else ""


def run(ctx, world, config: Path, crash_at: str | None = None) -> tuple[int, str]:
    return Run(ctx, world, config, crash_at).wait()


def last_task_states() -> dict[str, str]:
    """The newest flow run's task states; a killed flow leaves the task it was in Running."""
    return settled_states(killed=True)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_models(a: Path, b: Path) -> None:
    for sub in ("pruned", "model"):
        wa, wb = weights(a / "s1" / sub), weights(b / "s1" / sub)
        assert wa.keys() == wb.keys()
        for k in wb:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=f"{sub}/{k}")
    sa, sb = (json.loads((p / "summary.json").read_text())["stages"] for p in (a, b))
    assert [r["perplexity"] for r in sa] == pytest.approx([r["perplexity"] for r in sb], rel=1e-5)


@pytest.fixture(scope="module")
def clean(world, forkserver):
    config = write_config(world, "clean")
    t0 = time.monotonic()
    rc, err = run(forkserver, world, config)
    assert rc == 0, err[-3000:]
    return world[0] / "clean", time.monotonic() - t0


@pytest.mark.slow  # ~75 s on 2 cores; make test keeps the kill at a random time: `make test-slow`
def test_kill_at_every_point_then_resume_equals_uninterrupted(world, clean, forkserver):
    out, config = world[0] / "crashy", write_config(world, "crashy")
    s1 = out / "s1"

    rc, err = run(forkserver, world, config, "importance")
    assert rc == -signal.SIGKILL, err[-3000:]
    assert not (s1 / "importance.pt").exists()

    rc, err = run(forkserver, world, config, "slim:write")  # pruned folder filled, not yet renamed
    assert rc == -signal.SIGKILL, err[-3000:]
    assert (s1 / "importance.pt").is_file() and not (s1 / "pruned").exists()

    rc, err = run(forkserver, world, config, "distill:step=3")
    assert rc == -signal.SIGKILL, err[-3000:]
    states = last_task_states()
    assert states["importance-s1"] == "Cached" and states["slim-s1"] == "Completed", states
    assert (s1 / "pruned" / COMPLETE_FILE).is_file()
    assert (s1 / "model" / "checkpoints" / "step-00000002").is_dir()
    assert not (s1 / "model" / COMPLETE_FILE).exists()

    rc, err = run(forkserver, world, config, "checkpoint:write")  # dies writing the step-4 checkpoint
    assert rc == -signal.SIGKILL, err[-3000:]
    assert last_task_states()["slim-s1"] == "Cached"
    assert list((s1 / "model" / "checkpoints").glob(".tmp-step-00000004-*"))

    rc, err = run(forkserver, world, config, "evaluate")  # dies in the stage's evaluation, after distillation
    assert rc == -signal.SIGKILL, err[-3000:]
    done = json.loads((s1 / "model" / "distill_done.json").read_text())
    assert done["resumed_from_step"] == 2  # the torn step-4 checkpoint is not a checkpoint
    assert (s1 / "model" / COMPLETE_FILE).is_file()

    rc, err = run(forkserver, world, config, "summary:write")
    assert rc == -signal.SIGKILL, err[-3000:]
    states = last_task_states()
    assert states["distill-s1"] == "Cached" and states["evaluate-s1"] == "Completed", states
    assert not (out / "summary.json").exists()

    (s1 / "pruned" / COMPLETE_FILE).unlink()  # as if the slim write had died before its marker
    rc, err = run(forkserver, world, config)
    assert rc == 0, err[-3000:]
    states = last_task_states()
    assert states.pop("slim-s1") == "Completed"  # a folder without the marker is not a result
    assert all(states[n] == "Cached" for n in STEP_TASKS if n in states), states  # same pruned model: rest cached
    assert_same_models(out, clean[0])
    assert not list(out.rglob(".*.tmp-*")) and not list(s1.glob(".*.old-*"))
    assert_one_finished_run_per_stage(out)


def assert_one_finished_run_per_stage(out: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name(out.name)
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["crashy", "s1"]  # reused by key, never duplicated
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_kill_at_a_random_time_then_resume_equals_uninterrupted(world, clean, forkserver):
    out, config = world[0] / "random", write_config(world, "random")
    seed = int(time.time())
    delay = random.Random(seed).uniform(0.3, 0.9) * clean[1]
    r = Run(forkserver, world, config)
    r.proc.join(delay)
    if r.proc.exitcode is None:
        r.proc.kill()  # SIGKILL from outside, wherever it is
        r.proc.join()
    rc, err = run(forkserver, world, config)
    assert rc == 0, f"seed {seed}, killed after {delay:.1f}s: {err[-3000:]}"
    assert_same_models(out, clean[0])


def test_torn_cache_records_are_recomputed_not_fatal(world, clean, forkserver):
    out = world[0] / "clean"
    results = [p for p in (out / ".prefect-cache" / "results").iterdir() if p.is_file()]
    assert results
    for p in results:  # a kill while Prefect wrote each result file
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    before = weights(out / "s1" / "model")
    rc, err = run(forkserver, world, write_config(world, "clean"))
    assert rc == 0, err[-3000:]
    states = last_task_states()
    assert all(states[n] == "Completed" for n in STEP_TASKS), states
    after = weights(out / "s1" / "model")
    assert all(torch.equal(before[k], after[k]) for k in before)
