"""The Ray Serve application: HTTP ingress -> query embedder -> index partitions -> reranker.

Deployments (each one's replicas, resources and autoscaling from :class:`~unime_ray.serve.config.ServeConfig`):

* ``UniMEIngress``: FastAPI (:mod:`unime_ray.serve.api`): validation, auth, limits, merging, reranking order.
* ``QueryEmbedder``: the embedder, ``@serve.batch``-ed: concurrent queries share one forward.
* ``CandidateIndex`` (or ``CandidateIndex0..N-1`` when partitioned): FAISS search + candidate metadata.
* ``Reranker`` (optional): pairwise P(Yes) scores, ``@serve.batch``-ed over search requests.

:func:`build_app` is the application builder named by ``serve_config.yaml``
(``import_path: unime_ray.serve.app:build_app``); it takes ``args`` = {index, embedder, reranker, config,
config_file} (see :class:`AppArgs`). :func:`build_application` is the same for Python callers.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application

from ..data.schema import Item
from .config import (EmbedderSettings, IndexSettings, RerankerSettings, ServeConfig, api_key_digest,
                     read_api_key)

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
@serve.deployment(name="QueryEmbedder")
class QueryEmbedder:
    """Embeds items; concurrent requests are batched into one ``Embedder.encode`` call."""

    def __init__(self, spec: dict[str, Any], settings: dict[str, Any], expected_dim: int | None = None):
        from ..retrieval.embed import EmbedderSpec

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
@serve.deployment(name="CandidateIndex")
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

    def __init__(self, impl, implementation: str, model: str):
        self.impl, self.implementation, self.model = impl, implementation, model

    @classmethod
    def load(cls, folder: str, settings: RerankerSettings) -> "PairScorer":
        from ..models.processor import ImageOptions

        options = ImageOptions(max_pixels=settings.max_pixels) if settings.max_pixels else None
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
        for name in ("score_pairs_or_errors", "score_or_errors"):
            if hasattr(self.impl, name):
                scores, errors = getattr(self.impl, name)(pairs)
                return np.asarray(scores, dtype=np.float64), list(errors)
        scores = np.asarray(self.impl.score_pairs(pairs), dtype=np.float64)
        return scores, [None if np.isfinite(s) else "the pair cannot be scored" for s in scores]


RERANK_IMPL, JUDGE_IMPL = "unime_ray.rerank.Reranker", "unime_ray.judge.TransformersJudge"


def reranker_implementation(choice: str = "auto") -> str:
    """Which class serves the reranker (``auto``: the rerank package when it is installed)."""
    import importlib.util

    if choice == "judge":
        return JUDGE_IMPL
    if choice == "rerank" or importlib.util.find_spec("unime_ray.rerank") is not None:
        return RERANK_IMPL
    return JUDGE_IMPL


@serve.deployment(name="Reranker")
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

    def stats(self) -> dict[str, Any]:
        return {"model": self.scorer.model, "implementation": self.scorer.implementation,
                "batch_sizes": dict(self.batch_sizes)}


# ------------------------------------------------------------------------------------------ ingress
@serve.deployment(name="UniMEIngress")
@serve.ingress()
class UniMEIngress:
    """The HTTP front: builds its FastAPI app per replica (limits and key from the config)."""

    def __init__(self, embedder, partitions: list, reranker, info: dict[str, Any], config: dict[str, Any],
                 key_digest: str | None):
        self.cfg = ServeConfig(**config)
        self.embedder = embedder
        self.partitions = list(partitions)
        self.reranker = reranker
        self._info = info
        self.key_digest = key_digest

    def __serve_build_asgi_app__(self):
        from .api import create_api

        return create_api(self, self.cfg.limits, self.key_digest)

    # ---- backend interface used by api.create_api
    @property
    def can_rerank(self) -> bool:
        return self.reranker is not None

    async def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    async def info(self) -> dict[str, Any]:
        return self._info

    async def _embed(self, items: list[Item]) -> list[np.ndarray]:
        from .api import RequestError

        outcomes = await self.embedder.embed.remote(items)
        vectors = []
        for i, (kind, value) in enumerate(outcomes):
            where = "query" if len(items) == 1 else f"items[{i}]"
            if kind == INVALID:
                raise RequestError(422, f"{where} cannot be embedded: {value}")
            if kind != OK:
                raise RuntimeError(f"embedder failed on {where}: {value}")
            vectors.append(value)
        return vectors

    async def embed_items(self, items: list[Item]) -> dict[str, Any]:
        vectors = await self._embed(items)
        return {"model": self._info["embedder"]["model"], "dim": int(len(vectors[0])),
                "embeddings": [np.asarray(v, dtype=np.float32).tolist() for v in vectors]}

    async def search(self, item: Item, top_k: int, n_rerank: int, include_image: bool) -> dict[str, Any]:
        from .api import rerank_order

        t0 = time.perf_counter()
        [vector] = await self._embed([item])
        t1 = time.perf_counter()
        k = max(top_k, n_rerank)
        with_image = include_image or n_rerank > 0
        found = await asyncio.gather(*[p.search.remote(vector, k, with_image) for p in self.partitions])
        rows = sorted((r for part in found for r in part), key=lambda r: (-r["score"], r["position"]))[:k]
        for i, r in enumerate(rows):
            r["embed_rank"] = i + 1
        t2 = time.perf_counter()
        timings = {"embed": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3}
        reranked = False
        if n_rerank and rows:
            head = rows[:n_rerank]
            scorable = [i for i, r in enumerate(head) if not r.get("image_error")]
            cands = [Item(text=head[i].get("text") or "", instruction=head[i].get("instruction") or "",
                          image=head[i].get("image") or None) for i in scorable]
            outcomes = await self.reranker.score.remote(item, cands)
            scores: list[float | None] = [None] * len(head)
            for i, (s, err) in zip(scorable, outcomes):
                scores[i] = s
                if err:
                    head[i]["rerank_error"] = err
            for i, r in enumerate(head):
                r["rerank_score"] = scores[i]
            rows = [head[i] for i in rerank_order(len(head), scores)] + rows[n_rerank:]
            reranked = True
            timings["rerank"] = (time.perf_counter() - t2) * 1e3
        import base64

        hits = []
        for rank, r in enumerate(rows[:top_k], start=1):
            image = r.get("image")
            hits.append({"rank": rank, "id": r["id"], "score": r["score"], "rerank_score": r.get("rerank_score"),
                         "embed_rank": r["embed_rank"], "task": r.get("task"), "instruction": r.get("instruction"),
                         "text": r.get("text"), "image_path": r.get("image_path"),
                         "has_image": bool(image or r.get("image_path")),
                         "image": base64.b64encode(image).decode("ascii") if include_image and image else None})
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return {"results": hits, "reranked": reranked, "timings_ms": {k: round(v, 3) for k, v in timings.items()}}


# ------------------------------------------------------------------------------------------ builder
class AppArgs(BaseModel):
    """``args`` of the application builder (Serve config YAML / KubeRay RayService ``serveConfigV2``)."""

    model_config = ConfigDict(extra="forbid")

    index: str                         # a folder written by `unime-ray index`
    embedder: str | None = None        # default: the model recorded in the index
    reranker: str | None = None        # a Qwen2.5-VL reranker folder or hub id; None: no reranking
    config: dict[str, Any] | None = None      # ServeConfig fields (override config_file)
    config_file: str | None = None            # YAML: a ServeConfig, or a run config with a `serve:` section


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_serve_config(config: dict[str, Any] | ServeConfig | None = None,
                      config_file: str | os.PathLike | None = None) -> ServeConfig:
    """A :class:`ServeConfig` from a YAML file (a bare one, or a run config's ``serve:``) and/or a dict."""
    data: dict[str, Any] = {}
    if config_file:
        import yaml

        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping")
        data = loaded.get("serve", loaded) if "serve" in loaded else loaded
        data = data or {}
    if isinstance(config, ServeConfig):
        config = config.model_dump(exclude_unset=True)
    return ServeConfig(**_deep_merge(data, config or {}))


def build_application(index: str | os.PathLike, cfg: ServeConfig | None = None, embedder: str | None = None,
                      reranker: str | None = None) -> Application:
    """The bound Serve application for a serving index (see the module docstring)."""
    from .index import embedder_spec_from_manifest, load_manifest

    cfg = cfg or ServeConfig()
    index = str(Path(index).resolve())
    manifest = load_manifest(index)
    e = cfg.embedder
    spec = embedder_spec_from_manifest(manifest, model=embedder, input_format=e.input_format, positions=e.positions,
                                       image_resize=e.image_resize, min_pixels=e.min_pixels,
                                       max_pixels=e.max_pixels)
    if embedder is not None and str(embedder) != manifest["embedder"]["model"]:
        logger.warning("serving embedder %s, but the index was built with %s: the vectors must be comparable",
                       embedder, manifest["embedder"]["model"])
    spec_d = asdict(spec)
    spec_d["processor_backend"] = e.processor_backend if e.processor_backend != "auto" else spec.processor_backend
    key = read_api_key(cfg)
    digest = api_key_digest(key) if key else None
    image_root = cfg.image_root or manifest.get("image_root")

    embed_dep = QueryEmbedder.options(**e.deployment_options()).bind(spec_d, e.model_dump(mode="json"),
                                                                     manifest["dim"])
    parts = cfg.index.resolve_partitions(manifest["count"], manifest["index"]["num_shards"])
    partitions = []
    for p in range(parts):
        name = "CandidateIndex" if parts == 1 else f"CandidateIndex{p}"
        partitions.append(CandidateIndex.options(name=name, **cfg.index.deployment_options()).bind(
            index, p, parts, cfg.index.model_dump(mode="json"), image_root))
    rerank_dep = None
    if reranker:
        rerank_dep = RerankerDeployment.options(**cfg.reranker.deployment_options()).bind(
            str(reranker), cfg.reranker.model_dump(mode="json"))
    info = {
        "api_version": "1",
        "embedder": {"model": spec.model, "input_format": spec.input_format, "positions": spec.positions,
                     "dim": manifest["dim"]},
        "reranker": ({"model": str(reranker), "implementation": reranker_implementation(cfg.reranker.implementation)}
                     if reranker else None),
        "index": {"count": manifest["count"], "dim": manifest["dim"], "kind": manifest["index"]["kind"],
                  "shards": manifest["index"]["num_shards"], "partitions": parts, "built": manifest.get("created"),
                  "embedder_at_build": manifest["embedder"]["model"]},
        "limits": cfg.limits.model_dump(mode="json"),
        "auth": digest is not None,
    }
    return UniMEIngress.options(**cfg.ingress.deployment_options()).bind(
        embed_dep, partitions, rerank_dep, info, cfg.model_dump(mode="json"), digest)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run/deploy`` and KubeRay: ``args`` as in :class:`AppArgs`."""
    a = AppArgs.model_validate(dict(args or {}))
    cfg = load_serve_config(a.config, a.config_file)
    return build_application(a.index, cfg, embedder=a.embedder, reranker=a.reranker)
