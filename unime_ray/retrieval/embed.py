"""Encode the items of a canonical table into an embeddings table, shard by shard, resumably.

Output: ``out_dir/part-NNNNN.parquet`` with columns ``id`` and ``embedding`` (fixed-size float32 list), one
output shard per input shard. A shard whose output exists is never recomputed, so a killed run rerun
loses and duplicates nothing. Two drivers share that logic:

* :func:`embed_table_local`: one process, no Ray (tests, small data, debugging);
* :func:`embed_table_ray`: Ray Data streams the pending shards through an autoscaling actor pool
  (``ActorPoolStrategy(min_size, max_size)``, ``num_gpus`` per actor on GPU clusters); the driver writes
  each output shard as soon as all of its rows are back, so memory is bounded by the shards in flight.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data.io import iter_batches, shard_paths, write_table_atomic
from ..data.schema import Item
from ..utils.logs import Progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedderSpec:
    """Everything a worker needs to rebuild the same :class:`~unime_ray.models.Embedder`."""

    model: str
    input_format: str = "official"
    dtype: str = "auto"
    adapter: str | None = None
    image_root: str | None = None
    processor_backend: str = "auto"
    image_resize: tuple[int, int] | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    device: str | None = None
    positions: str = "auto"

    def build(self):
        from ..models import Embedder, ImageOptions

        options = ImageOptions(tuple(self.image_resize) if self.image_resize else None, self.min_pixels,
                               self.max_pixels)
        return Embedder.from_pretrained(self.model, input_format=self.input_format, adapter=self.adapter,
                                        dtype=self.dtype, device=self.device, image_options=options,
                                        image_root=self.image_root, processor_backend=self.processor_backend,
                                        positions=self.positions)


def item_columns(prefix: str) -> list[str]:
    return ["id"] + [f"{prefix}{n}" for n in ("instruction", "text", "image", "image_path")]


def items_from_columns(batch: dict[str, Any], prefix: str) -> list[Item]:
    n = len(batch["id"])

    def col(name):
        values = batch.get(f"{prefix}{name}")
        return values if values is not None else [None] * n

    instr, text, image, path = col("instruction"), col("text"), col("image"), col("image_path")
    return [Item(text=text[i] or "", instruction=instr[i] or "", image=image[i] or None,
                 image_path=path[i] or None) for i in range(n)]


def embeddings_table(ids: list[str], vectors: np.ndarray) -> pa.Table:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    emb = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    return pa.table({"id": pa.array(ids, type=pa.string()), "embedding": emb})


def read_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(ids, [N, dim] float32) of an embeddings table, in shard order."""
    ids: list[str] = []
    parts = []
    for shard in shard_paths(path):
        t = pq.read_table(shard)
        ids.extend(t.column("id").to_pylist())
        col = t.column("embedding").combine_chunks()
        parts.append(col.flatten().to_numpy(zero_copy_only=False).reshape(len(t), -1))
    if not parts:
        return ids, np.zeros((0, 0), dtype=np.float32)
    return ids, np.concatenate(parts).astype(np.float32, copy=False)


