"""The Ray Serve application: HTTP ingress -> query embedder -> index partitions -> reranker.

Deployments (each one's replicas, resources and autoscaling from :class:`~unime_ray.serve.config.ServeConfig`):

* ``UniMEIngress``: FastAPI (:mod:`unime_ray.serve.api`): validation, auth, limits, merging, reranking order.
* ``QueryEmbedder``: the embedder, ``@serve.batch``-ed: concurrent queries share one forward.
* ``CandidateIndex`` (or ``CandidateIndex0..N-1`` when partitioned): FAISS search + candidate metadata.
* ``Reranker`` (optional): pairwise P(Yes) scores, ``@serve.batch``-ed over search requests.

The ingress gives every request a deadline (``limits.request_timeout_s``): deployment calls not answered
by then are cancelled and answered 504 naming the deployment; a deployment the request needs that has no
running replica (per ``serve.status()``, cached about a second) is answered 503 at once. ``/healthz`` is
liveness, ``/readyz`` readiness (:func:`deployment_readiness`). Resource requests are fitted to the cluster
(:func:`fit_to_cluster`, ``serve.fit``) when the application is built.

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
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application

from ..data.schema import Item

if TYPE_CHECKING:
    from ..judge.stage import YesNoScorer
from .config import (EMBEDDER_NAME, INDEX_NAME, INGRESS_NAME, RERANKER_NAME, ClusterCapacity, EmbedderSettings,
                     IndexSettings, RerankerSettings, ResourceLayout, ServeConfig, api_key_digest, fit_resources,
                     index_deployment_names, read_api_key)

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


# ------------------------------------------------------------------------------------------ readiness
READY_TTL_S = 1.0          # a cached deployment status older than this is re-read before answering "not ready"
READY_TRUST_S = 15.0       # a cached "ready" is used this long (re-read in the background after READY_TTL_S)
STATUS_TIMEOUT_S = 5.0     # reading the status from the Serve controller


def _enum_value(x: Any) -> str:
    return str(getattr(x, "value", x))


def deployment_readiness(app_status, roles: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per deployment of ``roles`` ({name: role}): role, status, replica counts by state, ready, message.

    ``app_status``: the application's ``serve.status()`` entry (None: the application does not exist). A
    deployment is ready with at least one RUNNING replica (or when healthy and scaled to zero replicas);
    one missing from the status, or with replicas that are all starting/pending, is not.
    """
    deps = getattr(app_status, "deployments", None) or {}
    out: dict[str, dict[str, Any]] = {}
    for name, role in roles.items():
        d = deps.get(name)
        if d is None:
            out[name] = {"role": role, "status": "MISSING", "replicas": {}, "ready": False,
                         "message": "the deployment is not part of the running application"}
            continue
        status = _enum_value(d.status)
        replicas = {_enum_value(k): int(v) for k, v in (d.replica_states or {}).items() if v}
        ready = replicas.get("RUNNING", 0) > 0 or (status == "HEALTHY" and not replicas)
        out[name] = {"role": role, "status": status, "replicas": replicas, "ready": ready,
                     "message": d.message or ""}
    return out


def not_ready_message(names: list[str], states: dict[str, dict[str, Any]], advice: bool = True) -> str:
    parts = []
    for n in names:
        st = states[n]
        reps = ", ".join(f"{k}: {v}" for k, v in st["replicas"].items()) or "no replicas"
        msg = f" - {st['message'][:300]}" if st["message"] else ""
        parts.append(f"{n} ({st['role']}) is not ready: {st['status']}, {reps}{msg}")
    return "; ".join(parts) + (". Retry later; GET /readyz shows the deployments' state" if advice else "")


