"""Converters between external formats and the canonical pair table.

* official UniME-V2 training JSON (import and export, lossless round trip);
* MMEB-train rows ``qry, qry_image_path, pos_text, pos_image_path[, neg_text, neg_image_path]``
  (import and export);
* MMEB-eval rows ``qry_text, qry_img_path, tgt_text[], tgt_img_path[]`` with the ground truth first
  (import and export);
* MMEB-train and MMEB-eval in their published folder layouts, ``<Subset>/<split>-NNNNN-of-NNNNN.parquet``
  (several subsets in one run, each task named after its subset folder; one split per subset: ``train`` for
  MMEB-train by default, as its folders also hold ``original`` and ``diverse_instruction`` copies, ``test``
  for MMEB-eval), see :func:`mmeb_sources`;
* zero-shot retrieval sets (import only) into a retrieval table ``id, image, image_path, captions[]``
  (:data:`RETRIEVAL_SCHEMA`, what :func:`unime_ray.eval.retrieval.load_retrieval_set` reads):
  ``retrieval`` = records with an image (``image``: bytes, a Hugging Face ``{"bytes", "path"}`` struct or a
  path; or ``image_path``) and captions (``captions`` / ``caption`` / ``text``: a string or a list), which
  covers the official Flickr30K / COCO test sets (Parquet columns ``image`` struct + ``text`` list of 5
  captions); ``sharegpt4v`` = the ShareGPT4V caption JSON (``image`` path + ``conversations``, the caption
  is the first answer turn with newlines as spaces; plain ``{image, caption}`` records are accepted too);
  ``urban1k`` = the Urban1K folder (``image/<name>.jpg`` + ``caption/<name>.txt``, the caption is the
  file's first line), see :func:`urban1k_records`.

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

import pyarrow as pa

from ..utils.files import write_json_list_atomic
from .images import ImageError, decode_image, read_image_bytes
from .io import iter_rows, write_rows
from .schema import (IMAGE_MARKER, PAIR_SCHEMA, SCHEMAS, Item, empty_row, item_from_row, item_to_columns,
                     negatives_from_row, negatives_to_columns)
from .validate import DataError, Quarantine, RowAccount, _reason_kind, validate_rows

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
    return write_json_list_atomic((row_to_official_record(r, spill) for r in rows), out_json, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- MMEB
def mmeb_train_record_to_row(rec: Mapping[str, Any], index: int, source: str, task: str,
                             id_index: int | None = None) -> dict[str, Any]:
    """An MMEB-train row (``qry, qry_image_path, pos_text, pos_image_path[, neg_text, neg_image_path]``).
    ``index`` is the record's row in ``source``; ``id_index`` (default ``index``) numbers the row id, which
    runs on across the files of one subset."""
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
    return _pair_row(f"{task}:{index if id_index is None else id_index:08d}", task, query, pos, None, negatives)


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


# ---------------------------------------------------------------------------------------------- MMEB folders
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
_SHARD_RE = re.compile(r"^(?P<split>.+?)-\d+-of-\d+$")   # Hugging Face shard names: train-00000-of-00002
# the split read by default, in order of preference, per published layout
MMEB_SPLITS = {"mmeb-train": ("train", "original"), "mmeb-eval": ("test",)}
_SPLIT_NAMES = {"train", "original", "diverse_instruction", "test", "validation"}


def data_files(folder: Path) -> list[Path]:
    """The data files directly in ``folder`` (hidden and ``_``-prefixed ones, e.g. ``_done.json``, left out)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES
                  and not p.name.startswith((".", "_")))


def _split_name(path: Path) -> str | None:
    m = _SHARD_RE.match(path.stem)
    return m.group("split") if m else (path.stem if path.stem in _SPLIT_NAMES else None)


