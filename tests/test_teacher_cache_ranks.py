"""Teacher top-k cache written by every rank: parts independent of the world size, resumable
after a SIGKILL, found complete from small files only, keyed by a teacher folder's files.

Run as a script (``python tests/test_teacher_cache_ranks.py OUT ...``, or under torchrun)
this file is the builder the tests start in subprocesses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from helpers_distill import (
    ROOT,
    VOCAB,
    env,
    one_torch_thread,  # noqa: F401 - autouse fixture
    tiny_phimoe,
)

from slimmoe.distill.teacher_cache import (
    INDEX_FILE,
    build,
    find_complete,
    fingerprint_blocks,
    teacher_fingerprint,
)
from slimmoe.io.data import random_blocks
from slimmoe.parallel import Topology

SEQ, K, TEMP = 16, 4, 2.0
N_BLOCKS, PART, BATCH = 13, 3, 2  # 5 parts (3, 3, 3, 3, 1 blocks): an odd count
FORWARDS = [2, 2, 2, 2, 1]  # teacher calls per part at batch 2


def _teacher_and_blocks():
    return tiny_phimoe(0, scale=1.0).eval(), random_blocks(VOCAB, N_BLOCKS, SEQ, seed=3)


def _main(argv: list[str]) -> None:
    """Build the cache under OUT/cache with this process's rank; record the teacher calls."""
    from slimmoe.parallel import init_process_group

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--tag", default="run")
    ap.add_argument("--lockstep", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    topo = init_process_group()
    teacher, blocks = _teacher_and_blocks()
    calls: list[int] = []

    def run(ids):
        calls.append(int(ids[0, 0]))
        return teacher(input_ids=ids).logits

    key = {"teacher_fp": teacher_fingerprint(teacher), "k": K, "temperature": TEMP}
    build(args.out / "cache", blocks, run, batch_size=BATCH, topo=topo, part_size=PART, lockstep=args.lockstep,
          vocab_size=VOCAB, **key)
    assert find_complete(args.out / "cache", blocks, topo=topo, **key) is not None  # collective, same on every rank
    (args.out / f"calls-{args.tag}-{topo.rank}.json").write_text(json.dumps(calls))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _run(tmp: Path, out: Path, *extra: str, nproc: int = 1, crash: str | None = None, tag: str = "run"):
    script = [str(Path(__file__).resolve()), str(out), "--tag", tag, *extra]
    cmd = [sys.executable, *script]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
    e = env(tmp)
    if crash:
        e["SLIMMOE_CRASH_AT"] = crash
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)


def _entry(out: Path) -> Path:
    (entry,) = [p for p in (out / "cache").iterdir() if not p.name.startswith(".")]
    return entry


def _files(entry: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(entry.iterdir())}


def _calls(out: Path, tag: str, rank: int = 0) -> list[int]:
    return json.loads((out / f"calls-{tag}-{rank}.json").read_text())


def _first_ids(blocks: torch.Tensor, parts: list[int]) -> list[int]:
    """The first token of each batch the builder runs for these parts (what ``_main`` records)."""
    return [int(blocks[s, 0]) for p in parts for s in range(p * PART, min((p + 1) * PART, N_BLOCKS), BATCH)]


