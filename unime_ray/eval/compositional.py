"""Compositional caption pairs, SugarCrepe style (method reference 5.4, 5.5).

Each example is an image with a positive caption and a minimally edited negative one. The embedder
gets a hit iff cos(image, positive) > cos(image, negative); a reranker (pairwise, P(Yes) of the
"does the candidate meet the query" question) iff P(Yes | positive) > P(Yes | negative). Ties are
misses, and so is an example the reranker could not score (NaN; counted as ``unscored``). Subsets
group into Replace (obj/att/rel), Swap (obj/att) and Add (obj/att); R_Compos is the mean of the
three group means (paper Tables 3-4).

Layout read: a folder with one file per subset (``replace_obj.json`` ...), each a SugarCrepe JSON
object ``{id: {"filename", "caption", "negative_caption"}}``, or a JSON list / JSONL / Parquet of such
records; a single file may carry a ``subset`` field per record.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..data.convert.records import read_records
from ..data.images import resolve_image_path
from ..data.schema import Item
from ..data.validate import DataError
from ..utils.pool import Pool
from .encode import ItemEncoder, ItemRegistry
from .metrics import mean_count, pair_accuracy
from .rerank import load_reranker, score_pairs_chunked
from .retrieval import IMAGE_PROMPT, _image_key

logger = logging.getLogger(__name__)

GROUPS: dict[str, tuple[str, ...]] = {"Replace": ("replace_obj", "replace_att", "replace_rel"),
                                      "Swap": ("swap_obj", "swap_att"), "Add": ("add_obj", "add_att")}
SUBSETS = tuple(s for members in GROUPS.values() for s in members)


def summarize_compositional(per_subset: Mapping[str, float | None]) -> dict[str, dict[str, float | int | None]]:
    """``{"Replace", "Swap", "Add", "R_Compos", "Overall": {"mean", "count"}}``.

    Group means are over the subsets present; ``R_Compos`` is the mean of the group means present (its
    count = number of groups); ``Overall`` is the mean over every subset, including unknown ones.
    """
    out = {g: mean_count(per_subset.get(s) for s in members) for g, members in GROUPS.items()}
    out["R_Compos"] = mean_count(out[g]["mean"] for g in GROUPS)
    out["Overall"] = mean_count(per_subset.values())
    return out


@dataclass(frozen=True)
class CompositionalExample:
    id: str
    image: Item
    positive: Item
    negative: Item


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # SugarCrepe: {id: record}
            yield from ((str(k), v) for k, v in data.items())
            return
        if not isinstance(data, list):
            raise DataError(str(path), None, "<file>", f"expected a JSON object or list, got {type(data).__name__}")
        yield from ((str(i), v) for i, v in enumerate(data))
        return
    yield from ((str(i), v) for i, v in enumerate(read_records(path)))


_POS = ("caption", "positive_caption", "pos_caption")
_NEG = ("negative_caption", "neg_caption")


def _first(rec: Mapping[str, Any], names: Sequence[str]) -> Any:
    return next((rec[n] for n in names if rec.get(n) is not None), None)


def load_compositional(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                       subsets: Iterable[str] | None = None, max_rows: int | None = None,
                       image_prompt: str = IMAGE_PROMPT, check_images: bool = True
                       ) -> dict[str, list[CompositionalExample]]:
    """``{subset: [example, ...]}`` from a folder (one file per subset) or a single file."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".json", ".jsonl", ".parquet")
                       and not f.name.startswith((".", "_")))
        if not files:
            raise FileNotFoundError(f"no .json/.jsonl/.parquet subset files in {p}")
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"compositional data not found: {p}")
    wanted = set(subsets) if subsets is not None else None
    out: dict[str, list[CompositionalExample]] = {}
    for f in files:
        for index, (rid, rec) in enumerate(_records(f)):
            where = str(f)
            if not isinstance(rec, Mapping) or "__invalid_json__" in rec:
                raise DataError(where, index, "<row>", "expected an object (a valid JSON record)")
            subset = str(rec.get("subset") or f.stem)
            if wanted is not None and subset not in wanted:
                continue
            rows = out.setdefault(subset, [])
            if max_rows is not None and len(rows) >= max_rows:
                continue
            _, img_path, data = _image_key(rec, where, index)
            if check_images and img_path and not resolve_image_path(img_path, image_root).is_file():
                raise DataError(where, index, "filename" if "filename" in rec else "image_path",
                                f"image file not found: {resolve_image_path(img_path, image_root)}", rid)
            pos, neg = _first(rec, _POS), _first(rec, _NEG)
            for name, v in (("caption", pos), ("negative_caption", neg)):
                if not isinstance(v, str) or not v.strip():
                    raise DataError(where, index, name, "missing or empty caption", rid)
            rows.append(CompositionalExample(str(rec.get("id", rid)), Item(instruction=image_prompt, image=data,
                                                                            image_path=img_path),
                                             Item(text=pos), Item(text=neg)))
    if wanted is not None and (missing := sorted(wanted - set(out))):
        raise FileNotFoundError(f"unknown compositional subset(s) {missing} in {p}; found: {sorted(out) or 'none'}")
    for s in out:
        if s not in SUBSETS:
            logger.warning("subset %r is not a SugarCrepe subset: it counts only toward Overall", s)
    return out