def _subset_files(folder: Path, split: str | None, defaults: tuple[str, ...]) -> list[Path]:
    """The files of one subset folder for ``split``: all of them when they carry no split names (e.g. a
    folder of ``part-*`` shards), else the named split (default: the first of ``defaults`` present)."""
    files = data_files(folder)
    groups: dict[str, list[Path]] = {}
    for f in files:
        name = _split_name(f)
        if name is not None:
            groups.setdefault(name, []).append(f)
    if not groups:
        if split is not None:
            raise FileNotFoundError(f"{folder}: no files of split {split!r} (no split-named files)")
        return files
    if split is not None:
        if split not in groups:
            raise FileNotFoundError(f"{folder}: no files of split {split!r} (splits: {', '.join(sorted(groups))})")
        return groups[split]
    for name in defaults:
        if name in groups:
            return groups[name]
    if len(groups) == 1:
        return next(iter(groups.values()))
    raise ValueError(f"{folder}: several splits ({', '.join(sorted(groups))}); choose one (--mmeb-split)")


def mmeb_sources(path: str | os.PathLike, fmt: str = "mmeb-train", task: str | None = None,
                 split: str | None = None) -> list[tuple[str, list[Path]]]:
    """``[(task, files)]`` of an MMEB-train or MMEB-eval input (``fmt``).

    * a folder of subset folders (the published layouts ``MMEB-train/<Subset>/<split>-*.parquet``,
      ``MMEB-eval/<Subset>/test-*.parquet``): every subset folder holding data files, each task named after
      its folder;
    * one subset folder: its files, the task named after the folder;
    * one file: the task is ``task``, else the parent folder's name when the file is named after a split
      (``NIGHTS/train-00000-of-00001.parquet`` -> NIGHTS), else the file name (``VisDial.parquet``).

    The published MMEB-train subset folders hold the same rows as ``train`` and ``original`` plus a
    ``diverse_instruction`` variant: one split is read per subset (``split``; default :data:`MMEB_SPLITS`),
    never several, which would duplicate every row.
    """
    defaults = MMEB_SPLITS[fmt]
    p = Path(path)
    if p.is_file():
        name = task or (p.parent.name if _split_name(p) is not None and p.parent.name else p.stem)
        return [(name, [p])]
    if not p.is_dir():
        raise FileNotFoundError(f"input not found: {p}")
    subsets = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".") and data_files(d))
    if subsets:
        if task is not None:
            raise ValueError(f"{p} holds {len(subsets)} subsets, each named after its folder; do not pass a task")
        return [(d.name, _subset_files(d, split, defaults)) for d in subsets]
    if data_files(p):
        return [(task or p.name, _subset_files(p, split, defaults))]
    raise FileNotFoundError(f"{p}: no data files ({', '.join(DATA_SUFFIXES)}) in it or in its sub-folders")


# ---------------------------------------------------------------------------------------------- retrieval sets
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
    err = _error_factory(source, index)
    if not isinstance(rec, Mapping):
        raise err("<row>", f"expected an object, got {type(rec).__name__}")
    if "__invalid_json__" in rec:
        raise err("<row>", rec["__invalid_json__"])
    rid = rec.get("id", rec.get("image_id"))
    row_id = f"{name}:{rid}" if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) \
        else f"{name}:{index:08d}"
    err = _error_factory(source, index, row_id)
    data, path = _record_image(rec, err)
    if fmt == "sharegpt4v":
        captions = _sharegpt4v_captions(rec, err)
    else:
        captions = _record_captions(rec, err)
    return {"id": row_id, "image": data, "image_path": path, "captions": captions}


def validate_retrieval_row(row: Mapping[str, Any], *, source: str, index: int,
                           image_root: str | os.PathLike | None, check_images: bool) -> None:
    err = _error_factory(source, index, row.get("id"))
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
    _no_rows_is_an_error(account, input_path, fmt, str(input_path))
    return account


def _no_rows_is_an_error(account: RowAccount, input_path: Any, fmt: str, looked: str) -> None:
    """An input that yields nothing is a mistake, not a table: a run on it would train or evaluate on nothing."""
    if not account.rows_in:
        raise DataError(str(input_path), None, "<input>", f"no {fmt} records found (read {looked}); is it the right "
                        "format and path?")


# ---------------------------------------------------------------------------------------------- import
FORMATS = ("official", "mmeb-train", "mmeb-eval", "canonical") + RETRIEVAL_FORMATS


