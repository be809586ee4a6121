"""The ``mine`` stage (S3): hard negatives from the judge's scores, and the rule for training pairs that arrive
already mined (the official score JSON; see :func:`unime_ray.run.stages.data.imported_training`)."""

from __future__ import annotations

import logging
from typing import Any

from ...utils.markdown import markdown_table
from ..results import JudgeResult, MineResult, PrepareResult, RetrieveResult, imported_stage, imported_training
from ..specs import IMPORTED_READS
from ..stage import Context, Section, Stage

logger = logging.getLogger(__name__)


def run_mine(ctx: Context) -> dict[str, Any]:
    from ...mining.stage import run_mining

    cfg = ctx.cfg
    retrieved = ctx.result("retrieve", RetrieveResult)
    if retrieved.imported:
        return _mine_imported(ctx, imported_training(ctx))
    judged, prepared = ctx.result("judge", JudgeResult), ctx.result("prepare", PrepareResult)
    return run_mining(retrieved.candidates_table, judged.scores_table, prepared.path(f"{cfg.retrieve.split}_pairs"),
                      retrieved.candidate_pool, ctx.dir, cfg.mine, seed=cfg.seed, image_root=prepared.image_root)


def _mine_imported(ctx: Context, info: dict[str, Any]) -> dict[str, Any]:
    """The imported table is the training table: summarised, not re-mined (training checks it against k)."""
    from ...mining.stage import score_summary

    ctx.dir.mkdir(parents=True, exist_ok=True)
    out = {**imported_stage(info, "hard-negative mining"), "training_table": info["table"],
           **score_summary(info["table"], ctx.dir / "score_histograms.png")}
    if info["format"] == "official":
        out["official_json"] = info["imported_from"]
    return out


def report_mine(s: Section) -> list[str]:
    mine: MineResult = s.result  # type: ignore[assignment]
    parts: list[str] = []
    if mine.queries is not None:
        parts.append("\n## Hard-negative mining\n")
        st = mine.settings or {}
        parts.append(f"num_negatives {st.get('num_negatives')}, beta {st.get('beta')}, interval {st.get('interval')}; "
                     f"training table `{mine.training_table}`"
                     + (f", official JSON `{mine.official_json}`" if mine.official_json else "") + "\n")
        parts.append(markdown_table(
            ["queries", "mined", "quarantined", "false negatives dropped", "fallbacks (no survivor)",
             "cyclic repeats (< k survivors)", "mean positive score", "mean negative score"],
            [[mine.queries, mine.mined, mine.quarantined, mine.false_negatives, mine.fallbacks, mine.repeated_fill,
              mine.mean_positive_score, mine.mean_negative_score]]))
    if mine.imported:
        parts.append("\n## Hard negatives (imported)\n")
        parts.append("Global retrieval, the judge and mining did not run: the training table "
                     f"`{mine.training_table}` came with judge-scored negatives from "
                     f"`{mine.imported_from}` ({mine.format}; mine.from_imported: use).\n")
        parts.append(markdown_table(["rows", "negatives per row", "mean positive score", "mean negative score"],
                                    [[mine.rows, f"{mine.min_negatives}-{mine.max_negatives}",
                                      mine.mean_positive_score, mine.mean_negative_score]]))
    if mine.histogram:
        parts.append(f"\n![judge scores]({s.link(mine.histogram)})\n")
    return parts


MINE = Stage("mine", "stage S3: hard negatives from judge scores -> training table (+ official JSON)", run_mine,
             reads=("mine", *IMPORTED_READS, "seed"), result=MineResult, report=report_mine)
