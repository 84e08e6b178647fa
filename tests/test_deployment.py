"""The real deployment path, end to end, as docs/deployments.md tells a user to run it:
`prefect server start`, a process work pool and `prefect worker start`, `prefect deploy`
from deployments/prefect.yaml, `prefect deployment run compress/demo --params ...`, then
the flow run's results in MLflow and <output_dir>/summary.json.

Every process runs in its own session and is killed (with its descendants) at teardown;
PREFECT_HOME, TMPDIR, the outputs and the MLflow store live under tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

pytestmark = [pytest.mark.deployment, pytest.mark.timeout(600, method="signal")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Background processes, each in its own session, with their output in a log file."""

    def __init__(self, logs: Path, env: dict):
        self.logs, self.env, self.procs = logs, env, {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str, tail: int = 12000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def stop_all(self) -> None:
        """SIGTERM every process group and every descendant (a flow run's process starts its
        own group), then SIGKILL whatever is left after a grace period."""
        victims: list[psutil.Process] = []
        for proc in reversed(list(self.procs.values())):  # worker before server
            try:
                parent = psutil.Process(proc.pid)
                victims += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        for p in victims:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(victims, timeout=15)
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for proc in self.procs.values():
            proc.wait(timeout=5)


@pytest.fixture
def prefect_stack(tmp_path):
    """A Prefect server on a free loopback port, the `slimmoe` process pool and a worker."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    (tmp_path / "tmp").mkdir()
    (tmp_path / "logs").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "SLIMMOE_ROOT"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api, TMPDIR=str(tmp_path / "tmp"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="2",
               PREFECT_CLI_WRAP_LINES="false", COLUMNS="250", PYTHONUNBUFFERED="1")
    procs = Processes(tmp_path / "logs", env)
    try:
        server = procs.start("server", [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)])
        wait_healthy(api, server, procs)
        cli(env, "work-pool", "create", "slimmoe", "--type", "process", "--overwrite")
        procs.start("worker", [*PREFECT, "worker", "start", "--pool", "slimmoe", "--name", "test-worker"])
        yield api, env, procs
    finally:
        procs.stop_all()


def wait_healthy(api: str, server: subprocess.Popen, procs: Processes, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited with {server.returncode}:\n{procs.log('server')}")
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout}s:\n{procs.log('server')}")


def cli(env: dict, *args: str, timeout: float = 180) -> str:
    proc = subprocess.run([*PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def tiny_teacher(folder: Path) -> tuple[Path, Path]:
    """A tiny phimoe with a BPE tokenizer (vocab 300) trained on 20 KB of the bundled corpus."""
    from tiny_models import tiny_model

    from slimmoe.io.tokenizer import train_bpe_tokenizer

    folder.mkdir(parents=True)
    text = folder / "corpus.txt"
    text.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:20000])
    tok = train_bpe_tokenizer(text, vocab_size=300)
    tiny_model("phimoe", vocab_size=len(tok)).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return folder / "model", text


def tiny_pipeline(tmp_path: Path) -> dict:
    teacher, corpus = tiny_teacher(tmp_path / "teacher")
    stage = {"importance": {"samples": 8, "batch_size": 4}, "eval": {"max_blocks": 8},
             "distill": {"tokens": 2048, "batch_size": 8, "lr": 1e-3, "progress": False}}
    return {
        "name": "deploy-test",
        "teacher": str(teacher),
        "output_dir": str(tmp_path / "out"),
        "data": {"train": str(corpus), "eval_fraction": 0.1, "seq_len": 32},
        "stages": [{"name": "mid", "expert_intermediate_size": 12, **stage},
                   {"name": "final", "expert_intermediate_size": 8, "num_key_value_heads": 1, **stage}],
        "tracking": {"experiment": "deploy-test"},
    }


def wait_for_flow_run(api: str, run_id: str, procs: Processes, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    run: dict = {}
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
        if (run.get("state") or {}).get("type") in FINAL_STATES:
            return run
        for name, proc in procs.procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}\n{diagnostics(api, run_id, procs)}")
        time.sleep(2)
    pytest.fail(f"flow run not finished after {timeout}s: {(run.get('state') or {}).get('type')}\n"
                f"{diagnostics(api, run_id, procs)}")


def step_states(api: str, flow_run_id: str, timeout: float = 60) -> dict[str, str]:
    """Name -> state of the pipeline steps of a finished flow run, once the server has recorded
    every task run in a final state (task-run states arrive as events, recorded asynchronously)."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        runs = httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}},
                          timeout=10).json()
        seen = {r["name"]: (r.get("state") or {}).get("name") for r in runs}
        settled = runs and all((r.get("state") or {}).get("type") in FINAL_STATES for r in runs)
        if settled and seen == last:
            return {("prepare-data" if n.startswith("prepare-data") else n): v for n, v in seen.items()
                    if n.split("-")[0] in ("prepare", "importance", "slim", "distill", "evaluate")}
        last = seen if settled else None
        if time.monotonic() > deadline:
            pytest.fail(f"task runs of {flow_run_id} not settled after {timeout}s: {seen}")
        time.sleep(1)


def diagnostics(api: str, run_id: str, procs: Processes) -> str:
    try:
        logs = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200},
                          timeout=10).json()
        run_logs = "\n".join(f"{r['level']:>3} {r['message']}" for r in logs)[-8000:]
    except Exception as e:  # the server may be the thing that failed
        run_logs = f"(could not read the flow run's logs: {e})"
    return (f"--- flow run logs ---\n{run_logs}\n--- worker log ---\n{procs.log('worker')}\n"
            f"--- server log ---\n{procs.log('server', 4000)}")


