"""Converters between external formats and the canonical pair table, one module per format:
:mod:`.official` (the UniME-V2 training JSON), :mod:`.mmeb` (MMEB-train / MMEB-eval rows), :mod:`.folders`
(MMEB's published folder layouts), :mod:`.retrieval` (zero-shot retrieval sets); :mod:`.records` holds what they
share. This module dispatches a path and a format name to them.

Converters raise :class:`~unime_ray.data.validate.DataError` for a structurally bad record; the
``import_*`` functions turn those into quarantine entries so that every input row is accounted for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ...utils.files import write_text_atomic
from ..io import iter_rows, write_rows
from ..schema import SCHEMAS
from ..validate import DataError, Quarantine, RowAccount, validate_rows
from .folders import MMEB_SPLITS, mmeb_sources
from .mmeb import (mmeb_eval_record_to_row, mmeb_train_record_to_row, row_to_mmeb_eval_record,
                   row_to_mmeb_train_record)
from .official import export_official_json, official_record_to_row
from .records import ImageSpill, no_rows_is_an_error, read_records
from .retrieval import RETRIEVAL_FORMATS, import_retrieval_set

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
    no_rows_is_an_error(account, input_path, fmt, "; ".join(f"{name or 'rows'}: {', '.join(map(str, files))}"
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
    spill = ImageSpill(image_dir)
    lines = [json.dumps(to_record(row, spill), ensure_ascii=False) + "\n" for row in iter_rows(pairs_path)]
    write_text_atomic("".join(lines), out_path)
    return len(lines)