# ------------------------------------------------------------------------------------------ ingress
@serve.deployment(name=INGRESS_NAME)
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
        self.timeout_s = self.cfg.limits.request_timeout_s
        n = len(self.partitions)
        self.embedder_name = _deployment_name(embedder, EMBEDDER_NAME)
        self.partition_names = [_deployment_name(h, d) for h, d in zip(self.partitions, index_deployment_names(n))]
        self.reranker_name = _deployment_name(reranker, RERANKER_NAME) if reranker is not None else None
        self.roles = {self.embedder_name: "embedder"}
        self.roles.update({name: "index" if n == 1 else f"index partition {i + 1}/{n}"
                           for i, name in enumerate(self.partition_names)})
        if self.reranker_name:
            self.roles[self.reranker_name] = "reranker"
        try:
            self.app_name = serve.get_replica_context().app_name
        except Exception:  # outside a replica (unit use)
            self.app_name = getattr(embedder, "app_name", None) or self.cfg.app_name
        self._states_cache: tuple[float, dict[str, Any] | None] = (-1e9, None)
        self._states_lock: asyncio.Lock | None = None
        self._background: set = set()

    def __serve_build_asgi_app__(self):
        from .api import create_api

        return create_api(self, self.cfg.limits, self.key_digest)

    # ---- backend interface used by api.create_api
    @property
    def can_rerank(self) -> bool:
        return self.reranker is not None

    @property
    def rerank_withheld(self) -> str | None:
        """Why the configured reranker is not used (its validation), or None."""
        return self._info.get("reranker_not_used")

    async def health(self) -> dict[str, Any]:
        """Liveness: this process answers (the other deployments are ``readiness``)."""
        return {"status": "ok"}

    async def info(self) -> dict[str, Any]:
        return self._info

    # ---- readiness and deadlines
    async def _states(self, max_age: float) -> dict[str, Any] | None:
        """The deployments' readiness from ``serve.status()``, cached ``max_age`` s; None when unreadable."""
        if self._states_lock is None:
            self._states_lock = asyncio.Lock()
        async with self._states_lock:   # one controller call at a time; waiters reuse its answer
            t, states = self._states_cache
            if time.monotonic() - t <= max_age:
                return states
            try:
                st = await asyncio.wait_for(asyncio.to_thread(serve.status), STATUS_TIMEOUT_S)
                states = deployment_readiness(st.applications.get(self.app_name), self.roles)
            except Exception as exc:  # the controller is busy or gone: unknown, not "not ready"
                logger.warning("cannot read the deployments' status: %s: %s", type(exc).__name__, exc)
                states = None
            self._states_cache = (time.monotonic(), states)
            return states

    async def readiness(self) -> dict[str, Any]:
        states = await self._states(READY_TTL_S)
        if states is None:
            return {"status": "unknown", "ready": False, "not_ready": list(self.roles), "deployments": {},
                    "message": "the deployments' status cannot be read from the Serve controller"}
        not_ready = [n for n, st in states.items() if not st["ready"]]
        return {"status": "not ready" if not_ready else "ready", "ready": not not_ready, "not_ready": not_ready,
                "deployments": states,
                "message": not_ready_message(not_ready, states) if not_ready else "all deployments are ready"}

    async def _ensure_ready(self, names: list[str]) -> None:
        """503 at once when a deployment the request needs has no running replica (instead of queueing)."""
        from .api import RequestError

        t, cached = self._states_cache
        age = time.monotonic() - t
        if cached is not None and age <= READY_TRUST_S and all(cached[n]["ready"] for n in names):
            if age > READY_TTL_S and not (self._states_lock and self._states_lock.locked()):
                task = asyncio.ensure_future(self._states(READY_TTL_S))   # refresh off the request's path
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return
        states = await self._states(READY_TTL_S)
        if states is None:
            return      # unknown: the request deadline still bounds the wait
        bad = [n for n in names if not states[n]["ready"]]
        if bad:
            raise RequestError(503, not_ready_message(bad, states))

    def _deadline(self) -> float | None:
        return None if self.timeout_s is None else time.monotonic() + self.timeout_s

    async def _await_all(self, calls: list[tuple[str, Any]], deadline: float | None) -> list[Any]:
        """Results of deployment calls [(deployment name, DeploymentResponse)] by ``deadline``, or 504 naming
        the deployments that did not answer (their requests are cancelled)."""
        from .api import RequestError

        async def resolve(response):
            return await response

        tasks = [asyncio.ensure_future(resolve(r)) for _, r in calls]
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            _, pending = await asyncio.wait(tasks, timeout=timeout)
        except asyncio.CancelledError:   # the client went away: stop the work it asked for
            pending = set(tasks)
            self._cancel(calls, tasks, pending)
            raise
        if pending:
            self._cancel(calls, tasks, pending)
            late = [name for (name, _), task in zip(calls, tasks) if task in pending]
            raise RequestError(504, f"{', '.join(f'{n} ({self.roles.get(n, n)})' for n in late)} did not answer "
                                    f"within the request deadline of {self.timeout_s:g} s "
                                    "(limits.request_timeout_s)")
        return [task.result() for task in tasks]

    @staticmethod
    def _cancel(calls, tasks, pending) -> None:
        for (_, response), task in zip(calls, tasks):
            if task in pending:
                task.cancel()
                try:
                    response.cancel()
                except Exception:  # best effort
                    pass

    async def _embed(self, items: list[Item], deadline: float | None = None, checked: bool = False
                     ) -> list[np.ndarray]:
        from .api import RequestError

        if not checked:
            deadline = self._deadline()
            await self._ensure_ready([self.embedder_name])
        [outcomes] = await self._await_all([(self.embedder_name, self.embedder.embed.remote(items))], deadline)
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
        deadline = self._deadline()
        await self._ensure_ready([self.embedder_name, *self.partition_names]
                                 + ([self.reranker_name] if n_rerank and self.reranker_name else []))
        [vector] = await self._embed([item], deadline, checked=True)
        t1 = time.perf_counter()
        k = max(top_k, n_rerank)
        with_image = include_image or n_rerank > 0
        found = await self._await_all([(name, p.search.remote(vector, k, with_image))
                                       for name, p in zip(self.partition_names, self.partitions)], deadline)
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
            mode, choice = self.cfg.reranker.mode, None
            scores: list[float | None] = [None] * len(head)
            if mode == "listwise":
                [(index, raw)] = await self._await_all(
                    [(self.reranker_name, self.reranker.choose.remote(item, cands))], deadline)
                choice = scorable[index] if index is not None and 0 <= index < len(scorable) else None
            else:
                [outcomes] = await self._await_all(
                    [(self.reranker_name, self.reranker.score.remote(item, cands))], deadline)
                for i, (s, err) in zip(scorable, outcomes):
                    scores[i] = s
                    if err:
                        head[i]["rerank_error"] = err
            for i, r in enumerate(head):
                r["rerank_score"] = scores[i]
            order = rerank_order(mode, [r["score"] for r in head], scores, choice, self.cfg.reranker.fusion_weight)
            rows = [head[i] for i in order] + rows[n_rerank:]
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