def test_compress_deployment_runs_on_a_worker(prefect_stack, tmp_path):
    api, env, procs = prefect_stack
    config = tiny_pipeline(tmp_path)
    torch.set_num_threads(1)  # the test process only waits; leave the cores to the worker

    # The documented command deploys everything; until the teacher flow exists, the compress ones.
    expected = {"compress/demo", "compress/phi-mini-moe", "compress/phi-tiny-moe"}
    if (ROOT / "flows" / "teacher.py").exists():
        which, expected = ["--all"], expected | {"teacher/demo"}
    else:
        which = [arg for name in sorted(expected) for arg in ("--name", name)]
    if which == ["--all"] and (ROOT / "flows" / "ablation.py").exists():
        expected |= {"ablation/ablation-demo", "ablation/ablation-gutenberg-grid", "teacher/teacher-gutenberg"}
    if which == ["--all"] and (ROOT / "flows" / "node.py").exists():
        expected |= {"node/default"}
    cli(env, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", *which)
    listed = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
    flows = {f["id"]: f["name"] for f in httpx.post(f"{api}/flows/filter", json={}, timeout=10).json()}
    assert {f"{flows[d['flow_id']]}/{d['name']}" for d in listed} == expected
    deployment = httpx.get(f"{api}/deployments/name/compress/demo", timeout=10).json()
    assert deployment["work_pool_name"] == "slimmoe" and deployment["entrypoint"] == "flows/compress.py:compress"
    # The pull step's directory comes from SLIMMOE_ROOT, a job variable defaulting to this checkout.
    assert deployment["job_variables"]["env"]["SLIMMOE_ROOT"] == str(ROOT)
    assert deployment["parameters"]["config"]["name"] == "tiny-demo"

    # First the same pipeline through the CLI, from another folder with relative paths; the
    # work-pool run must then find every step in the cache (nothing a CLI run and a worker
    # run do differently enters a cache key).
    relative = {**config, "teacher": "teacher/model", "output_dir": "out", "data": {**config["data"],
                                                                                    "train": "teacher/corpus.txt"}}
    (tmp_path / "pipe.yaml").write_text(json.dumps(relative))
    proc = subprocess.run([sys.executable, "-m", "slimmoe.cli", "run", "pipe.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    out = cli(env, "deployment", "run", "compress/demo", "--params", json.dumps({"config": config}))
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, out
    run = wait_for_flow_run(api, match.group(1), procs)
    assert run["state"]["type"] == "COMPLETED", (
        f"flow run ended {run['state']['type']}: {run['state'].get('message')}\n{diagnostics(api, run['id'], procs)}")
    assert run["parameters"]["config"]["output_dir"] == config["output_dir"]
    steps = step_states(api, run["id"])
    assert len(steps) == 10 and set(steps.values()) == {"Cached"}, steps

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == ["teacher", "mid", "final"]
    for name in ("mid", "final"):
        assert (tmp_path / "out" / name / "model" / "config.json").exists()

    from mlflow.tracking import MlflowClient

    uri = summary["mlflow"]["tracking_uri"]
    assert uri == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("deploy-test")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    parent = runs[summary["mlflow"]["parent_run_id"]]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["final", "mid"]
    versions = client.search_model_versions("name='deploy-test'")
    assert sorted(v.tags["stage"] for v in versions) == ["final", "mid"]
    assert {r["model_version"] for r in summary["stages"][1:]} == {str(v.version) for v in versions}


@pytest.mark.slow  # ~100 s on 2 cores: `make test-slow`
def test_a_step_across_two_nodes_through_the_work_pool(prefect_stack, tmp_path):
    """launch: {nnodes: 2}: node 0 is the `slimmoe run` process; node 1 is a worker serving the
    work queue node-1. The importance and distill tasks on node 0 start node 1's share as a run of
    node/default, and both torchruns meet at one rendezvous (here both "nodes" are this machine,
    on loopback, one process each)."""
    api, env, procs = prefect_stack
    torch.set_num_threads(1)
    procs.start("worker-node-1", [*PREFECT, "worker", "start", "--pool", "slimmoe", "--work-queue", "node-1",
                                  "--name", "node-1"])
    cli(env, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "node/default")
    config = tiny_pipeline(tmp_path)
    config["stages"] = config["stages"][:1]
    config["launch"] = {"nnodes": 2, "nproc_per_node": 1, "master_addr": "127.0.0.1", "master_port": free_port()}
    (tmp_path / "pipe.yaml").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "slimmoe.cli", "run", "pipe.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:] + procs.log("worker-node-1")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == ["teacher", "mid"] and summary["stages"][1]["tokens"] == 2048
    flows = {f["id"]: f["name"] for f in httpx.post(f"{api}/flows/filter", json={}, timeout=10).json()}
    runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
    node_runs = [r for r in runs if flows[r["flow_id"]] == "node"]
    assert len(node_runs) == 2  # importance and distill: one share on node 1 each
    for r in node_runs:
        done = wait_for_flow_run(api, r["id"], procs)
        assert done["state"]["type"] == "COMPLETED" and done["work_queue_name"] == "node-1"
        assert done["parameters"]["launch"]["node_rank"] == 1
