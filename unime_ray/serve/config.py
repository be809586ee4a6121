"""Typed settings of the serving application (the run config's ``serve:`` section).

Imports only pydantic and the standard library, so the run config can embed :class:`ServeConfig` without
pulling in Ray or torch. Every deployment's replicas, resources and autoscaling come from here; unknown
keys are errors (``extra="forbid"``).

Example (YAML)::

    serve:
      host: 127.0.0.1          # loopback by default; expose deliberately, and with an API key
      port: 8000
      api_key_env: UNIME_API_KEY
      limits: {max_body_bytes: 16777216, max_top_k: 100}
      embedder: {num_cpus: 1, max_batch_size: 16, batch_wait_timeout_s: 0.005}
      reranker: {num_gpus: 1, autoscaling: {min_replicas: 1, max_replicas: 4}}
      index: {partitions: auto, max_vectors_per_partition: 2000000}
      fit: auto                # auto | strict | off (below)
      cluster_autoscales: null # null: a cluster joined by address may grow; the local Ray of `serve` cannot

Resource fitting (``fit``), checked where the application is built against ``ray.cluster_resources()``:
the deployments' CPU/GPU requests (per replica x replicas, ``min_replicas`` under autoscaling, x partitions
for the index) are added up and compared with the cluster's totals (and each replica with the largest node).

* ``auto`` (default): a layout that fits is kept. One that does not fit has the CPU requests the user did
  not set (defaults) scaled down together, to fractions of a CPU, until it fits; requests set explicitly
  are never changed, and when they alone cannot fit the start is refused with the numbers (requested vs
  available). On a cluster that can grow (``cluster_autoscales``), nothing is scaled and a misfit is only
  a warning: the autoscaler is expected to add nodes.
* ``strict``: nothing is changed, and any misfit is refused, autoscaling cluster or not.
* ``off``: no check (deployments that never fit stay pending; ``/readyz`` and 503 answers show them).

The layout chosen is printed/logged as one line: each deployment's CPUs/GPUs x replicas, total vs available.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ..utils.settings import Section


class AutoscalingSettings(Section):
    """A subset of Ray Serve's ``autoscaling_config`` (names and meanings as in Ray)."""

    min_replicas: int = Field(default=1, ge=0, description="replicas kept however idle")
    max_replicas: int = Field(default=2, ge=1, description="replicas it may grow to")
    initial_replicas: int | None = Field(default=None, ge=0, description="replicas at start; null: min_replicas")
    target_ongoing_requests: float = Field(default=2.0, gt=0, description="requests per replica the scaling aims "
                                           "for")
    upscale_delay_s: float = Field(default=30.0, ge=0, description="seconds the load stays above target before "
                                   "replicas are added")
    downscale_delay_s: float = Field(default=600.0, ge=0, description="seconds the load stays below target "
                                     "before replicas are removed")
    metrics_interval_s: float = Field(default=10.0, gt=0, description="seconds between the replicas' load "
                                      "reports")
    look_back_period_s: float = Field(default=30.0, gt=0, description="seconds of load averaged for a decision")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class DeploymentSettings(Section):
    """Replicas and resources of one deployment. ``autoscaling`` set: ``num_replicas`` is ignored."""

    num_replicas: int = Field(default=1, ge=1, description="replicas (without autoscaling)")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs each replica reserves")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs each replica reserves (fractions share one)")
    autoscaling: AutoscalingSettings | None = Field(default=None, description="Ray Serve autoscaling; null: "
                                                    "num_replicas, fixed")
    max_ongoing_requests: int | None = Field(default=None, ge=1, description="requests one replica works on at "
                                             "once; null: a default suited to the deployment")
    max_queued_requests: int = Field(default=-1, ge=-1, description="requests queued by callers before they get "
                                     "back-pressure errors; -1: unbounded (Ray's default)")
    graceful_shutdown_timeout_s: float | None = Field(default=None, ge=0, description="seconds a stopping replica "
                                                      "may finish its requests before it is killed; null: Ray's "
                                                      "default (20 s)")

    def default_max_ongoing(self) -> int:
        return 100

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options(...)``."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests or self.default_max_ongoing(),
            "max_queued_requests": self.max_queued_requests,
        }
        if self.graceful_shutdown_timeout_s is not None:
            opts["graceful_shutdown_timeout_s"] = self.graceful_shutdown_timeout_s
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class IngressSettings(DeploymentSettings):
    """The FastAPI ingress: async, I/O bound (awaits the other deployments)."""

    num_cpus: float = Field(default=0.25, ge=0, description="CPUs each replica reserves")
    max_ongoing_requests: int | None = Field(default=256, ge=1, description="requests one replica works on at "
                                             "once")


