"""The staged, resumable run: one run directory, a folder per stage, and a manifest.

Stages so far: ``data`` (build or locate the input data) -> ``models`` (tiny checkpoints for the demo)
-> ``prepare`` (convert + validate into canonical tables, quarantining bad rows) -> ``embed`` (encode
tables over a Ray Data actor pool) -> ``report``. Later stages (retrieval, judge, mining, training,
evaluation) plug into :data:`STAGES`.

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
    for role in ("embedder", "judge"):  # fail now, with a clear message, on unknown names or architectures
        ref = cfg.model_ref(getattr(cfg.models, role))
        out[role] = {"ref": ref, "architecture": architecture_of(load_config(ref), ref).model_type}
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
    spec = _embedder_spec(cfg, prepared.get("image_root"))
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
    return {"tables": results, "embedder": spec.model}


def _embedder_spec(cfg: RunConfig, image_root: str | None):
    from .retrieval.embed import EmbedderSpec

    m = cfg.models
    return EmbedderSpec(model=cfg.model_ref(m.embedder), input_format=m.input_format, dtype=m.dtype,
                        image_root=image_root, processor_backend=m.processor_backend, image_resize=m.image_resize,
                        min_pixels=m.min_pixels, max_pixels=m.max_pixels, positions=m.positions)


def _init_ray(cfg: RunConfig) -> None:
    from .utils.ray_utils import init_ray

    r = cfg.ray
    init_ray(r.address, r.num_cpus, r.num_gpus, r.include_dashboard, r.env_vars)


def stage_retrieve(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    from .retrieval.index import IndexSpec
    from .retrieval.stage import RetrieveSettings, run_retrieval

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
    out = run_retrieval(pairs["path"], candidates["path"] if candidates else None, _stage_dir(cfg, "retrieve"),
                        _embedder_spec(cfg, prepared.get("image_root")), settings, use_ray=True,
                        batch_size=e.batch_size, min_actors=e.min_actors, max_actors=e.max_actors,
                        num_cpus=e.num_cpus_per_actor, num_gpus=e.num_gpus_per_actor,
                        search_actors=r.search_actors)
    logger.info("retrieve: %d queries, %.1f candidates each on average, %d without any", out["queries"],
                out["mean_candidates"], out["queries_without_candidates"])
    return out


def stage_judge(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    from .judge.stage import JudgeSpec, run_judge

    retrieved = manifest.outputs("retrieve")
    prepared = manifest.outputs("prepare")
    j = cfg.judge
    prompt: dict[str, Any] = {"version": j.prompt_version}
    if j.instruction:
        prompt["instruction"] = j.instruction
    spec = JudgeSpec(model=cfg.model_ref(j.model or cfg.models.judge), backend=j.backend, dtype=j.dtype,
                     batch_size=j.batch_size, prefix_reuse=j.prefix_reuse, image_root=prepared.get("image_root"),
                     min_pixels=j.min_pixels, max_pixels=j.max_pixels, max_length=j.max_length, prompt=prompt,
                     vllm=j.vllm.model_dump() if j.backend == "vllm" else {})
    _init_ray(cfg)
    pairs = prepared["tables"][f"{cfg.retrieve.split}_pairs"]["path"]
    out = run_judge(retrieved["candidates_table"], pairs, retrieved["candidate_pool"], _stage_dir(cfg, "judge"),
                    spec, use_ray=True, batch_size=j.rows_per_call, min_actors=j.min_actors,
                    max_actors=j.max_actors, num_cpus=j.num_cpus_per_actor, num_gpus=j.num_gpus_per_actor)
    logger.info("judge: %d pairs scored, %d quarantined, %.1f pairs/s", out["scored"], out["quarantined"],
                out["pairs_per_s"])
    return out


def stage_mine(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    from .mining.stage import MineSettings, run_mining

    retrieved, judged, prepared = manifest.outputs("retrieve"), manifest.outputs("judge"), manifest.outputs("prepare")
    m = cfg.mine
    settings = MineSettings(num_negatives=m.num_negatives, beta=m.beta, interval=m.interval, seed=cfg.seed,
                            fallback_score=m.fallback_score)
    return run_mining(retrieved["candidates_table"], judged["scores_table"],
                      prepared["tables"][f"{cfg.retrieve.split}_pairs"]["path"], retrieved["candidate_pool"],
                      _stage_dir(cfg, "mine"), settings, image_root=prepared.get("image_root"),
                      export_official=m.export_official)


def stage_train(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    from .train.embedder import TrainSettings, train_embedder

    mined, prepared = manifest.outputs("mine"), manifest.outputs("prepare")
    t, m = cfg.train, cfg.models
    settings = TrainSettings(model=cfg.model_ref(m.embedder), output_dir=str(_stage_dir(cfg, "train")),
                             input_format=m.input_format, positions=m.positions,
                             image_root=prepared.get("image_root"), seed=cfg.seed, **t.model_dump())
    _init_ray(cfg)
    out = train_embedder(mined["training_table"], settings, name=cfg.name)
    logger.info("train: %d steps, final loss %.4f, model at %s", out["steps"], out["final"].get("loss", float("nan")),
                out["model"])
    return out


def stage_report(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    from .report import write_run_report

    path = write_run_report(Path(cfg.run_dir).resolve(), manifest.data)
    return {"report": str(path)}


STAGES: list[Stage] = [
    Stage("data", ("data",), stage_data),
    Stage("models", ("models",), stage_models),
    Stage("prepare", ("data",), stage_prepare),
    Stage("embed", ("models", "embed"), stage_embed),
    Stage("retrieve", ("models", "embed", "retrieve"), stage_retrieve),
    Stage("judge", ("judge",), stage_judge),
    Stage("mine", ("mine",), stage_mine),
    Stage("train", ("train",), stage_train),
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
        logger.info("stage %-8s running", stage.name)
        start = time.perf_counter()
        manifest.update(stage.name, status="running", key=key, started=time.time())
        try:
            outputs = stage.run(cfg, manifest)
        except BaseException as exc:
            manifest.update(stage.name, status="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        manifest.update(stage.name, status="complete", seconds=round(time.perf_counter() - start, 2),
                        outputs=outputs, error=None)
        logger.info("stage %-8s complete in %.1f s", stage.name, time.perf_counter() - start)
    return manifest