def evaluate_compositional(embedder_or_spec: Any, data: Mapping[str, Sequence[CompositionalExample]],
                           out_dir: str | os.PathLike | None, *, image_root: str | os.PathLike | None = None,
                           reranker: Any = None, pool: Pool | None = None, label: str | None = None) -> dict[str, Any]:
    """Accuracy per subset (embedder, and reranker when given), group means; writes results to ``out_dir``.

    Every distinct image and caption is encoded once. The reranker reads the image (with the image-side
    prompt) as the query and each caption as the candidate.
    """
    t0 = time.perf_counter()
    encoder = ItemEncoder.wrap(embedder_or_spec, image_root=image_root, pool=pool, work_dir=out_dir)
    registry = ItemRegistry(check_images=False)
    index = {s: np.array([[registry.add(e.image), registry.add(e.positive), registry.add(e.negative)] for e in rows],
                         dtype=np.int64).reshape(-1, 3) for s, rows in data.items()}
    vec = encoder.encode(registry.items, image_root=image_root)
    reranker = load_reranker(reranker, image_root=image_root if image_root is not None else encoder.image_root)
    subsets, per, per_rr = {}, {}, {}
    for s, idx in index.items():
        if not len(idx):
            raise DataError(s, None, "<subset>", "no examples")
        img, pos, neg = vec[idx[:, 0]], vec[idx[:, 1]], vec[idx[:, 2]]
        s_pos, s_neg = np.sum(img * pos, axis=1), np.sum(img * neg, axis=1)
        per[s] = round(pair_accuracy(s_pos, s_neg), 4)
        subsets[s] = {"pairs": len(idx), "accuracy": per[s], "group": next((g for g, m in GROUPS.items() if s in m),
                                                                          None)}
        if reranker is not None:
            rows = data[s]
            pairs = [(e.image, e.positive) for e in rows] + [(e.image, e.negative) for e in rows]
            p = score_pairs_chunked(reranker, pairs, what=f"reranker pairs ({s})")
            p_pos, p_neg = p[:len(rows)], p[len(rows):]
            per_rr[s] = round(pair_accuracy(p_pos, p_neg), 4)   # NaN > x is False: an unscored pair is a miss
            subsets[s]["reranker_accuracy"] = per_rr[s]
            subsets[s]["reranker_unscored"] = int(np.count_nonzero(np.isnan(p_pos) | np.isnan(p_neg)))
    results: dict[str, Any] = {"kind": "compositional", "model": label or encoder.label, "image_prompt": IMAGE_PROMPT,
                               "subsets": subsets, "per_subset": per, "summary": summarize_compositional(per),
                               "chance": 50.0, "sizes": {"pairs": int(sum(len(i) for i in index.values())),
                                                         "distinct_items_encoded": len(registry)}}
    results["rerank"] = ({"mode": "pairwise", "per_subset": per_rr, "summary": summarize_compositional(per_rr),
                          "unscored_examples": int(sum(v.get("reranker_unscored", 0) for v in subsets.values()))}
                         if reranker is not None else None)
    metrics: dict[str, float | None] = {f"acc {s}": v for s, v in per.items()}
    metrics.update({k: v["mean"] for k, v in results["summary"].items() if v["count"]})
    if reranker is not None:
        metrics.update({f"reranker acc {s}": v for s, v in per_rr.items()})
        metrics.update({f"reranker {k}": v["mean"] for k, v in results["rerank"]["summary"].items() if v["count"]})
    results["metrics"] = metrics
    results["timing"] = {"total_s": round(time.perf_counter() - t0, 3)}
    if out_dir is not None:
        from .outputs import write_outputs

        write_outputs(out_dir, results)
    return results
