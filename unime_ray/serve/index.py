"""The serving index: what ``unime-ray index`` writes and the serving application loads.

Layout of an index folder::

    index.json          manifest: format, embedder (and how it reads items), dim, count, FAISS layout
    faiss/              ShardedIndex.save: shard-NNN.faiss + its own index.json (offsets, spec)
    metadata.parquet    one row per vector, in vector order: id, task, instruction, text, image_path, image
    embeddings/         the candidate embeddings (id, embedding), one shard per candidate shard
    quarantine.parquet  candidates that were not indexed, with the reason (QUARANTINE_SCHEMA; empty when none)

Every candidate is accounted for: before embedding, each row is validated as the ``prepare`` stage does
(``data/validate.py``: ids, texts, images decoded from their bytes or read from ``image_root``); a row that
fails (missing or corrupt image, duplicate id, ...) is quarantined with its reason and the build goes on.
``index.json`` records ``accounting`` (rows_in = rows_out + rows_quarantined, reasons). When *no* image
given by path can be found, the image root is wrong or missing, and the build stops with that message.

The embeddings are computed with the same code as the retrieval stage (``embed_table``, in this process or
on the cluster's actor pool) and are resumable: a killed build rerun keeps the shards already embedded.
Row ``i`` of ``metadata.parquet`` is vector ``i`` of the index (checked at build time).

A large index is served as several *partitions*: each loads a contiguous slice of the saved FAISS shards
and answers with global positions, and the ingress merges their top-k exactly (``merge_topk``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data.io import iter_batches, rows_to_table, write_table_atomic
from ..data.schema import QUARANTINE_SCHEMA
from ..models.encode import EmbedderSpec, embed_table, read_embeddings
from ..retrieval.config import RetrieveConfig
from ..retrieval.index import ShardedIndex
from ..utils.files import write_json_atomic
from ..utils.pool import Pool

logger = logging.getLogger(__name__)

FORMAT = "unime-serving-index/1"
MANIFEST = "index.json"
FAISS_DIR = "faiss"
METADATA = "metadata.parquet"
EMBEDDINGS_DIR = "embeddings"
EMBEDDINGS_SPEC = "embeddings.spec.json"
QUARANTINE = "quarantine.parquet"
SCREENED_DIR = ".screened-candidates"   # accepted rows, while building (removed when done)
METADATA_COLUMNS = ("id", "task", "instruction", "text", "image_path", "image")
METADATA_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("task", pa.string()),
                             pa.field("instruction", pa.string()), pa.field("text", pa.string()),
                             pa.field("image_path", pa.string()), pa.field("image", pa.binary())])


class IndexFormatError(ValueError):
    """A folder that is not a serving index, or whose parts disagree."""


def _embedder_record(spec: EmbedderSpec) -> dict[str, Any]:
    d = asdict(spec)
    d.pop("device", None)
    d["image_resize"] = list(spec.image_resize) if spec.image_resize else None
    return d


def _write_metadata(candidates: str | os.PathLike, out: Path, store_images: bool) -> list[str]:
    """Stream the candidate table into metadata.parquet; returns the ids in row order."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    ids: list[str] = []
    with pq.ParquetWriter(tmp, METADATA_SCHEMA) as writer:
        for batch in iter_batches(candidates, batch_size=1024):
            cols = batch.to_pydict()
            n = len(cols["id"])

            def col(name, _cols=cols, _n=n):
                return _cols.get(name) if _cols.get(name) is not None else [None] * _n

            images = col("image") if store_images else [None] * n
            ids.extend(str(i) for i in cols["id"])
            writer.write_table(pa.table({
                "id": [str(i) for i in cols["id"]], "task": col("task"), "instruction": col("instruction"),
                "text": col("text"), "image_path": col("image_path"), "image": images}, schema=METADATA_SCHEMA))
    os.replace(tmp, out)
    return ids


def recorded_image_root(candidates: str | os.PathLike) -> tuple[str, Path] | None:
    """(image root, manifest) recorded by the run whose ``prepare`` stage wrote this candidate table
    (``RUN/manifest.json`` of ``RUN/prepare/<table>``), None when there is none."""
    path = Path(candidates).resolve()
    for parent in list(path.parents)[:3]:
        manifest = parent / "manifest.json"
        if not manifest.is_file():
            continue
        try:
            outputs = json.loads(manifest.read_text())["stages"]["prepare"]["outputs"]
        except (ValueError, KeyError, TypeError):
            continue
        tables = [Path(t.get("path", "")).resolve() for t in (outputs.get("tables") or {}).values()
                  if isinstance(t, dict) and t.get("path")]
        if outputs.get("image_root") and any(path == t or t in path.parents for t in tables):
            return str(outputs["image_root"]), manifest
    return None


