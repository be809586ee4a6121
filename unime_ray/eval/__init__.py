"""Evaluation harness: MMEB precision@1 (+ listwise reranking), zero-shot retrieval Recall@K, compositional pairs.

Names are imported lazily, so ``unime_ray.eval.config`` (pydantic only) stays cheap to import from the
run config.
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

_EXPORTS = {
    "EvalConfig": "config", "RerankSettings": "config",
    "ItemEncoder": "encode", "ItemRegistry": "encode",
    "TIE_RULE": "metrics", "gt_rank": "metrics", "pair_accuracy": "metrics", "precision_at_1": "metrics",
    "rank_order": "metrics",
    "IND": "mmeb", "META_TASKS": "mmeb", "MMEB_DATASETS": "mmeb", "OOD": "mmeb", "SUMMARY_KEYS": "mmeb",
    "evaluate_mmeb_dir": "mmeb", "evaluate_pairs_table": "mmeb", "mmeb_name": "mmeb", "prepare_mmeb_dir": "mmeb",
    "headline": "mmeb", "summarize": "mmeb",
    "RetrievalSet": "retrieval", "bidirectional_recall": "retrieval", "caption_to_image": "retrieval",
    "evaluate_retrieval_sets": "retrieval", "load_retrieval_set": "retrieval", "recall_at_k": "retrieval",
    "GROUPS": "compositional", "evaluate_compositional": "compositional", "load_compositional": "compositional",
    "summarize_compositional": "compositional",
    "apply_listwise_choice": "rerank", "load_reranker": "rerank", "rerank_listwise": "rerank",
    "compare_runs": "outputs", "write_outputs": "outputs",
    "register": "cli",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