class _ModelSettings(DeploymentSettings):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description="the model's "
                                                                     "dtype; auto: the index's (embedder), else "
                                                                     "bfloat16 on GPU, float32 on CPU")
    device: str | None = Field(default=None, description="torch device; null: cuda when the replica sees a GPU, "
                               "else cpu")
    torch_threads: int | None = Field(default=None, ge=1, description="torch threads of a replica; null: Ray's "
                                      "OMP_NUM_THREADS for the replica")
    max_batch_size: int = Field(default=16, ge=1, description="queries batched into one forward")
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, description="seconds a batch waits to fill before it "
                                        "runs")

    def default_max_ongoing(self) -> int:
        # A replica must hold at least a full batch of requests, or batches never fill.
        return max(2 * self.max_batch_size, 8)


class EmbedderSettings(_ModelSettings):
    """The query embedder (batched with ``@serve.batch``: one forward per batch of queries).

    The image/format options default to what the index was built with (recorded in its ``index.json``):
    queries must be embedded the way the candidates were.
    """

    input_format: Literal["official", "chat"] | None = Field(default=None, description="text format (as "
                                                             "models.input_format); null: the index's")
    positions: Literal["auto", "mrope", "sequential"] | None = Field(default=None, description="image-token "
                                                                     "positions (as models.positions); null: the "
                                                                     "index's")
    image_resize: tuple[int, int] | None = Field(default=None, description="(width, height) query images are "
                                                 "resized to first; null: the index's")
    min_pixels: int | None = Field(default=None, ge=1, description="processor's pixel floor per image; null: the "
                                   "index's")
    max_pixels: int | None = Field(default=None, ge=1, description="processor's pixel cap per image; null: the "
                                   "index's")
    processor_backend: Literal["auto", "hf", "manual"] = Field(default="auto", description="processor (as "
                                                               "models.processor_backend); auto: the index's")


class RerankerSettings(_ModelSettings):
    """The pairwise reranker; ``max_batch_size`` counts search requests, ``pair_batch_size`` pairs per forward."""

    max_batch_size: int = Field(default=4, ge=1, description="search requests batched together")
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, description="seconds a batch waits to fill before it "
                                        "runs")
    pair_batch_size: int = Field(default=32, ge=1, description="pairs per forward")
    max_pixels: int | None = Field(default=None, ge=1, description="processor's pixel cap per image (paper: "
                                   "235200 = 300*28*28); null: a run config's models.images.reranker (serve "
                                   "--config), else the checkpoint's")
    min_pixels: int | None = Field(default=None, ge=1, description="processor's pixel floor per image (paper: "
                                   "3136 = 4*28*28); null: as for max_pixels")
    image_resize: tuple[int, int] | None = Field(default=None, description="(width, height) images are resized "
                                                 "to first; null: as for max_pixels")
    implementation: Literal["auto", "rerank", "judge"] = Field(default="auto", description="auto: "
                                                               "unime_ray.rerank.Reranker when installed, else the "
                                                               "judge's TransformersJudge (same prompt)")
    mode: Literal["auto", "listwise", "pairwise", "fused"] = Field(default="auto", description="how the top hits "
                                                                   "are reordered (the rule the eval measured, "
                                                                   "rerank.inference.reorder); auto: the mode the "
                                                                   "reranker folder's validation recorded "
                                                                   "(rerank_validation.json, written by the "
                                                                   "pipeline's eval), else pairwise")
    fusion_weight: float | None = Field(default=None, ge=0, le=1, description="fused: w of (1 - w) * cosine + w * "
                                        "P(Yes); null: the recorded weight, else 0.5")
    require_validation: bool = Field(default=True, description="serve a reranker only when its folder records that "
                                     "it beat the embedder alone on the dev split")


