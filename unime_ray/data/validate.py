"""Row validation and the quarantine: bad rows are kept, with the reason, never silently dropped.

Every validating stage reports ``rows_in = rows_out + rows_quarantined``; :class:`RowAccount` checks it.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .images import ImageError, decode_image, read_image_bytes
from .io import rows_to_table, write_table_atomic
from .schema import IMAGE_MARKER, QUARANTINE_SCHEMA, Item, item_from_row, negatives_from_row


class DataError(ValueError):
    """A bad input row; the message names the source file, the row and the field."""

    def __init__(self, source: str, row: int | None, field: str, reason: str, row_id: str | None = None):
        self.source, self.row, self.field, self.reason, self.row_id = source, row, field, reason, row_id
        where = f"{source}, row {row}" if row is not None else source
        if row_id:
            where += f" (id={row_id!r})"
        super().__init__(f"{where}, field '{field}': {reason}")


@dataclass
class RowAccount:
    """Counts of one validating pass; ``rows_in == rows_out + rows_quarantined`` always."""

    rows_in: int = 0
    rows_out: int = 0
    rows_quarantined: int = 0
    reasons: Counter = field(default_factory=Counter)

    def check(self) -> None:
        if self.rows_in != self.rows_out + self.rows_quarantined:
            raise AssertionError(f"row accounting broken: in={self.rows_in} out={self.rows_out} "
                                 f"quarantined={self.rows_quarantined}")

    def as_dict(self) -> dict[str, Any]:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out,
                "rows_quarantined": self.rows_quarantined, "reasons": dict(self.reasons)}

    def summary(self) -> str:
        s = f"in={self.rows_in} out={self.rows_out} quarantined={self.rows_quarantined}"
        if self.reasons:
            s += " (" + ", ".join(f"{k}: {v}" for k, v in self.reasons.most_common()) + ")"
        return s


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


class Quarantine:
    """Collects rejected rows with their reasons and writes them to a Parquet file."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.entries: list[dict[str, Any]] = []

    def add(self, error: DataError, record: Any) -> None:
        self.entries.append({"source": error.source, "row": error.row, "id": error.row_id,
                             "field": error.field, "reason": error.reason,
                             "record": json.dumps(_jsonable(record), ensure_ascii=False)})

    def __len__(self) -> int:
        return len(self.entries)

    def write(self) -> Path | None:
        """Write the quarantine file (an empty one too, so a reader can tell 'none' from 'not run')."""
        if self.path is None:
            return None
        return write_table_atomic(rows_to_table(self.entries, QUARANTINE_SCHEMA), self.path)


_STR_FIELDS = ("instruction", "text", "image_path")


def _check_item(item_row: Mapping[str, Any], prefix: str, err, *, required: bool, check_images: bool,
                image_root) -> None:
    for name in _STR_FIELDS:
        v = item_row.get(f"{prefix}{name}")
        if v is not None and not isinstance(v, str):
            raise err(f"{prefix}{name}", f"expected a string, got {type(v).__name__}")
    img = item_row.get(f"{prefix}image")
    if img is not None and not isinstance(img, (bytes, bytearray)):
        raise err(f"{prefix}image", f"expected image bytes, got {type(img).__name__}")
    item = item_from_row(item_row, prefix)
    _check_item_content(item, prefix, err, required=required, check_images=check_images, image_root=image_root)


def _check_item_content(item: Item, prefix: str, err, *, required: bool, check_images: bool, image_root) -> None:
    if required and not item.prompt_text().strip() and not item.has_image:
        raise err(f"{prefix}text", "empty: no text and no image")
    n_markers = item.prompt_text().count(IMAGE_MARKER)
    if n_markers > 1:
        raise err(f"{prefix}text", f"{n_markers} image markers; one image per item is supported")
    if n_markers == 1 and not item.has_image:
        raise err(f"{prefix}text", f"has the image marker {IMAGE_MARKER!r} but no image")
    if check_images and item.has_image:
        field_name = f"{prefix}image" if item.image else f"{prefix}image_path"
        problem = _inline_image_problem(item.image) if item.image else _path_image_problem(
            item.image_path, None if image_root is None else str(image_root))
        if problem:
            raise err(field_name, problem)


