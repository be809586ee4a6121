"""MMEB-style evaluation: precision@1 over per-row candidate lists with the ground truth first (reference 5.1).

Input is a canonical pair table in MMEB-eval form (``pos_*`` = the ground truth, ``neg_*`` lists = the
other candidates; ``task`` names the dataset), e.g. the demo's ``prepare/eval_pairs``, or MMEB-eval in
its published layout (one folder per subset), converted by :func:`prepare_mmeb_dir`.

Work per call: every distinct query and candidate is encoded once (candidates de-duplicated by their
id within a dataset when the table has ids, else by content), then each row's candidates are scored by
cosine. A row is a hit iff its ground truth outscores every other candidate; see
:data:`~unime_ray.eval.metrics.TIE_RULE`. Optionally the reranker picks rank 1 among the embedder's top-K
(reference 5.2). Outputs: ``results.json``, ``results.md``, ``results.png`` and ``topk.parquet`` (the
embedder's top-K per query, the input of a later reranking run).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data.convert import import_table
from ..data.convert.folders import data_files, subset_folders
from ..data.io import iter_rows, shard_paths, write_table_atomic
from ..data.schema import Item, item_from_row, negatives_from_row
from ..data.validate import DataError
from ..rerank.prompt import ANSWER_KINDS, RerankPrompt, read_listwise_answer
from ..utils.pool import Pool
from ..utils.progress import Progress
from ..utils.tallies import drain_visual_tokens, token_tally
from .encode import ItemEncoder, ItemRegistry
from .metrics import TIE_RULE, gt_rank, mean_count, rank_order
from .rerank import load_reranker
from .rerank import rerank_modes as rerank_modes_of

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ the 36 datasets
CLASSIFICATION = ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
                  "ImageNet-R", "ObjectNet", "Country211")
VQA = ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
       "TextVQA")
RETRIEVAL = ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA",
             "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS")
GROUNDING = ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing")
META_TASKS: dict[str, tuple[str, ...]] = {"Classification": CLASSIFICATION, "VQA": VQA, "Retrieval": RETRIEVAL,
                                          "Grounding": GROUNDING}
MMEB_DATASETS: tuple[str, ...] = CLASSIFICATION + VQA + RETRIEVAL + GROUNDING
# In-distribution = the 20 MMEB-train sets the embedder is trained on; the other 16 are out-of-distribution.
IND = ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "OK-VQA", "A-OKVQA", "DocVQA",
       "InfographicsVQA", "ChartQA", "Visual7W", "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i",
       "MSCOCO_i2t", "NIGHTS", "WebQA", "MSCOCO")
OOD = tuple(d for d in MMEB_DATASETS if d not in IND)
SUMMARY_KEYS = ("Classification", "VQA", "Retrieval", "Grounding", "IND", "OOD", "Overall", "Other")
"""Summary groups: the four meta-tasks, IND/OOD and Overall cover only the 36 MMEB datasets; ``Other`` holds
every other dataset (e.g. CIFAR-100, which the published MMEB-eval folder also carries, or custom sets)."""


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_NORM = {_norm(d): d for d in MMEB_DATASETS}
assert len(_BY_NORM) == 36


def mmeb_name(name: str) -> str | None:
    """The MMEB dataset a name refers to, ignoring case and punctuation ("imagenet_1k" -> "ImageNet-1K")."""
    return _BY_NORM.get(_norm(name))


def meta_task(name: str) -> str | None:
    canon = mmeb_name(name)
    return next((group for group, members in META_TASKS.items() if canon in members), None)


def split_of(name: str) -> str | None:
    canon = mmeb_name(name)
    return None if canon is None else ("IND" if canon in IND else "OOD")


def summarize(per_dataset: Mapping[str, float | None]) -> dict[str, dict[str, Any]]:
    """Meta-task, IND/OOD, overall and "other" means of per-dataset scores (percent).

    Returns ``{key: {"mean": float | None, "count": int}}`` for each key of :data:`SUMMARY_KEYS`;
    ``mean`` is None when no dataset of that group is present. The meta-tasks, IND, OOD and ``Overall``
    count only the 36 MMEB datasets (the paper's numbers need all 36; means are over those present). A
    dataset outside the 36 (CIFAR-100 of the published MMEB-eval folder, a custom set) counts only toward
    ``Other``, whose entry also lists them (``"datasets"``). A None score counts nowhere. Names match case-
    and punctuation-insensitively; two names for one dataset are an error.
    """
    groups: dict[str, list[float | None]] = {k: [] for k in SUMMARY_KEYS}
    seen: dict[str, str] = {}
    others: list[str] = []
    for name, score in per_dataset.items():
        canon = mmeb_name(name)
        if canon is None:
            groups["Other"].append(score)
            others.append(name)
            continue
        if canon in seen:
            raise ValueError(f"datasets {seen[canon]!r} and {name!r} both name MMEB's {canon}")
        seen[canon] = name
        groups[meta_task(canon)].append(score)
        groups[split_of(canon)].append(score)
        groups["Overall"].append(score)
    out: dict[str, dict[str, Any]] = {k: mean_count(v) for k, v in groups.items()}
    out["Other"]["datasets"] = others
    return out


def headline(summary: Mapping[str, Mapping[str, Any]]) -> tuple[str, float | None]:
    """The one number of an MMEB-form run: ``("Overall", mean over the MMEB datasets present)``, or, when
    none of the 36 is present (custom sets such as the demo's), ``("Other", mean over those sets)``."""
    if summary["Overall"]["count"]:
        return "Overall", summary["Overall"]["mean"]
    return "Other", (summary.get("Other") or {}).get("mean")   # results written before "Other" existed lack it


# ------------------------------------------------------------------------------------ planning
@dataclass
class DatasetPlan:
    """One dataset's rows as indices into the shared :class:`ItemRegistry` (ground truth first)."""

    name: str
    row_ids: list[str] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)
    candidates: list[np.ndarray] = field(default_factory=list)
    gt_duplicates: int = 0

    def __len__(self) -> int:
        return len(self.row_ids)


def _empty(item: Item) -> bool:
    return not item.prompt_text().strip() and not item.has_image


def plan_pairs(tables: Sequence[str | os.PathLike], registry: ItemRegistry, *, datasets: Iterable[str] | None = None,
               max_rows_per_dataset: int | None = None) -> dict[str, DatasetPlan]:
    """Read pair tables into per-dataset plans, registering each distinct item once.

    Raises :class:`DataError` (naming table, row, id and field) for a row without a query or without a
    ground truth, a candidate id reused for different content, or an image file that does not exist.
    A distractor identical to its row's ground truth (same id, or same content without ids) is dropped
    and counted: it is the ground truth, not a distractor, and would otherwise make the row a tie.
    """
    wanted = set(datasets) if datasets is not None else None
    plans: dict[str, DatasetPlan] = {}
    seen: dict[str, None] = {}
    for table in tables:
        source = str(table)
        for index, row in enumerate(iter_rows(table)):
            row_id = row.get("id") or None
            task = row.get("task")
            if not task:
                raise DataError(source, index, "task", "missing: the dataset name of the row", row_id)
            seen[task] = None
            if wanted is not None and task not in wanted:
                continue
            plan = plans.setdefault(task, DatasetPlan(task))
            if max_rows_per_dataset is not None and len(plan) >= max_rows_per_dataset:
                continue
            where = dict(where=source, row=index, row_id=row_id)
            query = item_from_row(row, "query_")
            if _empty(query):
                raise DataError(source, index, "query_text", "empty query: no text and no image", row_id)
            pos = item_from_row(row, "pos_")
            if _empty(pos):
                raise DataError(source, index, "pos_text", "no candidates: the ground truth (pos_*) is empty; "
                                "an evaluation row needs its ground truth first", row_id)
            q = registry.add(query, None, field="query_{}", **where)
            gt = registry.add(pos, row.get("pos_id"), scope=task, field="pos_{}", **where)
            cands = [gt]
            for j, (item, _, neg_id) in enumerate(negatives_from_row(row)):
                if _empty(item):
                    raise DataError(source, index, f"neg_text[{j}]", "empty candidate: no text and no image", row_id)
                c = registry.add(item, neg_id, scope=task, field=f"neg_{{}}[{j}]", **where)
                if c == gt:
                    plan.gt_duplicates += 1
                    continue
                cands.append(c)
            plan.row_ids.append(row_id or f"{task}:{index}")
            plan.queries.append(q)
            plan.candidates.append(np.asarray(cands, dtype=np.int64))
    if wanted is not None:
        missing = sorted(wanted - set(plans))
        if missing:
            raise DataError(", ".join(str(t) for t in tables), None, "task",
                            f"no rows for dataset(s) {missing}; datasets present: {sorted(seen) or 'none'}")
    return plans


# ------------------------------------------------------------------------------------ scoring
def score_rows(queries: np.ndarray, candidates: np.ndarray, rows: Sequence[np.ndarray],
               max_block: int = 1 << 24) -> list[np.ndarray]:
    """Cosine scores of each row's candidates: ``queries[i] . candidates[rows[i]]``.

    Scores a block of queries against the union of their candidates with one matrix product, the block
    sized so the [block, candidates] matrix stays under ``max_block`` floats.
    """
    if len(queries) != len(rows):
        raise ValueError(f"{len(queries)} queries for {len(rows)} candidate rows")
    if not rows:
        return []
    flat = np.concatenate(rows)
    uniq, inverse = np.unique(flat, return_inverse=True)
    cand = candidates[uniq]
    bounds = np.cumsum([0] + [len(r) for r in rows])
    block = max(1, min(256, max_block // max(1, len(uniq))))
    out: list[np.ndarray] = []
    for start in range(0, len(rows), block):
        sims = queries[start:start + block] @ cand.T
        for i in range(sims.shape[0]):
            r = start + i
            out.append(sims[i, inverse[bounds[r]:bounds[r + 1]]])
    return out


def _topk_table(dataset: str, plan: DatasetPlan, labels: Sequence[str], scores: list[np.ndarray],
                orders: list[np.ndarray], ranks: list[int], rerank: dict[str, list] | None) -> pa.Table:
    cols: dict[str, Any] = {
        "dataset": [dataset] * len(plan),
        "row_id": plan.row_ids,
        "num_candidates": [len(c) for c in plan.candidates],
        "gt_rank": ranks,
        "topk_index": [o.astype(np.int32).tolist() for o in orders],
        "topk_id": [[labels[plan.candidates[r][i]] for i in o] for r, o in enumerate(orders)],
        "topk_score": [s[o].astype(np.float32).tolist() for s, o in zip(scores, orders)],
    }
    types = {"dataset": pa.string(), "row_id": pa.string(), "num_candidates": pa.int32(), "gt_rank": pa.int32(),
             "topk_index": pa.list_(pa.int32()), "topk_id": pa.list_(pa.string()), "topk_score": pa.list_(pa.float32())}
    if rerank is not None:
        cols.update(rerank_top1=rerank["top1"], rerank_fallback=rerank["fell_back"], rerank_raw=rerank["raw"])
        types.update(rerank_top1=pa.int32(), rerank_fallback=pa.bool_(), rerank_raw=pa.string())
        for mode, top1 in rerank["modes"].items():
            cols[f"rerank_top1_{mode}"], types[f"rerank_top1_{mode}"] = top1, pa.int32()
        if rerank.get("p_yes") is not None:
            cols["rerank_p_yes"], types["rerank_p_yes"] = rerank["p_yes"], pa.list_(pa.float32())
    return pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})


def _pct(x: float) -> float:
    return round(float(x), 4)


def evaluate_pairs_table(embedder_or_spec: Any, table: str | os.PathLike | Sequence[str | os.PathLike],
                         out_dir: str | os.PathLike | None, *, image_root: str | os.PathLike | None = None,
                         reranker: Any = None, rerank_top_k: int = 5, rerank_modes: Sequence[str] = ("listwise",),
                         fusion_weight: float = 0.5, top_k_dump: int = 10,
                         pool: Pool | None = None, datasets: Iterable[str] | None = None, max_rows_per_dataset: int | None = None,
                         check_images: bool = True, label: str | None = None, kind: str = "pairs") -> dict[str, Any]:
    """Evaluate an embedder (``Embedder``, ``EmbedderSpec`` or model path; or a ready :class:`ItemEncoder`)
    on canonical MMEB-form pair table(s); write the outputs to ``out_dir`` (None: write nothing).

    Returns ``{"per_dataset": {name: P@1 %}, "summary": summarize(...), "chance": {...}, "datasets": {...},
    "rerank": {...} | None, "sizes": {...}, ...}`` (the content of ``results.json``). ``reranker``: an object
    with ``choose_many`` / ``score_pairs`` or a reranker folder; it reorders the embedder's top-``rerank_top_k``
    in each of ``rerank_modes`` (listwise, pairwise, fused with ``fusion_weight``), side by side; the first mode
    is the headline's (``rerank``), every mode is in ``rerank["modes"]``. ``pool`` encodes (None: in this process;
    a Ray pool needs a spec or a path).
    """
    t0 = time.perf_counter()
    tables = [table] if isinstance(table, (str, os.PathLike)) else list(table)
    for t in tables:
        if not shard_paths(t):
            raise FileNotFoundError(f"eval table {t} has no Parquet shards")
    out = Path(out_dir) if out_dir is not None else None
    encoder = ItemEncoder.wrap(embedder_or_spec, image_root=image_root, pool=pool, work_dir=out)
    root = image_root if image_root is not None else encoder.image_root
    registry = ItemRegistry(root, check_images=check_images)
    plans = plan_pairs(tables, registry, datasets=datasets, max_rows_per_dataset=max_rows_per_dataset)
    if not plans:
        raise DataError(", ".join(map(str, tables)), None, "<table>", "no evaluation rows")
    n_rows = sum(len(p) for p in plans.values())
    t_plan = time.perf_counter()
    logger.info("evaluating %d datasets, %d rows, %d distinct items with %s", len(plans), n_rows, len(registry),
                encoder.label)
    vectors = encoder.encode(registry.items, image_root=root)
    t_enc = time.perf_counter()

    reranker = load_reranker(reranker, image_root=root)
    depth = max(top_k_dump, rerank_top_k if reranker is not None else 0)
    results: dict[str, Any] = {"kind": kind, "model": label or encoder.label, "tables": [str(t) for t in tables],
                               "tie_rule": TIE_RULE, "per_dataset": {}, "chance": {}, "datasets": {}}
    rerank_info: dict[str, Any] | None = None
    if reranker is not None:
        rerank_modes = list(dict.fromkeys(rerank_modes))
        rerank_info = {"mode": rerank_modes[0], "top_k": rerank_top_k, "per_dataset": {}, "fallbacks_per_dataset": {},
                       "gt_in_top_k": {}, "choice_ranks": {}, "fusion_weight": fusion_weight if "fused" in rerank_modes
                       else None, "modes": {m: {"per_dataset": {}, "fallbacks_per_dataset": {}, "choice_ranks": {}}
                                            for m in rerank_modes}}
    topk_tables = []
    rerank_s = 0.0
    progress = Progress(logger, "scored rows", n_rows)
    for name, plan in plans.items():
        scores = score_rows(vectors[plan.queries], vectors, plan.candidates)
        ranks = [gt_rank(s) for s in scores]
        orders = [rank_order(s)[:depth] for s in scores]
        hits = sum(r == 0 for r in ranks)
        n_cands = np.array([len(c) for c in plan.candidates], dtype=np.float64)
        p1, chance = 100.0 * hits / len(plan), 100.0 * float(np.mean(1.0 / n_cands))
        results["per_dataset"][name] = _pct(p1)
        results["chance"][name] = _pct(chance)
        r = np.asarray(ranks)
        info = {"p_at_1": _pct(p1), "r_at_5": _pct(100.0 * np.mean(r < 5)), "r_at_10": _pct(100.0 * np.mean(r < 10)),
                "mrr": _pct(100.0 * np.mean(1.0 / (r + 1))), "hits": int(hits), "rows": len(plan),
                "mean_candidates": round(float(n_cands.mean()), 3), "min_candidates": int(n_cands.min()),
                "chance": _pct(chance), "gt_duplicates_dropped": plan.gt_duplicates,
                "mmeb_name": mmeb_name(name), "group": meta_task(name), "split": split_of(name)}
        rr = None
        if reranker is not None:
            tr = time.perf_counter()
            tops = [list(o[:rerank_top_k]) for o in orders]
            cand_items = [[registry.items[plan.candidates[r][i]] for i in top] for r, top in enumerate(tops)]
            by_mode = rerank_modes_of(reranker, [registry.items[q] for q in plan.queries], cand_items,
                                      [list(range(len(t))) for t in tops], rerank_top_k, rerank_modes,
                                      similarities=[[float(scores[r][i]) for i in top] for r, top in enumerate(tops)],
                                      weight=fusion_weight, what=f"reranked ({name})")
            in_top = sum(0 in top for top in tops)
            rr = {"modes": {}, "p_yes": next((res.p_yes for res in by_mode.values() if res.p_yes and
                                              res.p_yes[0] is not None), None)}
            for mode, res in by_mode.items():
                top1 = [top[o[0]] for top, o in zip(tops, res.orders)]
                p1 = _pct(100.0 * sum(t == 0 for t in top1) / len(plan))
                # which of the embedder's ranks the reranker picked (usable answers): a reranker that always names
                # one position has learned the slot, not the content
                picked = Counter(top.index(t) + 1 for top, t, fb in zip(tops, top1, res.fell_back) if not fb)
                block = rerank_info["modes"][mode]
                block["per_dataset"][name], block["fallbacks_per_dataset"][name] = p1, res.fallbacks
                block["choice_ranks"][name] = {str(k): picked[k] for k in sorted(picked)}
                if mode == "listwise":   # how the answers were read: as trained, the first (i) of more, or not
                    prompt = getattr(reranker, "prompt", RerankPrompt())
                    kinds = Counter(read_listwise_answer(raw, len(top), prompt)[1] for raw, top in zip(res.raw, tops))
                    block.setdefault("answers", {})[name] = {k: kinds[k] for k in ANSWER_KINDS if kinds[k]}
                rr["modes"][mode] = top1
                if mode == rerank_modes[0]:
                    rr.update(top1=top1, fell_back=res.fell_back, raw=res.raw)
                    info.update(reranked_p_at_1=p1, rerank_fallbacks=res.fallbacks,
                                gt_in_top_k=_pct(100.0 * in_top / len(plan)))
                    rerank_info["per_dataset"][name] = p1
                    rerank_info["fallbacks_per_dataset"][name] = res.fallbacks
                    rerank_info["gt_in_top_k"][name] = info["gt_in_top_k"]
                    rerank_info["choice_ranks"][name] = block["choice_ranks"][name]
            rerank_s += time.perf_counter() - tr
        results["datasets"][name] = info
        topk_tables.append(_topk_table(name, plan, registry.labels, scores,
                                       [o[:top_k_dump] for o in orders], ranks, rr))
        progress.update(len(plan))

    per = results["per_dataset"]
    results["summary"] = summarize(per)
    results["chance_summary"] = summarize(results["chance"])
    results["outside_mmeb"] = [n for n in per if mmeb_name(n) is None]
    if rerank_info is not None:
        rerank_info["summary"] = summarize(rerank_info["per_dataset"])
        rerank_info["fallbacks"] = int(sum(rerank_info["fallbacks_per_dataset"].values()))
        for block in rerank_info["modes"].values():
            block["summary"] = summarize(block["per_dataset"])
            block["fallbacks"] = int(sum(block["fallbacks_per_dataset"].values()))
    results["rerank"] = rerank_info
    results["sizes"] = {"datasets": len(plans), "rows": n_rows,
                        "candidate_slots": int(sum(len(c) for p in plans.values() for c in p.candidates)),
                        "distinct_items_encoded": len(registry),
                        "rows_per_dataset": {n: len(p) for n, p in plans.items()}}
    results["top_k_dump"] = {"k": top_k_dump, "file": "topk.parquet" if out is not None else None}
    t_end = time.perf_counter()
    results["timing"] = {"plan_s": round(t_plan - t0, 3), "encode_s": round(t_enc - t_plan, 3),
                         "score_s": round(t_end - t_enc - rerank_s, 3), "rerank_s": round(rerank_s, 3),
                         "total_s": round(t_end - t0, 3),
                         "items_per_s": round(len(registry) / max(t_enc - t_plan, 1e-9), 2),
                         "use_ray": encoder.pool.ray}
    results["metrics"] = pair_metrics(results)
    # visual tokens per image actually used (models.budget tallies): the embedder's encodes, the reranker's prompts
    results["visual_tokens"] = {"embedder": token_tally(drain_visual_tokens(encoder)),
                                "reranker": token_tally(drain_visual_tokens(reranker)) if reranker is not None
                                else None}
    if out is not None:
        from .outputs import write_outputs

        out.mkdir(parents=True, exist_ok=True)
        write_table_atomic(pa.concat_tables(topk_tables), out / "topk.parquet")
        results["outputs"] = write_outputs(out, results)
    return results


def pair_metrics(results: Mapping[str, Any]) -> dict[str, float | None]:
    """Flat ``{label: value}`` view (what :func:`~unime_ray.eval.outputs.compare_runs` lines up)."""
    m: dict[str, float | None] = {}
    for name, v in results["per_dataset"].items():
        m[f"P@1 {name}"] = v
    for key, s in results["summary"].items():
        if s["count"]:
            m[f"mean {key}"] = s["mean"]
    rr = results.get("rerank")
    if rr:
        for name, v in rr["per_dataset"].items():
            m[f"rerank P@1 {name}"] = v
        for key, s in rr["summary"].items():
            if s["count"]:
                m[f"rerank mean {key}"] = s["mean"]
    return m


# ------------------------------------------------------------------------------------ MMEB-eval folders
def prepare_mmeb_dir(mmeb_dir: str | os.PathLike, tables_dir: str | os.PathLike, *,
                     image_root: str | os.PathLike | None = None, subsets: Sequence[str] | None = None,
                     check_images: bool = True) -> list[Path]:
    """Convert MMEB-eval subsets (``mmeb_dir/<subset>/*.parquet|jsonl``, rows ``qry_text, qry_img_path,
    tgt_text[], tgt_img_path[]``) into canonical pair tables under ``tables_dir/<subset>``.

    Conversion is cached (a subset with a ``_done.json`` for the same files is not converted again).
    Any rejected row is an error: an evaluation set that silently lost rows would report wrong numbers.
    """
    root = Path(mmeb_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"MMEB-eval folder not found: {root}")
    found = [d.name for d in subset_folders(root)]
    if subsets is None:
        subsets = found
        if not subsets:
            raise FileNotFoundError(f"no MMEB-eval subset folders (with .parquet/.jsonl files) in {root}")
    for s in subsets:
        if s not in found:
            hint = f"; did you mean {mmeb_name(s)!r}?" if mmeb_name(s) in found and mmeb_name(s) != s else ""
            raise FileNotFoundError(f"unknown MMEB-eval subset {s!r}: no folder {root / s} with .parquet/.jsonl "
                                    f"rows{hint} (found: {', '.join(found) or 'none'})")
    for s in subsets:
        if mmeb_name(s) is None:
            logger.warning("subset %r is not one of the 36 MMEB datasets: it is reported under Other, not in "
                           "Overall", s)
    out_paths = []
    for s in subsets:
        files = data_files(root / s)
        sig = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        target = Path(tables_dir) / s
        done = target / "_done.json"
        if done.is_file() and json.loads(done.read_text()).get("files") == sig:
            out_paths += [target / f"part{k:03d}" for k in range(len(files))]
            continue
        accounts = []
        for k, f in enumerate(files):
            qpath = target / f"part{k:03d}.quarantine.parquet"
            acc = import_table(f, "mmeb-eval", target / f"part{k:03d}", quarantine_path=qpath, task=s,
                               image_root=image_root, check_images=check_images)
            if acc.rows_quarantined:
                first = pq.read_table(qpath).slice(0, 1).to_pylist()[0]
                raise DataError(str(f), first["row"], first["field"],
                                f"{first['reason']} ({acc.rows_quarantined} of {acc.rows_in} rows of subset {s!r} "
                                f"rejected; all listed in {qpath})", first["id"])
            accounts.append(acc.as_dict())
            out_paths.append(target / f"part{k:03d}")
        done.write_text(json.dumps({"files": sig, "accounts": accounts}, indent=1))
    return out_paths


def evaluate_mmeb_dir(embedder_or_spec: Any, mmeb_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                      image_root: str | os.PathLike | None = None, subsets: Sequence[str] | None = None,
                      tables_dir: str | os.PathLike | None = None, check_images: bool = True,
                      **kwargs) -> dict[str, Any]:
    """MMEB-eval from its published folder layout: convert (cached in ``tables_dir``, default
    ``out_dir/mmeb_tables``), then :func:`evaluate_pairs_table` (``kwargs`` go there)."""
    tables = prepare_mmeb_dir(mmeb_dir, tables_dir or Path(out_dir) / "mmeb_tables", image_root=image_root,
                              subsets=subsets, check_images=check_images)
    return evaluate_pairs_table(embedder_or_spec, tables, out_dir, image_root=image_root, check_images=False,
                                kind="mmeb", **kwargs)