class IndexSettings(DeploymentSettings):
    """The candidate index. Large indexes are split into ``partitions`` deployments (each a slice of the
    saved FAISS shards, searched in parallel and merged exactly); ``auto`` makes one partition per
    ``max_vectors_per_partition`` vectors, at most one per saved shard."""

    num_cpus: float = Field(default=0.5, ge=0, description="CPUs each replica reserves")
    partitions: int | Literal["auto"] = Field(default="auto", description="index deployments, each a slice of the "
                                              "saved shards; auto: one per max_vectors_per_partition vectors")
    max_vectors_per_partition: int = Field(default=5_000_000, ge=1, description="vectors per partition under "
                                           "partitions: auto")
    use_gpu: bool | None = Field(default=False, description="faiss on GPU (faiss-gpu and num_gpus > 0); null: "
                                 "when available")
    nprobe: int | None = Field(default=None, ge=1, description="IVF lists visited per query; null: as saved")
    faiss_threads: int | None = Field(default=None, ge=1, description="faiss's OpenMP threads; null: faiss's "
                                      "default")

    @model_validator(mode="after")
    def _partitions(self):
        if isinstance(self.partitions, int) and self.partitions < 1:
            raise ValueError("partitions must be >= 1 or 'auto'")
        return self

    def resolve_partitions(self, ntotal: int, num_shards: int) -> int:
        want = (math.ceil(max(ntotal, 1) / self.max_vectors_per_partition) if self.partitions == "auto"
                else self.partitions)
        return max(1, min(want, num_shards))


class LimitsConfig(Section):
    """Request limits: over a size limit -> 413; otherwise invalid -> 422 (always with a message)."""

    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="largest request body, in bytes")
    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1, description="largest image, in bytes")
    max_image_pixels: int = Field(default=4096 * 4096, ge=1, description="width * height of a decoded image")
    max_image_aspect_ratio: float = Field(default=200.0, ge=1, description="longest over shortest side; Qwen-VL's "
                                          "processors refuse more than 200")
    max_text_chars: int = Field(default=8192, ge=1, description="characters per text / instruction")
    max_top_k: int = Field(default=100, ge=1, description="largest top_k of a search")
    max_rerank_top_k: int = Field(default=50, ge=1, description="largest rerank_top_k of a search")
    max_embed_items: int = Field(default=64, ge=1, description="items per embed request")
    request_timeout_s: float | None = Field(default=30.0, gt=0, description="every request's deadline: the "
                                            "ingress answers 504 (naming the deployment) when a deployment has "
                                            "not answered by then, and 503 at once when a deployment it needs is "
                                            "not running; the HTTP proxy's own timeout is a little above it; "
                                            "null: no deadline")


class ServeConfig(Section):
    """The whole serving application: HTTP binding, API key, limits, and one block per deployment."""

    host: str = Field(default="127.0.0.1", description="address the HTTP server binds (loopback by default; "
                      "expose deliberately, and with an API key)")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port")
    app_name: str = Field(default="unime", description="the Ray Serve application's name")
    route_prefix: str = Field(default="/", description="URL path the application is served under")
    api_key_env: str | None = Field(default=None, description="Authorization: Bearer <key>, the key read from "
                                    "this environment variable (never stored here); null: no auth unless "
                                    "api_key_file")
    api_key_file: str | None = Field(default=None, description="a file holding the API key (read when "
                                     "api_key_env is unset or empty)")
    image_root: str | None = Field(default=None, description="folder of the candidates' images stored by path; "
                                   "null: the root recorded when the index was built")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    reranker: RerankerSettings = Field(default_factory=RerankerSettings)
    fit: Literal["auto", "strict", "off"] = Field(default="auto", description="sizing the deployments to the "
                                                  "cluster: auto scales default CPU requests down to fit, strict "
                                                  "refuses a misfit, off does not check")
    cluster_autoscales: bool | None = Field(default=None, description="whether the cluster can grow (a misfit "
                                            "then only warns); null: a cluster joined by address may, the local "
                                            "Ray of serve cannot")

    @model_validator(mode="after")
    def _checks(self):
        if not self.route_prefix.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        if self.api_key_env is not None and not self.api_key_env.strip():
            raise ValueError("api_key_env must be a variable name")
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key_env or self.api_key_file)


class ApiKeyError(RuntimeError):
    """An API key was configured but cannot be read: the server refuses to start without it."""


