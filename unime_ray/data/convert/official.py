"""The official UniME-V2 training JSON (import and export, lossless round trip)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from ...utils.files import write_json_list_atomic
from ..io import iter_rows
from ..schema import item_from_row, negatives_from_row
from ..validate import DataError
from .records import ImageSpill, field, image_item, official_text, pair_row, record_errors, task_from_path


def official_record_to_row(rec: Mapping[str, Any], index: int, source: str, id_prefix: str = "official",
                           default_task: str = "unknown") -> dict[str, Any]:
    """One record of the official UniME-V2 training JSON -> a canonical pair row."""
    err = record_errors(rec, source, index)
    q_text = field(rec, "query_text", err)
    q_img = field(rec, "query_image", err, required=False, default="")
    p_text = field(rec, "pos_text", err)
    p_img = field(rec, "pos_image", err, required=False, default="")
    s_pos = field(rec, "query_pos_scores", err, types=(int, float), required=False)
    hns = field(rec, "hard_negatives", err, types=(list,), required=False, default=[])
    hn_scores = field(rec, "hard_negatives_scores", err, types=(list,), required=False, default=[])
    if len(hns) != len(hn_scores):
        raise err("hard_negatives_scores", f"{len(hn_scores)} scores for {len(hns)} hard negatives")
    negatives = []
    for j, (hn, score) in enumerate(zip(hns, hn_scores)):
        if not (isinstance(hn, (list, tuple)) and len(hn) == 2 and all(isinstance(x, str) for x in hn)):
            raise err(f"hard_negatives[{j}]", "expected [text, image_path]")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise err(f"hard_negatives_scores[{j}]", f"expected a number, got {type(score).__name__}")
        negatives.append((image_item(hn[0], hn[1]), float(score), None))
    task = task_from_path(q_img, p_img) or default_task
    return pair_row(f"{id_prefix}:{index:08d}", task, image_item(q_text, q_img), image_item(p_text, p_img),
                     None if s_pos is None else float(s_pos), negatives)


def row_to_official_record(row: Mapping[str, Any], spill: ImageSpill | None = None) -> dict[str, Any]:
    spill = spill or ImageSpill(None)
    where = f"row id={row.get('id')!r}"
    query, pos = item_from_row(row, "query_"), item_from_row(row, "pos_")
    negatives = negatives_from_row(row)
    if row.get("pos_score") is None:
        raise DataError(where, None, "pos_score", "the official format needs the judge score of the positive")
    if any(s is None for _, s, _ in negatives):
        raise DataError(where, None, "neg_score", "the official format needs a judge score for each negative")
    return {
        "query_text": official_text(query),
        "query_image": spill.path_of(query, where),
        "pos_text": official_text(pos),
        "pos_image": spill.path_of(pos, where),
        "query_pos_scores": row["pos_score"],
        "hard_negatives": [[official_text(it), spill.path_of(it, where)] for it, _, _ in negatives],
        "hard_negatives_scores": [s for _, s, _ in negatives],
    }


def export_official_json(pairs: str | os.PathLike | Iterable[Mapping[str, Any]], out_json: str | os.PathLike,
                         image_dir: str | os.PathLike | None = None) -> int:
    """Write a canonical pair table as the official training JSON; inline images go under ``image_dir``."""
    rows = iter_rows(pairs) if isinstance(pairs, (str, os.PathLike)) else pairs
    spill = ImageSpill(image_dir)
    return write_json_list_atomic((row_to_official_record(r, spill) for r in rows), out_json, ensure_ascii=False)
