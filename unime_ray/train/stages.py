"""The training stages: ``baseline`` (S1's retriever with in-batch negatives), ``train`` (S4: UniME-V2),
``ablations`` (the comparison runs: extra seeds and the ablation objectives) and ``rerank`` (the reranker:
pairwise Yes/No + listwise "(i)"). Every one of them is a Ray Train run of :mod:`unime_ray.train.trainer`;
a finished run writes ``done.json`` last, so a rerun after an interruption trains only what is missing."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..stage import Context, Section, Stage, StageResult

if TYPE_CHECKING:
    from ..config import RunConfig

logger = logging.getLogger(__name__)


class TrainResult(StageResult):
    enabled: bool = True
    model: str | None = None
    steps: int | None = None
    final: dict[str, Any] = {}


def train_settings(cfg: "RunConfig", section, model: str, out_dir: Path, task: str, image_root: str | None,
                    seed: int | None = None, role: str | None = None, **changes: Any):
    from .trainer import TrainSettings

    m = cfg.models
    kwargs = {**section.settings_kwargs(), **changes}
    # the image budget: embedder training, reranker training, or (judge_fit) the judge's
    images = cfg.image_budget(role or ("reranker" if task == "reranker" else "embedder")).model_dump(mode="json")
    return TrainSettings(model=model, output_dir=str(out_dir), task=task, input_format=m.input_format,
                         positions=m.positions, image_root=image_root,
                         seed=cfg.seed if seed is None else seed, images=images, **kwargs)


def _done(out_dir: Path) -> dict[str, Any] | None:
    """A finished training run's summary (written last), so a rerun of a multi-model stage skips it."""
    f = out_dir / "done.json"
    return json.loads(f.read_text()) if f.is_file() else None