def convert_records(records: Iterable[Any], fmt: str, *, source: str, task: str | None,
                    quarantine: Quarantine, account: RowAccount, id_offset: int = 0,
                    canonical: Callable[[Any, int], Any] | None = None) -> Iterator[tuple[int, dict[str, Any], Any]]:
    """Convert external records to ``(input row number, canonical row, original record)``.

    Structurally bad records go to the quarantine (counted as rows in) and are not yielded.
    ``id_offset``: MMEB-train row ids continue from it (a subset split over several files). ``canonical``: how a
    ``canonical`` record becomes a row (the Python API's column names and image values); None: as it is.
    """
    if fmt not in FORMATS or fmt in RETRIEVAL_FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; choose one of "
                         f"{', '.join(f for f in FORMATS if f not in RETRIEVAL_FORMATS)}")
    for index, rec in enumerate(records):
        try:
            if fmt == "canonical":
                row = canonical(rec, index) if canonical is not None else rec
            elif fmt == "official":
                row = official_record_to_row(rec, index, source, default_task=task or "unknown")
            elif fmt == "mmeb-train":
                row = mmeb_train_record_to_row(rec, index, source, task or Path(source).stem, index + id_offset)
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
                 rows_per_shard: int = 10_000, mmeb_split: str | None = None,
                 max_records: int | None = None) -> RowAccount:
    """Convert and validate ``input_path`` into a canonical table (``kind`` pairs or candidates) at ``out_dir``.

    Returns the row account; ``rows_in = rows_out + rows_quarantined`` holds and is checked. Candidate
    pools only come in the canonical format. ``mmeb-train`` and ``mmeb-eval`` also read their published folder
    layouts (all subsets of a folder in one run, see :func:`mmeb_sources`; ``mmeb_split`` picks the split). An
    input that yields no records is a :class:`DataError`. A
    retrieval format (:data:`RETRIEVAL_FORMATS`) writes a retrieval table instead
    (:func:`import_retrieval_set`; ``task`` names the set; ``max_records`` reads only the first records).
    """
    if fmt in RETRIEVAL_FORMATS:
        if kind != "pairs":
            raise ValueError(f"format {fmt!r} writes a retrieval table; --kind does not apply")
        return import_retrieval_set(input_path, fmt, out_dir, quarantine_path=quarantine_path, name=task,
                                    image_root=image_root, check_images=check_images, max_records=max_records,
                                    rows_per_shard=rows_per_shard)
    if kind not in SCHEMAS:
        raise ValueError(f"unknown table kind {kind!r}; choose one of {', '.join(SCHEMAS)}")
    if kind == "candidates" and fmt != "canonical":
        raise ValueError("candidate pools are read in the canonical format only")
    if fmt in MMEB_SPLITS:
        sources = mmeb_sources(input_path, fmt, task, mmeb_split)
    else:
        sources = [(task, [Path(input_path)])]
    quarantine = Quarantine(quarantine_path)
    account = RowAccount()
    seen_ids: set[str] = set()

    def rows() -> Iterator[Mapping[str, Any]]:
        left = max_records
        for name, files in sources:
            offset = 0
            for f in files:
                if left is not None and left <= 0:
                    return
                source = str(f)
                counted = _Counted(read_records(f), left)
                converted = convert_records(counted, fmt, source=source, task=name, quarantine=quarantine,
                                            account=account, id_offset=offset)
                yield from validate_rows(converted, kind, source=source, quarantine=quarantine, account=account,
                                         image_root=image_root, check_images=check_images, indexed=True,
                                         seen_ids=seen_ids)
                offset += counted.n
                left = None if left is None else left - counted.n

    write_rows(rows(), out_dir, SCHEMAS[kind], rows_per_shard)
    quarantine.write()
    account.check()
    _no_rows_is_an_error(account, input_path, fmt, "; ".join(f"{name or 'rows'}: {', '.join(map(str, files))}"
                                                            for name, files in sources))
    return account


class _Counted:
    """Iterates ``records`` (at most ``limit``), counting them."""

    def __init__(self, records: Iterable[Any], limit: int | None = None):
        self.records, self.limit, self.n = records, limit, 0

    def __iter__(self) -> Iterator[Any]:
        for rec in self.records:
            if self.limit is not None and self.n >= self.limit:
                return
            self.n += 1
            yield rec


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

