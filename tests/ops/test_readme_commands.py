"""The READMEs' commands, run as written.

The ```bash blocks of README.md's *Quick start*, *Evaluation* and *Serving* sections, jobs/README.md and the
*Trying it locally* section of cluster/README.md are extracted and run with bash, in a scratch folder laid out
like the repo. A line is replaced only where ``SUBSTITUTES`` says so, with the reason; every substituted line
must still be in its README, so a README change cannot leave a stale stand-in behind. A README command that
fails is a failing test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)

# line as written -> (what runs instead, why)
SUBSTITUTES = {
    "make demo": ("true", "the demo takes ~15 min: the suite's whole-method synthetic run (every stage, tiny sizes) "
                  "stands in for it and is linked at runs/demo, the folder the demo writes"),
    "make test": ("true", "this is the test suite itself"),
    "ray stop": ("true", "`ray stop` stops every Ray on the machine, the suite's own included: the test stops the "
                 "processes of the cluster that the block started"),
}


def bash_blocks(path: Path, heading: str | None = None) -> list[str]:
    """The ```bash blocks of a Markdown file, or of the section under ``## heading`` (up to the next ``## ``)."""
    text = path.read_text()
    if heading is not None:
        m = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
        assert m, f"{path.name}: no section '## {heading}'"
        text = m.group(1)
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)


def script_of(blocks: list[str]) -> tuple[str, list[str]]:
    """One bash script of the blocks, with the substitutions applied; returns it and the substituted lines."""
    out, used = [], []
    for block in blocks:
        for line in block.splitlines():
            bare = line.split("#", 1)[0].strip()
            if bare in SUBSTITUTES:
                used.append(bare)
                line = f"{SUBSTITUTES[bare][0]}   # README: {line.strip()}"
            out.append(line)
    return "\n".join(out) + "\n", used


def test_blocks_are_found_and_substitutes_are_current():
    readme = REPO / "README.md"
    for heading in ("Quick start", "Evaluation", "Serving"):
        assert bash_blocks(readme, heading), heading
    assert bash_blocks(REPO / "jobs" / "README.md")
    assert bash_blocks(REPO / "cluster" / "README.md", "Trying it locally")
    quick, used = script_of(bash_blocks(readme, "Quick start"))
    assert set(used) == {"make demo", "make test"}
    _, used = script_of(bash_blocks(REPO / "cluster" / "README.md", "Trying it locally"))
    assert used == ["ray stop"]
    # the substituted quick-start lines are the Makefile's real targets
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:.*\n\t.*unime-ray pipeline --preset demo", makefile, flags=re.M)
    assert re.search(r"^test:.*\n\t.*-m pytest", makefile, flags=re.M)


@pytest.fixture
def repo_copy(tmp_path):
    """(work, home): a scratch folder laid out like the repo (the package, jobs, the venv), and a HOME for it."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("unime_ray", "jobs"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", ".gitignore", "README.md"):
        shutil.copy(REPO / name, work / name)
    (work / ".venv").symlink_to(VENV)
    (work / "runs").mkdir()
    home = tmp_path / "home"
    home.mkdir()
    return work, home


@pytest.fixture
def workdir(repo_copy, whole_method_run):
    """The scratch repo after `make demo`: the whole-method run at runs/demo."""
    run, _, proc = whole_method_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    work, home = repo_copy
    (work / "runs" / "demo").symlink_to(run)
    return work, home


def run_script(script: str, work: Path, home: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run with bash -e in its own process group; whatever it left running in the background is stopped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "PYTEST_", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != str(VENV / "bin")))
    # Next to the work dir, not in it: a job uploads the work dir, which must not change while it is packed.
    files = work.parent
    (files / "script.sh").write_text("set -eo pipefail\n" + script)
    # Output to files, not pipes: a command left in the background (the server) keeps a pipe open.
    with open(files / "script.out", "w") as out, open(files / "script.err", "w") as err:
        proc = subprocess.Popen(["bash", str(files / "script.sh")], cwd=work, env=env, stdout=out, stderr=err,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            _stop_group(proc.pid)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, (files / "script.out").read_text(),
                                         (files / "script.err").read_text())
    if proc.returncode == -signal.SIGKILL:
        pytest.fail(f"timed out after {timeout} s:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _stop_group(pgid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


@pytest.mark.own_ray
@pytest.mark.timeout(900)
def test_readme_quick_start_evaluation_and_serving(workdir):
    work, home = workdir
    readme = REPO / "README.md"
    script, _ = script_of(bash_blocks(readme, "Quick start") + bash_blocks(readme, "Evaluation")
                          + bash_blocks(readme, "Serving"))
    proc = run_script(script, work, home, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"

    # evaluation: results written and compared
    results = json.loads((work / "runs" / "demo" / "eval-by-hand" / "results.json").read_text())
    assert results["per_dataset"] and all(0 <= v <= 100 for v in results["per_dataset"].values())
    assert "unime-v2-by-hand" in proc.stdout
    # the index accounts for every candidate
    info = json.loads((work / "serving-index" / "index.json").read_text())
    assert info, "index.json"
    # serving: the search answered with 5 hits, reranked exactly when the reranker's validation (written by the
    # run's eval) says it beat the embedder alone; otherwise in the embedder's order, saying why
    answers = [a for a in _json_lines(proc.stdout) if "results" in a]
    assert answers, proc.stdout[-3000:]
    hits = answers[-1]["results"]
    used = json.loads((work / "runs" / "demo" / "rerank" / "model" / "rerank_validation.json").read_text())["used"]
    assert answers[-1]["reranked"] is used and len(hits) == 5
    if used:
        assert all(h["rerank_score"] is not None for h in hits)
    else:
        assert "not reranked" in answers[-1]["rerank_note"] and "reranker not used" in proc.stdout


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _stop_cluster_of_session(session_dir: str) -> None:
    """What ``ray stop`` does, for this cluster only: its processes, and the file that points ``ray.init()`` at it."""
    from tests.ops.test_ops import _stop_local_cluster

    _stop_local_cluster(session_dir, 6379)
    current = Path(session_dir).parent / "ray_current_cluster"
    if current.exists() and current.read_text().strip().endswith(":6379"):
        current.unlink()


@pytest.mark.slow
@pytest.mark.own_ray
@pytest.mark.timeout(900)
def test_cluster_local_recipe_and_job_submission(repo_copy):
    """cluster/README.md's local two-node cluster, then jobs/README.md's submission to it (slow: about 100 s;
    `make test-all` runs it; tests/test_ops.py checks the job configs, commands and job environment by default)."""
    work, home = repo_copy
    busy = [port for port in (6379, 8265, 52365, 52366) if _port_in_use(port)]
    assert not busy, (f"ports {busy} are taken by another process (another Ray?): the README's recipe needs "
                      "Ray's default ports, and would talk to that process instead")
    script, _ = script_of(bash_blocks(REPO / "cluster" / "README.md", "Trying it locally")
                          + bash_blocks(REPO / "jobs" / "README.md"))
    session = None
    try:
        proc = run_script(script, work, home, timeout=780)
        latest = Path("/tmp/ray/session_latest")
        session = os.path.realpath(latest) if latest.exists() else None
        assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    finally:
        if session:
            _stop_cluster_of_session(session)
    assert proc.stdout.count("succeeded") >= 2, proc.stdout[-3000:]
    manifest = json.loads((work / "runs" / "smoke" / "manifest.json").read_text())["stages"]
    assert manifest and all(s["status"] == "complete" for s in manifest.values()), manifest