def _deployment_name(handle, default: str) -> str:
    name = getattr(handle, "deployment_name", None)
    return name if isinstance(name, str) and name else default


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
        # a run config's reranker budget (models.images.reranker) serves when serve.reranker sets none
        budget = ((loaded.get("models") or {}).get("images") or {}).get("reranker") if "serve" in loaded else None
        if isinstance(budget, dict):
            from ..models.budget import ImageBudget

            b = ImageBudget(**budget)
            rr = dict(data.get("reranker") or {})
            for key, value in (("image_resize", b.resize), ("min_pixels", b.min_pixels), ("max_pixels", b.max_pixels)):
                if value is not None and rr.get(key) is None:
                    rr[key] = value
            data = {**data, "reranker": rr}
    if isinstance(config, ServeConfig):
        config = config.model_dump(exclude_unset=True)
    return ServeConfig(**_deep_merge(data, config or {}))


def cluster_capacity(can_grow: bool) -> ClusterCapacity:
    """The connected Ray cluster's CPUs/GPUs (``ray.cluster_resources()``) and its largest node."""
    import ray

    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return ClusterCapacity(cpus=float(total.get("CPU", 0.0)), gpus=float(total.get("GPU", 0.0)),
                           node_cpus=max((float(r.get("CPU", 0.0)) for r in nodes), default=None),
                           node_gpus=max((float(r.get("GPU", 0.0)) for r in nodes), default=None),
                           can_grow=can_grow)


def fit_to_cluster(index: str | os.PathLike, cfg: ServeConfig, reranker: str | None,
                   capacity: ClusterCapacity) -> tuple[ServeConfig, ResourceLayout]:
    """:func:`~unime_ray.serve.config.fit_resources` for this index (its partitions) and reranker choice."""
    from .index import load_manifest

    manifest = load_manifest(index)
    parts = cfg.index.resolve_partitions(manifest["count"], manifest["index"]["num_shards"])
    return fit_resources(cfg, capacity, partitions=parts, with_reranker=bool(reranker))


