"""A development split carved out of the training pairs: rows no training step sees, on which decisions that must
not be made on the eval split are made (whether a reranker helps, the weight of a fused ranking).

Rows are held out by *group*, the visual content a row is about (the query's image, else the positive's, else the
query's text), so the other rows about the same image (an image -> name row, its name -> image twin, its
classification row) go to the same side and the embedder cannot have learned a dev row from its twin. The dev
rows are written in MMEB-eval form: the positive first, then the other dev positives of the same task as
distractors (distinct contents, at most ``candidates`` in all).
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np

from .schema import PAIR_SCHEMA, empty_row, item_from_row


def group_key(row: Mapping[str, Any]) -> str:
    """What a row is about: its query's image, else its positive's image, else its query's text."""
    for prefix in ("query_", "pos_"):
        if row.get(f"{prefix}image"):
            return "sha1:" + hashlib.sha1(row[f"{prefix}image"]).hexdigest()
        if row.get(f"{prefix}image_path"):
            return "path:" + row[f"{prefix}image_path"]
    return "text:" + (row.get("query_text") or "")


def in_dev(key: str, fraction: float, seed: int) -> bool:
    """Whether a group is held out: a hash of (seed, key) below ``fraction``, the same on every run."""
    h = int.from_bytes(hashlib.sha1(f"{seed}\0{key}".encode()).digest()[:8], "little")
    return h / 2 ** 64 < fraction


def split_dev(rows: Sequence[Mapping[str, Any]], fraction: float, seed: int = 0
              ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(training rows, dev rows), whole groups to one side."""
    train, dev = [], []
    for row in rows:
        (dev if in_dev(group_key(row), fraction, seed) else train).append(row)
    return train, dev


def dev_pairs(rows: Sequence[Mapping[str, Any]], candidates: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """The dev rows in MMEB-eval form: each row's positive, then up to ``candidates - 1`` other positives of its
    task's dev rows as distractors (distinct contents; its own positive's content never among them)."""
    rng = np.random.default_rng(seed)
    by_task: dict[str, dict[str, Any]] = {}
    for row in rows:
        item = item_from_row(row, "pos_")
        by_task.setdefault(row.get("task") or "", {}).setdefault(item.content_key(), (row.get("pos_id"), item))
    ids = {task: {k: str(i) if i is not None else f"{task}:{k}" for k, (i, _) in pool.items()}
           for task, pool in by_task.items()}
    out = []
    for row in rows:
        task = row.get("task") or ""
        pool = by_task[task]
        own = item_from_row(row, "pos_").content_key()
        others = [k for k in pool if k != own]
        picked = [others[i] for i in sorted(rng.permutation(len(others))[:max(0, candidates - 1)])]
        new = {**empty_row(PAIR_SCHEMA), **{k: v for k, v in row.items() if not k.startswith("neg_")}}
        negs = [pool[k] for k in picked]
        # one id per content: the eval de-duplicates candidates by id, so equal contents must share one
        new.update(pos_id=ids[task][own], neg_id=[ids[task][k] for k in picked],
                   neg_text=[it.text for _, it in negs], neg_instruction=[it.instruction for _, it in negs],
                   neg_image=[it.image for _, it in negs], neg_image_path=[it.image_path for _, it in negs],
                   neg_score=[None] * len(negs))
        out.append(new)
    return out
