"""Reading a finished flow's task-run states without racing the Prefect server.

A task run's states reach the server as events: the client sends them from a background
worker and the server records them asynchronously. Right after a flow returns, a read
of its task runs can therefore miss a run or see one without its final state (the
``AttributeError: 'NoneType' object has no attribute 'name'`` of a flaky test). So:
flush the client's events, then read until every task run is in a final state and the
reads have stopped changing.
"""

from __future__ import annotations

import time

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort
from prefect.events.worker import EventsWorker

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def newest_flow_runs(n: int = 1, **filters) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=n, **filters)


def settled_task_runs(flow_run_ids: list, expect: int | None = None, timeout: float = 60.0,
                      quiet: float = 1.0, killed: bool = False) -> list:
    """The task runs of ``flow_run_ids`` once all (at least ``expect`` of them) are recorded
    in a final state and the reads have not changed for ``quiet`` seconds; an
    AssertionError after ``timeout``. ``killed``: the flow's process was killed, so the run
    it was in stays Running: every run needs a state, not a final one."""
    EventsWorker.drain_all()
    deadline, last, since = time.monotonic() + timeout, None, 0.0
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids))))
        seen = sorted((str(r.id), r.state.type.value if r.state else None, r.state.name if r.state else None)
                      for r in runs)
        done = [s[1] is not None and (killed or s[1] in FINAL) for s in seen]
        settled = bool(runs) and all(done) and (expect is None or len(runs) >= expect)
        now = time.monotonic()
        if not settled or seen != last:
            last, since = (seen if settled else None), now
        elif now - since >= quiet:
            return runs
        if now > deadline:
            raise AssertionError(f"task runs of {flow_run_ids} not all recorded in a final state after {timeout}s: "
                                 f"{[(r.name, r.state.name if r.state else None) for r in runs]}")
        time.sleep(0.25)


def last_task_states(expect: int | None = None, killed: bool = False) -> dict[str, str]:
    """Task-run name -> state name of the newest flow run, once settled."""
    flow_run = newest_flow_runs()[0]
    return {r.name: r.state.name for r in settled_task_runs([flow_run.id], expect, killed=killed)}
