"""The judge stages: ``judge_fit`` (offline stand-in judges, k-fold cross-fitted, when configured) and ``judge``
(S2: Yes/No scores for each query's positive and retrieved candidates, over an actor pool)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ...utils.markdown import markdown_table
from ..results import JudgeFitResult, JudgeResult, PrepareResult, RetrieveResult, imported_stage, imported_training
from ..specs import IMPORTED_READS, JUDGE_READS, TRAIN_JOB_READS, judge_spec, train_settings
from ..stage import Context, Section, Stage

logger = logging.getLogger(__name__)


def run_judge_fit(ctx: Context) -> dict[str, Any]:
    """Stand-in judge (no pretrained MLLM judge offline): fine-tune the judge checkpoint on pairwise Yes/No,
    one model per fold of the training queries (see :mod:`unime_ray.judge.crossfit`)."""
    from ...judge.crossfit import build_fit_tables
    from ...train.api import run_job

    cfg = ctx.cfg
    jf = cfg.judge_fit
    if jf is None or not jf.enabled:
        return {"enabled": False}
    retrieved, prepared = ctx.result("retrieve", RetrieveResult), ctx.result("prepare", PrepareResult)
    if retrieved.imported:
        return {"enabled": False, "imported": True,
                "note": "no judge to fit: the scores came with the training table"}
    out_dir = ctx.dir
    tables = build_fit_tables(retrieved.candidates_table, prepared.path(f"{cfg.retrieve.split}_pairs"),
                              retrieved.candidate_pool, out_dir / "tables", jf.folds, jf.negatives_per_query,
                              seed=cfg.seed)
    if jf.kind == "dual_encoder":
        return _fit_encoder_judges(ctx, tables, prepared, retrieved, out_dir)
    ctx.init_ray()
    folds = {}
    for f, info in tables.items():
        settings = train_settings(cfg, jf, cfg.model_ref(cfg.models.judge), out_dir / f"fold{f}", "reranker",
                                   prepared.image_root, role="judge")
        out = run_job(info["table"], settings, f"judge-fold{f}")
        folds[str(f)] = {"model": out.model, "queries": info["queries"], "steps": out.steps, "final": out.final,
                         "visual_tokens": out.visual_tokens}
        logger.info("judge_fit fold %d: %d queries, final loss %.4f", f, info["queries"],
                    out.final.get("loss", float("nan")))
    return {"enabled": True, "folds": folds, "num_folds": jf.folds,
            "note": "stand-in judge: fine-tuned offline on the training pairs with cross-fitting",
            "visual_tokens": ctx.visual_tokens(judge=[f.get("visual_tokens") for f in folds.values()])}


def _fit_encoder_judges(ctx: Context, tables: dict[int, dict[str, Any]], prepared, retrieved,
                        out_dir: Path) -> dict[str, Any]:
    """judge_fit.kind: dual_encoder. The towers encode every distinct image and text of the pool and the pairs
    once, into a feature cache the judge stage reads too; then one judge per fold (a finished fold is skipped)."""
    from ...data.io import iter_rows
    from ...data.schema import item_from_row
    from ...judge.encoder.fit import EncoderFitSettings, fit_folds, warm_features

    cfg = ctx.cfg
    jf = cfg.judge_fit
    settings = EncoderFitSettings(**jf.encoder.model_dump(), seed=cfg.seed)
    image_root = prepared.image_root
    cache = out_dir / "features"
    items = [item_from_row(r) for r in iter_rows(retrieved.candidate_pool)]
    items += [item_from_row(r, "query_") for r in iter_rows(prepared.path(f"{cfg.retrieve.split}_pairs"))]
    t0 = time.perf_counter()
    warmed = warm_features(items, settings, image_root=image_root, feature_cache=cache)
    feature_s = time.perf_counter() - t0
    logger.info("judge_fit (dual encoder): tower features for %d distinct query and pool items in %.1f s",
                warmed["items"], feature_s)
    fitted = fit_folds({f: info["table"] for f, info in tables.items()}, out_dir, settings, image_root=image_root,
                       feature_cache=cache)
    folds = {}
    for f, info in tables.items():
        folds[str(f)] = {**fitted[str(f)], "queries": info["queries"]}
        logger.info("judge_fit fold %d: %d queries, held-out AUC %.3f", f, info["queries"],
                    fitted[str(f)].get("heldout_auc") or float("nan"))
    return {"enabled": True, "kind": "dual_encoder", "backend": "encoder", "folds": folds, "num_folds": jf.folds,
            "feature_cache": str(cache), "feature_items": warmed["items"], "feature_seconds": round(feature_s, 2),
            "method": settings.method, "text_tower": settings.text_tower, "image_tower": settings.image_tower,
            "note": "stand-in judge: heads on frozen pretrained text/image encoders, fitted with cross-fitting"}


def run_judge_stage(ctx: Context) -> dict[str, Any]:
    from ...judge.crossfit import merge_score_tables, query_folds, score_summary, scoring_judge, split_candidates
    from ...judge.stage import run_judge

    cfg = ctx.cfg
    retrieved = ctx.result("retrieve", RetrieveResult)
    if retrieved.imported:
        return imported_stage(imported_training(ctx), "the judge")
    prepared = ctx.result("prepare", PrepareResult)
    image_root, pairs, pool = prepared.image_root, prepared.path(f"{cfg.retrieve.split}_pairs"), cfg.judge.pool
    ctx.init_ray()
    fitted = ctx.result_if_run("judge_fit", JudgeFitResult) or JudgeFitResult()
    if not fitted.enabled:
        out = run_judge(retrieved.candidates_table, pairs, retrieved.candidate_pool, ctx.dir,
                        judge_spec(ctx, image_root), pool)
        logger.info("judge: %d pairs scored, %d quarantined, %.1f pairs/s", out["scored"], out["quarantined"],
                    out["pairs_per_s"])
        return {**out, "positive_auc": score_summary(out["scores_table"])["positive_auc"],
                "visual_tokens": ctx.visual_tokens(judge=out.get("visual_tokens"))}
    k = fitted.num_folds
    root = ctx.dir
    assignment = query_folds(pairs, k, seed=cfg.seed)
    split = split_candidates(retrieved.candidates_table, assignment, k, root / "candidates")
    per_fold, score_dirs = {}, []
    for f in range(k):
        out = run_judge(split[f], pairs, retrieved.candidate_pool, root / f"fold{f}",
                        judge_spec(ctx, image_root, fitted, scoring_judge(f, k)), pool)
        per_fold[str(f)] = {**out, "judge_fold": scoring_judge(f, k)}
        score_dirs.append(out["scores_table"])
        logger.info("judge fold %d (judge of fold %d): %d pairs, %.1f pairs/s", f, scoring_judge(f, k), out["scored"],
                    out["pairs_per_s"])
    scores = merge_score_tables(score_dirs, root / "scores" / "crossfit")
    total = {key: sum(o[key] for o in per_fold.values()) for key in ("pairs", "scored", "quarantined", "seconds")}
    return {"crossfit": True, "folds": per_fold, "scores_table": scores, **total, "seconds": round(total["seconds"], 2),
            "pairs_per_s": total["scored"] / max(1e-9, total["seconds"]),
            "judge": "cross-fitted " + ("dual-encoder judges" if fitted.kind == "dual_encoder" else "stand-in judges"),
            "backend": fitted.backend or "transformers",
            "prompt_version": next((o.get("prompt_version") for o in per_fold.values()), None),
            **score_summary(scores),
            "visual_tokens": ctx.visual_tokens(judge=[o.get("visual_tokens") for o in per_fold.values()])}


def report_judge_fit(s: Section) -> list[str]:
    fit: JudgeFitResult = s.result  # type: ignore[assignment]
    if not fit.enabled:
        return []
    if fit.kind == "dual_encoder":
        parts = ["\n## Stand-in judge: dual encoder (offline: no pretrained MLLM judge)\n",
                 f"Frozen pretrained towers (text `{fit.text_tower.get('kind')}` "
                 f"{fit.text_tower.get('path') or ''}, image `{fit.image_tower.get('kind')}`) with "
                 f"{fit.method}-fitted projection heads and a Platt calibration on held-out pairs, "
                 f"{fit.num_folds}-fold cross-fitted: each fold's queries were scored by the judge fitted on "
                 f"another fold. Tower features for the {fit.feature_items} distinct query and pool "
                 f"items (each distinct image and text encoded once) took {fit.feature_seconds} s.\n"]
        parts.append(markdown_table(["fold", "training queries", "held-out AUC (fitting fold)", "fit seconds",
                                     "judge"],
                                    [[k, v["queries"], v.get("heldout_auc"), v.get("seconds"), f"`{v['model']}`"]
                                     for k, v in fit.folds.items()]))
        return parts
    parts = ["\n## Stand-in judge (offline: no pretrained MLLM judge)\n",
             f"The judge checkpoint was fine-tuned on pairwise Yes/No (positive vs retrieved candidates) with "
             f"{fit.num_folds}-fold cross-fitting: each fold's queries were scored by the judge fitted on "
             "another fold, so no judge scored pairs it was trained on. Its scores stand in for a "
             "Qwen2.5-VL-7B judge's; numbers below are not the paper's judge.\n"]
    parts.append(markdown_table(["fold", "training queries", "steps", "final loss", "answer prob. (Yes, positive)",
                                 "answer prob. (No, negative)"],
                                [[k, v["queries"], v["steps"], v["final"].get("loss"),
                                  v["final"].get("answer_p_pair_pos"), v["final"].get("answer_p_pair_neg")]
                                 for k, v in fit.folds.items()]))
    return parts


def report_judge(s: Section) -> list[str]:
    jud: JudgeResult = s.result  # type: ignore[assignment]
    if jud.pairs is None:
        return []
    parts = ["\n## MLLM-as-a-Judge\n",
             f"Judge: `{jud.judge}` ({jud.backend or 'transformers'}, prompt {jud.prompt_version or 'unrecorded'})\n",
             markdown_table(["pairs", "scored", "quarantined", "pairs/s", "mean score (positives)",
                             "mean score (candidates)", "P(positive outscores a candidate)"],
                            [[jud.pairs, jud.scored, jud.quarantined, jud.pairs_per_s, jud.mean_score_positive,
                              jud.mean_score_candidates, jud.positive_auc]])]
    if jud.positive_auc is not None and jud.positive_auc < 0.6:
        parts.append("\nThe judge barely separates positives from retrieved candidates (0.5 = chance): its soft "
                     "scores carry little information, so UniME-V2's score alignment has little to learn from "
                     "in this run.\n")
    return parts


JUDGE_FIT = Stage("judge_fit", "fit cross-fitted stand-in judges (runs without a pretrained judge)", run_judge_fit,
                  reads=("judge_fit", "retrieve.split", "models.judge", "images.judge", *TRAIN_JOB_READS),
                  result=JudgeFitResult, report=report_judge_fit,
                  command="fit-judge")
JUDGE = Stage("judge", "stage S2: MLLM-as-a-Judge Yes/No scores for retrieved candidates", run_judge_stage,
              reads=(*JUDGE_READS, *IMPORTED_READS, "seed"), result=JudgeResult, report=report_judge)
