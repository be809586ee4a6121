"""Encode the unique items of an evaluation once, in this process or over a Ray Data actor pool.

Every evaluator first collects the distinct items it needs (queries and candidates, de-duplicated by
id or content) in an :class:`ItemRegistry`, then asks an :class:`ItemEncoder` for one embedding per
registry entry. The encoder writes the items to a temporary canonical candidate table and embeds it with the
pipeline's :func:`~unime_ray.models.encode.embed_table` on its pool (the same ``EmbedActor``, in this process
or over Ray), so single-process and distributed evaluation encode exactly the same inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Hashable, Sequence

import numpy as np

from ..data.images import resolve_image_path
from ..data.io import ShardWriter
from ..data.schema import CANDIDATE_SCHEMA, Item
from ..data.validate import DataError
from ..utils.pool import Pool
from ..utils.ray_utils import absolute_if_local

logger = logging.getLogger(__name__)


class ItemRegistry:
    """Distinct items in first-seen order; ``add`` returns the item's index (its row in the embeddings).

    ``key`` decides identity: ``("id", scope, id)`` for rows that carry candidate ids, else the item's
    content key. An id seen again with different content is a data error (it would silently score the
    wrong candidate), reported with the row and field that disagree.
    """

    def __init__(self, image_root: str | os.PathLike | None = None, check_images: bool = True):
        self.items: list[Item] = []
        self.labels: list[str] = []          # a printable id per entry (the table id or the content key)
        self._index: dict[Hashable, int] = {}
        self._content: dict[int, str] = {}
        self.image_root = image_root
        self.check_images = check_images
        self._checked_paths: dict[str, bool] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: Item, item_id: str | None = None, scope: str = "", *, where: str = "",
            field: str = "{}", row: int | None = None, row_id: str | None = None) -> int:
        """Index of ``item``; ``where``/``row``/``row_id``/``field`` locate it for error messages
        (``field`` is a format string such as ``"neg_{}[3]"``, filled with ``id`` or ``image_path``)."""
        ckey = item.content_key()
        key: Hashable = ("id", scope, item_id) if item_id else ("content", ckey)
        idx = self._index.get(key)
        if idx is not None:
            if item_id and self._content[idx] != ckey:
                raise DataError(where, row, field.format("id"), f"candidate id {item_id!r} has different content "
                                "here than where it was first seen; ids must name one item", row_id)
            return idx
        self._check_image(item, where, field, row, row_id)
        idx = len(self.items)
        self._index[key] = idx
        self._content[idx] = ckey
        self.items.append(item)
        self.labels.append(item_id or ckey)
        return idx

    def _check_image(self, item: Item, where: str, field: str, row: int | None, row_id: str | None) -> None:
        if not self.check_images or item.image or not item.image_path:
            return
        ok = self._checked_paths.get(item.image_path)
        if ok is None:
            ok = resolve_image_path(item.image_path, self.image_root).is_file()
            self._checked_paths[item.image_path] = ok
        if not ok:
            path = resolve_image_path(item.image_path, self.image_root)
            raise DataError(where, row, field.format("image_path"),
                            f"image file not found: {path} (image root: {self.image_root})", row_id)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit rows (cosine = dot product); zero rows stay zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class ItemEncoder:
    """One embedder for a whole evaluation, run by a :class:`~unime_ray.utils.pool.Pool` (None: this process).

    ``embedder_or_spec``: an ``Embedder`` (or any object with ``encode(items, batch_size)``), an
    :class:`~unime_ray.models.encode.EmbedderSpec`, or a model folder / hub id. A Ray pool needs a spec
    (actors rebuild the model from it); in this process the model is built once and reused.
    """

    @classmethod
    def wrap(cls, embedder_or_spec: Any, **kwargs: Any) -> "ItemEncoder":
        """``embedder_or_spec`` itself when it is already an encoder, else a new one built with ``kwargs``."""
        return embedder_or_spec if isinstance(embedder_or_spec, cls) else cls(embedder_or_spec, **kwargs)

    def __init__(self, embedder_or_spec: Any, *, image_root: str | os.PathLike | None = None,
                 pool: Pool | None = None, work_dir: str | os.PathLike | None = None):
        from ..models.encode import EmbedderSpec

        self.pool = pool or Pool.in_process()
        if isinstance(embedder_or_spec, (str, os.PathLike)):
            embedder_or_spec = EmbedderSpec(model=str(embedder_or_spec))
        self.spec: EmbedderSpec | None = None
        self._embedder = None
        if isinstance(embedder_or_spec, EmbedderSpec):
            spec = embedder_or_spec
            root = str(image_root) if image_root is not None else spec.image_root
            self.spec = dataclasses.replace(spec, model=absolute_if_local(spec.model),
                                            adapter=absolute_if_local(spec.adapter),
                                            image_root=absolute_if_local(root))
        else:
            if self.pool.ray:
                raise ValueError("a Ray pool needs an EmbedderSpec (or a model path) that Ray actors can rebuild; "
                                 "got a built embedder")
            self._embedder = embedder_or_spec
        self.image_root = image_root if image_root is not None else (
            self.spec.image_root if self.spec else getattr(self._embedder, "image_root", None))
        self.work_dir = work_dir
        self.visual_tokens: Counter = Counter()   # {tokens per image: images encoded}, drained per evaluation

    @property
    def label(self) -> str:
        if self.spec is not None:
            return self.spec.model + (f" + {self.spec.adapter}" if self.spec.adapter else "")
        return type(self._embedder).__name__

    def embedder(self):
        """The in-process embedder (built from the spec on first use)."""
        if self._embedder is None:
            self._embedder = self.spec.build()
        return self._embedder

    def encode(self, items: Sequence[Item], image_root: str | os.PathLike | None = None) -> np.ndarray:
        """[len(items), dim] float32 unit rows, in input order (``image_root`` overrides the default).

        The items go through a temporary candidate table, so in-process and Ray encoding run the pipeline's
        own ``EmbedActor`` over the same inputs."""
        from ..models.encode import embed_table, read_embeddings

        if not items:
            return np.zeros((0, 0), dtype=np.float32)
        root = image_root if image_root is not None else self.image_root
        parent = Path(self.work_dir) if self.work_dir else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".eval-encode-", dir=parent))
        bs = self.pool.batch_size
        emb = None if self.pool.ray else self.embedder()
        previous = getattr(emb, "image_root", None)
        try:
            # Enough shards that every actor of the pool gets work, none so small that batches fragment.
            per_shard = max(bs, math.ceil(len(items) / (4 * self.pool.max_actors)))
            with ShardWriter(tmp / "items", CANDIDATE_SCHEMA, rows_per_shard=min(per_shard, 4096)) as w:
                for i, it in enumerate(items):
                    w.write({"id": f"{i:010d}", "task": "eval", "instruction": it.instruction, "text": it.text,
                             "image": it.image, "image_path": it.image_path})
            if self.pool.ray:
                from ..utils.ray_utils import init_ray

                init_ray()
                target = self.spec if root is None else dataclasses.replace(self.spec, image_root=absolute_if_local(
                    str(root)))
            else:
                target = emb
                if root is not None and hasattr(emb, "image_root"):
                    emb.image_root = root
            stats = embed_table(target, tmp / "items", tmp / "emb", pool=self.pool)
            hist = (stats.get("visual_tokens") or {}).get("histogram") or {}
            self.visual_tokens.update({int(k): int(v) for k, v in hist.items()})
            ids, vectors = read_embeddings(tmp / "emb")
            index = np.asarray([int(i) for i in ids], dtype=np.int64)
            order = np.argsort(index)
            if not np.array_equal(index[order], np.arange(len(items))):
                raise RuntimeError(f"encoding returned {len(ids)} embeddings for {len(items)} items")
            return normalize_rows(vectors[order])
        finally:
            if hasattr(emb, "image_root"):
                emb.image_root = previous
            shutil.rmtree(tmp, ignore_errors=True)
