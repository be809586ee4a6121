"""Converters between external formats and the canonical pair table.

* official UniME-V2 training JSON (import and export, lossless round trip);
* MMEB-train rows ``qry, qry_image_path, pos_text, pos_image_path[, neg_text, neg_image_path]``
  (import and export);
* MMEB-eval rows ``qry_text, qry_img_path, tgt_text[], tgt_img_path[]`` with the ground truth first
  (import and export).

MMEB texts carry Phi-3-V image markers (``<|image_1|>``); they become the canonical
:data:`~unime_ray.data.schema.IMAGE_MARKER` here and each backbone's placeholder at formatting time.
Converters raise :class:`~unime_ray.data.validate.DataError` for a structurally bad record; the
``import_*`` functions turn those into quarantine entries so that every input row is accounted for.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from .io import iter_rows, write_rows
from .schema import (IMAGE_MARKER, PAIR_SCHEMA, SCHEMAS, Item, empty_row, item_from_row, item_to_columns,
                     negatives_from_row, negatives_to_columns)
from .validate import DataError, Quarantine, RowAccount, validate_rows

PHI3V_MARKER = "<|image_1|>"
_PHI3V_RE = re.compile(r"<\|image_\d+\|>")


def to_canonical_text(text: str) -> str:
    """Map Phi-3-V markers (``<|image_1|>``, ``<|image_2|>``...) to the canonical marker."""
    return _PHI3V_RE.sub(IMAGE_MARKER, text)


def from_canonical_text(text: str, marker: str = PHI3V_MARKER) -> str:
    return text.replace(IMAGE_MARKER, marker)


def read_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Records of a JSON list, a JSONL file, or a Parquet file/folder."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".parquet":
        yield from iter_rows(p)
        return
    if not p.is_file():
        raise FileNotFoundError(f"input file not found: {p}")
    if p.suffix == ".jsonl":
        with p.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        # Yield a marker the importer quarantines, so one bad line loses nothing else.
                        yield {"__invalid_json__": f"line {line_no + 1}: {exc}"}
        return
    with p.open(encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(str(p), None, "<file>", f"not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise DataError(str(p), None, "<file>", f"expected a JSON list of records, got {type(data).__name__}")
    yield from data


# ---------------------------------------------------------------------------------------------- helpers
def _field(rec: Mapping[str, Any], name: str, err, *, types: tuple = (str,), required: bool = True,
           default: Any = None) -> Any:
    if name not in rec or rec[name] is None:
        if required:
            raise err(name, "missing")
        return default
    v = rec[name]
    if not isinstance(v, types) or isinstance(v, bool) and bool not in types:
        names = "/".join(t.__name__ for t in types)
        raise err(name, f"expected {names}, got {type(v).__name__}")
    return v


def _path_or_none(p: str | None) -> str | None:
    return p if p else None


def _task_from_path(*paths: str | None) -> str | None:
    """MMEB-train images live under ``images/<Dataset>/...``: the dataset names the task."""
    for p in paths:
        if p:
            parts = Path(p).parts
            if len(parts) >= 2 and parts[0] == "images":
                return parts[1]
            if len(parts) >= 2:
                return parts[0]
    return None


def _image_item(text: str, image_path: str | None) -> Item:
    return Item(text=to_canonical_text(text), image_path=_path_or_none(image_path))


def _error_factory(source: str, index: int, row_id: str | None = None) -> Callable[[str, str], DataError]:
    return lambda field, reason: DataError(source, index, field, reason, row_id)


def _pair_row(row_id: str, task: str, query: Item, pos: Item, pos_score: float | None,
              negatives: list[tuple[Item, float | None, str | None]]) -> dict[str, Any]:
    row = empty_row(PAIR_SCHEMA)
    row.update(id=row_id, task=task, pos_id=pos.content_key(), pos_score=pos_score)
    row.update(item_to_columns(query, "query_"))
    row.update(item_to_columns(pos, "pos_"))
    row.update(negatives_to_columns(negatives))
    return row


# ---------------------------------------------------------------------------------------------- official
def official_record_to_row(rec: Mapping[str, Any], index: int, source: str, id_prefix: str = "official",
                           default_task: str = "unknown") -> dict[str, Any]:
    """One record of the official UniME-V2 training JSON -> a canonical pair row."""
    err = _error_factory(source, index)
    if not isinstance(rec, Mapping):
        raise err("<row>", f"expected an object, got {type(rec).__name__}")
    if "__invalid_json__" in rec:
        raise err("<row>", rec["__invalid_json__"])
    q_text = _field(rec, "query_text", err)
    q_img = _field(rec, "query_image", err, required=False, default="")
    p_text = _field(rec, "pos_text", err)
    p_img = _field(rec, "pos_image", err, required=False, default="")
    s_pos = _field(rec, "query_pos_scores", err, types=(int, float), required=False)
    hns = _field(rec, "hard_negatives", err, types=(list,), required=False, default=[])
    hn_scores = _field(rec, "hard_negatives_scores", err, types=(list,), required=False, default=[])
    if len(hns) != len(hn_scores):
        raise err("hard_negatives_scores", f"{len(hn_scores)} scores for {len(hns)} hard negatives")
    negatives = []
    for j, (hn, score) in enumerate(zip(hns, hn_scores)):
        if not (isinstance(hn, (list, tuple)) and len(hn) == 2 and all(isinstance(x, str) for x in hn)):
            raise err(f"hard_negatives[{j}]", "expected [text, image_path]")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise err(f"hard_negatives_scores[{j}]", f"expected a number, got {type(score).__name__}")
        negatives.append((_image_item(hn[0], hn[1]), float(score), None))
    task = _task_from_path(q_img, p_img) or default_task
    return _pair_row(f"{id_prefix}:{index:08d}", task, _image_item(q_text, q_img), _image_item(p_text, p_img),
                     None if s_pos is None else float(s_pos), negatives)


def _official_text(item: Item) -> str:
    text = from_canonical_text(item.prompt_text())
    if item.has_image and PHI3V_MARKER not in text:
        text = f"{PHI3V_MARKER}\n{text}"
    return text


class _ImageSpill:
    """Writes inline image bytes to files so that path-based formats can reference them."""

    def __init__(self, image_dir: str | os.PathLike | None, subdir: str = "inline"):
        self.image_dir = Path(image_dir) if image_dir else None
        self.subdir = subdir

    def path_of(self, item: Item, where: str) -> str:
        if item.image_path:
            return item.image_path
        if not item.image:
            return ""
        if self.image_dir is None:
            raise ValueError(f"{where} has an inline image; pass image_dir to write it out as a file")
        rel = f"{self.subdir}/{hashlib.sha1(item.image).hexdigest()[:20]}.png"
        target = self.image_dir / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(item.image)
        return rel


def row_to_official_record(row: Mapping[str, Any], spill: _ImageSpill | None = None) -> dict[str, Any]:
    spill = spill or _ImageSpill(None)
    where = f"row id={row.get('id')!r}"
    query, pos = item_from_row(row, "query_"), item_from_row(row, "pos_")
    negatives = negatives_from_row(row)
    if row.get("pos_score") is None:
        raise DataError(where, None, "pos_score", "the official format needs the judge score of the positive")
    if any(s is None for _, s, _ in negatives):
        raise DataError(where, None, "neg_score", "the official format needs a judge score for each negative")
    return {
        "query_text": _official_text(query),
        "query_image": spill.path_of(query, where),
        "pos_text": _official_text(pos),
        "pos_image": spill.path_of(pos, where),
        "query_pos_scores": row["pos_score"],
        "hard_negatives": [[_official_text(it), spill.path_of(it, where)] for it, _, _ in negatives],
        "hard_negatives_scores": [s for _, s, _ in negatives],
    }


def export_official_json(pairs: str | os.PathLike | Iterable[Mapping[str, Any]], out_json: str | os.PathLike,
                         image_dir: str | os.PathLike | None = None) -> int:
    """Write a canonical pair table as the official training JSON; inline images go under ``image_dir``."""
    rows = iter_rows(pairs) if isinstance(pairs, (str, os.PathLike)) else pairs
    spill = _ImageSpill(image_dir)
    records = [row_to_official_record(r, spill) for r in rows]
    _write_json(records, out_json)
    return len(records)


def _write_json(records: list, out_json: str | os.PathLike) -> None:
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------- MMEB
def mmeb_train_record_to_row(rec: Mapping[str, Any], index: int, source: str, task: str) -> dict[str, Any]:
    """An MMEB-train row (``qry, qry_image_path, pos_text, pos_image_path[, neg_text, neg_image_path]``)."""
    err = _error_factory(source, index)
    if not isinstance(rec, Mapping):
        raise err("<row>", f"expected an object, got {type(rec).__name__}")
    if "__invalid_json__" in rec:
        raise err("<row>", rec["__invalid_json__"])
    query = _image_item(_field(rec, "qry", err), _field(rec, "qry_image_path", err, required=False))
    pos = _image_item(_field(rec, "pos_text", err), _field(rec, "pos_image_path", err, required=False))
    neg_text = _field(rec, "neg_text", err, required=False)
    neg_path = _field(rec, "neg_image_path", err, required=False)
    negatives = [(_image_item(neg_text or "", neg_path), None, None)] if (neg_text or neg_path) else []
    return _pair_row(f"{task}:{index:08d}", task, query, pos, None, negatives)


def row_to_mmeb_train_record(row: Mapping[str, Any], spill: _ImageSpill | None = None) -> dict[str, Any]:
    spill = spill or _ImageSpill(None)
    where = f"row id={row.get('id')!r}"
    query, pos = item_from_row(row, "query_"), item_from_row(row, "pos_")
    rec = {"qry": _official_text(query), "qry_image_path": spill.path_of(query, where),
           "pos_text": _official_text(pos), "pos_image_path": spill.path_of(pos, where)}
    negatives = negatives_from_row(row)
    if negatives:
        neg = negatives[0][0]
        rec.update(neg_text=_official_text(neg), neg_image_path=spill.path_of(neg, where))
    return rec


def mmeb_eval_record_to_row(rec: Mapping[str, Any], index: int, source: str, task: str) -> dict[str, Any]:
    """An MMEB-eval row: query and candidate lists with the ground truth first."""
    err = _error_factory(source, index)
    if not isinstance(rec, Mapping):
        raise err("<row>", f"expected an object, got {type(rec).__name__}")
    if "__invalid_json__" in rec:
        raise err("<row>", rec["__invalid_json__"])
    query = _image_item(_field(rec, "qry_text", err), _field(rec, "qry_img_path", err, required=False))
    texts = _field(rec, "tgt_text", err, types=(list, tuple))
    paths = _field(rec, "tgt_img_path", err, types=(list, tuple), required=False)
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
        items.append(_image_item(t, p))
    negatives = [(it, None, it.content_key()) for it in items[1:]]
    return _pair_row(f"{task}:{index:08d}", task, query, items[0], None, negatives)


def row_to_mmeb_eval_record(row: Mapping[str, Any], spill: _ImageSpill | None = None) -> dict[str, Any]:
    spill = spill or _ImageSpill(None)
    where = f"row id={row.get('id')!r}"
    query = item_from_row(row, "query_")
    targets = [item_from_row(row, "pos_")] + [it for it, _, _ in negatives_from_row(row)]
    return {"qry_text": _official_text(query), "qry_img_path": spill.path_of(query, where),
            "tgt_text": [_official_text(t) for t in targets],
            "tgt_img_path": [spill.path_of(t, where) for t in targets]}


# ---------------------------------------------------------------------------------------------- import
FORMATS = ("official", "mmeb-train", "mmeb-eval", "canonical")


def convert_records(records: Iterable[Any], fmt: str, *, source: str, task: str | None,
                    quarantine: Quarantine, account: RowAccount) -> Iterator[tuple[int, dict[str, Any], Any]]:
    """Convert external records to ``(input row number, canonical row, original record)``.

    Structurally bad records go to the quarantine (counted as rows in) and are not yielded.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")
    for index, rec in enumerate(records):
        try:
            if fmt == "canonical":
                row = rec
            elif fmt == "official":
                row = official_record_to_row(rec, index, source, default_task=task or "unknown")
            elif fmt == "mmeb-train":
                row = mmeb_train_record_to_row(rec, index, source, task or Path(source).stem)
            else:
                row = mmeb_eval_record_to_row(rec, index, source, task or Path(source).stem)
        except DataError as exc:
            account.rows_in += 1
            account.rows_quarantined += 1
            account.reasons[f"{exc.field.split('[')[0]}: structure"] += 1
            quarantine.add(exc, rec)
            continue
        yield index, row, rec


