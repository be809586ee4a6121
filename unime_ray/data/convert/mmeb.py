"""MMEB rows: MMEB-train ``qry, qry_image_path, pos_text, pos_image_path[, neg_text, neg_image_path]`` and
MMEB-eval ``qry_text, qry_img_path, tgt_text[], tgt_img_path[]`` with the ground truth first (import and export).

MMEB texts carry Phi-3-V image markers (``<|image_1|>``); they become the canonical marker here
(:func:`~.records.to_canonical_text`) and each backbone's placeholder at formatting time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..schema import item_from_row, negatives_from_row
from .records import ImageSpill, field, image_item, official_text, pair_row, record_errors


def mmeb_train_record_to_row(rec: Mapping[str, Any], index: int, source: str, task: str,
                             id_index: int | None = None) -> dict[str, Any]:
    """An MMEB-train row (``qry, qry_image_path, pos_text, pos_image_path[, neg_text, neg_image_path]``).
    ``index`` is the record's row in ``source``; ``id_index`` (default ``index``) numbers the row id, which
    runs on across the files of one subset."""
    err = record_errors(rec, source, index)
    query = image_item(field(rec, "qry", err), field(rec, "qry_image_path", err, required=False))
    pos = image_item(field(rec, "pos_text", err), field(rec, "pos_image_path", err, required=False))
    neg_text = field(rec, "neg_text", err, required=False)
    neg_path = field(rec, "neg_image_path", err, required=False)
    negatives = [(image_item(neg_text or "", neg_path), None, None)] if (neg_text or neg_path) else []
    return pair_row(f"{task}:{index if id_index is None else id_index:08d}", task, query, pos, None, negatives)


def row_to_mmeb_train_record(row: Mapping[str, Any], spill: ImageSpill | None = None) -> dict[str, Any]:
    spill = spill or ImageSpill(None)
    where = f"row id={row.get('id')!r}"
    query, pos = item_from_row(row, "query_"), item_from_row(row, "pos_")
    rec = {"qry": official_text(query), "qry_image_path": spill.path_of(query, where),
           "pos_text": official_text(pos), "pos_image_path": spill.path_of(pos, where)}
    negatives = negatives_from_row(row)
    if negatives:
        neg = negatives[0][0]
        rec.update(neg_text=official_text(neg), neg_image_path=spill.path_of(neg, where))
    return rec


def mmeb_eval_record_to_row(rec: Mapping[str, Any], index: int, source: str, task: str) -> dict[str, Any]:
    """An MMEB-eval row: query and candidate lists with the ground truth first."""
    err = record_errors(rec, source, index)
    query = image_item(field(rec, "qry_text", err), field(rec, "qry_img_path", err, required=False))
    texts = field(rec, "tgt_text", err, types=(list, tuple))
    paths = field(rec, "tgt_img_path", err, types=(list, tuple), required=False)
    texts = list(texts)
    paths = list(paths) if paths is not None else [""] * len(texts)
    if not texts:
        raise err("tgt_text", "no candidates (the ground truth must come first)")
    if len(paths) != len(texts):
        raise err("tgt_img_path", f"{len(paths)} image paths for {len(texts)} candidate texts")
    items = []
    for j, (t, p) in enumerate(zip(texts, paths)):
        if not isinstance(t, str) or (p is not None and not isinstance(p, str)):
            raise err(f"tgt_text[{j}]", "expected strings")
        items.append(image_item(t, p))
    negatives = [(it, None, it.content_key()) for it in items[1:]]
    return pair_row(f"{task}:{index:08d}", task, query, items[0], None, negatives)


def row_to_mmeb_eval_record(row: Mapping[str, Any], spill: ImageSpill | None = None) -> dict[str, Any]:
    spill = spill or ImageSpill(None)
    where = f"row id={row.get('id')!r}"
    query = item_from_row(row, "query_")
    targets = [item_from_row(row, "pos_")] + [it for it, _, _ in negatives_from_row(row)]
    return {"qry_text": official_text(query), "qry_img_path": spill.path_of(query, where),
            "tgt_text": [official_text(t) for t in targets],
            "tgt_img_path": [spill.path_of(t, where) for t in targets]}
