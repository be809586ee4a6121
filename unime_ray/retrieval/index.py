"""Sharded FAISS inner-product indexes: build, save, load, search, exact merge.

Vectors are L2-normalised, so inner product is cosine similarity. The pool is split into ``num_shards``
contiguous slices, each its own index (flat: exact; IVF: approximate, for large pools). A search asks
every shard for its top ``min(k, shard size)`` and merges by (score descending, id ascending), so a
sharded flat search returns exactly what one flat index (or numpy brute force) returns. faiss-gpu is
used when it is installed and a GPU is visible; faiss-cpu otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import RetrieveConfig


def _faiss():
    import faiss

    return faiss


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


IVF_TRAIN_SIZE = 100_000   # IVF training sample per shard


def saved_settings(saved: dict, nprobe: int | None = None) -> RetrieveConfig:
    """The index fields of a saved ``index.json`` ``spec`` (``nprobe``: search with another)."""
    return RetrieveConfig(index_kind=saved["kind"], num_shards=saved["num_shards"], nlist=saved["nlist"],
                          nprobe=nprobe or saved["nprobe"])


def _as_f32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {x.shape}")
    return x


class ShardedIndex:
    """An index over ``n`` vectors (positions ``0..n-1``), split into contiguous shards, as ``settings``'
    ``index_kind``, ``num_shards``, ``nlist`` and ``nprobe`` say; ``use_gpu`` None: when available."""

    def __init__(self, settings: RetrieveConfig, dim: int, seed: int = 0, use_gpu: bool | None = None):
        self.settings = settings
        self.seed = seed
        self.use_gpu = use_gpu
        self.dim = dim
        self.shards: list = []
        self.offsets: list[int] = []
        self.ntotal = 0
        self.on_gpu = False

    # ------------------------------------------------------------------------------------------ build
    @classmethod
    def build(cls, vectors: np.ndarray, settings: RetrieveConfig | None = None, seed: int = 0,
              use_gpu: bool | None = None) -> "ShardedIndex":
        vectors = _as_f32(vectors)
        index = cls(settings or RetrieveConfig(), vectors.shape[1], seed, use_gpu)
        n = len(vectors)
        bounds = np.linspace(0, n, min(index.settings.num_shards, max(n, 1)) + 1).astype(int)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            index.shards.append(index._make_shard(vectors[lo:hi]))
            index.offsets.append(int(lo))
        index.ntotal = n
        return index

    def _make_shard(self, part: np.ndarray):
        faiss = _faiss()
        spec = self.settings
        if spec.index_kind == "flat" or len(part) < 64:
            shard = faiss.IndexFlatIP(self.dim)
        else:
            nlist = spec.nlist or max(1, min(len(part) // 39, int(4 * np.sqrt(len(part)))))
            quantizer = faiss.IndexFlatIP(self.dim)
            shard = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(self.seed)
            sample = part if len(part) <= IVF_TRAIN_SIZE else part[rng.choice(len(part), IVF_TRAIN_SIZE,
                                                                                 replace=False)]
            shard.train(sample)
            shard.nprobe = min(spec.nprobe, nlist)
        shard.add(part)
        return self._to_device(shard)

    def _to_device(self, shard):
        use_gpu = self.use_gpu if self.use_gpu is not None else gpu_available()
        if use_gpu:
            faiss = _faiss()
            if not gpu_available():
                raise RuntimeError("use_gpu=True but faiss has no GPU support here (install faiss-gpu)")
            self.on_gpu = True
            return faiss.index_cpu_to_all_gpus(shard)
        return shard

    # ------------------------------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [nq, k] float32 descending, positions [nq, k] int64); -1 / -inf pad when k > ntotal."""
        queries = _as_f32(queries)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dim {queries.shape[1]} != index dim {self.dim}")
        if k <= 0:
            raise ValueError("k must be positive")
        nq = len(queries)
        all_scores, all_ids = [], []
        for shard, offset in zip(self.shards, self.offsets):
            kk = min(k, shard.ntotal)
            if kk == 0:
                continue
            s, i = shard.search(queries, kk)
            valid = i >= 0
            all_scores.append(np.where(valid, s, -np.inf).astype(np.float32))
            all_ids.append(np.where(valid, i + offset, -1).astype(np.int64))
        if not all_scores:
            return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        return merge_topk(np.concatenate(all_scores, axis=1), np.concatenate(all_ids, axis=1), k)

    # ------------------------------------------------------------------------------------------ io
    def save(self, folder: str | os.PathLike) -> Path:
        faiss = _faiss()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for j, shard in enumerate(self.shards):
            cpu = faiss.index_gpu_to_cpu(shard) if self.on_gpu else shard
            tmp = folder / f".shard-{j:03d}.faiss.tmp"
            faiss.write_index(cpu, str(tmp))
            os.replace(tmp, folder / f"shard-{j:03d}.faiss")
        st = self.settings
        spec = {"kind": st.index_kind, "num_shards": st.num_shards, "nlist": st.nlist, "nprobe": st.nprobe,
                "seed": self.seed}
        meta = {"spec": spec, "dim": self.dim, "offsets": self.offsets, "ntotal": self.ntotal}
        (folder / "index.json").write_text(json.dumps(meta, indent=1))
        return folder

    @staticmethod
    def _meta(folder: Path) -> dict:
        meta_path = folder / "index.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder} is not a saved index (no index.json)")
        return json.loads(meta_path.read_text())

    @classmethod
    def num_saved_shards(cls, folder: str | os.PathLike) -> int:
        return len(cls._meta(Path(folder))["offsets"])

    @classmethod
    def load(cls, folder: str | os.PathLike, use_gpu: bool | None = None, nprobe: int | None = None,
             shards: Sequence[int] | None = None) -> "ShardedIndex":
        """A saved index; ``shards``: only these shard numbers (a serving partition: positions stay global,
        ``ntotal`` counts the rows loaded); ``nprobe``: instead of the saved one."""
        faiss = _faiss()
        folder = Path(folder)
        meta = cls._meta(folder)
        index = cls(saved_settings(meta["spec"], nprobe), meta["dim"], meta["spec"].get("seed", 0), use_gpu)
        bounds = list(meta["offsets"]) + [meta["ntotal"]]
        for j in range(len(meta["offsets"])) if shards is None else shards:
            shard = faiss.read_index(str(folder / f"shard-{j:03d}.faiss"))
            if hasattr(shard, "nprobe"):
                shard.nprobe = index.settings.nprobe
            index.shards.append(index._to_device(shard))
            index.offsets.append(int(bounds[j]))
            index.ntotal += bounds[j + 1] - bounds[j]
        return index