def read_api_key(cfg: ServeConfig) -> str | None:
    """The configured API key (env var first, then file), None when auth is off; fails closed."""
    if not cfg.auth_enabled:
        return None
    if cfg.api_key_env:
        value = os.environ.get(cfg.api_key_env, "").strip()
        if value:
            return value
        if not cfg.api_key_file:
            raise ApiKeyError(f"api_key_env is {cfg.api_key_env!r} but that environment variable is unset or empty")
    path = Path(os.path.expanduser(cfg.api_key_file or ""))
    if not path.is_file():
        raise ApiKeyError(f"api_key_file {str(path)!r} does not exist")
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise ApiKeyError(f"api_key_file {str(path)!r} is empty")
    return value


def api_key_digest(key: str) -> str:
    """What the ingress keeps: the SHA-256 of the key (the key itself never enters the Serve config)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_api_key(presented: str | None, digest: str) -> bool:
    """Constant-time comparison of a presented key against the stored digest."""
    given = api_key_digest(presented or "")
    return hmac.compare_digest(given.encode("ascii"), digest.encode("ascii")) and bool(presented)


# ------------------------------------------------------------------------------------------ resource fitting
# Deployment names (the Serve application's; app.py uses these).
INGRESS_NAME, EMBEDDER_NAME, INDEX_NAME, RERANKER_NAME = "UniMEIngress", "QueryEmbedder", "CandidateIndex", "Reranker"


def index_deployment_names(partitions: int) -> list[str]:
    return [INDEX_NAME] if partitions == 1 else [f"{INDEX_NAME}{p}" for p in range(partitions)]


class ResourceFitError(ValueError):
    """The deployments' explicit resource requests cannot fit the cluster (message: requested vs available)."""


@dataclass(frozen=True)
class ClusterCapacity:
    """What the Ray cluster has: totals, the largest node (None: unknown), and whether it can grow."""

    cpus: float
    gpus: float = 0.0
    node_cpus: float | None = None
    node_gpus: float | None = None
    can_grow: bool = False


@dataclass(frozen=True)
class DeploymentDemand:
    """One deployment's request: per replica, times ``replicas`` (x ``copies``: index partitions)."""

    name: str
    section: str                # the ServeConfig field: ingress / embedder / index / reranker
    num_cpus: float
    num_gpus: float
    replicas: int
    copies: int = 1
    explicit_cpus: bool = False
    explicit_gpus: bool = False

    @property
    def total_cpus(self) -> float:
        return self.num_cpus * self.replicas * self.copies

    @property
    def total_gpus(self) -> float:
        return self.num_gpus * self.replicas * self.copies

    def describe(self) -> str:
        s = f"{self.name} {self.num_cpus:g} CPU"
        if self.num_gpus:
            s += f" + {self.num_gpus:g} GPU"
        s += f" x{self.replicas}"
        if self.copies > 1:
            s += f" x{self.copies} partitions"
        return s


@dataclass
class ResourceLayout:
    """The deployments' requests against the cluster; ``line()`` is the one-line summary printed at start."""

    demands: list[DeploymentDemand]
    capacity: ClusterCapacity
    mode: str
    problems: list[str] = field(default_factory=list)
    scaled_by: float | None = None      # factor applied to the default CPU requests (None: unchanged)

    @property
    def total_cpus(self) -> float:
        return round(sum(d.total_cpus for d in self.demands), 6)

    @property
    def total_gpus(self) -> float:
        return round(sum(d.total_gpus for d in self.demands), 6)

    @property
    def fits(self) -> bool:
        return not self.problems

    def line(self) -> str:
        c = self.capacity
        s = (f"resources: {', '.join(d.describe() for d in self.demands)} = {self.total_cpus:g} CPUs, "
             f"{self.total_gpus:g} GPUs of {c.cpus:g} CPUs, {c.gpus:g} GPUs in the cluster")
        if self.scaled_by is not None:
            s += f" (default CPU requests scaled x{self.scaled_by:.2f} to fit)"
        if self.problems:
            s += " - DOES NOT FIT: " + "; ".join(self.problems)
            if c.can_grow and self.mode == "auto":
                s += " (waiting for the cluster to grow)"
        return s


def _replicas(s: DeploymentSettings) -> int:
    """Replicas needed to serve: num_replicas, or under autoscaling the initial/min count (at least one)."""
    if s.autoscaling is None:
        return s.num_replicas
    a = s.autoscaling
    return max(1, a.initial_replicas if a.initial_replicas is not None else a.min_replicas)


