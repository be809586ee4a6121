"""Folder discovery for MMEB-train and MMEB-eval in their published layouts,
``<Subset>/<split>-NNNNN-of-NNNNN.parquet`` (each task named after its subset folder; one split per subset:
``train`` for MMEB-train by default, as its folders also hold ``original`` and ``diverse_instruction`` copies,
``test`` for MMEB-eval)."""

from __future__ import annotations

import os
import re
from pathlib import Path

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
_SHARD_RE = re.compile(r"^(?P<split>.+?)-\d+-of-\d+$")   # Hugging Face shard names: train-00000-of-00002
# the split read by default, in order of preference, per published layout
MMEB_SPLITS = {"mmeb-train": ("train", "original"), "mmeb-eval": ("test",)}
_SPLIT_NAMES = {"train", "original", "diverse_instruction", "test", "validation"}


def data_files(folder: Path) -> list[Path]:
    """The data files directly in ``folder`` (hidden and ``_``-prefixed ones, e.g. ``_done.json``, left out)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES
                  and not p.name.startswith((".", "_")))


def subset_folders(root: Path) -> list[Path]:
    """The sub-folders of ``root`` holding data files, by name (image folders and hidden ones left out)."""
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and data_files(d))


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
    subsets = subset_folders(p)
    if subsets:
        if task is not None:
            raise ValueError(f"{p} holds {len(subsets)} subsets, each named after its folder; do not pass a task")
        return [(d.name, _subset_files(d, split, defaults)) for d in subsets]
    if data_files(p):
        return [(task or p.name, _subset_files(p, split, defaults))]
    raise FileNotFoundError(f"{p}: no data files ({', '.join(DATA_SUFFIXES)}) in it or in its sub-folders")
