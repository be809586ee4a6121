"""The reranker guard: whether a trained reranker helps, measured on the dev split against the embedder it would
rerank, with the eval's own path (:func:`~unime_ray.eval.mmeb.evaluate_pairs_table`). The decision goes into the
reranker's folder (:data:`VALIDATION_FILE`), which the server reads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

VALIDATION_FILE = "rerank_validation.json"
FUSION_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class RerankValidation:
    """Whether a reranker helps, measured on the dev split (rows no training step saw): the fused ranking's weight
    is chosen on one half of the dev rows, every mode is measured against the embedder alone on the other half,
    and the configured ``mode`` is used only if its gain's 95 % interval lies above 0 (and, listwise, its picks
    are not one slot for nearly every query)."""

    mode: str
    top_k: int
    embedder: str
    tuning_rows: int
    rows: int
    weight: float | None                  # the fused ranking's weight (chosen on the tuning half)
    weights_tried: dict[str, float]       # weight -> P@1 of the fused ranking on the tuning half
    embedder_p1: float                    # on the deciding half
    p1: dict[str, float]                  # every mode on the deciding half
    gain: float                           # mode - embedder alone, points, on the deciding half
    lo: float
    hi: float
    one_slot: bool
    used: bool

    def sentence(self) -> str:
        where = f"on {self.rows} dev rows (held out of training; the fused weight chosen on {self.tuning_rows} others)"
        change = f"{self.mode} reranking of the top-{self.top_k} changes P@1 by {self.gain:+.2f} [{self.lo:+.2f}, {self.hi:+.2f}] points"
        if self.used:
            return f"The reranker is used: {where}, {change} over the embedder alone ({self.embedder_p1:.2f} %)."
        why = ("its picks are one slot for nearly every query (a position bias)" if self.one_slot
               else "that interval does not lie above 0")
        return (f"The reranker is not used (eval and serving): {where}, {change} over the embedder alone "
                f"({self.embedder_p1:.2f} %), and {why}.")

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def validate_reranker(embedder: Any, reranker: Any, dev_table: str | os.PathLike, out_dir: str | os.PathLike, *,
                      mode: str = "listwise", top_k: int = 5, image_root: str | os.PathLike | None = None,
                      pool: Any = None, weights: Sequence[float] = FUSION_WEIGHTS,
                      embedder_label: str = "embedder") -> RerankValidation:
    """Measure every rerank mode against ``embedder`` alone on the dev pairs (the eval's own path,
    :func:`~unime_ray.eval.mmeb.evaluate_pairs_table`, writes ``out_dir``) and decide whether ``mode`` is used."""
    import hashlib

    import pyarrow.parquet as pq

    from ..rerank.inference import RERANK_MODES, reorder
    from .mmeb import evaluate_pairs_table
    from .stats import one_slot, paired_interval

    out = Path(out_dir)
    res = evaluate_pairs_table(embedder, dev_table, out, image_root=image_root, reranker=reranker,
                               rerank_top_k=top_k, rerank_modes=("listwise", "pairwise"), top_k_dump=top_k, pool=pool,
                               label="rerank validation (dev split)")
    t = pq.read_table(out / "topk.parquet").to_pydict()
    tuning = np.array([hashlib.sha1(str(r).encode()).digest()[0] % 2 == 0 for r in t["row_id"]])

    def hits(m: str, weight: float = 0.5) -> np.ndarray:
        if m == "embedder":
            return np.array([r == 0 for r in t["gt_rank"]])
        if m == "listwise":
            return np.array([c == 0 for c in t["rerank_top1_listwise"]])
        return np.array([reorder(m, idx[:top_k], p_yes=p, similarities=s[:top_k], weight=weight)[0][0] == 0
                         for idx, p, s in zip(t["topk_index"], t["rerank_p_yes"], t["topk_score"])])

    tried = {str(w): float(100.0 * hits("fused", w)[tuning].mean()) for w in weights}
    best = max(tried.values())
    weight = min(float(w) for w, v in tried.items() if v == best)       # the least reliance on the reranker
    deciding = ~tuning
    base = hits("embedder")
    per_mode = {m: hits(m, weight) for m in RERANK_MODES}
    p1 = {m: float(100.0 * v[deciding].mean()) for m, v in per_mode.items()}
    as_ranks = lambda h: {0: {"dev": np.where(h[deciding], 0, 1)}}
    gap = paired_interval(as_ranks(per_mode[mode]), as_ranks(base), "R@1", "dev")
    biased = mode == "listwise" and one_slot(res["rerank"]["modes"]["listwise"]["choice_ranks"])
    return RerankValidation(mode=mode, top_k=top_k, embedder=embedder_label, tuning_rows=int(tuning.sum()),
                            rows=int(deciding.sum()), weight=weight, weights_tried=tried,
                            embedder_p1=float(100.0 * base[deciding].mean()), p1=p1, gain=gap.mean, lo=gap.lo,
                            hi=gap.hi, one_slot=biased, used=bool(gap.lo > 0 and not biased))
