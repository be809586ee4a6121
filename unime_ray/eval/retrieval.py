"""Zero-shot image-text retrieval: Recall@K in both directions (method reference 5.3, 5.5).

Directions are named by the query side and labelled the right way round (the official code prints
them swapped): ``i2t`` = an image queries the captions, ``t2i`` = a caption queries the images.
Flickr30K / COCO keep 5 captions per image (caption i belongs to image i // 5); ShareGPT4V / Urban1K
have one (caption i <-> image i). Default prompts are the official code's: the image side reads
``"<image> Find an image caption describing the given image."`` and a caption is encoded as is.

Reranked recall (listwise over the embedder's top-K) counts a hit only for a caption of *that* image
(never the official 5-caption window, which inflates 1:1 sets).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..data.convert.records import read_records
from ..data.images import resolve_image_path
from ..data.schema import IMAGE_MARKER, Item
from ..data.validate import DataError
from ..utils.pool import Pool
from .encode import ItemEncoder
from .metrics import TIE_RULE, mean_count, rank_order
from .rerank import load_reranker, rerank_listwise

logger = logging.getLogger(__name__)

IMAGE_PROMPT = f"{IMAGE_MARKER} Find an image caption describing the given image."
DEFAULT_KS = (1, 5, 10)
# Paper aggregates (reference 5.3): R_Short over Flickr30K + COCO, R_Long over ShareGPT4V + Urban1K (R@1, both ways).
SHORT_SETS = ("flickr30k", "flickr", "coco", "coco2014", "mscoco")
LONG_SETS = ("sharegpt4v", "urban1k", "urban200k")


# ------------------------------------------------------------------------------------ metrics
def caption_to_image(n_captions: int, n_images: int, captions_per_image: int = 1) -> np.ndarray:
    """Image index of each caption when captions come in fixed groups: caption i -> image i // k."""
    if captions_per_image <= 0:
        raise ValueError("captions_per_image must be positive")
    if n_captions != n_images * captions_per_image:
        raise ValueError(f"{n_captions} captions for {n_images} images at {captions_per_image} caption(s) per image")
    return np.arange(n_captions) // captions_per_image


def _gt_mask(gt: Any, n_queries: int, n_candidates: int) -> np.ndarray:
    if isinstance(gt, np.ndarray) and gt.dtype == bool:
        mask = gt
    else:
        mask = np.zeros((n_queries, n_candidates), dtype=bool)
        if isinstance(gt, np.ndarray) and gt.ndim == 1 and np.issubdtype(gt.dtype, np.integer):
            if len(gt) != n_queries:
                raise ValueError(f"{len(gt)} ground-truth indices for {n_queries} queries")
            mask[np.arange(n_queries), gt] = True
        else:
            gt = list(gt)
            if len(gt) != n_queries:
                raise ValueError(f"{len(gt)} ground-truth entries for {n_queries} queries")
            for q, g in enumerate(gt):
                mask[q, np.atleast_1d(np.asarray(g, dtype=np.int64))] = True
    if mask.shape != (n_queries, n_candidates):
        raise ValueError(f"ground-truth mask of shape {mask.shape} for similarities of shape "
                         f"{(n_queries, n_candidates)}")
    missing = np.flatnonzero(~mask.any(axis=1))
    if missing.size:
        raise ValueError(f"query {int(missing[0])} has no ground-truth candidate ({missing.size} such queries)")
    return mask


def best_gt_rank(sim: np.ndarray, gt: Any) -> np.ndarray:
    """0-based rank of each query's best-scoring ground truth: the number of *non*-GT candidates scoring
    at least as high (tie rule: a tie goes to the distractor). Other GTs above it do not count."""
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"similarities must be a [queries, candidates] matrix, got shape {sim.shape}")
    mask = _gt_mask(gt, *sim.shape)
    best = np.where(mask, sim, -np.inf).max(axis=1)
    return np.count_nonzero(np.where(mask, -np.inf, sim) >= best[:, None], axis=1)