def screen_candidates(candidates: str | os.PathLike, accepted_dir: Path, image_root: str | None,
                      check_images: bool = True):
    """Validate every candidate row (``data.validate``) before embedding.

    Returns ``(table to embed, RowAccount, Quarantine entries)``: the original table when every row is
    good, else ``accepted_dir`` holding the good rows under the same shard names. Raises
    :class:`IndexFormatError` when images are given by path and none of them can be found (a wrong or
    missing image root: quarantining everything would hide that).
    """
    from ..data.io import shard_paths
    from ..data.validate import Quarantine, RowAccount, validate_rows

    quarantine, account, seen = Quarantine(None), RowAccount(), set()
    shards = shard_paths(candidates)
    bad: dict[Path, set[int]] = {}
    path_images = path_missing = 0
    example = None
    for shard in shards:
        offset = 0
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=256):
            rows = batch.to_pylist()
            before = len(quarantine)
            kept = {offset + i for i, _ in enumerate(rows)}
            triples = ((offset + i, r, r) for i, r in enumerate(rows))
            for _ in validate_rows(triples, "candidates", source=str(shard), quarantine=quarantine, account=account,
                                   image_root=image_root, check_images=check_images, seen_ids=seen, indexed=True):
                pass
            for entry in quarantine.entries[before:]:
                kept.discard(entry["row"])
                bad.setdefault(shard, set()).add(entry["row"])
                if entry["field"] == "image_path" and "not found" in entry["reason"]:
                    path_missing += 1
                    example = example or entry["reason"]
            path_images += sum(1 for r in rows if r.get("image_path") and not r.get("image"))
            offset += len(rows)
    account.check()
    if path_images and path_missing == path_images:
        where = f"under the image root {image_root}" if image_root else "and no image root was given"
        raise IndexFormatError(f"none of the {path_images} candidate images given by path can be found {where} "
                               f"(e.g. {example.removeprefix('image file not found: ')}): pass --image-root, the "
                               "folder the candidates' image paths are relative to")
    if not bad:
        return candidates, account, quarantine.entries
    shutil.rmtree(accepted_dir, ignore_errors=True)
    accepted_dir.mkdir(parents=True)
    for shard in shards:
        target = accepted_dir / shard.name
        if shard not in bad:
            try:
                os.link(shard, target)
            except OSError:
                shutil.copyfile(shard, target)
            continue
        drop = bad[shard]
        table = pq.read_table(shard)
        mask = pa.array([i not in drop for i in range(table.num_rows)])
        pq.write_table(table.filter(mask), target)
    return accepted_dir, account, quarantine.entries


def build_serving_index(candidates: str | os.PathLike, out: str | os.PathLike, embedder: EmbedderSpec | str, *,
                        kind: str = "flat", num_shards: int = 1, nlist: int | None = None, nprobe: int = 16,
                        pool: Pool | None = None, store_images: bool = True, overwrite: bool = False,
                        built_embedder=None, check_images: bool = True, start_ray=None) -> dict[str, Any]:
    """Embed a candidate table (``CANDIDATE_SCHEMA``) and write a serving index to ``out``; returns the manifest.

    ``embedder``: an :class:`EmbedderSpec` (or a model name/folder); ``built_embedder``: an already loaded
    :class:`~unime_ray.models.Embedder` for that spec (saves a reload in one-process use).
    ``pool``: where the candidates are embedded (None: in this process; a Ray pool: Ray must be initialised).
    ``store_images``: keep inline candidate image bytes in the metadata (needed to rerank image candidates
    stored inline, and to return images); images given by path are read from ``spec.image_root``.
    ``check_images``: decode every candidate image before embedding (unreadable ones are quarantined); off,
    only texts and ids are checked, and an unreadable image fails the embedding.
    ``start_ray``: called before embedding on a Ray pool (after screening: a bad table fails before Ray).
    """
    t0 = time.perf_counter()
    spec = embedder if isinstance(embedder, EmbedderSpec) else EmbedderSpec(model=str(embedder))
    if spec.image_root:
        spec = EmbedderSpec(**{**asdict(spec), "image_root": str(Path(spec.image_root).resolve())})
    index_settings = RetrieveConfig(index_kind=kind, num_shards=num_shards, nlist=nlist, nprobe=nprobe)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    emb_dir = out / EMBEDDINGS_DIR
    record = {"embedder": _embedder_record(spec), "candidates": str(Path(candidates).resolve())}
    spec_path = out / EMBEDDINGS_SPEC
    if spec_path.is_file() and json.loads(spec_path.read_text()) != record:
        if not overwrite:
            raise IndexFormatError(f"{out} holds embeddings of another embedder or candidate table "
                                   f"({spec_path}); pass overwrite=True (--overwrite) to rebuild it")
        logger.info("overwriting the embeddings in %s", emb_dir)
        shutil.rmtree(emb_dir, ignore_errors=True)
    elif overwrite:
        shutil.rmtree(emb_dir, ignore_errors=True)
    accepted, account, quarantined = screen_candidates(candidates, out / SCREENED_DIR, spec.image_root,
                                                       check_images=check_images)
    write_table_atomic(rows_to_table(quarantined, QUARANTINE_SCHEMA), out / QUARANTINE)
    if quarantined:
        logger.warning("%d of %d candidates quarantined (%s): see %s", account.rows_quarantined, account.rows_in,
                       ", ".join(f"{k}: {v}" for k, v in account.reasons.most_common()), out / QUARANTINE)
    if account.rows_out == 0:
        raise IndexFormatError(f"candidate table {candidates} has no rows to index ({account.summary()}; "
                               f"see {out / QUARANTINE})")
    write_json_atomic(record, spec_path, allow_nan=True)

    if pool is not None and pool.ray and start_ray is not None:
        start_ray()
    in_process = built_embedder is not None and not (pool and pool.ray)
    stats = embed_table(built_embedder if in_process else spec, accepted, emb_dir, pool=pool)
    ids, vectors = read_embeddings(emb_dir)
    if len(ids) == 0:
        raise IndexFormatError(f"candidate table {candidates} has no rows")
    meta_ids = _write_metadata(accepted, out / METADATA, store_images)
    if meta_ids != ids:
        raise IndexFormatError("the embeddings and the candidate table disagree on ids/order; rebuild with "
                               "--overwrite (was the candidate table changed after embedding?)")
    seen: set[str] = set()
    dups = [i for i in ids if i in seen or seen.add(i)]
    if dups:
        raise IndexFormatError(f"candidate ids must be unique; {len(dups)} repeated, e.g. {dups[:5]}")

    index = ShardedIndex.build(vectors, index_settings, use_gpu=False)
    index.save(out / FAISS_DIR)
    manifest = {
        "format": FORMAT,
        "embedder": record["embedder"],
        "dim": int(vectors.shape[1]),
        "count": int(len(ids)),
        "index": {"kind": kind, "num_shards": len(index.shards), "nlist": nlist, "nprobe": nprobe},
        "image_root": spec.image_root,
        "candidates": record["candidates"],
        "stores_images": bool(store_images),
        "accounting": {**account.as_dict(), "rows_indexed": int(len(ids)), "quarantine": QUARANTINE},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build": {**stats, "seconds_total": round(time.perf_counter() - t0, 3)},
    }
    write_json_atomic(manifest, out / MANIFEST, allow_nan=True)
    shutil.rmtree(out / SCREENED_DIR, ignore_errors=True)
    logger.info("serving index %s: %d vectors of dim %d, %s x%d", out, manifest["count"], manifest["dim"], kind,
                len(index.shards))
    return manifest


