"""Stage S1, global retrieval: embedding tables, sharded FAISS indexes, top-K candidates below delta.

Names are imported lazily, so ``unime_ray.retrieval.config`` (pydantic only) stays cheap to import from the
run config.
"""

from ..utils.lazy import lazy_exports

_EXPORTS = {"EmbedConfig": "config", "RetrieveConfig": "config", "EmbedderSpec": "embed", "embed_table": "embed",
            "read_embeddings": "embed", "ShardedIndex": "index", "brute_force_topk": "index", "search_topk": "index",
            "run_retrieval": "stage", "select_candidates": "stage"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