def resource_demands(cfg: ServeConfig, partitions: int = 1, with_reranker: bool = False) -> list[DeploymentDemand]:
    """Each deployment's request, marking which resources the user set (vs defaults)."""
    sections = [(INGRESS_NAME, "ingress", 1), (EMBEDDER_NAME, "embedder", 1), (INDEX_NAME, "index", partitions)]
    if with_reranker:
        sections.append((RERANKER_NAME, "reranker", 1))
    out = []
    for name, section, copies in sections:
        s: DeploymentSettings = getattr(cfg, section)
        out.append(DeploymentDemand(name, section, s.num_cpus, s.num_gpus, _replicas(s), copies,
                                    "num_cpus" in s.model_fields_set, "num_gpus" in s.model_fields_set))
    return out


def _problems(demands: list[DeploymentDemand], cap: ClusterCapacity) -> list[str]:
    out = []
    cpus = sum(d.total_cpus for d in demands)
    gpus = sum(d.total_gpus for d in demands)
    if cpus > cap.cpus + 1e-9:
        out.append(f"{cpus:g} CPUs requested, {cap.cpus:g} available")
    if gpus > cap.gpus + 1e-9:
        out.append(f"{gpus:g} GPUs requested, {cap.gpus:g} available")
    for d in demands:
        if cap.node_cpus is not None and d.num_cpus > cap.node_cpus + 1e-9:
            out.append(f"{d.name} needs {d.num_cpus:g} CPUs per replica, the largest node has {cap.node_cpus:g}")
        if cap.node_gpus is not None and d.num_gpus > cap.node_gpus + 1e-9:
            out.append(f"{d.name} needs {d.num_gpus:g} GPUs per replica, the largest node has {cap.node_gpus:g}")
    return out


def _scale_default_cpus(demands: list[DeploymentDemand], cap: ClusterCapacity) -> tuple[list[DeploymentDemand], float]:
    """Default (not explicitly set) CPU requests scaled down together so the total fits (hundredths of a CPU)."""
    fixed = sum(d.total_cpus for d in demands if d.explicit_cpus)
    flexible = sum(d.total_cpus for d in demands if not d.explicit_cpus)
    budget = cap.cpus - fixed
    if flexible <= 0 or budget < 0:
        return demands, 1.0
    factor = min(1.0, budget / flexible)
    out = []
    for d in demands:
        if d.explicit_cpus:
            out.append(d)
            continue
        cpus = math.floor(d.num_cpus * factor * 100 + 1e-9) / 100
        if cap.node_cpus is not None:
            cpus = min(cpus, math.floor(cap.node_cpus * 100) / 100)
        out.append(replace(d, num_cpus=cpus))
    return out, factor


def fit_resources(cfg: ServeConfig, capacity: ClusterCapacity, partitions: int = 1,
                  with_reranker: bool = False) -> tuple[ServeConfig, ResourceLayout]:
    """The config to deploy and its layout, per ``cfg.fit`` (module docstring); pure (no Ray).

    Raises :class:`ResourceFitError` when the requests cannot fit and may not be changed (``strict``, or
    explicit requests under ``auto``), unless the cluster can grow under ``auto``.
    """
    demands = resource_demands(cfg, partitions, with_reranker)
    layout = ResourceLayout(demands, capacity, cfg.fit, _problems(demands, capacity))
    if cfg.fit == "off" or layout.fits or (cfg.fit == "auto" and capacity.can_grow):
        return cfg, layout
    if cfg.fit == "auto":
        scaled, factor = _scale_default_cpus(demands, capacity)
        trial = ResourceLayout(scaled, capacity, cfg.fit, _problems(scaled, capacity), scaled_by=factor)
        if trial.fits:
            updates = {}
            for d in scaled:
                settings = getattr(cfg, d.section)
                if d.num_cpus != settings.num_cpus:
                    updates[d.section] = settings.model_copy(update={"num_cpus": d.num_cpus})
            return cfg.model_copy(update=updates), trial
        layout = trial
    explicit = [d.name for d in layout.demands if d.explicit_cpus or d.explicit_gpus]
    hint = (f"lower the requests set for {', '.join(explicit)}" if explicit else "lower the requests")
    raise ResourceFitError(
        f"the serving deployments do not fit the Ray cluster: {'; '.join(layout.problems)} "
        f"[{', '.join(d.describe() for d in layout.demands)}]. Either {hint}, give Ray more resources "
        f"(--num-cpus, a bigger cluster), or set serve.fit: off (or cluster_autoscales: true on a cluster "
        f"that grows) to deploy anyway")
