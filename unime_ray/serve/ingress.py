"""The HTTP front of the Serve application (FastAPI from :mod:`unime_ray.serve.api`) and its readiness.

The ingress gives every request a deadline (``limits.request_timeout_s``): deployment calls not answered
by then are cancelled and answered 504 naming the deployment; a deployment the request needs that has no
running replica (per ``serve.status()``, cached about a second) is answered 503 at once. ``/healthz`` is
liveness, ``/readyz`` readiness (:func:`deployment_readiness`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from ray import serve

from ..data.schema import Item
from .config import EMBEDDER_NAME, INGRESS_NAME, RERANKER_NAME, ServeConfig, index_deployment_names
from .deployments import INVALID, OK

logger = logging.getLogger(__name__)

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

    @property
    def reranker_model(self) -> str:
        return str((self._info.get("reranker") or {}).get("model") or self.reranker_name)

    async def rerank(self, query: Item, documents: list[Item]) -> list[tuple[float | None, str | None]]:
        """(P(Yes) or None, error or None) per document, from the reranker deployment (pairwise)."""
        deadline = self._deadline()
        await self._ensure_ready([self.reranker_name])
        [outcomes] = await self._await_all([(self.reranker_name, self.reranker.score.remote(query, documents))],
                                           deadline)
        return outcomes

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
