"""The Serve deployments behind the ingress: the query embedder, the index partitions and the reranker.

Each one's replicas, resources and autoscaling come from :class:`~unime_ray.serve.config.ServeConfig`; the
embedder and the reranker are ``@serve.batch``-ed, so concurrent requests share one forward.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from ..data.schema import Item
from .config import EMBEDDER_NAME, INDEX_NAME, RERANKER_NAME, EmbedderSettings, IndexSettings, RerankerSettings

if TYPE_CHECKING:
    from ..judge.stage import YesNoScorer

logger = logging.getLogger(__name__)

OK, INVALID, FAILED = "ok", "invalid", "error"


def _outcome_of(exc: Exception) -> tuple[str, str]:
    """Errors caused by the input (bad image, too long, ...) are the client's; the rest are ours."""
    kind = INVALID if isinstance(exc, ValueError) else FAILED
    return kind, f"{type(exc).__name__}: {exc}" if kind == FAILED else str(exc)


def _set_torch_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------ embedder
@serve.deployment(name=EMBEDDER_NAME)
class QueryEmbedder:
    """Embeds items; concurrent requests are batched into one ``Embedder.encode`` call."""

    def __init__(self, spec: dict[str, Any], settings: dict[str, Any], expected_dim: int | None = None):
        from ..models.encode import EmbedderSpec

        s = EmbedderSettings(**settings)
        _set_torch_threads(s.torch_threads)
        spec = dict(spec)
        spec["dtype"] = s.dtype if s.dtype != "auto" else spec.get("dtype", "auto")
        spec["device"] = s.device
        if spec.get("image_resize"):
            spec["image_resize"] = tuple(spec["image_resize"])
        self.spec = EmbedderSpec(**spec)
        self.embedder = self.spec.build()
        if expected_dim is not None and self.embedder.dim != expected_dim:
            raise ValueError(f"embedder {self.spec.model} makes {self.embedder.dim}-d vectors but the index holds "
                             f"{expected_dim}-d ones: serve the embedder the index was built with")
        self.embed_batch.set_max_batch_size(s.max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self.batch_sizes: collections.Counter = collections.Counter()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def embed_batch(self, items: list[Item]) -> list[tuple[str, Any]]:
        return await asyncio.to_thread(self._encode, items)

    def _encode(self, items: list[Item]) -> list[tuple[str, Any]]:
        self.batch_sizes[len(items)] += 1
        try:
            vectors = self.embedder.encode(items, batch_size=len(items))
            return [(OK, v) for v in vectors]
        except Exception as exc:  # one bad item must not fail its batch-mates: retry one by one
            if len(items) == 1:
                return [_outcome_of(exc)]
        return [self._encode([it])[0] for it in items]

    async def embed(self, items: list[Item]) -> list[tuple[str, Any]]:
        """One outcome per item: ("ok", float32 vector) or ("invalid" | "error", message)."""
        return list(await asyncio.gather(*[self.embed_batch(it) for it in items]))

    def stats(self) -> dict[str, Any]:
        return {"model": self.spec.model, "dim": self.embedder.dim, "batch_sizes": dict(self.batch_sizes)}


# ------------------------------------------------------------------------------------------ index
@serve.deployment(name=INDEX_NAME)
class CandidateIndex:
    """One partition of the candidate index: FAISS search (global positions) and metadata lookup."""

    def __init__(self, folder: str, part: int, parts: int, settings: dict[str, Any], image_root: str | None):
        from .index import MetadataStore, load_partition

        s = IndexSettings(**settings)
        if s.faiss_threads:
            import faiss

            faiss.omp_set_num_threads(s.faiss_threads)
        self.index = load_partition(folder, part, parts, use_gpu=s.use_gpu, nprobe=s.nprobe)
        self.meta = MetadataStore(folder, image_root)
        self.part, self.parts = part, parts

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def search_batch(self, requests: list[tuple[np.ndarray, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        k = max(k for _, k in requests)
        queries = np.stack([np.asarray(v, dtype=np.float32) for v, _ in requests])
        scores, positions = await asyncio.to_thread(self.index.search, queries, k)
        return [(scores[i, :kk], positions[i, :kk]) for i, (_, kk) in enumerate(requests)]

    async def search(self, vector: np.ndarray, k: int, with_image: bool = False) -> list[dict[str, Any]]:
        """This partition's top ``k`` as metadata rows with ``score`` and global ``position``."""
        scores, positions = await self.search_batch((vector, k))
        keep = positions >= 0
        rows = self.meta.rows(positions[keep].tolist(), with_image)
        for row, s, p in zip(rows, scores[keep], positions[keep]):
            row["score"], row["position"] = float(s), int(p)
        return rows

    def stats(self) -> dict[str, Any]:
        return {"part": self.part, "parts": self.parts, "ntotal": self.index.ntotal, "shards": len(self.index.shards)}


# ------------------------------------------------------------------------------------------ reranker
class PairScorer:
    """The reranker model behind one interface: ``score(pairs) -> (P(Yes) array with NaN, errors)``.

    ``implementation: auto`` uses :class:`unime_ray.rerank.Reranker` (the pairwise Yes/No prompt of the
    judge, run with the reranker checkpoint) when that package is present, else
    :class:`~unime_ray.judge.hf_backend.TransformersJudge` directly; both score the same tokens.
    """

    def __init__(self, impl: YesNoScorer, implementation: str, model: str):
        self.impl, self.implementation, self.model = impl, implementation, model

    @classmethod
    def load(cls, folder: str, settings: RerankerSettings) -> "PairScorer":
        from ..models.budget import ImageBudget

        options = ImageBudget.from_parts(settings.image_resize, settings.min_pixels, settings.max_pixels)
        kwargs = {"dtype": settings.dtype, "device": settings.device, "image_options": options,
                  "batch_size": settings.pair_batch_size}
        if reranker_implementation(settings.implementation) == RERANK_IMPL:
            from ..rerank import Reranker

            return cls(Reranker.from_pretrained(folder, **kwargs), RERANK_IMPL, str(folder))
        from ..judge.hf_backend import TransformersJudge

        return cls(TransformersJudge(folder, **kwargs), JUDGE_IMPL, str(folder))

    def score(self, pairs: list[tuple[Item, Item]]) -> tuple[np.ndarray, list[str | None]]:
        if not pairs:
            return np.zeros(0), []
        scores, errors = self.impl.score_or_errors(pairs)
        return np.asarray(scores, dtype=np.float64), list(errors)


RERANK_IMPL, JUDGE_IMPL = "unime_ray.rerank.Reranker", "unime_ray.judge.TransformersJudge"


def reranker_implementation(choice: str = "auto") -> str:
    """Which class serves the reranker (``auto``: the rerank package when it is installed)."""
    import importlib.util

    if choice == "judge":
        return JUDGE_IMPL
    if choice == "rerank" or importlib.util.find_spec("unime_ray.rerank") is not None:
        return RERANK_IMPL
    return JUDGE_IMPL


@serve.deployment(name=RERANKER_NAME)
class RerankerDeployment:
    """Scores (query, candidates) requests; concurrent requests share the model's batches."""

    def __init__(self, folder: str, settings: dict[str, Any]):
        s = RerankerSettings(**settings)
        _set_torch_threads(s.torch_threads)
        self.scorer = PairScorer.load(folder, s)
        self.score_batch.set_max_batch_size(s.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self.batch_sizes: collections.Counter = collections.Counter()

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
    async def score_batch(self, requests: list[tuple[Item, list[Item]]]) -> list[list[tuple[float | None, str | None]]]:
        return await asyncio.to_thread(self._score, requests)

    def _score(self, requests: list[tuple[Item, list[Item]]]) -> list[list[tuple[float | None, str | None]]]:
        self.batch_sizes[len(requests)] += 1
        pairs = [(q, c) for q, cands in requests for c in cands]
        try:
            scores, errors = self.scorer.score(pairs)
        except Exception as exc:
            logger.exception("reranker failed on a batch of %d pairs", len(pairs))
            scores, errors = np.full(len(pairs), np.nan), [_outcome_of(exc)[1]] * len(pairs)
        out, i = [], 0
        for _, cands in requests:
            part = []
            for _ in cands:
                s = None if errors[i] or not np.isfinite(scores[i]) else float(scores[i])
                part.append((s, errors[i]))
                i += 1
            out.append(part)
        return out

    async def score(self, query: Item, candidates: list[Item]) -> list[tuple[float | None, str | None]]:
        """(P(Yes) or None, error or None) per candidate."""
        return await self.score_batch((query, candidates))

    async def choose(self, query: Item, candidates: list[Item]) -> tuple[int | None, str]:
        """The listwise answer: (0-based index of the best candidate or None when unusable, the raw answer)."""
        impl = self.scorer.impl
        if not hasattr(impl, "choose_many"):
            raise RuntimeError(f"listwise reranking needs {RERANK_IMPL} (reranker.implementation)")
        [choice] = await asyncio.to_thread(impl.choose_many, [query], [candidates])
        return choice.index, choice.raw

    def stats(self) -> dict[str, Any]:
        return {"model": self.scorer.model, "implementation": self.scorer.implementation,
                "batch_sizes": dict(self.batch_sizes)}

