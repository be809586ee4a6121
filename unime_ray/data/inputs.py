"""Data as users hold it, turned into the canonical tables: what the Python API accepts.

Pair or candidate data can come as a Hugging Face ``datasets.Dataset``, a pyarrow ``Table``, a pandas
``DataFrame``, a list of dicts, or a path in any format the importer reads (canonical Parquet, JSON/JSONL,
the official UniME-V2 JSON, MMEB rows). Columns are the canonical ones (:mod:`unime_ray.data.schema`) or these
short names, and ``columns={"theirs": "ours"}`` maps any others explicitly:

* pairs: ``query`` (text), ``query_image``, ``query_instruction``, ``positive`` (text), ``positive_image``,
  ``positive_instruction``; ``id`` and ``task`` are optional (row number and ``"default"``);
* candidates: ``text``, ``image``, ``instruction``; ``id`` (default: a hash of the content) and ``task``.

An image is a path (relative to ``image_root``), encoded bytes, a PIL image, or a Hugging Face image value
(``{"bytes": ..., "path": ...}``). Every row is validated as the importer validates files: a bad row goes to
the quarantine file with the reason and the row account (``rows_in = rows_out + rows_quarantined``) is
checked, so nothing is dropped silently.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from .schema import SCHEMAS, Item, empty_row, item_from_row
from .validate import DataError, Quarantine, RowAccount

# short name -> canonical column, per table kind
ALIASES: dict[str, dict[str, str]] = {
    "pairs": {"query": "query_text", "positive": "pos_text", "positive_image": "pos_image",
              "positive_instruction": "pos_instruction", "positive_image_path": "pos_image_path"},
    "candidates": {},
}
_IMAGE_COLUMNS = {"pairs": ("query_image", "pos_image"), "candidates": ("image",)}


def image_value(image: Any) -> tuple[bytes | None, str | None]:
    """(inline bytes, path) of an image given as a path, bytes, a PIL image or a Hugging Face image dict."""
    if image is None:
        return None, None
    if isinstance(image, (bytes, bytearray)):
        return bytes(image), None
    if isinstance(image, (str, os.PathLike)):
        return None, str(image) or None
    if isinstance(image, Mapping):   # datasets.Image without decoding: {"bytes": b"...", "path": "..."}
        data, path = image.get("bytes"), image.get("path")
        return (bytes(data), None) if data else (None, path or None)
    if hasattr(image, "save") and hasattr(image, "mode"):   # a PIL image: stored losslessly as PNG
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), None
    raise TypeError(f"an image must be a path, bytes, a PIL image or a {{'bytes', 'path'}} dict, "
                    f"not {type(image).__name__}")


def to_item(value: Any = None, *, image: Any = None, instruction: str | None = None) -> Item:
    """An :class:`Item` from a string (its text), a dict (``text``/``image``/``instruction``, or the canonical
    field names), a PIL image / bytes (an image alone), or an ``Item``; ``image``/``instruction`` add to it."""
    if isinstance(value, Item):
        item = value
    elif isinstance(value, Mapping):
        data, path = image_value(value.get("image"))
        item = Item(text=value.get("text") or "", instruction=value.get("instruction") or "",
                    image=data, image_path=path or value.get("image_path") or None)
    elif isinstance(value, str) or value is None:
        item = Item(text=value or "")
    else:
        data, path = image_value(value)
        item = Item(image=data, image_path=path)
    if image is not None:
        data, path = image_value(image)
        item = Item(text=item.text, instruction=item.instruction, image=data, image_path=path)
    if instruction is not None:
        item = Item(text=item.text, instruction=instruction, image=item.image, image_path=item.image_path)
    return item


def _broadcast(values: Any, n: int, name: str) -> list:
    if values is None or isinstance(values, str):
        return [values] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{len(values)} {name} for {n} inputs")
    return values


def to_items(texts: Any = None, images: Any = None, instructions: Any = None) -> list[Item]:
    """Items from parallel lists: ``texts`` (strings, dicts or Items), ``images`` (paths / bytes / PIL / None),
    ``instructions`` (one string for all, or one per input). A single string or image is a list of one.

    >>> to_items(["a cat", "a dog"], instructions="Find an image:")[1]
    Item(text='a dog', instruction='Find an image:', image=None, image_path=None)
    """
    if isinstance(texts, (str, Item, Mapping)):
        texts = [texts]
    if images is not None and not isinstance(images, (list, tuple)):
        images = [images]
    if texts is None and images is None:
        raise ValueError("give texts, images or both")
    n = len(texts) if texts is not None else len(images)
    texts = _broadcast(texts, n, "texts")
    images = _broadcast(images, n, "images")
    instructions = _broadcast(instructions, n, "instructions")
    return [to_item(t, image=im, instruction=ins) for t, im, ins in zip(texts, images, instructions)]


def records_of(data: Any) -> Iterator[dict[str, Any]]:
    """The rows of a datasets.Dataset, pyarrow Table, pandas DataFrame or iterable of dicts, as dicts."""
    import pyarrow as pa

    if hasattr(data, "with_format") and hasattr(data, "features"):   # datasets.Dataset (undecoded images)
        data = data.with_format("arrow")[:]
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        for batch in data.to_batches(max_chunksize=1024):
            yield from batch.to_pylist()
        return
    if hasattr(data, "to_dict") and hasattr(data, "columns"):         # pandas.DataFrame
        for rec in data.to_dict(orient="records"):
            yield {k: (None if _is_missing(v) else v) for k, v in rec.items()}
        return
    if isinstance(data, Mapping):
        raise TypeError("give rows (a list of dicts, a table or a dataset), not one dict")
    yield from data


def _is_missing(v: Any) -> bool:
    return isinstance(v, float) and v != v    # pandas fills absent cells with NaN


def canonical_row(rec: Any, kind: str, index: int, columns: Mapping[str, str] | None = None) -> Any:
    """A user record renamed to the canonical columns (``columns`` first, then the short names), images
    normalised, defaults filled in; anything that is not a dict is returned as is for validation to reject."""
    if not isinstance(rec, Mapping):
        return rec
    rec = {(columns or {}).get(k, k): v for k, v in rec.items()}
    aliases = ALIASES[kind]
    row = empty_row(SCHEMAS[kind])
    given: dict[str, str] = {}
    for name, v in rec.items():
        if v is None:     # absent here (tables and data frames give every row every column)
            continue
        k = aliases.get(name, name)
        if k not in row:
            raise DataError("<input>", index, name, f"unknown column (known: {', '.join(row)}; short names: "
                            f"{', '.join(aliases) or 'none'}; map others with columns={{...}})", rec.get("id"))
        if k in given:
            raise DataError("<input>", index, name, f"given twice, as {given[k]!r} and {name!r}", rec.get("id"))
        given[k] = name
        row[k] = v
    for col in _IMAGE_COLUMNS[kind]:
        value = row.get(col)
        if value is not None and not isinstance(value, (bytes, bytearray)):
            try:
                data, path = image_value(value)
            except TypeError as exc:
                raise DataError("<input>", index, col, str(exc), rec.get("id")) from None
            row[col] = data
            if path:
                row[f"{col}_path"] = path
    if row.get("task") is None:
        row["task"] = "default"
    if kind == "pairs":
        if row.get("id") is None:
            row["id"] = f"row-{index}"
        if row.get("pos_id") is None:
            row["pos_id"] = item_from_row(row, "pos_").content_key()
    elif row.get("id") is None:
        row["id"] = item_from_row(row, "").content_key()
    return row


def is_table_path(data: Any) -> bool:
    return isinstance(data, (str, os.PathLike))


def load_table(data: Any, out_dir: str | os.PathLike, *, kind: str = "pairs", fmt: str = "canonical",
               columns: Mapping[str, str] | None = None, image_root: str | os.PathLike | None = None,
               check_images: bool = True, task: str | None = None,
               rows_per_shard: int = 10_000) -> tuple[Path, RowAccount]:
    """Write ``data`` as a canonical ``kind`` table (``pairs`` or ``candidates``) to ``out_dir``; bad rows go to
    ``out_dir``'s sibling ``<name>.quarantine.parquet``. Returns (table folder, row account).

    ``fmt`` names the records' format (``canonical``, ``official``, ``mmeb-train``, ``mmeb-eval``); a path is
    read by :func:`unime_ray.data.convert.import_table` (any file it reads: Parquet, JSON, JSONL, MMEB folders).
    A finished table (its ``_account.json`` written last) is reused: calling again resumes nothing twice.

    >>> rows = [{"query": "a red circle", "positive": "red circle"}, {"query": "", "positive": "no query"}]
    >>> table, account = load_table(rows, tmp / "pairs")
    >>> account.rows_in, account.rows_out, account.rows_quarantined
    (2, 1, 1)
    """
    import json
    import shutil

    from .convert import convert_records, import_table
    from .io import write_rows
    from .validate import validate_rows

    if kind not in SCHEMAS:
        raise ValueError(f"unknown table kind {kind!r}; choose one of {', '.join(SCHEMAS)}")
    if columns and is_table_path(data):
        raise ValueError("columns= maps in-memory data; convert a file with its format (fmt=...) instead")
    if columns and fmt != "canonical":
        raise ValueError(f"columns= maps canonical records; {fmt!r} records have their own field names")
    out = Path(out_dir)
    done = out / "_account.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        account = RowAccount(saved["rows_in"], saved["rows_out"], saved["rows_quarantined"])
        account.reasons.update(saved.get("reasons", {}))
        return out, account
    quarantine_path = out.with_name(f"{out.name}.quarantine.parquet")
    shutil.rmtree(out, ignore_errors=True)   # an interrupted earlier call: written again, whole
    if is_table_path(data):
        account = import_table(data, fmt, out, quarantine_path=quarantine_path, kind=kind, task=task,
                               image_root=image_root, check_images=check_images, rows_per_shard=rows_per_shard)
    else:
        quarantine = Quarantine(quarantine_path)
        account = RowAccount()
        converted = convert_records(records_of(data), fmt, source="<input>", task=task, quarantine=quarantine,
                                    account=account, canonical=lambda rec, i: canonical_row(rec, kind, i, columns))
        rows = validate_rows(converted, kind, source="<input>", quarantine=quarantine, account=account,
                             image_root=image_root, check_images=check_images, indexed=True)
        write_rows(rows, out, SCHEMAS[kind], rows_per_shard)
        quarantine.write()
        account.check()
    done.write_text(json.dumps({**account.as_dict(), "quarantine": str(quarantine_path)}))
    return out, account