def train_once(train_fn, table: str, settings, name: str) -> dict[str, Any]:
    out_dir = Path(settings.output_dir)
    done = _done(out_dir)
    if done:
        logger.info("%s: already trained (%s)", name, done["model"])
        return done
    out = train_fn(table, settings, name=name)
    out = {k: v for k, v in out.items() if k != "checkpoint"} | {"checkpoint": str(out.get("checkpoint"))}
    (out_dir / "done.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def run_baseline(ctx: Context) -> dict[str, Any]:
    """The retriever of global retrieval trained with in-batch negatives (VLM2Vec's role in the paper)."""
    from .embedder import train_embedder

    cfg = ctx.cfg
    if not cfg.baseline.enabled:
        return {"enabled": False}
    prepared = ctx.outputs("prepare")
    settings = train_settings(cfg, cfg.baseline, cfg.model_ref(cfg.models.embedder), ctx.dir,
                               "embedder", prepared.get("image_root"))
    ctx.init_ray()
    out = train_once(train_embedder, prepared["tables"]["train_pairs"]["path"], settings, "baseline")
    logger.info("baseline: %d steps, final loss %.4f", out["steps"], out["final"].get("loss", float("nan")))
    return {"enabled": True, **out, "visual_tokens": ctx.visual_tokens(embedder=out.get("visual_tokens"))}


def _embedder_init(ctx: Context) -> str:
    cfg = ctx.cfg
    if cfg.train.init == "baseline":
        base = ctx.optional("baseline")
        if not base.get("model"):
            raise ValueError("train.init: baseline needs baseline.enabled: true (and its stage run)")
        return base["model"]
    return cfg.model_ref(cfg.models.embedder)


def _check_imported_negatives(mined: dict[str, Any], k: int) -> None:
    """An imported table is trained as it is: every row needs the k negatives that training takes."""
    if mined.get("imported") and mined.get("min_negatives", k) < k:
        raise ValueError(f"the imported training table has rows with {mined['min_negatives']} negatives; "
                         f"train.num_negatives is {k} (lower it, or set mine.from_imported: remine)")


def run_train(ctx: Context) -> dict[str, Any]:
    from .embedder import train_embedder

    cfg = ctx.cfg
    mined, prepared = ctx.outputs("mine"), ctx.outputs("prepare")
    _check_imported_negatives(mined, cfg.train.num_negatives)
    settings = train_settings(cfg, cfg.train, _embedder_init(ctx), ctx.dir, "embedder",
                               prepared.get("image_root"))
    ctx.init_ray()
    out = train_once(train_embedder, mined["training_table"], settings, cfg.name)
    logger.info("train: %d steps, final loss %.4f, model at %s", out["steps"], out["final"].get("loss", float("nan")),
                out["model"])
    return {**out, "visual_tokens": ctx.visual_tokens(embedder=out.get("visual_tokens"))}


def variant_runs(cfg: RunConfig) -> list[tuple[str, int, dict[str, Any]]]:
    """(variant name, seed, changes to the train section) of every comparison run, UniME-V2 first."""
    seeds = cfg.compare.seeds if cfg.compare.seeds is not None else [cfg.seed]
    runs = [("unime-v2", seed, {}) for seed in seeds]
    for ab in cfg.compare.ablations:
        changes: dict[str, Any] = {"objective": ab.objective}
        if ab.num_negatives is not None:
            changes["num_negatives"] = ab.num_negatives
        runs += [(ab.name, seed, changes) for seed in (ab.seeds or seeds)]
    return runs


def run_ablations(ctx: Context) -> dict[str, Any]:
    """The comparison runs: UniME-V2 over the extra seeds and each ablation, from the same initial weights,
    on the same mined table and for the same number of steps as the main run. Each finished run is kept, so
    a rerun after an interruption trains only what is missing."""
    from .embedder import train_embedder

    cfg = ctx.cfg
    mined, prepared, main = ctx.outputs("mine"), ctx.outputs("prepare"), ctx.outputs("train")
    init = _embedder_init(ctx)
    variants: dict[str, dict[str, Any]] = {}
    tallies = []
    for name, seed, changes in variant_runs(cfg):
        if name == "unime-v2" and seed == cfg.seed:
            out = main
        else:
            _check_imported_negatives(mined, changes.get("num_negatives", cfg.train.num_negatives))
            settings = train_settings(cfg, cfg.train, init, ctx.dir / f"{name}-seed{seed}",
                                       "embedder", prepared.get("image_root"), seed=seed, **changes)
            ctx.init_ray()
            out = train_once(train_embedder, mined["training_table"], settings, f"{name}-seed{seed}")
            tallies.append(out.get("visual_tokens"))
        variants.setdefault(name, {})[str(seed)] = {"model": out["model"], "steps": out["steps"],
                                                    "final": out["final"], "objective":
                                                    changes.get("objective", cfg.train.objective)}
    return {"variants": variants, "init": init, "visual_tokens": ctx.visual_tokens(embedder=tallies)}


def run_rerank(ctx: Context) -> dict[str, Any]:
    """Reranker training on the mined table (pairwise Yes/No + listwise "(i)")."""
    from .reranker import train_reranker

    cfg = ctx.cfg
    r = cfg.reranker
    if not r.enabled:
        return {"enabled": False}
    mined, prepared = ctx.outputs("mine"), ctx.outputs("prepare")
    init = cfg.model_ref(cfg.models.judge)
    if r.init == "fitted_judge":
        fitted = ctx.optional("judge_fit")
        if not fitted.get("enabled"):
            raise ValueError("reranker.init: fitted_judge needs judge_fit (and its stage run)")
        if fitted.get("kind") == "dual_encoder":
            raise ValueError("reranker.init: fitted_judge needs an MLLM stand-in judge (judge_fit.kind: mllm); a "
                             "dual-encoder judge has no MLLM weights to start from: set reranker.init: judge")
        init = fitted["folds"]["0"]["model"]
    settings = train_settings(cfg, r, init, ctx.dir, "reranker", prepared.get("image_root"))
    ctx.init_ray()
    out = train_once(train_reranker, mined["training_table"], settings, "reranker")
    logger.info("rerank: %d steps, final loss %.4f", out["steps"], out["final"].get("loss", float("nan")))
    return {"enabled": True, "init": init, **out, "visual_tokens": ctx.visual_tokens(reranker=out.get("visual_tokens"))}



def report_baseline(s: Section) -> list[str]:
    from ..report import markdown_table

    base = s.result
    if not base.get("enabled"):
        return []
    f = base.get("final", {})
    return ["\n## Baseline retriever training (in-batch InfoNCE)\n",
            markdown_table(["steps", "final loss", "in-batch top-1", "samples/s", "model"],
                           [[base.get("steps"), f.get("loss"), f.get("inbatch_top1"), f.get("samples_per_s"),
                             f"`{base.get('model')}`"]])]


def report_train(s: Section) -> list[str]:
    from ..report import markdown_table

    tr = s.result
    if not tr.get("model"):
        return []
    f = tr.get("final", {})
    parts = ["\n## Embedder training\n", f"Model: `{tr.get('model')}`; global batch {tr.get('global_batch')}\n",
             markdown_table(["steps", "final loss", "top-1 agrees with judge", "positive ranked first", "samples/s"],
                            [[tr.get("steps"), f.get("loss"), f.get("agreement_top1"), f.get("positive_top1"),
                              f.get("samples_per_s")]])]
    if tr.get("plot"):
        parts.append(f"\n![training curve]({s.link(tr.get('plot'))})\n")
    return parts


def report_rerank(s: Section) -> list[str]:
    from ..report import markdown_table

    rr = s.result
    if not rr.get("enabled"):
        return []
    f = rr.get("final", {})
    return ["\n## Reranker training (pairwise Yes/No + listwise (i))\n", f"Initial weights: `{rr.get('init')}`\n",
            markdown_table(["steps", "final loss", "L_pair", "L_list", "P(answer) list", "model"],
                           [[rr.get("steps"), f.get("loss"), f.get("loss_pair"), f.get("loss_list"),
                             f.get("answer_p_list"), f"`{rr.get('model')}`"]])]


BASELINE = Stage("baseline", "train the retriever with in-batch negatives (VLM2Vec's role)", run_baseline,
                 sections=("models", "baseline"), result=TrainResult, report=report_baseline,
                 command="train-baseline")
TRAIN = Stage("train", "stage S4: train the embedder on the mined table (Ray Train + DeepSpeed)", run_train,
              sections=("train",), result=TrainResult, report=report_train, command="train-embedder")
ABLATIONS = Stage("ablations", "train the comparison variants (extra seeds, ablation objectives)", run_ablations,
                  sections=("train", "compare"), command="train-ablations")
RERANK = Stage("rerank", "train the reranker: pairwise Yes/No + listwise (i) on the mined table", run_rerank,
               sections=("models", "reranker"), result=TrainResult, report=report_rerank, command="train-reranker")