def _inline_image_problem(data: bytes) -> str | None:
    try:
        decode_image(data)
    except ImageError as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=65536)
def _path_image_problem(image_path: str, image_root: str | None) -> str | None:
    """Decode each referenced file once per process: eval rows repeat the same distractor images."""
    try:
        decode_image(read_image_bytes(image_path, image_root))
    except ImageError as exc:
        return str(exc)
    return None


def _check_score(value: Any, field_name: str, err) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise err(field_name, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise err(field_name, f"score {value!r} outside [0, 1]")


def validate_row(row: Mapping[str, Any], kind: str, *, source: str, index: int,
                 image_root: str | os.PathLike | None = None, check_images: bool = True) -> None:
    """Raise :class:`DataError` if ``row`` is not a valid row of table ``kind`` ("pairs"/"candidates")."""
    row_id = row.get("id")

    def err(field_name: str, reason: str) -> DataError:
        return DataError(source, index, field_name, reason, row_id if isinstance(row_id, str) else None)

    if not isinstance(row_id, str) or not row_id:
        raise err("id", "missing or not a non-empty string")
    task = row.get("task")
    if not isinstance(task, str) or not task:
        raise err("task", "missing or not a non-empty string")
    if kind == "candidates":
        _check_item(row, "", err, required=True, check_images=check_images, image_root=image_root)
        return
    if kind != "pairs":
        raise ValueError(f"unknown table kind {kind!r}")
    _check_item(row, "query_", err, required=True, check_images=check_images, image_root=image_root)
    _check_item(row, "pos_", err, required=True, check_images=check_images, image_root=image_root)
    _check_score(row.get("pos_score"), "pos_score", err)
    neg_cols = ("neg_id", "neg_instruction", "neg_text", "neg_image", "neg_image_path", "neg_score")
    lengths = {}
    for name in neg_cols:
        v = row.get(name)
        if v is None:
            continue
        if not isinstance(v, (list, tuple)):
            raise err(name, f"expected a list, got {type(v).__name__}")
        lengths[name] = len(v)
    if len(set(lengths.values())) > 1:
        raise err("neg_text", f"negative columns have different lengths: {lengths}")
    if lengths and "neg_text" not in lengths:
        raise err("neg_text", "negatives given without neg_text")
    for j, (item, score, _) in enumerate(negatives_from_row(row)):
        _check_item_content(item, f"neg_{j}.", err, required=True, check_images=check_images,
                            image_root=image_root)
        _check_score(score, f"neg_score[{j}]", err)


def validate_rows(rows: Iterable[Any], kind: str, *, source: str, quarantine: Quarantine,
                  account: RowAccount, image_root: str | os.PathLike | None = None,
                  check_images: bool = True, seen_ids: set[str] | None = None,
                  indexed: bool = False) -> Iterator[Mapping[str, Any]]:
    """Yield the valid rows; put the rest (with reasons) in ``quarantine``. Later duplicates of an id are bad.

    With ``indexed=True`` the input is ``(input_row_number, row, original_record)`` triples, so errors
    name the row of the input file and the quarantine keeps the record as it was read.
    """
    seen = seen_ids if seen_ids is not None else set()
    for position, entry in enumerate(rows):
        index, row, record = entry if indexed else (position, entry, entry)
        account.rows_in += 1
        try:
            if not isinstance(row, Mapping):
                raise DataError(source, index, "<row>", f"expected an object, got {type(row).__name__}")
            validate_row(row, kind, source=source, index=index, image_root=image_root, check_images=check_images)
            if row["id"] in seen:
                raise DataError(source, index, "id", "duplicate id", row["id"])
        except DataError as exc:
            quarantine.add(exc, record)
            account.rows_quarantined += 1
            account.reasons[exc.field.split(".")[0].split("[")[0] + ": " + _reason_kind(exc.reason)] += 1
            continue
        seen.add(row["id"])
        account.rows_out += 1
        yield row


def _reason_kind(reason: str) -> str:
    """A short bucket for the reason counter (the full reason stays in the quarantine file)."""
    for key in ("not found", "cannot decode", "empty", "duplicate", "marker", "expected", "outside", "lengths"):
        if key in reason:
            return key
    return reason[:40]