def merge_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row by (score descending, id ascending); pads with -inf / -1."""
    nq, m = scores.shape
    # lexsort sorts by the last key first: score descending, then id ascending; padding (-1) goes last.
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=1)[:, :k]
    top_s = np.take_along_axis(scores, order, axis=1)
    top_i = np.take_along_axis(ids, order, axis=1)
    if m < k:
        top_s = np.concatenate([top_s, np.full((nq, k - m), -np.inf, np.float32)], axis=1)
        top_i = np.concatenate([top_i, np.full((nq, k - m), -1, np.int64)], axis=1)
    return top_s.astype(np.float32), top_i.astype(np.int64)


def search_topk(query_vectors: np.ndarray, candidate_vectors: np.ndarray, k: int, num_shards: int = 1,
                kind: str = "flat", **spec_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` candidates of each query by inner product: (scores, ids), sorted by descending score.

    With the flat index (default) this equals brute force, for any number of shards.
    """
    index = ShardedIndex.build(candidate_vectors, RetrieveConfig(index_kind=kind, num_shards=num_shards, **spec_kwargs))
    return index.search(query_vectors, k)


def brute_force_topk(query_vectors: np.ndarray, candidate_vectors: np.ndarray, k: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The numpy reference: full similarity matrix, stable sort (ties by lower id)."""
    sims = _as_f32(query_vectors) @ _as_f32(candidate_vectors).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids
