"""The ``eval`` stage: MMEB-protocol P@1 of every embedder the run trained (and the initial one), with and
without listwise reranking of the top-K, and the report's comparison (the paper's Table 4) with its
statistics over seeds."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..results import AblationsResult, EvalResult, JudgeFitResult, ModelEval, PrepareResult, TrainStageResult
from ..specs import EMBEDDER_READS, embedder_spec
from ..stage import Context, Section, Stage

logger = logging.getLogger(__name__)


def track_evaluation(model_dir: str, res: dict[str, Any]) -> None:
    """A trained model's results, into the tracked run of its training (``train.tracking``), at its last step."""
    from ...models.card import read_card
    from ...train.tracking import log_final_evaluation

    folder = Path(model_dir)
    if folder.is_dir():
        step = int((read_card(folder).get("metrics") or {}).get("step") or 0)
        log_final_evaluation(folder.parent, {"precision_at_1": res["per_dataset"], **(res.get("summary") or {})}, step)


def eval_models(ctx: Context) -> list[dict[str, Any]]:
    """What the eval step measures: the retriever, UniME-V2 and every comparison run, labelled."""
    cfg = ctx.cfg
    models: list[dict[str, Any]] = []
    base = ctx.result_if_run("baseline", TrainStageResult)
    if base is not None and base.enabled:
        models.append({"label": "baseline", "variant": "baseline", "seed": cfg.seed,
                       "model": base.model, "rerank": True})
    else:
        models.append({"label": "initial-embedder", "variant": "initial-embedder", "seed": None,
                       "model": cfg.model_ref(cfg.models.embedder), "rerank": False})
    ablations = ctx.result_if_run("ablations", AblationsResult)
    variants: dict[str, dict[str, Any]] = ablations.variants if ablations is not None else {}
    if not variants and ctx.completed("train"):
        variants = {"unime-v2": {str(cfg.seed): ctx.result("train", TrainStageResult)}}
    for name, seeds in variants.items():
        for seed, out in seeds.items():
            models.append({"label": f"{name}-seed{seed}", "variant": name, "seed": int(seed), "model": out.model,
                           "rerank": name == "unime-v2"})   # every seed: the reranker's effect is paired over seeds
    for label, ref in cfg.eval.models.items():
        models.append({"label": label, "variant": label, "seed": None, "model": cfg.model_ref(ref), "rerank": False})
    judge = _judge_reference(ctx)
    if judge:
        models.append({"label": "judge-fold0", "variant": "judge", "seed": None, "model": judge, "rerank": False})
    return models


def _judge_reference(ctx: Context) -> str | None:
    """The first fold's dual-encoder judge, when the run fitted one and ``eval.judge_reference`` is on. The eval
    items are outside the training split, so no fold has seen them."""

    if not ctx.cfg.eval.judge_reference:
        return None
    fitted = ctx.result_if_run("judge_fit", JudgeFitResult)
    if fitted is None or not fitted.enabled or fitted.kind != "dual_encoder" or "0" not in fitted.folds:
        return None
    return fitted.folds["0"]["model"]


