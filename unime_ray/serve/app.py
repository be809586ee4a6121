"""The Ray Serve application: HTTP ingress -> query embedder -> index partitions -> reranker.

Deployments: ``UniMEIngress`` (:mod:`.ingress`), ``QueryEmbedder``, ``CandidateIndex`` (or
``CandidateIndex0..N-1`` when partitioned) and ``Reranker`` (optional) (:mod:`.deployments`). Resource
requests are fitted to the cluster (:func:`fit_to_cluster`, ``serve.fit``) when the application is built.

:func:`build_app` is the application builder named by ``serve_config.yaml``
(``import_path: unime_ray.serve.app:build_app``); it takes ``args`` = {index, embedder, reranker, config,
config_file} (see :class:`AppArgs`). :func:`build_application` is the same for Python callers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from ray.serve import Application

from ..utils.settings import deep_merge
from .config import (ClusterCapacity, RerankerSettings, ResourceLayout, ServeConfig, api_key_digest, fit_resources,
                     read_api_key)
from .deployments import CandidateIndex, QueryEmbedder, RerankerDeployment, reranker_implementation
from .ingress import UniMEIngress

logger = logging.getLogger(__name__)


class AppArgs(BaseModel):
    """``args`` of the application builder (Serve config YAML / KubeRay RayService ``serveConfigV2``)."""

    model_config = ConfigDict(extra="forbid")

    index: str                         # a folder written by `unime-ray index`
    embedder: str | None = None        # default: the model recorded in the index
    reranker: str | None = None        # a Qwen2.5-VL reranker folder or hub id; None: no reranking
    config: dict[str, Any] | None = None      # ServeConfig fields (override config_file)
    config_file: str | None = None            # YAML: a ServeConfig, or a run config with a `serve:` section


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
    return ServeConfig(**deep_merge(data, config or {}))


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