def load_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise IndexFormatError(f"{folder} is not a serving index (no {MANIFEST}); build one with `unime-ray index`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for part in (FAISS_DIR, METADATA):
        if not (folder / part).exists():
            raise IndexFormatError(f"{folder} is incomplete: {part} is missing")
    return manifest


def embedder_spec_from_manifest(manifest: dict[str, Any], model: str | None = None, **overrides) -> EmbedderSpec:
    """The spec the candidates were embedded with; ``model``/``overrides`` replace fields (None: keep)."""
    d = dict(manifest["embedder"])
    if model is not None:
        d["model"] = str(model)
    for k, v in overrides.items():
        if v is not None:
            d[k] = v
    if d.get("image_resize"):
        d["image_resize"] = tuple(d["image_resize"])
    fields = set(EmbedderSpec.__dataclass_fields__)
    return EmbedderSpec(**{k: v for k, v in d.items() if k in fields})


def partition_shards(num_shards: int, parts: int) -> list[list[int]]:
    """Contiguous, balanced groups of shard numbers, one per partition."""
    bounds = np.linspace(0, num_shards, parts + 1).astype(int)
    return [list(range(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def load_partition(folder: str | os.PathLike, part: int = 0, parts: int = 1, use_gpu: bool | None = False,
                   nprobe: int | None = None) -> ShardedIndex:
    """Partition ``part`` of ``parts`` of a saved index: its shards, searched with global positions."""
    fdir = Path(folder) / FAISS_DIR
    groups = partition_shards(ShardedIndex.num_saved_shards(fdir), parts)
    if not 0 <= part < len(groups):
        raise ValueError(f"partition {part} out of range for {parts} partitions")
    return ShardedIndex.load(fdir, use_gpu=use_gpu, nprobe=nprobe, shards=groups[part])


class MetadataStore:
    """Row lookup by vector position in ``metadata.parquet`` (memory-mapped: replicas share the pages)."""

    def __init__(self, folder: str | os.PathLike, image_root: str | os.PathLike | None = None):
        self.table = pq.read_table(Path(folder) / METADATA, memory_map=True)
        self.image_root = image_root

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, positions: list[int], with_image: bool = False) -> list[dict[str, Any]]:
        """Rows at ``positions`` (in order); ``image`` is the encoded bytes (inline, or read from its path)
        when ``with_image``, else None; a path image that cannot be read gives ``image_error``."""
        from ..data.images import ImageError, read_image_bytes

        cols = [c for c in METADATA_COLUMNS if with_image or c != "image"]
        rows = self.table.select(cols).take(pa.array(positions, type=pa.int64())).to_pylist()
        for r in rows:
            r.setdefault("image", None)
            if with_image and not r["image"] and r.get("image_path"):
                try:
                    r["image"] = read_image_bytes(r["image_path"], self.image_root)
                except ImageError as exc:
                    r["image_error"] = str(exc)
        return rows
