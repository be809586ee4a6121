"""Zero-shot retrieval sets (import only) into a retrieval table ``id, image, image_path, captions[]``
(:data:`RETRIEVAL_SCHEMA`, what :func:`unime_ray.eval.retrieval.load_retrieval_set` reads).

``retrieval`` = records with an image (``image``: bytes, a Hugging Face ``{"bytes", "path"}`` struct or a
path; or ``image_path``) and captions (``captions`` / ``caption`` / ``text``: a string or a list), which
covers the official Flickr30K / COCO test sets (Parquet columns ``image`` struct + ``text`` list of 5
captions); ``sharegpt4v`` = the ShareGPT4V caption JSON (``image`` path + ``conversations``, the caption
is the first answer turn with newlines as spaces; plain ``{image, caption}`` records are accepted too);
``urban1k`` = the Urban1K folder (``image/<name>.jpg`` + ``caption/<name>.txt``, the caption is the
file's first line), see :func:`urban1k_records`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..images import ImageError, decode_image, read_image_bytes
from ..io import write_rows
from ..validate import DataError, Quarantine, RowAccount, _reason_kind
from .records import error_factory, no_rows_is_an_error, read_records, record_errors

RETRIEVAL_FORMATS = ("retrieval", "sharegpt4v", "urban1k")
RETRIEVAL_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("image", pa.binary()),
                              pa.field("image_path", pa.string()), pa.field("captions", pa.list_(pa.string()))])
"""One row per image (or per caption: rows of one image share it) of a zero-shot retrieval set."""


def _record_image(rec: Mapping[str, Any], err) -> tuple[bytes | None, str | None]:
    """(inline bytes, path) of a record's image: ``image`` as bytes, an HF ``{"bytes", "path"}`` struct or a
    path string; or ``image_path``. Inline bytes win over a path."""
    img = rec.get("image")
    path = rec.get("image_path")
    data = None
    if isinstance(img, (bytes, bytearray)):
        data = bytes(img)
    elif isinstance(img, Mapping):
        data, path = img.get("bytes"), path or img.get("path")
    elif isinstance(img, str):
        path = path or img
    elif img is not None:
        raise err("image", f"expected bytes, a {{bytes, path}} struct or a path, got {type(img).__name__}")
    if data:
        return bytes(data), None
    if not path or not isinstance(path, str):
        raise err("image", "missing: each record needs an image (image bytes or image_path)")
    return None, path


def _record_captions(rec: Mapping[str, Any], err) -> list[str]:
    for name in ("captions", "caption", "text"):
        if rec.get(name) is not None:
            value = rec[name]
            texts = [value] if isinstance(value, str) else value
            if not isinstance(texts, (list, tuple)) or not texts:
                raise err(name, "expected a non-empty caption string or list of strings")
            for j, t in enumerate(texts):
                if not isinstance(t, str) or not t.strip():
                    raise err(f"{name}[{j}]", "empty caption" if isinstance(t, str) else
                              f"expected a string, got {type(t).__name__}")
            return list(texts)
    raise err("captions", "missing: each record needs captions (captions / caption / text)")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _sharegpt4v_captions(rec: Mapping[str, Any], err) -> list[str]:
    """The caption of a ShareGPT4V record: the first answer turn (``conversations[1]`` in the released
    file), newlines as spaces; a record without ``conversations`` may give ``caption(s)`` instead."""
    turns = rec.get("conversations")
    if turns is None:
        return [_one_line(t) for t in _record_captions(rec, err)]
    if not isinstance(turns, (list, tuple)):
        raise err("conversations", f"expected a list of turns, got {type(turns).__name__}")
    answers = [t for t in turns if isinstance(t, Mapping) and t.get("from") in ("gpt", "assistant")]
    if not answers and len(turns) >= 2 and isinstance(turns[1], Mapping):
        answers = [turns[1]]
    if not answers:
        raise err("conversations", "no answer turn (from: gpt) holding the caption")
    value = answers[0].get("value")
    if not isinstance(value, str) or not value.strip():
        raise err("conversations[1].value", "empty caption")
    return [_one_line(value)]


def urban1k_records(folder: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Iterator[dict[str, Any]]:
    """Records of the Urban1K folder (``image/<name>.jpg`` + ``caption/<name>.txt``, in caption-file name
    order): ``{"id", "image_path", "caption"}`` with the first line of the text file. A folder holding
    one ``Urban1k``-like folder (the unpacked zip) works too. Image paths are relative to ``image_root``
    when the image lies under it, else absolute."""
    root = Path(folder)
    if not (root / "caption").is_dir():
        inner = [d for d in root.iterdir() if d.is_dir() and (d / "caption").is_dir()] if root.is_dir() else []
        if len(inner) != 1:
            raise DataError(str(root), None, "<folder>", "not an Urban1K folder: expected caption/ and image/ in it")
        root = inner[0]
    images = root / "image"
    for txt in sorted((root / "caption").glob("*.txt")):
        rec: dict[str, Any] = {"id": txt.stem}
        try:
            lines = txt.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            yield {"id": txt.stem, "__invalid_json__": f"{txt.name}: not UTF-8 text: {exc}"}
            continue
        rec["caption"] = lines[0].strip() if lines else ""
        found = next((images / f"{txt.stem}{ext}" for ext in (".jpg", ".jpeg", ".png", ".JPG")
                      if (images / f"{txt.stem}{ext}").is_file()), images / f"{txt.stem}.jpg")
        path = found.resolve()
        if image_root is not None and path.is_relative_to(Path(image_root).resolve()):
            rec["image_path"] = str(path.relative_to(Path(image_root).resolve()))
        else:
            rec["image_path"] = str(path)
        yield rec


def retrieval_record_to_row(rec: Any, index: int, source: str, fmt: str, name: str) -> dict[str, Any]:
    """One record of a retrieval set -> a :data:`RETRIEVAL_SCHEMA` row (structure only; images are
    checked by :func:`validate_retrieval_row`)."""
    record_errors(rec, source, index)
    rid = rec.get("id", rec.get("image_id"))
    row_id = f"{name}:{rid}" if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) \
        else f"{name}:{index:08d}"
    err = error_factory(source, index, row_id)
    data, path = _record_image(rec, err)
    if fmt == "sharegpt4v":
        captions = _sharegpt4v_captions(rec, err)
    else:
        captions = _record_captions(rec, err)
    return {"id": row_id, "image": data, "image_path": path, "captions": captions}


def validate_retrieval_row(row: Mapping[str, Any], *, source: str, index: int,
                           image_root: str | os.PathLike | None, check_images: bool) -> None:
    err = error_factory(source, index, row.get("id"))
    if check_images:
        try:
            decode_image(row["image"] if row.get("image") else read_image_bytes(row["image_path"], image_root))
        except ImageError as exc:
            raise err("image" if row.get("image") else "image_path", str(exc)) from None


def import_retrieval_set(input_path: str | os.PathLike, fmt: str, out_dir: str | os.PathLike, *,
                         quarantine_path: str | os.PathLike, name: str | None = None,
                         image_root: str | os.PathLike | None = None, check_images: bool = True,
                         max_records: int | None = None, rows_per_shard: int = 10_000) -> RowAccount:
    """Convert a zero-shot retrieval set (``fmt`` in :data:`RETRIEVAL_FORMATS`) into a retrieval table at
    ``out_dir``; bad records (no image, an image that is missing or does not decode, no or empty caption,
    a repeated id) go to the quarantine with reasons, and ``rows_in = rows_out + rows_quarantined``.
    ``max_records`` reads only the first records (the ShareGPT4V protocol uses the first 1000)."""
    if fmt not in RETRIEVAL_FORMATS:
        raise ValueError(f"unknown retrieval format {fmt!r}; choose one of {', '.join(RETRIEVAL_FORMATS)}")
    source = str(input_path)
    name = name or Path(input_path).stem
    records = urban1k_records(input_path, image_root) if fmt == "urban1k" else read_records(input_path)
    quarantine = Quarantine(quarantine_path)
    account = RowAccount()
    seen: set[str] = set()

    def rows() -> Iterator[dict[str, Any]]:
        for index, rec in enumerate(records):
            if max_records is not None and index >= max_records:
                break
            account.rows_in += 1
            try:
                row = retrieval_record_to_row(rec, index, source, fmt, name)
                validate_retrieval_row(row, source=source, index=index, image_root=image_root,
                                       check_images=check_images)
                if row["id"] in seen:
                    raise DataError(source, index, "id", "duplicate id", row["id"])
            except DataError as exc:
                account.rows_quarantined += 1
                account.reasons[exc.field.split(".")[0].split("[")[0] + ": " + _reason_kind(exc.reason)] += 1
                quarantine.add(exc, rec)
                continue
            seen.add(row["id"])
            account.rows_out += 1
            yield row

    write_rows(rows(), out_dir, RETRIEVAL_SCHEMA, rows_per_shard)
    quarantine.write()
    account.check()
    no_rows_is_an_error(account, input_path, fmt, str(input_path))
    return account
