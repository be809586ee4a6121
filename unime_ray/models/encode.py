"""Encode the items of a canonical table into an embeddings table, shard by shard, resumably.

Output: ``out_dir/part-NNNNN.parquet`` with columns ``id`` and ``embedding`` (fixed-size float32 list), one
output shard per input shard. A shard whose output exists is never recomputed, so a killed run rerun
loses and duplicates nothing. :func:`embed_table` runs where its :class:`~unime_ray.utils.pool.Pool` says: in
this process (``None``, tests and small data), or streamed by Ray Data through an autoscaling actor pool whose
driver writes each output shard as soon as all of its rows are back (memory bounded by the shards in flight).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data.io import shard_paths
from ..data.schema import Item
from ..utils.pool import Pool
from ..utils.shards import VISUAL_TOKENS_COLUMN, visual_tokens_column

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
        from . import Embedder
        from .budget import ImageBudget

        options = ImageBudget.from_parts(self.image_resize, self.min_pixels, self.max_pixels)
        return Embedder.from_pretrained(self.model, input_format=self.input_format, adapter=self.adapter,
                                        dtype=self.dtype, device=self.device, image_options=options,
                                        image_root=self.image_root, processor_backend=self.processor_backend,
                                        positions=self.positions)


def add_embedder_arguments(parser, image_root_help: str = "folder that image paths are relative to") -> None:
    """The flags of an :class:`EmbedderSpec` and its image budget, shared by the tool commands."""
    from .budget import add_budget_arguments

    parser.add_argument("--model", required=True, help="embedder checkpoint folder or hub id")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder (or hub id) on --model")
    parser.add_argument("--input-format", default="official", choices=["official", "chat"],
                        help="official: the paper's raw Qwen text format; chat: the chat template")
    parser.add_argument("--positions", default="auto", choices=["auto", "mrope", "sequential"],
                        help="position ids: the checkpoint's (auto), M-RoPE, or 1-D")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--image-root", default=None, help=image_root_help)
    add_budget_arguments(parser, "the embedder's images")


def embedder_spec_from_arguments(args, image_root: str | None = None) -> EmbedderSpec:
    """The spec the flags of :func:`add_embedder_arguments` give (no budget flag: the model's training budget)."""
    from .budget import budget_from_arguments

    budget = budget_from_arguments(args, args.model)
    return EmbedderSpec(model=args.model, input_format=args.input_format, dtype=args.dtype, adapter=args.adapter,
                        image_root=image_root or args.image_root, positions=args.positions,
                        image_resize=budget.resize, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)


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


def _builder(dim_hint: int | None = None, passthrough: tuple[str, ...] = ()):
    def build(cols: dict[str, list]) -> pa.Table:
        ids = cols.get("id", [])
        if not ids:
            table = embeddings_table([], np.zeros((0, dim_hint or 1), dtype=np.float32))
        else:
            table = embeddings_table([str(i) for i in ids], np.stack(cols["embedding"]))
        for c in passthrough:
            table = table.append_column(c, pa.array(cols.get(c, []), type=pa.string()))
        return table
    return build


class EmbedActor:
    """Loads the embedder once (per process or Ray actor), then encodes batches of table rows."""

    def __init__(self, spec: dict[str, Any] | None, prefix: str, batch_size: int, embedder=None,
                 passthrough: tuple[str, ...] = ()):
        import torch

        if os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        self.embedder = embedder if embedder is not None else EmbedderSpec(**spec).build()
        self.prefix = prefix
        self.batch_size = batch_size
        self.passthrough = tuple(passthrough)

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        vectors = self.embedder.encode(items_from_columns(batch, self.prefix), batch_size=self.batch_size)
        out = {"id": list(batch["id"]), "embedding": vectors}
        out.update({c: list(batch[c]) for c in self.passthrough})
        out[VISUAL_TOKENS_COLUMN] = visual_tokens_column(self.embedder, len(out["id"]))
        return out


def _stats(s: dict[str, Any]) -> dict[str, Any]:
    return {"rows_embedded": s["rows"], "shards_written": s["shards_written"], "seconds": s["seconds"],
            "items_per_s": s["rows_per_s"], "visual_tokens": s.get("visual_tokens")}


def embed_table(embedder_or_spec, table: str | os.PathLike, out_dir: str | os.PathLike, prefix: str = "",
                pool: Pool | None = None, passthrough: tuple[str, ...] = ()) -> dict[str, Any]:
    """Embed every pending shard of ``table``; returns counts and throughput.

    ``embedder_or_spec``: an :class:`EmbedderSpec`, or (in process only) an already built embedder.
    ``pool``: where it runs (None: in this process). ``passthrough`` columns of the input (strings, e.g.
    ``task``, ``pos_id``) are copied to the output.
    """
    pool = pool or Pool.in_process()
    passthrough = tuple(passthrough)
    spec = embedder_or_spec if isinstance(embedder_or_spec, EmbedderSpec) else None
    if spec is None and pool.ray:
        raise ValueError("a Ray pool rebuilds the embedder in its actors: pass an EmbedderSpec, not a built model")
    kwargs = {"spec": asdict(spec) if spec else None, "prefix": prefix, "batch_size": pool.batch_size,
              "passthrough": passthrough}
    actor = None if pool.ray else EmbedActor(**kwargs, embedder=None if spec else embedder_or_spec)
    build = _builder(getattr(actor.embedder, "dim", None) if actor else None, passthrough)
    return _stats(pool.map_shards(EmbedActor, kwargs, table, out_dir, build, item_columns(prefix) + list(passthrough),
                                  what="embedded", actor=actor))
