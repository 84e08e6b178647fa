"""One `slimmoe run` per output folder: a live holder refuses the second run (exit 2, folder and
pid named); a holder killed by SIGKILL leaves nothing stuck."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml
from tiny_models import tiny_teacher_with_tokenizer

from slimmoe.cli import main
from slimmoe.errors import UserError
from slimmoe.io.lock import LOCK_FILE, check_output_owner, output_lock, read_holder, write_output_owner

HOLD = textwrap.dedent("""
    import sys, time
    from slimmoe.io.lock import output_lock
    with output_lock(sys.argv[1], what="test holder"):
        print("locked", flush=True)
        time.sleep(120)
""")


def hold_in_child(folder) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_second_holder_in_the_same_process_is_refused_and_lock_is_reusable(tmp_path):
    with output_lock(tmp_path / "out", what="first"):
        assert read_holder(tmp_path / "out")["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            with output_lock(tmp_path / "out"):
                pass
    with output_lock(tmp_path / "out"):  # released on exit
        pass


def test_run_is_refused_while_another_process_holds_the_folder_then_not_after_sigkill(tmp_path, capsys):
    teacher, corpus = tiny_teacher_with_tokenizer(tmp_path / "teacher", corpus_chars=3000)
    out = tmp_path / "out"
    cfg = {"name": "p", "teacher": str(teacher), "output_dir": str(out), "data": {"train": str(corpus), "seq_len": 16},
           "stages": [{"name": "a", "expert_intermediate_size": 8, "distill": None}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    child = hold_in_child(out)
    capsys.readouterr()
    try:
        assert main(["run", str(tmp_path / "p.yaml")]) == 2
        err = capsys.readouterr().err
        (line,) = [ln for ln in err.splitlines() if "error" in ln.lower()]
        assert line.startswith("error: output_dir: ") and "Traceback" not in err
        assert str(out) in line and f"pid {child.pid}" in line
        assert not (out / ".slimmoe-pipeline.json").exists()  # refused before writing anything
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert (out / LOCK_FILE).exists()  # the file stays, the lock does not
    with output_lock(out, what="after"):
        assert read_holder(out)["pid"] == os.getpid()


def test_a_pipeline_may_rerun_into_its_own_folder_but_not_into_another_ones(tmp_path):
    out = tmp_path / "out"
    check_output_owner(out, "demo")  # not there yet
    with output_lock(out):
        write_output_owner(out, "demo", "teacher/model")
    (out / "summary.json").write_text('{"name": "demo"}')
    check_output_owner(out, "demo")  # a re-run (slimmoe demo twice)
    with pytest.raises(UserError, match="holds the results of pipeline 'demo', not 'other'"):
        check_output_owner(out, "other")
    check_output_owner(out, "other", force=True)
    (out / ".slimmoe-pipeline.json").unlink()  # a folder from before markers: summary.json names it
    with pytest.raises(UserError, match="pipeline 'demo'"):
        check_output_owner(out, "other")
