"""Every stage's typed result (what the manifest stores and later stages and the report read back), and what the
stages read of each other's results: whether the training pairs came already judged (imported)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .stage import Context, StageResult

logger = logging.getLogger(__name__)


class DataResult(StageResult):
    format: str
    eval_format: str | None = None         # eval_pairs' format when it differs (data.eval_source)
    image_root: str | None = None
    inputs: dict[str, str]                 # table name -> input file or folder
    summary: dict[str, Any] | None = None  # the demo data's own summary


class PrepareResult(StageResult):
    tables: dict[str, dict[str, Any]]      # table name -> row accounting + "path"
    image_root: str | None = None

    def path(self, table: str) -> str | None:
        return (self.tables.get(table) or {}).get("path")


class ModelsResult(StageResult):
    tiny_models: dict[str, str] | None = None    # architecture -> folder, when models.tiny.make
    tokenizer_corpus_texts: int | None = None


class EmbedResult(StageResult):
    tables: dict[str, dict[str, Any]] = {}    # table name -> embed_table's stats + "path"
    embedder: str | None = None


class RetrieveResult(StageResult):
    imported: bool = False
    candidates_table: str | None = None   # per query: retrieved candidate ids and similarities
    candidate_pool: str | None = None     # the items candidates are drawn from
    embedder: str | None = None           # the model S1 embedded with
    queries: int | None = None            # queries searched (None: imported)
    search: dict[str, Any] | None = None  # search throughput (the report prints rows/s)
    mean_candidates: float | None = None
    queries_without_candidates: int | None = None
    mean_dropped_by_delta: float | None = None   # candidates above delta (likely false negatives), per query
    pools: int | None = None              # candidate pools (one per task)


class JudgeFitResult(StageResult):
    enabled: bool = False
    kind: Literal["mllm", "dual_encoder"] = "mllm"
    backend: str | None = None            # the backend that scores with the fitted judges (None: judge.backend)
    num_folds: int | None = None
    folds: dict[str, dict[str, Any]] = {}   # fold -> its judge ("model": checkpoint or folder) and fit record
    feature_cache: str | None = None      # dual encoder: the tower features the judge stage reads too
    feature_items: int | None = None      # dual encoder: distinct items encoded by the towers
    feature_seconds: float | None = None
    method: str | None = None             # dual encoder: how the heads were fitted
    text_tower: dict[str, Any] = {}
    image_tower: dict[str, Any] = {}


class JudgeResult(StageResult):
    imported: bool = False
    scores_table: str | None = None       # per (query, candidate) pair: the judge's score
    judge: str | None = None
    backend: str | None = None
    prompt_version: str | None = None
    pairs: int | None = None
    scored: int | None = None
    quarantined: int | None = None
    pairs_per_s: float | None = None
    mean_score_positive: float | None = None
    mean_score_candidates: float | None = None
    positive_auc: float | None = None     # P(positive outscores a candidate)


class MineResult(StageResult):
    training_table: str                   # what the embedder and the reranker train on
    imported: bool = False
    official_json: str | None = None
    imported_from: str | None = None      # imported: the input file the training pairs came from
    format: str | None = None             # imported: its format
    rows: int | None = None               # imported: training rows
    min_negatives: int | None = None      # imported: the fewest negatives of a row (training checks it against k)
    max_negatives: int | None = None
    settings: dict[str, Any] | None = None  # the mine section and seed it ran with (the report prints them)
    queries: int | None = None            # mined: queries read (= mined + quarantined)
    mined: int | None = None
    quarantined: int | None = None
    false_negatives: int | None = None    # candidates dropped above the positive's score - beta
    fallbacks: int | None = None          # queries with no surviving candidate
    repeated_fill: int | None = None      # queries with fewer than k survivors, filled cyclically
    mean_positive_score: float | None = None
    mean_negative_score: float | None = None
    histogram: str | None = None          # the judge-score histogram plot


class TrainStageResult(StageResult):
    """A training stage (baseline, train, rerank): the exported model folder and its last metrics
    (unime_ray.train.api.TrainResult), whether the stage ran, and the weights it started from."""

    enabled: bool = True
    model: str | None = None
    steps: int | None = None
    final: dict[str, Any] = {}
    init: str | None = None               # rerank: the weights it started from
    global_batch: int | None = None
    plot: str | None = None               # the training curve
    visual_tokens: dict[str, Any] = {}


class VariantRun(BaseModel):
    """One comparison run of the ablations stage."""

    model_config = ConfigDict(frozen=True)

    model: str
    steps: int
    final: dict[str, Any] = {}
    objective: str


class AblationsResult(StageResult):
    variants: dict[str, dict[str, VariantRun]] = {}   # variant name -> seed (as a string) -> its run
    init: str | None = None
    visual_tokens: dict[str, Any] = {}


class ModelEval(BaseModel):
    """One evaluated model: what the comparison and its statistics over seeds read."""

    model_config = ConfigDict(frozen=True, extra="allow")

    label: str
    variant: str                                  # the comparison's row (models of one variant: its seeds)
    seed: int | None = None
    model: str
    per_dataset: dict[str, float | None] | None = None   # P@1 (%) per eval set
    summary: dict[str, Any] | None = None         # mmeb.summarize: the headline means
    chance: dict[str, float | None] | None = None        # chance P@1 per eval set
    sizes: dict[str, Any] | None = None           # rows per eval set, items encoded
    rerank: dict[str, Any] | None = None          # the reranked P@1 (per_dataset, summary, gt_in_top_k, fallbacks)
    results: str                                  # the model's results.json
    visual_tokens: dict[str, Any] = {}


class EvalResult(StageResult):
    enabled: bool = True
    reason: str | None = None                     # why it did not run (enabled false)
    table: str | None = None                      # the eval pair table
    models: dict[str, ModelEval] = {}             # label -> its evaluation
    reranker: str | None = None                   # the reranker of the reranked P@1 (None: none used)
    # the guard's measurement on the dev split (eval.rerank): RerankValidation.as_dict(), or why there is none
    rerank_validation: dict[str, Any] | None = None
    visual_tokens: dict[str, Any] = {}            # per role: the tally over every model (Context.visual_tokens)


def imported_training(ctx: Context) -> dict[str, Any] | None:
    """The prepared training pairs, when they already carry judge-scored negatives (the official score JSON, or a
    canonical table with neg_* and neg_score columns) and ``mine.from_imported`` is ``use``: retrieve, judge and
    mine then record them as imported and training reads them as they are. None: mine as for any other data."""
    from ..mining.stage import scored_negatives

    cfg = ctx.cfg
    if cfg.mine.from_imported != "use":
        return None
    split = cfg.retrieve.split
    path = ctx.result("prepare", PrepareResult).path(f"{split}_pairs")
    if path is None:
        return None
    stats = scored_negatives(path)
    if not stats["scored_rows"]:
        return None
    if stats["scored_rows"] < stats["rows"]:
        raise ValueError(f"{split} pairs: {stats['scored_rows']} of {stats['rows']} rows carry judge-scored "
                         "negatives; a table is used as imported only when every row does (a judge score for the "
                         "positive and each negative). Fix the table, or set mine.from_imported: remine")
    data = ctx.result("data", DataResult)
    return {"imported": True, "imported_from": data.inputs.get(f"{split}_pairs"), "format": data.format,
            "table": path, **stats}


def imported_stage(info: dict[str, Any], what: str) -> dict[str, Any]:
    """The result of a stage that did not run because the training pairs came with judge-scored negatives."""
    logger.info("%s: imported with the training table (%d rows from %s), not recomputed", what, info["rows"],
                info["imported_from"])
    return {**info, "note": f"{what} not run: the training pairs came with judge-scored negatives "
                            "(mine.from_imported: use; remine recomputes them)"}
