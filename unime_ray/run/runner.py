"""The staged, resumable run: one run directory, a folder per stage, and a manifest; a generic runner over
:data:`STAGES`, each declared once in ``run/stages/`` (:class:`unime_ray.run.stage.Stage`).

Stages: ``data`` (build or locate the input data) -> ``models`` (tiny checkpoints for the demo) ->
``prepare`` (convert + validate into canonical tables, quarantining bad rows) -> ``baseline`` (the
retriever trained with in-batch negatives, when enabled) -> ``embed`` (optional: encode tables) ->
``retrieve`` (S1, sharded FAISS) -> ``judge_fit`` (offline stand-in judges, cross-fitted, when configured)
-> ``judge`` (S2) -> ``mine`` (S3) -> ``train`` (S4, UniME-V2) -> ``ablations`` (extra seeds and the
ablation objectives) -> ``rerank`` (reranker training, when enabled) -> ``eval`` (P@1 with and without
reranking) -> ``report``. A disabled stage completes at once with ``{"enabled": false}``; with training pairs
that already carry judge-scored negatives (the official score JSON), retrieve, judge and mine complete at once
with ``{"imported": true, ...}`` and training reads those pairs (``mine.from_imported: remine`` recomputes them).

``manifest.json`` records, per stage, its status, its key (the hash of the settings it reads and of the stages
before it), outputs and counts. A rerun skips stages that completed with the same key, and reruns a stage that did
not complete; stages resume internally where they can (embedding resumes per shard).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..utils.console import end_live
from ..utils.progress import fmt_duration
from .config import RunConfig
from .report import write_run_report
from .stage import ConfigView, Context, Manifest, Stage
from .stages.data import DATA, PREPARE
from .stages.eval import EVAL
from .stages.judge import JUDGE, JUDGE_FIT
from .stages.mining import MINE
from .stages.models import MODELS
from .stages.retrieval import EMBED, RETRIEVE
from .stages.train import ABLATIONS, BASELINE, RERANK, TRAIN

logger = logging.getLogger(__name__)


def run_report(ctx: Context) -> dict[str, Any]:
    return {"report": str(write_run_report(ctx.run_dir, ctx.manifest.data, STAGES))}


REPORT = Stage("report", "write the run report (report.md) from the manifest", run_report, clear_on_rerun=False,
               optional=True, always_run=True, command="")
# The pipeline, in order. Each stage is declared in ``run/stages/<package>.py``; see ARCHITECTURE.md.
STAGES: list[Stage] = [DATA, MODELS, PREPARE, BASELINE, EMBED, RETRIEVE, JUDGE_FIT, JUDGE, MINE, TRAIN, ABLATIONS,
                       RERANK, EVAL, REPORT]
STAGE_NAMES = [s.name for s in STAGES]
OPTIONAL_STAGES = {s.name for s in STAGES if s.optional}   # nothing downstream reads their outputs


def stages_through(name: str) -> list[str]:
    """The stages a stage needs, then the stage: what ``unime-ray <stage>`` runs (completed ones are skipped)."""
    if name not in STAGE_NAMES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    upto = STAGE_NAMES[: STAGE_NAMES.index(name) + 1]
    return [s for s in upto if s == name or s not in OPTIONAL_STAGES]


def _stage_key(view: ConfigView, stage: Stage, upstream: str) -> str:
    own = json.dumps(view.values(), sort_keys=True)
    return hashlib.sha256(f"{upstream}|{stage.name}|{own}".encode()).hexdigest()[:16]


def run_pipeline(cfg: RunConfig, force: bool = False, only: list[str] | None = None) -> Manifest:
    """Run (or resume) the configured stages in order; returns the manifest."""
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    wanted = only or cfg.stages or STAGE_NAMES
    unknown = [s for s in wanted if s not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGE_NAMES)}")
    manifest = Manifest(run_dir)
    if manifest.data.get("keys") != Manifest.KEYS and manifest.data["stages"]:
        if not force:
            raise ValueError(f"{run_dir} was made by an earlier unime-ray whose stage keys cannot tell whether its "
                             "stages are current: rerun with --force to recompute every stage there, or give a "
                             "new run_dir")
        manifest.data["keys"] = Manifest.KEYS
    upstream = ""
    order = [s.name for s in STAGES if s.name in wanted]
    for stage in STAGES:
        view = ConfigView(cfg, stage.reads, stage.name)   # what the stage may read, and its key
        key = _stage_key(view, stage, upstream)
        if stage.name not in OPTIONAL_STAGES:  # nothing downstream reads optional stages' outputs
            upstream = key
        if stage.name not in wanted:
            continue
        prev = manifest.stage(stage.name)
        if not force and prev.get("status") == "complete" and prev.get("key") == key and not stage.always_run:
            logger.info("stage %-8s complete (skipped)", stage.name)
            continue
        if prev and prev.get("key") != key and stage.clear_on_rerun:
            shutil.rmtree(run_dir / stage.name, ignore_errors=True)  # config changed: start the stage afresh
        logger.info("stage %-8s running (%d of %d)", stage.name, order.index(stage.name) + 1, len(order))
        start = time.perf_counter()
        manifest.update(stage.name, status="running", key=key, started=time.time())
        try:
            outputs = stage.execute(Context(view, manifest, stage.name)).as_dict()
        except BaseException as exc:
            end_live()
            manifest.update(stage.name, status="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        end_live()  # a progress line the stage left unfinished stays as it was
        manifest.update(stage.name, status="complete", seconds=round(time.perf_counter() - start, 2),
                        outputs=outputs, error=None)
        logger.info("stage %-8s complete in %s", stage.name, _took(time.perf_counter() - start))
    return manifest


def _took(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else fmt_duration(seconds)


def failed_stage(manifest: Manifest) -> str | None:
    """The stage that failed last in this run directory, if any."""
    failed = [(st.get("started") or 0, name) for name, st in manifest.data["stages"].items()
              if st.get("status") == "failed"]
    return max(failed)[1] if failed else None


def headline_table(report: str | os.PathLike) -> list[str]:
    """The report's main comparison table (one row per variant, P@1 per eval set), as aligned text lines;
    [] when the report has none (no eval stage)."""
    try:
        lines = Path(report).read_text().splitlines()
    except OSError:
        return []
    start = next((i for i, ln in enumerate(lines) if ln.startswith("| variant")), None)
    if start is None:
        return []
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if all(c and set(c) <= set("-:") for c in cells):
            continue  # the header's separator
        rows.append(cells)
    width = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]


def run_summary(run_dir: str | os.PathLike, manifest: Manifest) -> str:
    """What the end of a run prints: the stages' states, where the report and the log are, the headline table."""
    run_dir = Path(run_dir).resolve()
    out = [f"run directory: {run_dir}"]
    for name in STAGE_NAMES:
        st = manifest.stage(name)
        if st:
            secs = st.get("seconds")
            out.append(f"  {name:<9} {st.get('status'):<9} {_took(secs) if secs is not None else ''}".rstrip())
    log = run_dir / "logs" / "console.log"
    if log.is_file():
        out.append(f"log (Ray, libraries, workers): {log}")
    report = run_dir / "report.md"
    if report.is_file():
        out.append(f"report: {report}")
        table = headline_table(report)
        if table:
            out += ["", "Comparison (the headline table of report.md):"]
            out += ["  " + ln for ln in table]
    return "\n".join(out)
