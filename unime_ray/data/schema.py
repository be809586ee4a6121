"""The canonical Arrow schemas every stage reads and writes.

Two tables cover the whole method:

* **pairs** (``PAIR_SCHEMA``): one row per query with its positive and, optionally, a list of
  negatives (mined hard negatives with judge scores for training; distractors for evaluation, where
  the positive is the ground truth). The official UniME-V2 training JSON, MMEB-train rows and MMEB-eval
  rows all map onto it.
* **candidates** (``CANDIDATE_SCHEMA``): a pool of retrievable items (text and/or image).

An *item* (a query, a positive, a candidate) is ``instruction`` + ``text`` + an image given either
inline (``image``: encoded bytes) or as ``image_path`` relative to an image root. Texts use one
backbone-neutral image marker, :data:`IMAGE_MARKER`; each backbone's formatter maps it to its own
placeholder (e.g. ``<|image_pad|>`` for Qwen2-VL), and converters map other conventions
(MMEB's Phi-3-V ``<|image_1|>``) onto it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa

IMAGE_MARKER = "<image>"

ITEM_FIELDS: dict[str, pa.DataType] = {
    "instruction": pa.string(),
    "text": pa.string(),
    "image": pa.binary(),
    "image_path": pa.string(),
}


def _item_fields(prefix: str) -> list[pa.Field]:
    return [pa.field(f"{prefix}{name}", dtype) for name, dtype in ITEM_FIELDS.items()]


def _list_item_fields(prefix: str) -> list[pa.Field]:
    return [pa.field(f"{prefix}{name}", pa.list_(dtype)) for name, dtype in ITEM_FIELDS.items()]


PAIR_SCHEMA = pa.schema(
    [pa.field("id", pa.string(), nullable=False), pa.field("task", pa.string(), nullable=False)]
    + _item_fields("query_")
    + [pa.field("pos_id", pa.string())]
    + _item_fields("pos_")
    + [pa.field("pos_score", pa.float64())]
    + [pa.field("neg_id", pa.list_(pa.string()))]
    + _list_item_fields("neg_")
    + [pa.field("neg_score", pa.list_(pa.float64()))]
)

CANDIDATE_SCHEMA = pa.schema(
    [pa.field("id", pa.string(), nullable=False), pa.field("task", pa.string(), nullable=False)]
    + _item_fields("")
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("id", pa.string()),
        pa.field("field", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("record", pa.string()),  # the offending row as JSON (image bytes abbreviated)
    ]
)

SCHEMAS = {"pairs": PAIR_SCHEMA, "candidates": CANDIDATE_SCHEMA}


@dataclass(frozen=True)
class Item:
    """One side of a pair: what an embedder, judge or reranker reads."""

    text: str = ""
    instruction: str = ""
    image: bytes | None = None
    image_path: str | None = None

    @property
    def has_image(self) -> bool:
        return bool(self.image) or bool(self.image_path)

    def prompt_text(self) -> str:
        """Instruction and text joined the way every stage sees them."""
        return join_instruction(self.instruction, self.text)

    def content_key(self) -> str:
        """A stable id from the content, for de-duplicating candidates."""
        h = hashlib.sha1()
        for part in (self.instruction, self.text, self.image_path or ""):
            h.update(part.encode("utf-8"))
            h.update(b"\x00")
        if self.image:
            h.update(hashlib.sha1(self.image).digest())
        return h.hexdigest()[:16]


def join_instruction(instruction: str | None, text: str | None) -> str:
    instruction = (instruction or "").strip()
    text = text or ""
    if not instruction:
        return text
    if not text:
        return instruction
    return f"{instruction} {text}"


def item_from_row(row: Mapping[str, Any], prefix: str = "") -> Item:
    """Read an :class:`Item` from a row dict of either schema (``prefix`` e.g. ``"query_"``)."""
    return Item(
        text=row.get(f"{prefix}text") or "",
        instruction=row.get(f"{prefix}instruction") or "",
        image=row.get(f"{prefix}image") or None,
        image_path=row.get(f"{prefix}image_path") or None,
    )


def item_to_columns(item: Item, prefix: str = "") -> dict[str, Any]:
    return {
        f"{prefix}instruction": item.instruction,
        f"{prefix}text": item.text,
        f"{prefix}image": item.image,
        f"{prefix}image_path": item.image_path,
    }


def negatives_from_row(row: Mapping[str, Any]) -> list[tuple[Item, float | None, str | None]]:
    """The row's negatives as (item, score, id) triples, in stored order."""
    texts = row.get("neg_text") or []
    n = len(texts)

    def col(name: str) -> list:
        values = row.get(name)
        return list(values) if values is not None else [None] * n

    instr, images, paths, scores, ids = (
        col("neg_instruction"), col("neg_image"), col("neg_image_path"), col("neg_score"), col("neg_id"))
    out = []
    for i in range(n):
        item = Item(text=texts[i] or "", instruction=instr[i] or "", image=images[i] or None,
                    image_path=paths[i] or None)
        out.append((item, scores[i], ids[i]))
    return out


def negatives_to_columns(negatives: list[tuple[Item, float | None, str | None]]) -> dict[str, Any]:
    if not negatives:
        return {"neg_id": None, "neg_instruction": None, "neg_text": None, "neg_image": None,
                "neg_image_path": None, "neg_score": None}
    return {
        "neg_id": [nid for _, _, nid in negatives],
        "neg_instruction": [it.instruction for it, _, _ in negatives],
        "neg_text": [it.text for it, _, _ in negatives],
        "neg_image": [it.image for it, _, _ in negatives],
        "neg_image_path": [it.image_path for it, _, _ in negatives],
        "neg_score": [s for _, s, _ in negatives],
    }


def empty_row(schema: pa.Schema) -> dict[str, Any]:
    return {name: None for name in schema.names}