def recall_at_k(sim: np.ndarray, gt: Any, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """``{"R@k": percent}``: share of queries with a ground truth among their top-k candidates.

    ``sim``: [queries, candidates]; ``gt``: an int array (one GT per query), a list of index lists (several
    GTs, e.g. the 5 captions of an image) or a boolean [queries, candidates] mask.
    """
    ranks = best_gt_rank(sim, gt)
    return {f"R@{k}": 100.0 * float(np.mean(ranks < k)) for k in ks}


def bidirectional_recall(sim_t2i: np.ndarray, caption_image: Sequence[int], ks: Iterable[int] = DEFAULT_KS,
                         block: int = 1024) -> dict[str, dict[str, float]]:
    """``{"i2t": {...}, "t2i": {...}}`` from caption-by-image similarities and each caption's image index.

    Works in row blocks so COCO-sized matrices (25k x 5k) never need a dense boolean mask.
    """
    sim_t2i = np.asarray(sim_t2i, dtype=np.float32)
    c2i = np.asarray(caption_image, dtype=np.int64)
    n_txt, n_img = sim_t2i.shape
    if len(c2i) != n_txt:
        raise ValueError(f"{len(c2i)} caption->image entries for {n_txt} captions")
    ks = list(ks)
    t2i_ranks = np.concatenate([best_gt_rank(sim_t2i[s:s + block], c2i[s:s + block])
                                for s in range(0, n_txt, block)]) if n_txt else np.zeros(0)
    sim_i2t = sim_t2i.T
    i2t_ranks = []
    for s in range(0, n_img, block):
        rows = np.arange(s, min(s + block, n_img))
        mask = c2i[None, :] == rows[:, None]
        i2t_ranks.append(best_gt_rank(sim_i2t[rows], mask))
    i2t = np.concatenate(i2t_ranks) if i2t_ranks else np.zeros(0)
    return {"i2t": {f"R@{k}": 100.0 * float(np.mean(i2t < k)) for k in ks},
            "t2i": {f"R@{k}": 100.0 * float(np.mean(t2i_ranks < k)) for k in ks}}


def retrieval_aggregates(per_set: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, dict]:
    """R_Short / R_Long (paper Tables 3-4): means of the R@1 numbers (both directions) of the sets present."""
    def norm(n: str) -> str:
        return "".join(ch for ch in n.lower() if ch.isalnum())

    out = {}
    for key, names in (("R_Short", SHORT_SETS), ("R_Long", LONG_SETS)):
        vals = [s[d]["R@1"] for n, s in per_set.items() if norm(n) in names for d in ("i2t", "t2i")]
        if vals:
            out[key] = mean_count(vals)
    return out


# ------------------------------------------------------------------------------------ data
@dataclass
class RetrievalSet:
    """Images, captions (flattened, image order) and the image index of every caption."""

    name: str
    images: list[Item]
    captions: list[Item]
    caption_image: np.ndarray
    image_root: str | None = None

    @property
    def captions_per_image(self) -> float:
        return len(self.captions) / max(1, len(self.images))


def _image_key(rec: Mapping[str, Any], where: str, index: int) -> tuple[str, str | None, bytes | None]:
    """(identity, image_path, inline bytes) of a record's image; ``image`` may be a path, bytes or an HF
    ``{"bytes", "path"}`` dict."""
    img = rec.get("image")
    path = rec.get("image_path") or rec.get("filename")
    data = None
    if isinstance(img, str):
        path = path or img
    elif isinstance(img, (bytes, bytearray)):
        data = bytes(img)
    elif isinstance(img, Mapping):
        data = img.get("bytes")
        path = path or img.get("path")
    if data:
        return "b:" + hashlib.sha1(data).hexdigest(), None, bytes(data)
    if not path or not isinstance(path, str):
        raise DataError(where, index, "image_path", "missing: each record needs an image (image_path or image)")
    return "p:" + path, path, None


def load_retrieval_set(path: str | os.PathLike, *, name: str | None = None,
                       image_root: str | os.PathLike | None = None, captions_per_image: int | None = None,
                       image_prompt: str = IMAGE_PROMPT, caption_prompt: str = "", max_images: int | None = None,
                       check_images: bool = True) -> RetrievalSet:
    """Read ``{image_path | image, caption | captions | text}`` records (JSONL / JSON list / Parquet), e.g.
    the official Flickr30K / COCO test Parquet (``image`` struct, ``text`` = 5 captions) or a retrieval
    table written by ``unime-ray prepare --format retrieval|sharegpt4v|urban1k``.

    Records may hold one image with all its captions (``captions`` list) or one caption each (rows of
    one image share ``image_path``); captions group by image in first-seen order. ``captions_per_image``
    keeps the first k captions of each image (COCO has images with 6-7, the protocol uses 5) and makes
    an image with fewer an error; None keeps all.
    """
    where = str(path)
    order: list[str] = []
    images: dict[str, Item] = {}
    caps: dict[str, list[str]] = {}
    for index, rec in enumerate(read_records(path)):
        if not isinstance(rec, Mapping) or "__invalid_json__" in rec:
            raise DataError(where, index, "<row>", str(rec.get("__invalid_json__") if isinstance(rec, Mapping)
                                                       else f"expected an object, got {type(rec).__name__}"))
        key, img_path, data = _image_key(rec, where, index)
        if key not in images:
            if max_images is not None and len(order) >= max_images:
                continue
            if check_images and img_path and not resolve_image_path(img_path, image_root).is_file():
                raise DataError(where, index, "image_path",
                                f"image file not found: {resolve_image_path(img_path, image_root)}")
            images[key] = Item(instruction=image_prompt, image=data, image_path=img_path)
            caps[key] = []
            order.append(key)
        value = next((rec[k] for k in ("captions", "caption", "text") if rec.get(k) is not None), None)
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) and t.strip()
                                                                        for t in texts):
            raise DataError(where, index, "caption", "expected a non-empty caption string or list of strings")
        caps[key].extend(texts)
    if not order:
        raise DataError(where, None, "<file>", "no records")
    captions: list[Item] = []
    owner: list[int] = []
    for i, key in enumerate(order):
        texts = caps[key]
        if captions_per_image is not None:
            if len(texts) < captions_per_image:
                raise DataError(where, None, "caption", f"image {images[key].image_path or key!r} has "
                                f"{len(texts)} caption(s); captions_per_image={captions_per_image}")
            texts = texts[:captions_per_image]
        captions += [Item(text=t, instruction=caption_prompt) for t in texts]
        owner += [i] * len(texts)
    return RetrievalSet(name or Path(path).stem, [images[k] for k in order], captions, np.asarray(owner, np.int64),
                        None if image_root is None else str(image_root))


