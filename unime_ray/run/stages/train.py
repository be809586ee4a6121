"""The training stages: ``baseline`` (S1's retriever with in-batch negatives), ``train`` (S4: UniME-V2),
``ablations`` (the comparison runs: extra seeds and the ablation objectives) and ``rerank`` (the reranker:
pairwise Yes/No + listwise "(i)"). Every one of them is a Ray Train run of :mod:`unime_ray.train.trainer`;
a finished run writes ``done.json`` last, so a rerun after an interruption trains only what is missing."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ...train.api import run_job
from ...utils.markdown import markdown_table
from ..results import AblationsResult, JudgeFitResult, MineResult, PrepareResult, TrainStageResult, VariantRun
from ..specs import TRAIN_JOB_READS, train_settings
from ..stage import Context, Section, Stage

if TYPE_CHECKING:
    from ..config import RunConfig

logger = logging.getLogger(__name__)

# train and ablations: the section, the weights it starts from, the run's name (its Ray Train folder)
EMBEDDER_TRAIN_READS = ("train", "models.embedder", "images.embedder", "name", *TRAIN_JOB_READS)


def run_baseline(ctx: Context) -> TrainStageResult:
    """The retriever of global retrieval trained with in-batch negatives (VLM2Vec's role in the paper)."""
    cfg = ctx.cfg
    if not cfg.baseline.enabled:
        return TrainStageResult(enabled=False)
    prepared = ctx.result("prepare", PrepareResult)
    settings = train_settings(cfg, cfg.baseline, cfg.model_ref(cfg.models.embedder), ctx.dir,
                              "embedder", prepared.image_root)
    ctx.init_ray()
    out = run_job(prepared.path("train_pairs"), settings, "baseline")
    logger.info("baseline: %d steps, final loss %.4f", out.steps, out.final.get("loss", float("nan")))
    return TrainStageResult(**{**out.model_dump(), "enabled": True,
                               "visual_tokens": ctx.visual_tokens(embedder=out.visual_tokens)})


def _embedder_init(ctx: Context) -> str:
    cfg = ctx.cfg
    if cfg.train.init == "baseline":
        base = ctx.result_if_run("baseline", TrainStageResult)
        if base is None or not base.model:
            raise ValueError("train.init: baseline needs baseline.enabled: true (and its stage run)")
        return base.model
    return cfg.model_ref(cfg.models.embedder)


def _check_imported_negatives(mined: MineResult, k: int) -> None:
    """An imported table is trained as it is: every row needs the k negatives that training takes."""
    if mined.imported and mined.min_negatives is not None and mined.min_negatives < k:
        raise ValueError(f"the imported training table has rows with {mined.min_negatives} negatives; "
                         f"train.num_negatives is {k} (lower it, or set mine.from_imported: remine)")


def run_train(ctx: Context) -> TrainStageResult:
    cfg = ctx.cfg
    mined, prepared = ctx.result("mine", MineResult), ctx.result("prepare", PrepareResult)
    _check_imported_negatives(mined, cfg.train.num_negatives)
    settings = train_settings(cfg, cfg.train, _embedder_init(ctx), ctx.dir, "embedder", prepared.image_root)
    ctx.init_ray()
    out = run_job(mined.training_table, settings, cfg.name)
    logger.info("train: %d steps, final loss %.4f, model at %s", out.steps, out.final.get("loss", float("nan")),
                out.model)
    return TrainStageResult(**{**out.model_dump(), "visual_tokens": ctx.visual_tokens(embedder=out.visual_tokens)})


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


def run_ablations(ctx: Context) -> AblationsResult:
    """The comparison runs: UniME-V2 over the extra seeds and each ablation, from the same initial weights,
    on the same mined table and for the same number of steps as the main run. Each finished run is kept, so
    a rerun after an interruption trains only what is missing."""
    cfg = ctx.cfg
    mined, prepared = ctx.result("mine", MineResult), ctx.result("prepare", PrepareResult)
    main = ctx.result("train", TrainStageResult)
    init = _embedder_init(ctx)
    variants: dict[str, dict[str, VariantRun]] = {}
    tallies = []
    for name, seed, changes in variant_runs(cfg):
        if name == "unime-v2" and seed == cfg.seed:
            out = main
        else:
            _check_imported_negatives(mined, changes.get("num_negatives", cfg.train.num_negatives))
            settings = train_settings(cfg, cfg.train, init, ctx.dir / f"{name}-seed{seed}",
                                      "embedder", prepared.image_root, seed=seed, **changes)
            ctx.init_ray()
            out = run_job(mined.training_table, settings, f"{name}-seed{seed}")
            tallies.append(out.visual_tokens)
        variants.setdefault(name, {})[str(seed)] = VariantRun(
            model=out.model, steps=out.steps, final=out.final,
            objective=changes.get("objective", cfg.train.objective))
    return AblationsResult(variants=variants, init=init, visual_tokens=ctx.visual_tokens(embedder=tallies))


def run_rerank(ctx: Context) -> TrainStageResult:
    """Reranker training on the mined table (pairwise Yes/No + listwise "(i)")."""
    cfg = ctx.cfg
    r = cfg.reranker
    if not r.enabled:
        return TrainStageResult(enabled=False)

    mined, prepared = ctx.result("mine", MineResult), ctx.result("prepare", PrepareResult)
    init = cfg.model_ref(cfg.models.judge)
    if r.init == "fitted_judge":
        fitted = ctx.result_if_run("judge_fit", JudgeFitResult)
        if fitted is None or not fitted.enabled:
            raise ValueError("reranker.init: fitted_judge needs judge_fit (and its stage run)")
        if fitted.kind == "dual_encoder":
            raise ValueError("reranker.init: fitted_judge needs an MLLM stand-in judge (judge_fit.kind: mllm); a "
                             "dual-encoder judge has no MLLM weights to start from: set reranker.init: judge")
        init = fitted.folds["0"]["model"]
    settings = train_settings(cfg, r, init, ctx.dir, "reranker", prepared.image_root)
    ctx.init_ray()
    out = run_job(mined.training_table, settings, "reranker")
    logger.info("rerank: %d steps, final loss %.4f", out.steps, out.final.get("loss", float("nan")))
    return TrainStageResult(**{**out.model_dump(), "enabled": True, "init": init,
                               "visual_tokens": ctx.visual_tokens(reranker=out.visual_tokens)})


def report_baseline(s: Section) -> list[str]:
    base = s.result
    if not base.enabled:
        return []
    f = base.final
    return ["\n## Baseline retriever training (in-batch InfoNCE)\n",
            markdown_table(["steps", "final loss", "in-batch top-1", "samples/s", "model"],
                           [[base.steps, f.get("loss"), f.get("inbatch_top1"), f.get("samples_per_s"),
                             f"`{base.model}`"]])]


def report_train(s: Section) -> list[str]:
    tr = s.result
    if not tr.model:
        return []
    f = tr.final
    parts = ["\n## Embedder training\n", f"Model: `{tr.model}`; global batch {tr.global_batch}\n",
             markdown_table(["steps", "final loss", "top-1 agrees with judge", "positive ranked first", "samples/s"],
                            [[tr.steps, f.get("loss"), f.get("agreement_top1"), f.get("positive_top1"),
                              f.get("samples_per_s")]])]
    if tr.plot:
        parts.append(f"\n![training curve]({s.link(tr.plot)})\n")
    return parts


def report_rerank(s: Section) -> list[str]:
    rr = s.result
    if not rr.enabled:
        return []
    f = rr.final
    return ["\n## Reranker training (pairwise Yes/No + listwise (i))\n", f"Initial weights: `{rr.init}`\n",
            markdown_table(["steps", "final loss", "L_pair", "L_list", "P(answer) list", "model"],
                           [[rr.steps, f.get("loss"), f.get("loss_pair"), f.get("loss_list"),
                             f.get("answer_p_list"), f"`{rr.model}`"]])]


BASELINE = Stage("baseline", "train the retriever with in-batch negatives (VLM2Vec's role)", run_baseline,
                 reads=("baseline", "models.embedder", "images.embedder", *TRAIN_JOB_READS), result=TrainStageResult,
                 report=report_baseline, command="train-baseline")
TRAIN = Stage("train", "stage S4: train the embedder on the mined table (Ray Train + DeepSpeed)", run_train,
              reads=EMBEDDER_TRAIN_READS, result=TrainStageResult, report=report_train, command="train-embedder")
ABLATIONS = Stage("ablations", "train the comparison variants (extra seeds, ablation objectives)", run_ablations,
                  reads=(*EMBEDDER_TRAIN_READS, "compare"), result=AblationsResult, command="train-ablations")
RERANK = Stage("rerank", "train the reranker: pairwise Yes/No + listwise (i) on the mined table", run_rerank,
               reads=("reranker", "models.judge", "images.reranker", *TRAIN_JOB_READS), result=TrainStageResult,
               report=report_rerank, command="train-reranker")
