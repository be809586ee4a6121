"""What every format's converter shares: reading records, image markers, field checks, the pair row."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..io import iter_rows
from ..schema import IMAGE_MARKER, PAIR_SCHEMA, Item, empty_row, item_to_columns, negatives_to_columns
from ..validate import DataError, RowAccount

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


def field(rec: Mapping[str, Any], name: str, err, *, types: tuple = (str,), required: bool = True,
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


def path_or_none(p: str | None) -> str | None:
    return p if p else None


def task_from_path(*paths: str | None) -> str | None:
    """MMEB-train images live under ``images/<Dataset>/...``: the dataset names the task."""
    for p in paths:
        if p:
            parts = Path(p).parts
            if len(parts) >= 2 and parts[0] == "images":
                return parts[1]
            if len(parts) >= 2:
                return parts[0]
    return None


def image_item(text: str, image_path: str | None) -> Item:
    return Item(text=to_canonical_text(text), image_path=path_or_none(image_path))


def error_factory(source: str, index: int, row_id: str | None = None) -> Callable[[str, str], DataError]:
    return lambda field, reason: DataError(source, index, field, reason, row_id)


def record_errors(rec: Any, source: str, index: int) -> Callable[[str, str], DataError]:
    """The error factory of record ``index``, once it passed what every format checks: an object, valid JSON."""
    err = error_factory(source, index)
    if not isinstance(rec, Mapping):
        raise err("<row>", f"expected an object, got {type(rec).__name__}")
    if "__invalid_json__" in rec:
        raise err("<row>", rec["__invalid_json__"])
    return err


def pair_row(row_id: str, task: str, query: Item, pos: Item, pos_score: float | None,
              negatives: list[tuple[Item, float | None, str | None]]) -> dict[str, Any]:
    row = empty_row(PAIR_SCHEMA)
    row.update(id=row_id, task=task, pos_id=pos.content_key(), pos_score=pos_score)
    row.update(item_to_columns(query, "query_"))
    row.update(item_to_columns(pos, "pos_"))
    row.update(negatives_to_columns(negatives))
    return row


def official_text(item: Item) -> str:
    text = from_canonical_text(item.prompt_text())
    if item.has_image and PHI3V_MARKER not in text:
        text = f"{PHI3V_MARKER}\n{text}"
    return text


class ImageSpill:
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


def no_rows_is_an_error(account: RowAccount, input_path: Any, fmt: str, looked: str) -> None:
    """An input that yields nothing is a mistake, not a table: a run on it would train or evaluate on nothing."""
    if not account.rows_in:
        raise DataError(str(input_path), None, "<input>", f"no {fmt} records found (read {looked}); is it the right "
                        "format and path?")