# ------------------------------------------------------------------------------------ runner
def _rerank_direction(reranker, sim: np.ndarray, queries: Sequence[Item], cands: Sequence[Item],
                      gt_of: Any, top_k: int, what: str) -> tuple[float, int]:
    """Reranked R@1 of one direction; ``gt_of(q)`` = the ground-truth candidate indices of query q."""
    gts = [np.atleast_1d(gt_of(q)) for q in range(len(queries))]
    orders = [rank_order(row, gt=g)[:top_k] for row, g in zip(sim, gts)]
    res = rerank_listwise(reranker, list(queries), [[cands[i] for i in o] for o in orders],
                          [list(range(len(o))) for o in orders], top_k, what=what)
    hits = sum(int(o[new[0]]) in set(g.tolist()) for o, new, g in zip(orders, res.orders, gts))
    return round(100.0 * hits / max(1, len(orders)), 4), res.fallbacks


def evaluate_retrieval(encoder: ItemEncoder, rset: RetrievalSet, *, ks: Iterable[int] = DEFAULT_KS,
                       reranker: Any = None, rerank_top_k: int = 5) -> dict[str, Any]:
    """Recall@K both ways for one set (and reranked R@1 when a reranker is given)."""
    t0 = time.perf_counter()
    vec = encoder.encode(rset.images + rset.captions, image_root=rset.image_root)
    img, txt = vec[:len(rset.images)], vec[len(rset.images):]
    sim_t2i = txt @ img.T
    out: dict[str, Any] = {"images": len(rset.images), "captions": len(rset.captions),
                           "captions_per_image": round(rset.captions_per_image, 3)}
    out.update(bidirectional_recall(sim_t2i, rset.caption_image, ks))
    c2i = rset.caption_image
    if reranker is not None:
        i2t_r1, fb1 = _rerank_direction(reranker, sim_t2i.T, rset.images, rset.captions,
                                        lambda q: np.flatnonzero(c2i == q), rerank_top_k, f"reranked i2t ({rset.name})")
        t2i_r1, fb2 = _rerank_direction(reranker, sim_t2i, rset.captions, rset.images,
                                        lambda q: c2i[q], rerank_top_k, f"reranked t2i ({rset.name})")
        out["rerank"] = {"i2t_R@1": i2t_r1, "t2i_R@1": t2i_r1, "fallbacks": fb1 + fb2}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def evaluate_retrieval_sets(embedder_or_spec: Any, sets: Sequence[RetrievalSet], out_dir: str | os.PathLike | None,
                            *, ks: Iterable[int] = DEFAULT_KS, reranker: Any = None, rerank_top_k: int = 5,
                            pool: Pool | None = None, label: str | None = None) -> dict[str, Any]:
    """Evaluate several retrieval sets with one embedder; writes results.json/md/png to ``out_dir``."""
    ks = list(ks)
    encoder = ItemEncoder.wrap(embedder_or_spec, image_root=sets[0].image_root if sets else None, pool=pool,
                               work_dir=out_dir)
    reranker = load_reranker(reranker, image_root=encoder.image_root)
    per_set = {s.name: evaluate_retrieval(encoder, s, ks=ks, reranker=reranker, rerank_top_k=rerank_top_k)
               for s in sets}
    results: dict[str, Any] = {"kind": "retrieval", "model": label or encoder.label, "ks": ks, "tie_rule": TIE_RULE,
                               "image_prompt": IMAGE_PROMPT, "sets": per_set,
                               "aggregates": retrieval_aggregates(per_set)}
    if reranker is not None:
        results["rerank"] = {"mode": "listwise", "top_k": rerank_top_k,
                             "sets": {n: s["rerank"] for n, s in per_set.items()},
                             "fallbacks": int(sum(s["rerank"]["fallbacks"] for s in per_set.values()))}
    metrics: dict[str, float | None] = {}
    for n, s in per_set.items():
        for d in ("i2t", "t2i"):
            for k in ks:
                metrics[f"{n} {d} R@{k}"] = s[d][f"R@{k}"]
            if "rerank" in s:
                metrics[f"{n} {d} R@1 reranked"] = s["rerank"][f"{d}_R@1"]
    for k, v in results["aggregates"].items():
        metrics[k] = v["mean"]
    results["metrics"] = metrics
    if out_dir is not None:
        from .outputs import write_outputs

        write_outputs(out_dir, results)
    logger.info("retrieval results: %s", json.dumps({n: {d: s[d]["R@1"] for d in ("i2t", "t2i")}
                                                     for n, s in per_set.items()}))
    return results
