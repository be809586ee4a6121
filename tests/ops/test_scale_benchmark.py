"""The scale benchmark killed during the judge (SIGKILL of its whole process group: driver, raylet, GCS, actors)
and rerun: no judged pair lost or duplicated, and the rerun skips the shards judged before the kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from unime_ray.data.io import read_table

ROOT = Path(__file__).resolve().parents[2]
SHARDS = 20


def _start(out: Path, seconds_per_batch: float) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--queries", str(10 * SHARDS), "--rows-per-shard",
           "10", "--candidates-per-query", "5", "--judge-actors", "1", "--judge-batch", "30",
           "--judge-seconds-per-batch", str(seconds_per_batch), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with open(out.parent / f"{out.name}.log", "a") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _judged(out: Path) -> list[Path]:
    return sorted(out.glob("judge/scores/*/part-*.parquet"))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the benchmark's process group, and its Ray workers too (raylet starts them in their own groups)."""
    job = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in job:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait()
    psutil.wait_procs(job, timeout=10)


def test_scale_benchmark_resumes_after_sigkill_of_its_process_group(tmp_path):
    out = tmp_path / "scale"
    out.mkdir()
    proc = _start(out, seconds_per_batch=0.3)
    try:
        deadline = time.monotonic() + 240
        while len(_judged(out)) < 2:
            assert proc.poll() is None, (out.parent / "scale.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the judge never wrote two shards"
            time.sleep(0.05)
    finally:
        _kill_group(proc)
    before = len(_judged(out))
    assert 2 <= before < SHARDS                       # killed during the judge, not after it

    rerun = _start(out, seconds_per_batch=0.0)
    assert rerun.wait(timeout=300) == 0, (out.parent / "scale.log").read_text()[-3000:]
    judge_line = next(l for l in (out.parent / "scale.log").read_text().splitlines()[::-1] if l.startswith("judge: "))
    assert json.loads(judge_line[len("judge: "):])["result"]["shards_written"] == SHARDS - before

    expected = {(r["query_id"], c) for r in read_table(out / "candidates").to_pylist()
                for c in [r["pos_id"], *r["cand_ids"]]}
    scores = read_table(_judged(out)[0].parent, ["query_id", "cand_id"]).to_pylist()
    keys = [(r["query_id"], r["cand_id"]) for r in scores]
    assert len(keys) == len(set(keys))               # 0 duplicated
    assert set(keys) == expected                     # 0 lost
    results = json.loads((out / "results.json").read_text())
    assert results["pairs"] == len(expected) and results["stages"]["mine"]["result"]["queries"] == 10 * SHARDS