def test_two_ranks_write_the_same_entry_as_one(tmp_path):
    one = _run(tmp_path, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(tmp_path, tmp_path / "two", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    lock = _run(tmp_path, tmp_path / "lock", "--lockstep", nproc=2)
    assert lock.returncode == 0, lock.stderr[-3000:]
    a = _files(_entry(tmp_path / "one"))
    assert sorted(a) == [INDEX_FILE] + sorted(f"part-{p:06d}.{s}" for p in range(5)
                                              for s in ("indices.u16", "json", "logprobs.f16"))
    assert _entry(tmp_path / "two").name == _entry(tmp_path / "one").name
    assert _files(_entry(tmp_path / "two")) == a and _files(_entry(tmp_path / "lock")) == a
    index = json.loads(a[INDEX_FILE])
    assert (index["num_parts"], index["part_size"], index["shape"]) == (5, PART, [N_BLOCKS, SEQ, K])
    # each rank ran the teacher on its own parts only: rank 0 parts 0, 2, 4; rank 1 parts 1, 3
    _, blocks = _teacher_and_blocks()
    assert _calls(tmp_path / "one", "run") == _first_ids(blocks, [0, 1, 2, 3, 4])
    assert _calls(tmp_path / "two", "run", 0) == _first_ids(blocks, [0, 2, 4])
    assert _calls(tmp_path / "two", "run", 1) == _first_ids(blocks, [1, 3])
    # lockstep (a sharded teacher): rank 1 pads its 4 forwards to rank 0's 5 with a repeat of the first batch
    assert _calls(tmp_path / "lock", "run", 0) == _first_ids(blocks, [0, 2, 4])
    assert _calls(tmp_path / "lock", "run", 1) == _first_ids(blocks, [1, 3]) + [int(blocks[0, 0])]


def test_resume_after_kill_recomputes_only_missing_parts(tmp_path):
    _, blocks = _teacher_and_blocks()
    ref = _run(tmp_path, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"
    # killed after part 1's marker: parts 0 and 1 are complete
    r = _run(tmp_path, out, crash="teacher_cache:part:part=1")
    assert r.returncode == -9 and "crash point teacher_cache:part:part=1" in r.stderr, r.stderr[-3000:]
    assert sorted(p.name for p in _entry(out).glob("part-*.json")) == ["part-000000.json", "part-000001.json"]
    # killed between part 2's data files and its marker: part 2 does not count as done
    r = _run(tmp_path, out, crash="teacher_cache:data:part=2", tag="second")
    assert r.returncode == -9, r.stderr[-3000:]
    assert (_entry(out) / "part-000002.logprobs.f16").is_file() and not (_entry(out) / "part-000002.json").exists()
    (_entry(out) / ".part-000003.logprobs.f16.tmp-99999").write_bytes(b"half")  # a writer killed mid-file
    r = _run(tmp_path, out, tag="resumed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _calls(out, "resumed") == _first_ids(blocks, [2, 3, 4])  # parts 0 and 1 were not recomputed
    assert _files(_entry(out)) == _files(_entry(tmp_path / "ref"))  # the stale temporary is gone too


def test_resume_with_another_world_size(tmp_path):
    """Two ranks killed mid-build (rank 0 after part 2; torchrun then stops rank 1); one process finishes."""
    _, blocks = _teacher_and_blocks()
    ref = _run(tmp_path, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"
    r = _run(tmp_path, out, crash="teacher_cache:part:part=2", nproc=2)
    assert r.returncode != 0
    done = sorted(int(p.name[5:11]) for p in _entry(out).glob("part-*.json"))
    assert {0, 2} <= set(done) and 4 not in done
    r = _run(tmp_path, out, tag="resumed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _calls(out, "resumed") == _first_ids(blocks, [p for p in range(5) if p not in done])
    assert _files(_entry(out)) == _files(_entry(tmp_path / "ref"))


def test_find_complete_missing_partial_complete(tmp_path):
    teacher, blocks = _teacher_and_blocks()
    key = {"teacher_fp": teacher_fingerprint(teacher), "k": K, "temperature": TEMP}
    assert find_complete(tmp_path / "nothing", blocks, **key) is None
    calls = []

    def run(ids):
        calls.append(1)
        return teacher(input_ids=ids).logits

    cache = build(tmp_path, blocks, run, batch_size=BATCH, topo=Topology(), part_size=PART, **key)
    assert len(calls) == sum(FORWARDS)
    found = find_complete(tmp_path, blocks, **key)
    assert found is not None and found.path == cache.path and len(found) == N_BLOCKS
    for a, b in zip(found.get(torch.tensor([12, 0, 5])), cache.get(torch.tensor([12, 0, 5]))):
        assert torch.equal(a, b)
    assert find_complete(tmp_path, blocks, **{**key, "k": 3}) is None  # another key
    assert find_complete(tmp_path, blocks, data_fp="other", **key) is None
    assert find_complete(tmp_path, blocks, data_fp=fingerprint_blocks(blocks), **key) is not None
    entry = cache.path
    # a marker gone, a data file short, the index gone: each makes the entry partial
    for broken in ("part-000003.json", "part-000004.indices.i32", INDEX_FILE):  # vocab unknown: int32 ids
        saved = (entry / broken).read_bytes()
        if broken.endswith(".i32"):
            (entry / broken).write_bytes(saved[:-4])
        else:
            (entry / broken).unlink()
        assert find_complete(tmp_path, blocks, **key) is None, broken
        (entry / broken).write_bytes(saved)
    assert find_complete(tmp_path, blocks, **key) is not None
    # a partial entry is finished by building again: only the missing part runs the teacher
    (entry / "part-000003.json").unlink()
    calls.clear()
    build(tmp_path, blocks, run, batch_size=BATCH, topo=Topology(), part_size=PART, **key)
    assert len(calls) == FORWARDS[3] and find_complete(tmp_path, blocks, **key).verify()


def test_teacher_fingerprint_of_a_folder(tmp_path):
    teacher = tiny_phimoe(0, scale=1.0)
    teacher.save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    fp = teacher_fingerprint(tmp_path / "a")
    assert teacher_fingerprint(str(tmp_path / "copy")) == fp
    with torch.no_grad():
        teacher.model.layers[1].self_attn.q_proj.weight[3, 5] += 1e-3
    teacher.save_pretrained(tmp_path / "b")
    assert teacher_fingerprint(tmp_path / "b") != fp
    assert teacher_fingerprint(tmp_path / "a", dtype=torch.bfloat16) != fp
    assert teacher_fingerprint(teacher) != teacher_fingerprint(tiny_phimoe(0, scale=1.0))  # in memory: weights


if __name__ == "__main__":
    _main(sys.argv[1:])