def import_table(input_path: str | os.PathLike, fmt: str, out_dir: str | os.PathLike, *,
                 quarantine_path: str | os.PathLike, kind: str = "pairs", task: str | None = None,
                 image_root: str | os.PathLike | None = None, check_images: bool = True,
                 rows_per_shard: int = 10_000) -> RowAccount:
    """Convert and validate ``input_path`` into a canonical table (``kind`` pairs or candidates) at ``out_dir``.

    Returns the row account; ``rows_in = rows_out + rows_quarantined`` holds and is checked. Candidate
    pools only come in the canonical format.
    """
    if kind not in SCHEMAS:
        raise ValueError(f"unknown table kind {kind!r}; choose one of {', '.join(SCHEMAS)}")
    if kind == "candidates" and fmt != "canonical":
        raise ValueError("candidate pools are read in the canonical format only")
    source = str(input_path)
    quarantine = Quarantine(quarantine_path)
    account = RowAccount()
    converted = convert_records(read_records(input_path), fmt, source=source, task=task,
                                quarantine=quarantine, account=account)
    valid = validate_rows(converted, kind, source=source, quarantine=quarantine, account=account,
                          image_root=image_root, check_images=check_images, indexed=True)
    write_rows(valid, out_dir, SCHEMAS[kind], rows_per_shard)
    quarantine.write()
    account.check()
    return account


def import_pairs(input_path: str | os.PathLike, fmt: str, out_dir: str | os.PathLike, **kwargs) -> RowAccount:
    return import_table(input_path, fmt, out_dir, kind="pairs", **kwargs)


def export_pairs(pairs_path: str | os.PathLike, fmt: str, out_path: str | os.PathLike,
                 image_dir: str | os.PathLike | None = None) -> int:
    """Export a canonical pair table: ``official`` -> JSON list; ``mmeb-train`` / ``mmeb-eval`` -> JSONL."""
    if fmt == "official":
        return export_official_json(pairs_path, out_path, image_dir)
    to_record = {"mmeb-train": row_to_mmeb_train_record, "mmeb-eval": row_to_mmeb_eval_record}.get(fmt)
    if to_record is None:
        raise ValueError(f"cannot export to {fmt!r}; choose official, mmeb-train or mmeb-eval")
    spill = _ImageSpill(image_dir)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in iter_rows(pairs_path):
            f.write(json.dumps(to_record(row, spill), ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, out)
    return n

