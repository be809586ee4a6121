"""Stage S1, global retrieval: sharded FAISS indexes, top-K candidates below delta (tables are embedded with
:mod:`unime_ray.models.encode`).

Names are imported lazily, so ``unime_ray.retrieval.config`` (pydantic only) stays cheap to import from the
run config.
"""

from ..utils.lazy import lazy_exports

_EXPORTS = {"EmbedConfig": "config", "RetrieveConfig": "config", "ShardedIndex": "index", "brute_force_topk": "index", "search_topk": "index",
            "run_retrieval": "stage", "select_candidates": "stage"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