def run_eval(ctx: Context) -> EvalResult:
    """MMEB-protocol P@1 of each model on the eval pairs (and MMEB-eval when configured), with and without
    listwise reranking of the top-K. Each model's results are kept, so a rerun evaluates only what is missing."""
    from ...eval.api import evaluation_of, record_in_card
    from ...eval.mmeb import evaluate_mmeb_dir, evaluate_pairs_table
    from ...eval.rerank import load_reranker
    from ...utils.files import write_json_atomic

    cfg = ctx.cfg
    ev = cfg.eval
    prepared = ctx.result("prepare", PrepareResult)
    image_root = ev.image_root or prepared.image_root
    table = cfg.path(ev.table) if ev.table else prepared.path("eval_pairs")
    if "pairs" in ev.sets and not table:
        return EvalResult(enabled=False, reason="no eval pairs (data has no eval split and eval.table is unset)")
    reranker_ref = ev.rerank.model and cfg.model_ref(ev.rerank.model)
    if ev.rerank.enabled and not reranker_ref:
        trained = ctx.result_if_run("rerank", TrainStageResult)
        reranker_ref = trained.model if trained is not None else None
        if not reranker_ref:
            raise ValueError("eval.rerank.enabled, but eval.rerank.model is not set and this run trained no "
                             "reranker (reranker.enabled: false)")
    reranker = validation = None
    if ev.rerank.enabled and reranker_ref:
        reranker = load_reranker(reranker_ref, image_root=image_root, dtype=ev.rerank.dtype,
                                 batch_size=ev.rerank.batch_size, image_options=cfg.image_budget("reranker"))
    if ev.pool.ray:
        ctx.init_ray()
    if reranker is not None:
        reranker, validation = _guard(ctx, reranker, str(reranker_ref), image_root)
    weight = ev.rerank.fusion_weight
    if weight is None:
        weight = (validation or {}).get("weight")
    weight = 0.5 if weight is None else weight
    modes = [ev.rerank.mode] + [m for m in ev.rerank.modes if m != ev.rerank.mode]
    out_dir = ctx.dir
    results: dict[str, ModelEval] = {}
    for m in eval_models(ctx):
        target = out_dir / m["label"]
        done = target / "results.json"
        is_judge = m["variant"] == "judge"   # the stand-in judge as a reference, not a model this run trains
        if done.is_file():
            res = json.loads(done.read_text())
        else:
            if is_judge:    # in this process: Ray actors rebuild embedders from an EmbedderSpec
                from ...judge.encoder.backend import EncoderJudge

                spec, pool = EncoderJudge.load(m["model"], image_root=image_root), None
            else:
                spec, pool = embedder_spec(ctx, image_root, m["model"], role="eval"), ev.pool
            kw = dict(image_root=image_root, top_k_dump=ev.top_k_dump, pool=pool, check_images=ev.check_images,
                      label=m["label"])
            res = {}
            if "pairs" in ev.sets:
                res = evaluate_pairs_table(spec, table, target, reranker=reranker if m["rerank"] else None,
                                           rerank_top_k=ev.rerank.top_k, rerank_modes=modes, fusion_weight=weight,
                                           max_rows_per_dataset=ev.max_rows_per_dataset, **kw)
            if "mmeb" in ev.sets:
                kw.pop("check_images")
                mmeb = evaluate_mmeb_dir(spec, ev.mmeb_dir, target / "mmeb", subsets=ev.mmeb_subsets,
                                         reranker=reranker if m["rerank"] else None, rerank_top_k=ev.rerank.top_k,
                                         **kw)
                # MMEB-eval alone (the paper's eval): its results are the model's; beside pairs, a part of them.
                # Written as the model's results.json: what the report reads, and a rerun skips the model.
                res = {**res, "mmeb": mmeb} if "pairs" in ev.sets else mmeb
                write_json_atomic(res, done)
            if res.get("per_dataset") and not is_judge:   # a trained model carries its results in its card
                record_in_card(m["model"], evaluation_of(res), str(table) if "pairs" in ev.sets else ev.mmeb_dir)
                track_evaluation(m["model"], res)
        vt = [r.get("visual_tokens") or {} for r in (res, res.get("mmeb") or {})]
        tokens = ctx.visual_tokens(eval=[v.get("embedder") for v in vt], reranker=[v.get("reranker") for v in vt])
        results[m["label"]] = ModelEval(**{**m, "per_dataset": res.get("per_dataset"), "summary": res.get("summary"),
                                           "chance": res.get("chance"), "sizes": res.get("sizes"),
                                           "rerank": res.get("rerank"), "results": str(done),
                                           "visual_tokens": tokens})
        logger.info("eval %s: %s", m["label"], {k: round(v, 2) for k, v in (res.get("per_dataset") or {}).items()
                                                if v is not None})
    per_model = [r.visual_tokens for r in results.values()]
    return EvalResult(table=str(table) if table else None, models=results,
                      reranker=str(reranker_ref) if reranker is not None else None, rerank_validation=validation,
                      visual_tokens=ctx.visual_tokens(eval=[t.get("eval") for t in per_model],
                                                      reranker=[t.get("reranker") for t in per_model]))


def _guard(ctx: Context, reranker: Any, reranker_ref: str, image_root: str | None) -> tuple[Any, dict[str, Any]]:
    """(the reranker, or None when it must not be used; the validation's record). The reranker is measured on the
    dev split against the run's UniME-V2 embedder (else the baseline); the measurement goes into the reranker's
    folder (``rerank_validation.json``, which the server reads, and its model card)."""
    from ...eval.guard import VALIDATION_FILE, validate_reranker
    from ...utils.files import write_json_atomic

    ev = ctx.cfg.eval
    out = ctx.dir / "rerank-validation"
    dev = ctx.result("prepare", PrepareResult).path("dev_pairs")
    if dev is None:
        if not ev.rerank.require_validation:
            logger.warning("eval: the reranker is used without validation (no dev split; "
                           "eval.rerank.require_validation: false)")
            return reranker, {"used": True, "reason": "not validated: no dev split (data.dev_fraction is 0)"}
        reason = ("the reranker is not used: there is no dev split to validate it on (set data.dev_fraction, "
                  "or eval.rerank.require_validation: false to rerank unchecked)")
        logger.warning("eval: %s", reason)
        return None, {"used": False, "reason": reason}
    done = out / "validation.json"
    if done.is_file():
        record = json.loads(done.read_text())
    else:
        models = {m["label"]: m for m in eval_models(ctx)}
        main = models.get(f"unime-v2-seed{ctx.cfg.seed}") or next(iter(models.values()))
        v = validate_reranker(embedder_spec(ctx, image_root, main["model"], role="eval"), reranker, dev, out,
                              mode=ev.rerank.mode, top_k=ev.rerank.top_k, image_root=image_root, pool=ev.pool,
                              embedder_label=main["label"])
        record = {**v.as_dict(), "reason": v.sentence()}
        write_json_atomic(record, done)
        folder = Path(reranker_ref)
        if folder.is_dir():
            from ...models.card import CARD_JSON, write_model_card

            write_json_atomic(record, folder / VALIDATION_FILE)
            if (folder / CARD_JSON).is_file():
                write_model_card(folder, validation=record)
    (logger.info if record["used"] else logger.warning)("eval: %s", record["reason"])
    return (reranker if record["used"] else None), record


def report_eval(s: Section) -> list[str]:
    from ...eval.report import comparison_section

    return comparison_section(s.result.as_dict(), s.run_dir)


EVAL = Stage("eval", "evaluate the run's embedders (and reranker) on its eval set", run_eval,
             reads=("eval", "seed", *EMBEDDER_READS, "images.eval", "images.reranker"), result=EvalResult,
             report=report_eval, headline=True, command="evaluate")