def build_application(index: str | os.PathLike, cfg: ServeConfig | None = None, embedder: str | None = None,
                      reranker: str | None = None, capacity: ClusterCapacity | None = None,
                      fit: bool = True) -> Application:
    """The bound Serve application for a serving index (see the module docstring).

    ``fit``: size the deployments' resources to the cluster per ``cfg.fit`` (``capacity``; None: read from
    the connected Ray, a cluster that may grow unless ``cluster_autoscales: false``; no Ray: no fitting).
    Raises :class:`~unime_ray.serve.config.ResourceFitError` when the requests cannot fit.
    """
    from .index import embedder_spec_from_manifest, load_manifest

    cfg = cfg or ServeConfig()
    index = str(Path(index).resolve())
    manifest = load_manifest(index)
    if fit and cfg.fit != "off":
        import ray

        if capacity is None and ray.is_initialized():
            capacity = cluster_capacity(cfg.cluster_autoscales if cfg.cluster_autoscales is not None else True)
        if capacity is not None:
            cfg, layout = fit_to_cluster(index, cfg, reranker, capacity)
            (logger.info if layout.fits and layout.scaled_by is None else logger.warning)("%s", layout.line())
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
    plan = rerank_plan(reranker, cfg.reranker) if reranker else None
    if plan is not None and not plan["use"]:
        logger.warning("serving without the reranker: %s", plan["reason"])
        reranker = None
    if reranker:
        rerank_dep = RerankerDeployment.options(**cfg.reranker.deployment_options()).bind(
            str(reranker), cfg.reranker.model_dump(mode="json"))
        cfg = cfg.model_copy(update={"reranker": cfg.reranker.model_copy(
            update={"mode": plan["mode"], "fusion_weight": plan["weight"]})})
    info = {
        "api_version": "1",
        "embedder": {"model": spec.model, "input_format": spec.input_format, "positions": spec.positions,
                     "dim": manifest["dim"]},
        "reranker": ({"model": str(reranker), "implementation": reranker_implementation(cfg.reranker.implementation),
                      "mode": plan["mode"], "fusion_weight": plan["weight"], "validation": plan["reason"]}
                     if reranker else None),
        "reranker_not_used": plan["reason"] if plan is not None and not plan["use"] else None,
        "index": {"count": manifest["count"], "dim": manifest["dim"], "kind": manifest["index"]["kind"],
                  "shards": manifest["index"]["num_shards"], "partitions": parts, "built": manifest.get("created"),
                  "embedder_at_build": manifest["embedder"]["model"]},
        "limits": cfg.limits.model_dump(mode="json"),
        "auth": digest is not None,
    }
    return UniMEIngress.options(**cfg.ingress.deployment_options()).bind(
        embed_dep, partitions, rerank_dep, info, cfg.model_dump(mode="json"), digest)


def wait_until_ready(app_name: str, report=print, report_every_s: float = 30.0, poll_s: float = 0.5,
                     timeout_s: float | None = None) -> dict[str, Any]:
    """Wait for the application to be RUNNING; every ``report_every_s`` report the deployments not ready yet
    (status, replicas, Serve's message: e.g. replicas that cannot be scheduled). Returns the last status;
    raises RuntimeError when the deployment fails, TimeoutError after ``timeout_s``."""
    start = last = time.monotonic()
    while True:
        app = serve.status().applications.get(app_name)
        status = _enum_value(app.status) if app is not None else "MISSING"
        if status == "RUNNING":
            return {"status": status}
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"deploying {app_name} failed: {app.message}")
        now = time.monotonic()
        if now - last >= report_every_s and app is not None:
            last = now
            roles = {n: n for n in app.deployments}
            states = deployment_readiness(app, roles)
            waiting = [n for n, st in states.items() if not st["ready"]]
            if waiting:
                report(f"still starting after {now - start:.0f} s: "
                       f"{not_ready_message(waiting, states, advice=False)}")
        if timeout_s is not None and now - start > timeout_s:
            raise TimeoutError(f"{app_name} was not ready after {timeout_s:g} s")
        time.sleep(poll_s)


def rerank_plan(reranker: str | os.PathLike, settings: RerankerSettings) -> dict[str, Any]:
    """Whether and how to serve ``reranker``: ``{"use", "mode", "weight", "reason"}`` from its folder's
    validation (``rerank_validation.json``: what the pipeline's eval measured on the dev split) and the settings."""
    import json

    from ..eval.guard import VALIDATION_FILE

    path = Path(str(reranker)) / VALIDATION_FILE
    val = json.loads(path.read_text()) if path.is_file() else None
    mode = settings.mode if settings.mode != "auto" else (val or {}).get("mode", "pairwise")
    weight = settings.fusion_weight if settings.fusion_weight is not None else (val or {}).get("weight")
    weight = 0.5 if weight is None else float(weight)
    if val is None:
        reason = f"{reranker} records no validation against the embedder alone ({VALIDATION_FILE})"
        use = not settings.require_validation
    else:
        reason = str(val.get("reason", ""))
        use = bool(val.get("used")) or not settings.require_validation
        if val.get("used") and mode != val.get("mode"):
            reason += f" (validated in {val.get('mode')} mode; serving {mode})"
    if not use:
        reason += "; set reranker.require_validation: false to serve it anyway"
    return {"use": use, "mode": mode, "weight": weight, "reason": reason}


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run/deploy`` and KubeRay: ``args`` as in :class:`AppArgs`."""
    a = AppArgs.model_validate(dict(args or {}))
    cfg = load_serve_config(a.config, a.config_file)
    return build_application(a.index, cfg, embedder=a.embedder, reranker=a.reranker)
