"""The ``embed`` stage (encode tables with the retriever) and the ``retrieve`` stage (S1: top-K candidates per
query below the threshold, sharded FAISS), and which embedder S1 uses: the trained baseline when there is one,
else ``models.retriever``, else ``models.embedder``."""

from __future__ import annotations

import logging
from typing import Any

from ...utils.markdown import markdown_table
from ..results import EmbedResult, PrepareResult, RetrieveResult, imported_stage, imported_training
from ..specs import IMPORTED_READS, RETRIEVER_READS, retriever_spec
from ..stage import Context, Section, Stage

logger = logging.getLogger(__name__)


def run_embed(ctx: Context) -> dict[str, Any]:
    from ...models.encode import embed_table

    cfg = ctx.cfg
    prepared = ctx.result("prepare", PrepareResult)
    if cfg.embed.tables and imported_training(ctx):
        # S1 does not run, so its retriever is not part of the run (the models stage does not require it either)
        return {"imported": True, "tables": {}, "note": "not run: the training pairs came with judge-scored "
                "negatives (mine.from_imported: use), so S1's retriever embeds nothing in this run"}
    spec = retriever_spec(ctx, prepared.image_root)
    ctx.init_ray()
    results = {}
    for table in cfg.embed.tables:
        if table not in prepared.tables:
            logger.warning("embed: table %s was not prepared; skipping it", table)
            continue
        prefix = "query_" if table.endswith("pairs") else ""
        stats = embed_table(spec, prepared.path(table), ctx.dir / table, prefix=prefix, pool=cfg.embed.pool)
        results[table] = {**stats, "path": str(ctx.dir / table)}
        logger.info("embed %s: %d rows at %.1f items/s", table, stats["rows_embedded"], stats["items_per_s"])
    return {"tables": results, "embedder": spec.model,
            "visual_tokens": ctx.visual_tokens(retriever=[r.get("visual_tokens") for r in results.values()])}


def report_embed(s: Section) -> list[str]:
    emb: EmbedResult = s.result  # type: ignore[assignment]
    if not emb.tables:
        return []
    return ["\n## Embedding\n", f"Embedder: `{emb.embedder}`\n",
            markdown_table(["table", "rows embedded (this run)", "seconds", "items/s"],
                           [[t, st["rows_embedded"], st["seconds"], st["items_per_s"]]
                            for t, st in emb.tables.items()])]


def run_retrieve(ctx: Context) -> dict[str, Any]:
    from ...retrieval.stage import run_retrieval

    cfg = ctx.cfg
    imported = imported_training(ctx)
    if imported:
        return imported_stage(imported, "global retrieval")
    prepared = ctx.result("prepare", PrepareResult)
    r = cfg.retrieve
    pairs = prepared.path(f"{r.split}_pairs")
    if pairs is None:
        raise ValueError(f"retrieve.split={r.split!r} but no {r.split} pairs were prepared")
    ctx.init_ray()
    spec = retriever_spec(ctx, prepared.image_root)
    out = run_retrieval(pairs, prepared.path(f"{r.split}_candidates"), ctx.dir, spec, r, pool=cfg.embed.pool,
                        seed=cfg.seed)
    logger.info("retrieve: %d queries, %.1f candidates each on average, %d without any", out["queries"],
                out["mean_candidates"], out["queries_without_candidates"])
    return {**out, "embedder": spec.model, "visual_tokens": ctx.visual_tokens(retriever=out.get("visual_tokens"))}


def report_retrieve(s: Section) -> list[str]:
    ret: RetrieveResult = s.result  # type: ignore[assignment]
    if ret.queries is None:
        return []
    return ["\n## Global retrieval\n", markdown_table(
        ["queries", "mean candidates", "queries without candidates", "mean dropped by delta", "pools",
         "search rows/s"],
        [[ret.queries, ret.mean_candidates, ret.queries_without_candidates, ret.mean_dropped_by_delta, ret.pools,
          (ret.search or {}).get("rows_per_s")]])]


EMBED = Stage("embed", "encode the configured tables with S1's embedder (Ray Data actor pool)", run_embed,
              reads=(*RETRIEVER_READS, *IMPORTED_READS, "embed"), result=EmbedResult, report=report_embed,
              optional=True, command="")
RETRIEVE = Stage("retrieve", "stage S1: top-K candidates per query below delta (sharded FAISS)", run_retrieve,
                 reads=(*RETRIEVER_READS, *IMPORTED_READS, "retrieve", "embed.pool", "seed"), result=RetrieveResult,
                 report=report_retrieve)
