"""The staged, resumable run: one run directory, a folder per stage, and a manifest.

Stages: ``data`` (build or locate the input data) -> ``models`` (tiny checkpoints for the demo) ->
``prepare`` (convert + validate into canonical tables, quarantining bad rows) -> ``baseline`` (the
retriever trained with in-batch negatives, when enabled) -> ``embed`` (optional: encode tables) ->
``retrieve`` (S1, sharded FAISS) -> ``judge_fit`` (offline stand-in judges, cross-fitted, when configured)
-> ``judge`` (S2) -> ``mine`` (S3) -> ``train`` (S4, UniME-V2) -> ``ablations`` (extra seeds and the
ablation objectives) -> ``rerank`` (reranker training, when enabled) -> ``eval`` (P@1 with and without
reranking) -> ``report``. A disabled stage completes at once with ``{"enabled": false}``; with training pairs
that already carry judge-scored negatives (the official score JSON), retrieve, judge and mine complete at once
with ``{"imported": true, ...}`` and training reads those pairs (``mine.from_imported: remine`` recomputes them).

``manifest.json`` records, per stage, its status, the hash of the config it ran with, outputs and
counts. A rerun skips stages that completed with the same config (and the same upstream), and reruns
a stage that did not complete; stages resume internally where they can (embedding resumes per shard).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import RunConfig
from .utils.logs import end_live, fmt_duration

logger = logging.getLogger(__name__)

TABLES = ("train_pairs", "train_candidates", "eval_pairs", "eval_candidates")


class Manifest:
    """``run_dir/manifest.json``, rewritten atomically after every change."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "manifest.json"
        self.data: dict[str, Any] = {"stages": {}}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name, {})

    def outputs(self, name: str) -> dict[str, Any]:
        """What a completed stage returned (its outputs, paths and counts)."""
        stage = self.stage(name)
        if stage.get("status") != "complete":
            raise RuntimeError(f"stage {name!r} has not completed in this run directory; run it first")
        return stage["outputs"]

    def update(self, name: str, **fields: Any) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(".manifest.json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


@dataclass
class Stage:
    name: str
    sections: tuple[str, ...]          # config sections whose change reruns the stage
    run: Callable[[RunConfig, Manifest], dict[str, Any]]
    clear_on_rerun: bool = True         # wipe the stage folder when its config changed
    fields: tuple[str, ...] = ()        # single config fields ("section.key") whose change reruns the stage


# -------------------------------------------------------------------------------------------- stages
def _stage_dir(cfg: RunConfig, name: str) -> Path:
    return Path(cfg.run_dir).resolve() / name


def stage_data(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    d = cfg.data
    if d.source in ("emoji", "synthetic"):
        from .data.demo import make_demo_data

        out = _stage_dir(cfg, "data")
        summary = make_demo_data(out, source=d.source, seed=d.seed, eval_fraction=d.eval_fraction,
                                 max_items=d.max_items, image_size=d.image_size, rows_per_shard=d.rows_per_shard)
        inputs = {"train_pairs": out / "train/pairs", "train_candidates": out / "train/candidates",
                  "eval_pairs": out / "eval/pairs", "eval_candidates": out / "eval/candidates"}
        return {"format": "canonical", "image_root": str(out), "inputs": {k: str(v) for k, v in inputs.items()},
                "summary": summary}
    inputs = {}
    if d.train_path:
        inputs["train_pairs"] = str(cfg.path(d.train_path))
    if d.eval_path:
        inputs["eval_pairs"] = str(cfg.path(d.eval_path))
    for k, v in inputs.items():
        if not Path(v).exists():
            raise FileNotFoundError(f"data.{k.split('_')[0]}_path: {v} does not exist")
    return {"format": d.source, "image_root": str(cfg.path(d.image_root)) if d.image_root else None,
            "inputs": inputs}


def _training_texts(manifest: Manifest) -> list[str]:
    """Texts of the training split only (the tiny tokenizer must not see eval texts)."""
    from .data.io import iter_rows

    data = manifest.outputs("data")
    path = data["inputs"].get("train_pairs")
    if not path or data["format"] != "canonical":
        return []
    texts = []
    for row in iter_rows(path, columns=["query_instruction", "query_text", "pos_instruction", "pos_text"]):
        texts.extend(v for v in row.values() if v)
    return texts


def stage_models(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    from .models.backbone import architecture_of, load_config
    from .models.tiny import TinySpec, make_tiny_models

    out: dict[str, Any] = {}
    t = cfg.models.tiny
    if t.make:
        spec = TinySpec(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                        num_key_value_heads=t.num_key_value_heads, vision_depth=t.vision_depth,
                        vocab_size=t.vocab_size)
        corpus = _training_texts(manifest)
        written = make_tiny_models(_stage_dir(cfg, "models"), seed=t.seed, spec=spec, corpus=corpus)
        out["tiny_models"] = {k: str(v) for k, v in written.items()}
        out["tokenizer_corpus_texts"] = len(corpus)
    roles = {"embedder": cfg.models.embedder, "judge": cfg.models.judge}
    r = cfg.models.retriever
    if r is not None and not cfg.baseline.enabled and not (cfg.data.source == "official"
                                                           and cfg.mine.from_imported == "use"):
        roles["retriever"] = r.model  # an imported official file skips S1: its retriever need not be here
    for role, name in roles.items():  # fail now, with a clear message, on unknown names or architectures
        ref = cfg.model_ref(name)
        as_role = "embedder" if role == "retriever" else role   # S1's retriever is an embedder backbone
        out[role] = {"ref": ref, "architecture": architecture_of(load_config(ref), ref, as_role).model_type}
    return out


def stage_prepare(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    from .data.convert import import_table

    data = manifest.outputs("data")
    out_root = _stage_dir(cfg, "prepare")
    results: dict[str, Any] = {}
    for table, src in data["inputs"].items():
        final = out_root / table
        account_file = out_root / f"{table}.account.json"
        if final.is_dir() and account_file.is_file():  # finished in an earlier, interrupted run
            results[table] = json.loads(account_file.read_text())
            continue
        tmp = out_root / f".{table}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        kind = "candidates" if table.endswith("candidates") else "pairs"
        fmt = data["format"] if kind == "pairs" else "canonical"
        if fmt == "mmeb-eval" and table == "train_pairs":
            raise ValueError("data.source mmeb-eval describes evaluation rows; give it as data.eval_path")
        start = time.perf_counter()
        account = import_table(src, fmt, tmp, quarantine_path=out_root / "quarantine" / f"{table}.parquet",
                               kind=kind, task=cfg.data.task, image_root=data.get("image_root"),
                               check_images=cfg.data.check_images, rows_per_shard=cfg.data.rows_per_shard)
        os.replace(tmp, final)
        results[table] = {**account.as_dict(), "path": str(final), "seconds": round(time.perf_counter() - start, 2)}
        account_file.write_text(json.dumps(results[table], indent=1))
        logger.info("prepare %s: %s", table, account.summary())
    return {"tables": results, "image_root": data.get("image_root")}


def stage_embed(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    from .retrieval.embed import embed_table_ray

    prepared = manifest.outputs("prepare")
    if cfg.embed.tables and imported_training(cfg, manifest):
        # S1 does not run, so its retriever is not part of the run (the models stage does not require it either)
        return {"imported": True, "tables": {}, "note": "not run: the training pairs came with judge-scored "
                "negatives (mine.from_imported: use), so S1's retriever embeds nothing in this run"}
    spec = _retriever_spec(cfg, manifest, prepared.get("image_root"))
    _init_ray(cfg)
    results = {}
    for table in cfg.embed.tables:
        if table not in prepared["tables"]:
            logger.warning("embed: table %s was not prepared; skipping it", table)
            continue
        prefix = "query_" if table.endswith("pairs") else ""
        e = cfg.embed
        stats = embed_table_ray(spec, prepared["tables"][table]["path"], _stage_dir(cfg, "embed") / table,
                                prefix=prefix, batch_size=e.batch_size, min_actors=e.min_actors,
                                max_actors=e.max_actors, num_cpus=e.num_cpus_per_actor, num_gpus=e.num_gpus_per_actor)
        results[table] = {**stats, "path": str(_stage_dir(cfg, "embed") / table)}
        logger.info("embed %s: %d rows at %.1f items/s", table, stats["rows_embedded"], stats["items_per_s"])
    return {"tables": results, "embedder": spec.model,
            "visual_tokens": _visual_tokens(cfg, retriever=[r.get("visual_tokens") for r in results.values()])}


def _retriever_spec(cfg: RunConfig, manifest: Manifest, image_root: str | None):
    """The embedder of global retrieval: the trained baseline when there is one (it reads the embedder's input
    format), else models.retriever with its own input format and positions, else models.embedder."""
    from dataclasses import replace

    base = manifest.stage("baseline").get("outputs") or {}
    if cfg.baseline.enabled:
        if not base.get("model"):
            raise RuntimeError("baseline.enabled but the baseline stage has no model; run it first")
        return _embedder_spec(cfg, image_root, base["model"])
    r = cfg.models.retriever
    if r is None:
        return _embedder_spec(cfg, image_root)
    return replace(_embedder_spec(cfg, image_root, cfg.model_ref(r.model)), input_format=r.input_format,
                   positions=r.positions, adapter=cfg.model_ref(r.adapter) if r.adapter else None)


def _embedder_spec(cfg: RunConfig, image_root: str | None, model: str | None = None, role: str = "retriever"):
    from .retrieval.embed import EmbedderSpec

    m = cfg.models
    b = cfg.image_budget(role)   # retriever (S1 embedding) or eval
    return EmbedderSpec(model=model or cfg.model_ref(m.embedder), input_format=m.input_format, dtype=m.dtype,
                        image_root=image_root, processor_backend=m.processor_backend, image_resize=b.resize,
                        min_pixels=b.min_pixels, max_pixels=b.max_pixels, positions=m.positions)


def _visual_tokens(cfg: RunConfig, **tallies: Any) -> dict[str, Any]:
    """A stage's ``visual_tokens`` output: per budget role, the tally of visual tokens per image it used
    (models.budget.token_tally, or several merged) and the configured budget; roles without images left out."""
    from .models.budget import merge_tallies

    out = {}
    for role, tally in tallies.items():
        merged = merge_tallies(*tally) if isinstance(tally, (list, tuple)) else tally
        if merged:
            out[role] = {**merged, "budget": cfg.image_budget(role).describe()}
    return out


def _init_ray(cfg: RunConfig) -> None:
    from .utils.ray_utils import init_ray

    r = cfg.ray
    init_ray(r.address, r.num_cpus, r.num_gpus, r.include_dashboard, r.env_vars)


def imported_training(cfg: RunConfig, manifest: Manifest) -> dict[str, Any] | None:
    """The prepared training pairs, when they already carry judge-scored negatives (the official score JSON, or a
    canonical table with neg_* and neg_score columns) and ``mine.from_imported`` is ``use``: retrieve, judge and
    mine then record them as imported and training reads them as they are. None: mine as for any other data."""
    from .mining.stage import scored_negatives

    if cfg.mine.from_imported != "use":
        return None
    split = cfg.retrieve.split
    table = manifest.outputs("prepare")["tables"].get(f"{split}_pairs")
    if table is None:
        return None
    stats = scored_negatives(table["path"])
    if not stats["scored_rows"]:
        return None
    if stats["scored_rows"] < stats["rows"]:
        raise ValueError(f"{split} pairs: {stats['scored_rows']} of {stats['rows']} rows carry judge-scored "
                         "negatives; a table is used as imported only when every row does (a judge score for the "
                         "positive and each negative). Fix the table, or set mine.from_imported: remine")
    data = manifest.outputs("data")
    return {"imported": True, "imported_from": data["inputs"].get(f"{split}_pairs"), "format": data["format"],
            "table": table["path"], **stats}


def _imported_stage(info: dict[str, Any], what: str) -> dict[str, Any]:
    logger.info("%s: imported with the training table (%d rows from %s), not recomputed", what, info["rows"],
                info["imported_from"])
    return {**info, "note": f"{what} not run: the training pairs came with judge-scored negatives "
                            "(mine.from_imported: use; remine recomputes them)"}


def stage_retrieve(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    from .retrieval.index import IndexSpec
    from .retrieval.stage import RetrieveSettings, run_retrieval

    imported = imported_training(cfg, manifest)
    if imported:
        return _imported_stage(imported, "global retrieval")
    prepared = manifest.outputs("prepare")
    r, e = cfg.retrieve, cfg.embed
    tables = prepared["tables"]
    pairs = tables.get(f"{r.split}_pairs")
    if pairs is None:
        raise ValueError(f"retrieve.split={r.split!r} but no {r.split} pairs were prepared")
    candidates = tables.get(f"{r.split}_candidates")
    settings = RetrieveSettings(top_k=r.top_k, delta=r.delta, fill=r.fill, pool=r.pool,
                                index=IndexSpec(kind=r.index_kind, num_shards=r.num_shards, nlist=r.nlist,
                                                nprobe=r.nprobe, seed=cfg.seed),
                                search_batch_size=r.search_batch_size)
    _init_ray(cfg)
    spec = _retriever_spec(cfg, manifest, prepared.get("image_root"))
    out = run_retrieval(pairs["path"], candidates["path"] if candidates else None, _stage_dir(cfg, "retrieve"),
                        spec, settings, use_ray=True,
                        batch_size=e.batch_size, min_actors=e.min_actors, max_actors=e.max_actors,
                        num_cpus=e.num_cpus_per_actor, num_gpus=e.num_gpus_per_actor,
                        search_actors=r.search_actors)
    logger.info("retrieve: %d queries, %.1f candidates each on average, %d without any", out["queries"],
                out["mean_candidates"], out["queries_without_candidates"])
    return {**out, "embedder": spec.model, "visual_tokens": _visual_tokens(cfg, retriever=out.get("visual_tokens"))}


def _judge_spec(cfg: RunConfig, image_root: str | None, model: str | None = None, backend: str | None = None,
                feature_cache: str | None = None):
    from .judge.stage import JudgeSpec

    j = cfg.judge
    if (backend or j.backend) == "encoder":
        return JudgeSpec(model=model or cfg.model_ref(j.model or cfg.models.judge), backend="encoder",
                         batch_size=j.batch_size, image_root=image_root, feature_cache=feature_cache)
    budget = cfg.image_budget("judge")
    prompt: dict[str, Any] = {"version": j.prompt_version}
    if j.instruction:
        prompt["instruction"] = j.instruction
    return JudgeSpec(model=model or cfg.model_ref(j.model or cfg.models.judge), backend=j.backend, dtype=j.dtype,
                     batch_size=j.batch_size, prefix_reuse=j.prefix_reuse, image_root=image_root,
                     min_pixels=budget.min_pixels, max_pixels=budget.max_pixels, image_resize=budget.resize,
                     max_length=j.max_length, prompt=prompt, vllm=j.vllm.model_dump() if j.backend == "vllm" else {})


def _train_settings(cfg: RunConfig, section, model: str, out_dir: Path, task: str, image_root: str | None,
                    seed: int | None = None, role: str | None = None, **changes: Any):
    from .train.trainer import TrainSettings

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


def _train_once(train_fn, table: str, settings, name: str) -> dict[str, Any]:
    out_dir = Path(settings.output_dir)
    done = _done(out_dir)
    if done:
        logger.info("%s: already trained (%s)", name, done["model"])
        return done
    out = train_fn(table, settings, name=name)
    out = {k: v for k, v in out.items() if k != "checkpoint"} | {"checkpoint": str(out.get("checkpoint"))}
    (out_dir / "done.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def stage_baseline(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    """The retriever of global retrieval trained with in-batch negatives (VLM2Vec's role in the paper)."""
    from .train.embedder import train_embedder

    if not cfg.baseline.enabled:
        return {"enabled": False}
    prepared = manifest.outputs("prepare")
    settings = _train_settings(cfg, cfg.baseline, cfg.model_ref(cfg.models.embedder), _stage_dir(cfg, "baseline"),
                               "embedder", prepared.get("image_root"))
    _init_ray(cfg)
    out = _train_once(train_embedder, prepared["tables"]["train_pairs"]["path"], settings, "baseline")
    logger.info("baseline: %d steps, final loss %.4f", out["steps"], out["final"].get("loss", float("nan")))
    return {"enabled": True, **out, "visual_tokens": _visual_tokens(cfg, embedder=out.get("visual_tokens"))}


def stage_judge_fit(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    """Stand-in judge (no pretrained MLLM judge offline): fine-tune the judge checkpoint on pairwise Yes/No,
    one model per fold of the training queries (see :mod:`unime_ray.judge.crossfit`)."""
    from .judge.crossfit import build_fit_tables
    from .train.reranker import train_reranker

    jf = cfg.judge_fit
    if jf is None or not jf.enabled:
        return {"enabled": False}
    if manifest.outputs("retrieve").get("imported"):
        return {"enabled": False, "imported": True,
                "note": "no judge to fit: the scores came with the training table"}
    retrieved, prepared = manifest.outputs("retrieve"), manifest.outputs("prepare")
    out_dir = _stage_dir(cfg, "judge_fit")
    tables = build_fit_tables(retrieved["candidates_table"], prepared["tables"][f"{cfg.retrieve.split}_pairs"]["path"],
                              retrieved["candidate_pool"], out_dir / "tables", jf.folds, jf.negatives_per_query,
                              seed=cfg.seed)
    if jf.kind == "dual_encoder":
        return _fit_encoder_judges(cfg, tables, prepared, retrieved, out_dir)
    _init_ray(cfg)
    folds = {}
    for f, info in tables.items():
        settings = _train_settings(cfg, jf, cfg.model_ref(cfg.models.judge), out_dir / f"fold{f}", "reranker",
                                   prepared.get("image_root"), role="judge")
        out = _train_once(train_reranker, info["table"], settings, f"judge-fold{f}")
        folds[str(f)] = {"model": out["model"], "queries": info["queries"], "steps": out["steps"],
                         "final": out["final"], "visual_tokens": out.get("visual_tokens")}
        logger.info("judge_fit fold %d: %d queries, final loss %.4f", f, info["queries"],
                    out["final"].get("loss", float("nan")))
    return {"enabled": True, "folds": folds, "num_folds": jf.folds,
            "note": "stand-in judge: fine-tuned offline on the training pairs with cross-fitting",
            "visual_tokens": _visual_tokens(cfg, judge=[f.get("visual_tokens") for f in folds.values()])}


def _fit_encoder_judges(cfg: RunConfig, tables: dict[int, dict[str, Any]], prepared: dict[str, Any],
                        retrieved: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """judge_fit.kind: dual_encoder. The towers encode every distinct image and text of the pool and the pairs
    once, into a feature cache the judge stage reads too; then one judge per fold (a finished fold is skipped)."""
    from .data.io import iter_rows
    from .data.schema import item_from_row
    from .judge.encoder_fit import EncoderFitSettings, fit_folds, warm_features

    jf = cfg.judge_fit
    settings = EncoderFitSettings(**jf.encoder.model_dump(), seed=cfg.seed)
    image_root = prepared.get("image_root")
    cache = out_dir / "features"
    pairs = prepared["tables"][f"{cfg.retrieve.split}_pairs"]["path"]
    items = [item_from_row(r) for r in iter_rows(retrieved["candidate_pool"])]
    items += [item_from_row(r, "query_") for r in iter_rows(pairs)]
    t0 = time.perf_counter()
    warmed = warm_features(items, settings, image_root=image_root, feature_cache=cache)
    feature_s = time.perf_counter() - t0
    logger.info("judge_fit (dual encoder): tower features for %d distinct query and pool items in %.1f s",
                warmed["items"], feature_s)
    fitted = fit_folds({f: info["table"] for f, info in tables.items()}, out_dir, settings, image_root=image_root,
                       feature_cache=cache)
    folds = {}
    for f, info in tables.items():
        folds[str(f)] = {**fitted[str(f)], "queries": info["queries"]}
        logger.info("judge_fit fold %d: %d queries, held-out AUC %.3f", f, info["queries"],
                    fitted[str(f)].get("heldout_auc") or float("nan"))
    return {"enabled": True, "kind": "dual_encoder", "backend": "encoder", "folds": folds, "num_folds": jf.folds,
            "feature_cache": str(cache), "feature_items": warmed["items"], "feature_seconds": round(feature_s, 2),
            "method": settings.method, "text_tower": settings.text_tower, "image_tower": settings.image_tower,
            "note": "stand-in judge: heads on frozen pretrained text/image encoders, fitted with cross-fitting"}


def stage_judge(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    from .judge.crossfit import merge_score_tables, query_folds, score_summary, scoring_judge, split_candidates
    from .judge.stage import run_judge

    retrieved = manifest.outputs("retrieve")
    if retrieved.get("imported"):
        return _imported_stage(imported_training(cfg, manifest), "the judge")
    prepared = manifest.outputs("prepare")
    j = cfg.judge
    image_root = prepared.get("image_root")
    pairs = prepared["tables"][f"{cfg.retrieve.split}_pairs"]["path"]
    _init_ray(cfg)
    kw = dict(use_ray=True, batch_size=j.rows_per_call, min_actors=j.min_actors, max_actors=j.max_actors,
              num_cpus=j.num_cpus_per_actor, num_gpus=j.num_gpus_per_actor)
    fitted = manifest.stage("judge_fit").get("outputs") or {}
    if not fitted.get("enabled"):
        out = run_judge(retrieved["candidates_table"], pairs, retrieved["candidate_pool"], _stage_dir(cfg, "judge"),
                        _judge_spec(cfg, image_root), **kw)
        logger.info("judge: %d pairs scored, %d quarantined, %.1f pairs/s", out["scored"], out["quarantined"],
                    out["pairs_per_s"])
        return {**out, "positive_auc": score_summary(out["scores_table"])["positive_auc"],
                "visual_tokens": _visual_tokens(cfg, judge=out.get("visual_tokens"))}
    k = fitted["num_folds"]
    root = _stage_dir(cfg, "judge")
    assignment = query_folds(pairs, k, seed=cfg.seed)
    split = split_candidates(retrieved["candidates_table"], assignment, k, root / "candidates")
    per_fold, score_dirs = {}, []
    for f in range(k):
        judge_model = fitted["folds"][str(scoring_judge(f, k))]["model"]
        out = run_judge(split[f], pairs, retrieved["candidate_pool"], root / f"fold{f}",
                        _judge_spec(cfg, image_root, judge_model, backend=fitted.get("backend"),
                                    feature_cache=fitted.get("feature_cache")), **kw)
        per_fold[str(f)] = {**out, "judge_fold": scoring_judge(f, k)}
        score_dirs.append(out["scores_table"])
        logger.info("judge fold %d (judge of fold %d): %d pairs, %.1f pairs/s", f, scoring_judge(f, k), out["scored"],
                    out["pairs_per_s"])
    scores = merge_score_tables(score_dirs, root / "scores" / "crossfit")
    total = {key: sum(o[key] for o in per_fold.values()) for key in ("pairs", "scored", "quarantined", "seconds")}
    return {"crossfit": True, "folds": per_fold, "scores_table": scores, **total, "seconds": round(total["seconds"], 2),
            "pairs_per_s": total["scored"] / max(1e-9, total["seconds"]),
            "judge": "cross-fitted " + ("dual-encoder judges" if fitted.get("kind") == "dual_encoder"
                                        else "stand-in judges"),
            "backend": fitted.get("backend", "transformers"),
            "prompt_version": next((o.get("prompt_version") for o in per_fold.values()), None),
            **score_summary(scores),
            "visual_tokens": _visual_tokens(cfg, judge=[o.get("visual_tokens") for o in per_fold.values()])}


def stage_mine(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    from .mining.stage import MineSettings, run_mining

    retrieved, judged, prepared = manifest.outputs("retrieve"), manifest.outputs("judge"), manifest.outputs("prepare")
    if retrieved.get("imported"):
        return _mine_imported(cfg, imported_training(cfg, manifest))
    m = cfg.mine
    settings = MineSettings(num_negatives=m.num_negatives, beta=m.beta, interval=m.interval, seed=cfg.seed,
                            fallback_score=m.fallback_score)
    return run_mining(retrieved["candidates_table"], judged["scores_table"],
                      prepared["tables"][f"{cfg.retrieve.split}_pairs"]["path"], retrieved["candidate_pool"],
                      _stage_dir(cfg, "mine"), settings, image_root=prepared.get("image_root"),
                      export_official=m.export_official)


def _mine_imported(cfg: RunConfig, info: dict[str, Any]) -> dict[str, Any]:
    """The imported table is the training table: summarised, not re-mined (training checks it against k)."""
    from .mining.stage import score_summary

    out_dir = _stage_dir(cfg, "mine")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = {**_imported_stage(info, "hard-negative mining"), "training_table": info["table"],
           **score_summary(info["table"], out_dir / "score_histograms.png")}
    if info["format"] == "official":
        out["official_json"] = info["imported_from"]
    return out


def _embedder_init(cfg: RunConfig, manifest: Manifest) -> str:
    if cfg.train.init == "baseline":
        base = manifest.stage("baseline").get("outputs") or {}
        if not base.get("model"):
            raise ValueError("train.init: baseline needs baseline.enabled: true (and its stage run)")
        return base["model"]
    return cfg.model_ref(cfg.models.embedder)


def _check_imported_negatives(mined: dict[str, Any], k: int) -> None:
    """An imported table is trained as it is: every row needs the k negatives that training takes."""
    if mined.get("imported") and mined.get("min_negatives", k) < k:
        raise ValueError(f"the imported training table has rows with {mined['min_negatives']} negatives; "
                         f"train.num_negatives is {k} (lower it, or set mine.from_imported: remine)")


def stage_train(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    from .train.embedder import train_embedder

    mined, prepared = manifest.outputs("mine"), manifest.outputs("prepare")
    _check_imported_negatives(mined, cfg.train.num_negatives)
    settings = _train_settings(cfg, cfg.train, _embedder_init(cfg, manifest), _stage_dir(cfg, "train"), "embedder",
                               prepared.get("image_root"))
    _init_ray(cfg)
    out = _train_once(train_embedder, mined["training_table"], settings, cfg.name)
    logger.info("train: %d steps, final loss %.4f, model at %s", out["steps"], out["final"].get("loss", float("nan")),
                out["model"])
    return {**out, "visual_tokens": _visual_tokens(cfg, embedder=out.get("visual_tokens"))}


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


def stage_ablations(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    """The comparison runs: UniME-V2 over the extra seeds and each ablation, from the same initial weights,
    on the same mined table and for the same number of steps as the main run. Each finished run is kept, so
    a rerun after an interruption trains only what is missing."""
    from .train.embedder import train_embedder

    mined, prepared, main = manifest.outputs("mine"), manifest.outputs("prepare"), manifest.outputs("train")
    init = _embedder_init(cfg, manifest)
    variants: dict[str, dict[str, Any]] = {}
    tallies = []
    for name, seed, changes in variant_runs(cfg):
        if name == "unime-v2" and seed == cfg.seed:
            out = main
        else:
            _check_imported_negatives(mined, changes.get("num_negatives", cfg.train.num_negatives))
            settings = _train_settings(cfg, cfg.train, init, _stage_dir(cfg, "ablations") / f"{name}-seed{seed}",
                                       "embedder", prepared.get("image_root"), seed=seed, **changes)
            _init_ray(cfg)
            out = _train_once(train_embedder, mined["training_table"], settings, f"{name}-seed{seed}")
            tallies.append(out.get("visual_tokens"))
        variants.setdefault(name, {})[str(seed)] = {"model": out["model"], "steps": out["steps"],
                                                    "final": out["final"], "objective":
                                                    changes.get("objective", cfg.train.objective)}
    return {"variants": variants, "init": init, "visual_tokens": _visual_tokens(cfg, embedder=tallies)}


def stage_rerank(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    """Reranker training on the mined table (pairwise Yes/No + listwise "(i)")."""
    from .train.reranker import train_reranker

    r = cfg.reranker
    if not r.enabled:
        return {"enabled": False}
    mined, prepared = manifest.outputs("mine"), manifest.outputs("prepare")
    init = cfg.model_ref(cfg.models.judge)
    if r.init == "fitted_judge":
        fitted = manifest.stage("judge_fit").get("outputs") or {}
        if not fitted.get("enabled"):
            raise ValueError("reranker.init: fitted_judge needs judge_fit (and its stage run)")
        if fitted.get("kind") == "dual_encoder":
            raise ValueError("reranker.init: fitted_judge needs an MLLM stand-in judge (judge_fit.kind: mllm); a "
                             "dual-encoder judge has no MLLM weights to start from: set reranker.init: judge")
        init = fitted["folds"]["0"]["model"]
    settings = _train_settings(cfg, r, init, _stage_dir(cfg, "rerank"), "reranker", prepared.get("image_root"))
    _init_ray(cfg)
    out = _train_once(train_reranker, mined["training_table"], settings, "reranker")
    logger.info("rerank: %d steps, final loss %.4f", out["steps"], out["final"].get("loss", float("nan")))
    return {"enabled": True, "init": init, **out, "visual_tokens": _visual_tokens(cfg, reranker=out.get("visual_tokens"))}


def eval_models(cfg: RunConfig, manifest: Manifest) -> list[dict[str, Any]]:
    """What the eval step measures: the retriever, UniME-V2 and every comparison run, labelled."""
    models: list[dict[str, Any]] = []
    base = manifest.stage("baseline").get("outputs") or {}
    if base.get("enabled"):
        models.append({"label": "baseline", "variant": "baseline", "seed": cfg.seed,
                       "model": base["model"], "rerank": True})
    else:
        models.append({"label": "initial-embedder", "variant": "initial-embedder", "seed": None,
                       "model": cfg.model_ref(cfg.models.embedder), "rerank": False})
    variants = (manifest.stage("ablations").get("outputs") or {}).get("variants")
    if not variants and manifest.stage("train").get("status") == "complete":
        variants = {"unime-v2": {str(cfg.seed): manifest.outputs("train")}}
    for name, seeds in (variants or {}).items():
        for seed, out in seeds.items():
            models.append({"label": f"{name}-seed{seed}", "variant": name, "seed": int(seed), "model": out["model"],
                           "rerank": name == "unime-v2"})   # every seed: the reranker's effect is paired over seeds
    for label, ref in cfg.eval.models.items():
        models.append({"label": label, "variant": label, "seed": None, "model": cfg.model_ref(ref), "rerank": False})
    return models


def stage_eval(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    """MMEB-protocol P@1 of each model on the eval pairs (and MMEB-eval when configured), with and without
    listwise reranking of the top-K. Each model's results are kept, so a rerun evaluates only what is missing."""
    from .eval.mmeb import evaluate_mmeb_dir, evaluate_pairs_table
    from .eval.outputs import write_json_atomic
    from .eval.rerank import load_reranker

    ev = cfg.eval
    prepared = manifest.outputs("prepare")
    image_root = ev.image_root or prepared.get("image_root")
    table = cfg.path(ev.table) if ev.table else (prepared["tables"].get("eval_pairs") or {}).get("path")
    if "pairs" in ev.sets and not table:
        return {"enabled": False, "reason": "no eval pairs (data has no eval split and eval.table is unset)"}
    reranker_ref = ev.rerank.model and cfg.model_ref(ev.rerank.model)
    if ev.rerank.enabled and not reranker_ref:
        trained = manifest.stage("rerank").get("outputs") or {}
        reranker_ref = trained.get("model")
        if not reranker_ref:
            raise ValueError("eval.rerank.enabled, but eval.rerank.model is not set and this run trained no "
                             "reranker (reranker.enabled: false)")
    reranker = None
    if ev.rerank.enabled and reranker_ref:
        reranker = load_reranker(reranker_ref, image_root=image_root, dtype=ev.rerank.dtype,
                                 batch_size=ev.rerank.batch_size, image_options=cfg.image_budget("reranker"))
    if ev.use_ray:
        _init_ray(cfg)
    out_dir = _stage_dir(cfg, "eval")
    results: dict[str, Any] = {}
    for m in eval_models(cfg, manifest):
        target = out_dir / m["label"]
        done = target / "results.json"
        if done.is_file():
            res = json.loads(done.read_text())
        else:
            spec = _embedder_spec(cfg, image_root, m["model"], role="eval")
            kw = dict(image_root=image_root, top_k_dump=ev.top_k_dump, use_ray=ev.use_ray, batch_size=ev.batch_size,
                      min_actors=ev.min_actors, max_actors=ev.max_actors, num_cpus_per_actor=ev.num_cpus_per_actor,
                      num_gpus_per_actor=ev.num_gpus_per_actor, check_images=ev.check_images, label=m["label"])
            res = {}
            if "pairs" in ev.sets:
                res = evaluate_pairs_table(spec, table, target, reranker=reranker if m["rerank"] else None,
                                           rerank_top_k=ev.rerank.top_k, max_rows_per_dataset=ev.max_rows_per_dataset,
                                           **kw)
            if "mmeb" in ev.sets:
                kw.pop("check_images")
                mmeb = evaluate_mmeb_dir(spec, ev.mmeb_dir, target / "mmeb", subsets=ev.mmeb_subsets,
                                         reranker=reranker if m["rerank"] else None, rerank_top_k=ev.rerank.top_k,
                                         **kw)
                # MMEB-eval alone (the paper's eval): its results are the model's; beside pairs, a part of them.
                # Written as the model's results.json: what the report reads, and a rerun skips the model.
                res = {**res, "mmeb": mmeb} if "pairs" in ev.sets else mmeb
                write_json_atomic(res, done)
        vt = [r.get("visual_tokens") or {} for r in (res, res.get("mmeb") or {})]
        tokens = _visual_tokens(cfg, eval=[v.get("embedder") for v in vt], reranker=[v.get("reranker") for v in vt])
        results[m["label"]] = {**m, "per_dataset": res.get("per_dataset"), "summary": res.get("summary"),
                               "chance": res.get("chance"), "sizes": res.get("sizes"),
                               "rerank": res.get("rerank"), "results": str(done), "visual_tokens": tokens}
        logger.info("eval %s: %s", m["label"], {k: round(v, 2) for k, v in (res.get("per_dataset") or {}).items()
                                                if v is not None})
    per_model = [r["visual_tokens"] for r in results.values()]
    return {"enabled": True, "table": str(table) if table else None, "models": results,
            "reranker": str(reranker_ref) if reranker is not None else None,
            "visual_tokens": _visual_tokens(cfg, eval=[t.get("eval") for t in per_model],
                                            reranker=[t.get("reranker") for t in per_model])}


def stage_report(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    from .report import write_run_report

    path = write_run_report(Path(cfg.run_dir).resolve(), manifest.data)
    return {"report": str(path)}


STAGES: list[Stage] = [
    Stage("data", ("data",), stage_data),
    Stage("models", ("models",), stage_models),
    Stage("prepare", ("data",), stage_prepare),
    Stage("baseline", ("models", "baseline"), stage_baseline),
    Stage("embed", ("models", "embed"), stage_embed, fields=("mine.from_imported",)),
    Stage("retrieve", ("models", "embed", "retrieve"), stage_retrieve, fields=("mine.from_imported",)),
    Stage("judge_fit", ("models", "judge_fit"), stage_judge_fit),
    Stage("judge", ("judge",), stage_judge),
    Stage("mine", ("mine",), stage_mine),
    Stage("train", ("train",), stage_train),
    Stage("ablations", ("train", "compare"), stage_ablations),
    Stage("rerank", ("models", "reranker"), stage_rerank),
    Stage("eval", ("models", "eval"), stage_eval),
    Stage("report", (), stage_report, clear_on_rerun=False),
]
STAGE_NAMES = [s.name for s in STAGES]
OPTIONAL_STAGES = {"embed", "report"}   # nothing downstream reads their outputs


def stages_through(name: str) -> list[str]:
    """The stages a stage needs, then the stage: what ``unime-ray <stage>`` runs (completed ones are skipped)."""
    if name not in STAGE_NAMES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    upto = STAGE_NAMES[: STAGE_NAMES.index(name) + 1]
    return [s for s in upto if s == name or s not in OPTIONAL_STAGES]


def _stage_key(cfg: RunConfig, stage: Stage, upstream: str) -> str:
    own = cfg.section_hash(*stage.sections) if stage.sections else ""
    for f in stage.fields:  # e.g. whether retrieve runs or records imported negatives (and so all that follows)
        section, key = f.split(".")
        own += f"|{f}={getattr(getattr(cfg, section), key)}"
    return hashlib.sha256(f"{upstream}|{stage.name}|{own}".encode()).hexdigest()[:16]


def run_pipeline(cfg: RunConfig, force: bool = False, only: list[str] | None = None) -> Manifest:
    """Run (or resume) the configured stages in order; returns the manifest."""
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    wanted = only or cfg.stages or STAGE_NAMES
    unknown = [s for s in wanted if s not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGE_NAMES)}")
    manifest = Manifest(run_dir)
    upstream = ""
    order = [s.name for s in STAGES if s.name in wanted]
    for stage in STAGES:
        key = _stage_key(cfg, stage, upstream)
        if stage.name not in OPTIONAL_STAGES:  # nothing downstream reads optional stages' outputs
            upstream = key
        if stage.name not in wanted:
            continue
        prev = manifest.stage(stage.name)
        if not force and prev.get("status") == "complete" and prev.get("key") == key and stage.name != "report":
            logger.info("stage %-8s complete (skipped)", stage.name)
            continue
        if prev and prev.get("key") != key and stage.clear_on_rerun:
            shutil.rmtree(run_dir / stage.name, ignore_errors=True)  # config changed: start the stage afresh
        logger.info("stage %-8s running (%d of %d)", stage.name, order.index(stage.name) + 1, len(order))
        start = time.perf_counter()
        manifest.update(stage.name, status="running", key=key, started=time.time())
        try:
            outputs = stage.run(cfg, manifest)
        except BaseException as exc:
            end_live()
            manifest.update(stage.name, status="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        end_live()  # a progress line the stage left unfinished stays as it was
        manifest.update(stage.name, status="complete", seconds=round(time.perf_counter() - start, 2),
                        outputs=outputs, error=None)
        logger.info("stage %-8s complete in %s", stage.name, _took(time.perf_counter() - start))
    return manifest


def _took(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else fmt_duration(seconds)


def failed_stage(manifest: Manifest) -> str | None:
    """The stage that failed last in this run directory, if any."""
    failed = [(st.get("started") or 0, name) for name, st in manifest.data["stages"].items()
              if st.get("status") == "failed"]
    return max(failed)[1] if failed else None


def headline_table(report: str | os.PathLike) -> list[str]:
    """The report's main comparison table (one row per variant, P@1 per eval set), as aligned text lines;
    [] when the report has none (no eval stage)."""
    try:
        lines = Path(report).read_text().splitlines()
    except OSError:
        return []
    start = next((i for i, ln in enumerate(lines) if ln.startswith("| variant")), None)
    if start is None:
        return []
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if all(c and set(c) <= set("-:") for c in cells):
            continue  # the header's separator
        rows.append(cells)
    width = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]


def run_summary(run_dir: str | os.PathLike, manifest: Manifest) -> str:
    """What the end of a run prints: the stages' states, where the report and the log are, the headline table."""
    run_dir = Path(run_dir).resolve()
    out = [f"run directory: {run_dir}"]
    for name in STAGE_NAMES:
        st = manifest.stage(name)
        if st:
            secs = st.get("seconds")
            out.append(f"  {name:<9} {st.get('status'):<9} {_took(secs) if secs is not None else ''}".rstrip())
    log = run_dir / "logs" / "console.log"
    if log.is_file():
        out.append(f"log (Ray, libraries, workers): {log}")
    report = run_dir / "report.md"
    if report.is_file():
        out.append(f"report: {report}")
        table = headline_table(report)
        if table:
            out += ["", "Comparison (the headline table of report.md):"]
            out += ["  " + ln for ln in table]
    return "\n".join(out)
