"""The run report (``run_dir/report.md``): each stage's own section (``Stage.report``), in stage order after the
headline comparison, plus what spans stages (their states and timings, the visual tokens per image); and the
``report`` stage (declared with the stage list, in the runner) writes it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..utils.markdown import markdown_table
from .stage import Section, Stage

logger = logging.getLogger(__name__)


def visual_token_rows(stages: dict[str, Any]) -> list[list[Any]]:
    """(stage, budget role, configured budget, images, min / median / max visual tokens per image) of every
    stage that recorded its ``visual_tokens`` (see unime_ray.models.budget)."""
    rows = []
    for name, st in stages.items():
        for role, t in ((st.get("outputs") or {}).get("visual_tokens") or {}).items():
            if isinstance(t, dict) and t.get("images"):
                rows.append([name, role, t.get("budget"), t["images"], t.get("min"), t.get("median"), t.get("max")])
    return rows


def write_run_report(run_dir: Path, manifest: dict[str, Any], stages: list[Stage]) -> Path:
    """Write ``report.md`` from the manifest: the headline section first, then the stage table, the visual tokens
    per image, and every other stage's section in pipeline order."""
    recorded = manifest.get("stages", {})

    def section(stage) -> list[str]:
        out = (recorded.get(stage.name) or {}).get("outputs")
        if stage.report is None or not out:
            return []
        return stage.report(Section(result=stage.result.model_validate(out), stages=recorded, run_dir=run_dir))

    parts = [f"# unime-ray run report\n\nRun directory: `{run_dir}`\n"]
    for stage in stages:
        if stage.headline:
            parts += section(stage)
    parts.append("## Stages\n")
    parts.append(markdown_table(["stage", "status", "seconds"],
                                [[n, s.get("status"), s.get("seconds")] for n, s in recorded.items()
                                 if n != "report"]))
    token_rows = visual_token_rows(recorded)
    if token_rows:
        parts.append("\n## Images: visual tokens per image\n")
        parts.append("Tokens each stage's model actually received per image (image grid / merge size^2, counted "
                     "where images are processed), against the budget configured for its role (models.images).\n")
        parts.append(markdown_table(["stage", "role", "budget", "images", "min", "median", "max"], token_rows))
    for stage in stages:
        if not stage.headline:
            parts += section(stage)
    path = run_dir / "report.md"
    path.write_text("\n".join(parts) + "\n")
    logger.info("report written to %s", path)
    return path