def pending_shards(table: str | os.PathLike, out_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(input shard, output shard) pairs whose output does not exist yet."""
    out_dir = Path(out_dir)
    return [(s, out_dir / s.name) for s in shard_paths(table) if not (out_dir / s.name).exists()]


def _shard_rows(shard: Path) -> int:
    return pq.ParquetFile(shard).metadata.num_rows


def embed_table_local(embedder, table: str | os.PathLike, out_dir: str | os.PathLike, prefix: str = "",
                      batch_size: int = 16) -> dict[str, Any]:
    """Single-process driver; returns counts and throughput."""
    todo = pending_shards(table, out_dir)
    total = sum(_shard_rows(s) for s, _ in todo)
    progress = Progress(logger, f"embedding {Path(table).name}", total)
    for shard, out in todo:
        ids: list[str] = []
        vecs = []
        for batch in iter_batches(shard, batch_size=batch_size, columns=item_columns(prefix)):
            cols = batch.to_pydict()
            vecs.append(embedder.encode(items_from_columns(cols, prefix), batch_size=batch_size))
            ids.extend(cols["id"])
            progress.update(len(cols["id"]))
        dim = embedder.dim
        write_table_atomic(embeddings_table(ids, np.concatenate(vecs) if vecs else np.zeros((0, dim))), out)
    return {"rows_embedded": total, "shards_written": len(todo), "seconds": progress.elapsed,
            "items_per_s": progress.rate if total else 0.0}


class EmbedActor:
    """Ray Data actor: loads the embedder once, then encodes batches of table rows."""

    def __init__(self, spec: dict[str, Any], prefix: str, batch_size: int):
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.embedder = EmbedderSpec(**spec).build()
        self.prefix = prefix
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        items = items_from_columns({k: list(v) for k, v in batch.items()}, self.prefix)
        vectors = self.embedder.encode(items, batch_size=self.batch_size)
        return {"id": np.asarray(batch["id"], dtype=object), "path": np.asarray(batch["path"], dtype=object),
                "embedding": vectors}


def embed_table_ray(spec: EmbedderSpec, table: str | os.PathLike, out_dir: str | os.PathLike, prefix: str = "",
                    batch_size: int = 16, min_actors: int = 1, max_actors: int = 2, num_cpus: float = 1.0,
                    num_gpus: float = 0.0) -> dict[str, Any]:
    """Ray Data driver over an autoscaling actor pool (Ray must be initialised)."""
    import ray
    from ray.data import ActorPoolStrategy

    todo = pending_shards(table, out_dir)
    if not todo:
        return {"rows_embedded": 0, "shards_written": 0, "seconds": 0.0, "items_per_s": 0.0}
    expected = {s.name: _shard_rows(s) for s, _ in todo}
    outputs = {s.name: o for s, o in todo}
    total = sum(expected.values())
    for name, n in list(expected.items()):
        if n == 0:  # an empty shard yields no batches: write its (empty) output directly
            write_table_atomic(embeddings_table([], np.zeros((0, 1), dtype=np.float32)), outputs[name])
            del expected[name]
    progress = Progress(logger, f"embedding {Path(table).name} on Ray", total)
    if expected:
        ds = ray.data.read_parquet([str(s) for s, _ in todo if s.name in expected], columns=item_columns(prefix),
                                   include_paths=True)
        out = ds.map_batches(EmbedActor, fn_constructor_kwargs={"spec": asdict(spec), "prefix": prefix,
                                                                "batch_size": batch_size},
                             batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus, num_gpus=num_gpus,
                             compute=ActorPoolStrategy(min_size=min_actors, max_size=max_actors))
        buffers: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
        for name, ids, vectors in _iter_grouped(out):
            buf = buffers[name]
            buf[0].extend(ids)
            buf[1].append(vectors)
            progress.update(len(ids))
            if len(buf[0]) == expected[name]:
                write_table_atomic(embeddings_table(buf[0], np.concatenate(buf[1])), outputs[name])
                del buffers[name]
        if buffers:
            raise RuntimeError(f"embedding incomplete for shards {sorted(buffers)}")
    return {"rows_embedded": total, "shards_written": len(todo), "seconds": progress.elapsed,
            "items_per_s": progress.rate}


def _iter_grouped(ds) -> Iterator[tuple[str, list[str], np.ndarray]]:
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        names = np.array([os.path.basename(str(p)) for p in batch["path"]])
        vectors = np.asarray(np.stack(batch["embedding"]) if batch["embedding"].dtype == object
                             else batch["embedding"], dtype=np.float32)
        for name in np.unique(names):
            mask = names == name
            yield str(name), [str(i) for i in batch["id"][mask]], vectors[mask]
