"""Hard-negative mining from Python: S1 -> S2 -> S3 on any pair data, returning the training table.

:func:`mine_hard_negatives` runs the pipeline's own steps, the functions its ``retrieve``, ``judge`` and ``mine``
stages call (:func:`~unime_ray.retrieval.stage.run_retrieval`, :func:`~unime_ray.judge.stage.run_judge`,
:func:`~unime_ray.mining.stage.run_mining`), so the rule is exactly the stage's: top-``top_k`` candidates
below the similarity threshold, judge scores for the positive and each candidate, candidates with
``s > s_pos - beta`` dropped as false negatives, ``num_negatives`` taken by cyclical sampling.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa

from ..data.validate import RowAccount
from ..utils.pool import Pool
from .config import MineConfig


@dataclass(frozen=True)
class MinedNegatives:
    """The training table (the canonical pair table: query, positive with ``pos_score``, ``neg_*`` with
    ``neg_score``) and where every input row went."""

    table: pa.Table
    path: str                                  # the table on disk (shards), what training takes as well
    account: dict[str, Any]                    # input rows: in = out + quarantined (bad rows, with reasons)
    stats: dict[str, Any] = field(default_factory=dict)   # mining counts: mined, false negatives, fallbacks ...
    quarantine: list[str] = field(default_factory=list)   # files of rows left out, each with its reason

    def __len__(self) -> int:
        return self.table.num_rows

    def to_pandas(self):
        return self.table.to_pandas()


def _retriever_spec(retriever: Any, image_root: str | os.PathLike | None):
    from ..models.encode import EmbedderSpec
    from ..utils.ray_utils import absolute_if_local

    if isinstance(retriever, (str, os.PathLike)):   # rebuilt by Ray actors when there is a pool
        return EmbedderSpec(model=absolute_if_local(retriever), image_root=absolute_if_local(image_root))
    if isinstance(retriever, EmbedderSpec) or hasattr(retriever, "encode"):
        return retriever
    raise TypeError(f"retriever must be an Embedder, an EmbedderSpec or a model name/folder, not "
                    f"{type(retriever).__name__}")


def _judge(judge: Any, image_root: str | os.PathLike | None, on_ray: bool):
    """(spec, scorer loaded here or None): a Ray pool builds the judge in its actors from the spec."""
    from ..judge.api import Judge
    from ..judge.stage import JudgeSpec

    if isinstance(judge, (str, os.PathLike)):
        if on_ray:
            return Judge.spec_for(judge, image_root=image_root), None
        judge = Judge.from_pretrained(judge, image_root=image_root)
    if on_ray and (not isinstance(judge, Judge) or judge.spec is None):
        raise ValueError("a Ray pool builds the judge in its actors: pass the judge's name or folder, or a Judge "
                         "loaded with Judge.from_pretrained")
    if isinstance(judge, Judge):
        return (judge.spec, None) if on_ray else (judge.spec or JudgeSpec(model=judge.name), judge.scorer)
    if hasattr(judge, "score_or_errors"):       # any YesNoScorer: a backend or the served reranker
        return JudgeSpec(model=type(judge).__name__), judge
    raise TypeError(f"judge must be a Judge, a scorer with score_or_errors or a model name/folder, not "
                    f"{type(judge).__name__}")


def mine_hard_negatives(pairs: Any, *, retriever: Any, judge: Any, candidates: Any = None, top_k: int = 50,
                        num_negatives: int = 10, beta: float = 0.01, interval: int = 5,
                        delta: str | float | None = "positive", fill: bool = False, fallback_score: float = 1.0,
                        candidate_pool: str = "task", columns: Mapping[str, str] | None = None,
                        candidate_columns: Mapping[str, str] | None = None,
                        image_root: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                        pool: Pool | None = None, seed: int = 0) -> MinedNegatives:
    """UniME-V2's hard negatives for each (query, positive) of ``pairs``.

    ``pairs``/``candidates``: a datasets.Dataset, pyarrow Table, pandas DataFrame, list of dicts or a path (see
    :mod:`unime_ray.data.inputs`; ``columns`` maps other column names). ``candidates`` None: the positives of
    all pairs are the pool (per task, as MMEB-train). ``retriever``: an :class:`~unime_ray.Embedder` or a
    model name/folder; ``judge``: a :class:`~unime_ray.Judge` or a model name/folder, or a list of k of them,
    the judge fitted on each fold of :func:`~unime_ray.judge.crossfit.query_folds` ``(pairs, k, seed)``: then
    scoring is cross-fitted (a fold's queries scored by another fold's judge, as the pipeline's stand-in
    judges). ``delta``: drop
    candidates at or above the query's similarity to its positive (``"positive"``), a number, or None; ``fill``:
    search deeper so that ``top_k`` remain after that drop (the paper's Rank_50 over x < delta) instead of
    filtering the first ``top_k``.
    ``out_dir``: where the steps write (a rerun resumes there; None: a temporary folder). ``pool``: run
    embedding and judging on Ray actors (then give names, not loaded models); None: in this process.

    >>> mined = mine_hard_negatives(pairs, retriever=embedder, judge=tiny_judge, top_k=4, num_negatives=2)
    >>> len(mined) + mined.account["rows_quarantined"] == len(pairs)
    True
    >>> row = mined.table.slice(0, 1).to_pylist()[0]
    >>> len(row["neg_text"]), all(s <= row["pos_score"] - 0.01 for s in row["neg_score"]) or row["neg_score"][0] == 1.0
    (2, True)
    """
    from ..data.inputs import load_table
    from ..data.io import read_table
    from ..judge.crossfit import judge_crossfit
    from ..judge.stage import run_judge
    from ..retrieval.config import RetrieveConfig
    from ..retrieval.stage import run_retrieval
    from .stage import run_mining

    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="unime-mine-"))
    settings = MineConfig(num_negatives=num_negatives, beta=beta, interval=interval, fallback_score=fallback_score,
                          export_official=False)
    search = RetrieveConfig(top_k=top_k, delta=delta, fill=fill, pool=candidate_pool)
    pairs_table, account = load_table(pairs, out / "pairs", columns=columns, image_root=image_root)
    quarantine = [str(out / "pairs.quarantine.parquet")]
    cand_table = None
    if candidates is not None:
        cand_table, cand_account = load_table(candidates, out / "candidates", kind="candidates",
                                              columns=candidate_columns, image_root=image_root)
        quarantine.append(str(out / "candidates.quarantine.parquet"))
    if not account.rows_out:
        raise ValueError(f"no valid pairs to mine ({account.summary()}); see {quarantine[0]}")
    on_ray = pool is not None and pool.ray
    folds = list(judge) if isinstance(judge, (list, tuple)) else None
    specs, scorers = zip(*[_judge(j, image_root, on_ray) for j in (folds or [judge])])
    if image_root is not None:
        specs = [s if s.image_root else s.model_copy(update={"image_root": str(image_root)}) for s in specs]
    retrieved = run_retrieval(pairs_table, cand_table, out / "retrieve", _retriever_spec(retriever, image_root),
                              search, pool=pool, seed=seed)
    args = (retrieved["candidates_table"], pairs_table, retrieved["candidate_pool"], out / "judge")
    if folds:   # cross-fitted: each fold's queries scored by a judge fitted without them
        judged = judge_crossfit(*args, specs, pool if on_ray else None, seed=seed,
                                scorers=None if on_ray else scorers)
    else:
        judged = run_judge(*args, specs[0], pool=pool if on_ray else None, scorer=scorers[0])
    mined = run_mining(retrieved["candidates_table"], judged["scores_table"], pairs_table,
                       retrieved["candidate_pool"], out / "mine", settings, seed=seed, image_root=image_root)
    quarantine += [str(out / "judge" / "quarantine.parquet"), str(out / "mine" / "quarantine")]
    # every input pair: mined, or quarantined at conversion or at mining (a positive the judge could not score)
    rows = RowAccount(account.rows_in, mined["mined"], account.rows_quarantined + mined["quarantined"],
                      account.reasons.copy())
    if mined["quarantined"]:
        rows.reasons["mining: positive unscored or no candidates"] += mined["quarantined"]
    rows.check()
    stats = {k: mined[k] for k in ("queries", "mined", "quarantined", "false_negatives", "fallbacks",
                                   "repeated_fill", "no_candidates", "mean_positive_score", "mean_negative_score")
             if k in mined}
    stats.update(retrieval_queries=retrieved["queries"], mean_candidates=retrieved["mean_candidates"],
                 pairs_judged=judged["pairs"], judge_errors=judged["quarantined"])
    if candidates is not None:
        stats["candidates"] = cand_account.as_dict()
    return MinedNegatives(table=read_table(mined["training_table"]), path=mined["training_table"],
                          account=rows.as_dict(), stats=stats, quarantine=quarantine)
