"""Evaluation from Python: MMEB-protocol precision@1 of an embedder (optionally with listwise reranking of its
top-K) on any eval pairs, as a typed result; and the model card's evaluation section.

:func:`evaluate` runs :func:`~unime_ray.eval.mmeb.evaluate_pairs_table`, the function the pipeline's ``eval``
stage runs, so the numbers are the same for the same model and data.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict

from ..utils.pool import Pool

PROTOCOL = ("MMEB protocol: for each query the ground truth and its distractors are ranked by cosine similarity; "
            "P@1 is the share of queries whose ground truth ranks first (ties count against it). Chance is "
            "the mean of 1 / candidates.")


class Evaluation(BaseModel):
    """One model's evaluation: P@1 (%) per eval set (a task), its chance level and, with a reranker, the
    reranked P@1; ``results`` is the full ``results.json`` when it was written."""

    model_config = ConfigDict(frozen=True, extra="allow")

    model: str
    per_dataset: dict[str, float | None]
    chance: dict[str, float | None]
    summary: dict[str, Any] = {}
    reranked: dict[str, float | None] | None = None
    rows: dict[str, int] = {}
    results: str | None = None

    def __str__(self) -> str:
        head = ["eval set", "rows", "P@1 (%)", "chance (%)"] + (["reranked P@1 (%)"] if self.reranked else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, v in self.per_dataset.items():
            chance = self.chance.get(name)
            row = [name, str(self.rows.get(name, "")), "" if v is None else f"{v:.2f}",
                   "" if chance is None else f"{chance:.2f}"]
            if self.reranked:
                r = self.reranked.get(name)
                row.append("" if r is None else f"{r:.2f}")
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)


def evaluation_of(results: Mapping[str, Any], results_file: str | None = None) -> Evaluation:
    rerank = results.get("rerank") or {}
    return Evaluation(model=str(results.get("model")), per_dataset=results.get("per_dataset") or {},
                      chance=results.get("chance") or {}, summary=results.get("summary") or {},
                      reranked=rerank.get("per_dataset") if rerank else None,
                      rows=(results.get("sizes") or {}).get("rows_per_dataset", {}), results=results_file)


def record_in_card(model_dir: str | os.PathLike, evaluation: Evaluation, data: str | None = None) -> bool:
    """Write the evaluation into the model folder's card (a folder saved by this project); False if there is
    no such folder (a hub name)."""
    from ..models.card import CARD_JSON, write_model_card

    folder = Path(model_dir)
    if not (folder / CARD_JSON).is_file():
        return False
    write_model_card(folder, evaluation={"protocol": PROTOCOL + (f" Data: `{data}`." if data else ""),
                                         "per_dataset": evaluation.per_dataset, "chance": evaluation.chance,
                                         "reranked": evaluation.reranked or {}})
    return True


def evaluate(model: Any, data: Any, *, reranker: Any = None, rerank_top_k: int = 5,
             columns: Mapping[str, str] | None = None, image_root: str | os.PathLike | None = None,
             out_dir: str | os.PathLike | None = None, pool: Pool | None = None, label: str | None = None,
             update_card: bool = True) -> Evaluation:
    """P@1 of ``model`` (an :class:`~unime_ray.Embedder`, or a model folder / hub name) on eval pairs ``data``:
    rows of a query, its ground truth (the positive) and distractors (the negatives), in any form
    :mod:`unime_ray.data.inputs` reads; rows are grouped into eval sets by ``task``.

    ``reranker``: a :class:`~unime_ray.Reranker` or its folder; its listwise choice among the embedder's
    top-``rerank_top_k`` replaces rank 1. ``out_dir``: where ``results.json`` and the per-query top-K go (None:
    a temporary folder). With ``update_card`` a model folder saved by this project gets the results in its card.

    >>> result = evaluate(embedder, eval_pairs)
    >>> sorted(result.per_dataset) == sorted(result.chance), all(0 <= v <= 100 for v in result.per_dataset.values())
    (True, True)
    """
    from ..data.inputs import load_table
    from .mmeb import evaluate_pairs_table

    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="unime-eval-"))
    table, account = load_table(data, out / "data", columns=columns, image_root=image_root)
    if not account.rows_out:
        raise ValueError(f"no valid eval rows ({account.summary()}); see {table}.quarantine.parquet")
    results = evaluate_pairs_table(model, table, out / "results", image_root=image_root, reranker=reranker,
                                   rerank_top_k=rerank_top_k, pool=pool, label=label)
    evaluation = evaluation_of(results, str(out / "results" / "results.json"))
    if update_card and isinstance(model, (str, os.PathLike)):
        record_in_card(model, evaluation, str(data) if isinstance(data, (str, os.PathLike)) else None)
    return evaluation
