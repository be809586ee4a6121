"""The one place a library spec is built from a run config: the embedder, retriever and judge specs the actor
pools rebuild their models from, and the trainer's job for a config section."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .results import JudgeFitResult, TrainStageResult
from .stage import Context

# What the builders below read of the run config (a stage that calls one lists these in its reads)
EMBEDDER_READS = ("models.embedder", "models.input_format", "models.dtype", "models.processor_backend",
                  "models.positions")
RETRIEVER_READS = (*EMBEDDER_READS, "images.retriever", "baseline.enabled", "models.retriever")
JUDGE_READS = ("judge", "models.judge", "images.judge")
TRAIN_JOB_READS = ("models.input_format", "models.positions", "seed")
# results.imported_training: whether the training pairs came already judged, and which split S1-S3 mine
IMPORTED_READS = ("mine.from_imported", "retrieve.split")

if TYPE_CHECKING:
    from ..train.config import TrainLoop
    from ..train.job import TrainJob
    from .config import RunConfig


def embedder_spec(ctx: Context, image_root: str | None, model: str | None = None, role: str = "retriever"):
    """How workers rebuild an embedder of the run: its checkpoint, input format and the image budget of ``role``
    (``retriever``: S1 embedding; ``eval``: evaluation)."""
    from ..models.encode import EmbedderSpec

    cfg = ctx.cfg
    m = cfg.models
    b = cfg.image_budget(role)
    return EmbedderSpec(model=model or cfg.model_ref(m.embedder), input_format=m.input_format, dtype=m.dtype,
                        image_root=image_root, processor_backend=m.processor_backend, image_resize=b.resize,
                        min_pixels=b.min_pixels, max_pixels=b.max_pixels, positions=m.positions)


def retriever_spec(ctx: Context, image_root: str | None):
    """The embedder of global retrieval: the trained baseline when there is one (it reads the embedder's input
    format), else models.retriever with its own input format and positions, else models.embedder."""
    from dataclasses import replace

    cfg = ctx.cfg
    if cfg.baseline.enabled:
        base = ctx.result_if_run("baseline", TrainStageResult)
        if base is None or not base.model:
            raise RuntimeError("baseline.enabled but the baseline stage has no model; run it first")
        return embedder_spec(ctx, image_root, base.model)
    r = cfg.models.retriever
    if r is None:
        return embedder_spec(ctx, image_root)
    return replace(embedder_spec(ctx, image_root, cfg.model_ref(r.model)), input_format=r.input_format,
                   positions=r.positions, adapter=cfg.model_ref(r.adapter) if r.adapter else None)


def judge_spec(ctx: Context, image_root: str | None, fitted: JudgeFitResult | None = None, fold: int | None = None):
    """The judge actors' spec: the ``judge`` section; with ``fitted``, the stand-in judge of ``fold``."""
    from ..judge.stage import JudgeSpec

    cfg, j = ctx.cfg, ctx.cfg.judge
    model = cfg.model_ref(j.model or cfg.models.judge)
    if fitted is not None:
        model = fitted.folds[str(fold)]["model"]
        j = j.model_copy(update={"backend": fitted.backend or j.backend})
    return JudgeSpec(model=model, judge=j, image_root=image_root, budget=cfg.image_budget("judge"),
                     feature_cache=fitted.feature_cache if fitted is not None else None)


def train_settings(cfg: "RunConfig", section: "TrainLoop", model: str, out_dir: Path, task: str,
                   image_root: str | None, seed: int | None = None, role: str | None = None,
                   **changes: Any) -> "TrainJob":
    """The trainer's job for one run of a config section (``changes``: an ablation's fields, validated with the
    section); the image budget is the ``task``'s role, or ``role`` (judge_fit: the judge's)."""
    from ..train.job import TrainJob

    m = cfg.models
    settings = type(section).model_validate({**section.model_dump(), **changes}) if changes else section
    return TrainJob(settings=settings, model=model, output_dir=str(out_dir), input_format=m.input_format,
                    positions=m.positions, image_root=image_root, seed=cfg.seed if seed is None else seed,
                    images=cfg.image_budget(role or ("reranker" if task == "reranker" else "embedder")))
