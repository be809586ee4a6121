"""Stage S1, global retrieval: embedding tables, sharded FAISS indexes, top-K candidates below delta."""

from .embed import EmbedderSpec, embed_table_local, embed_table_ray, read_embeddings
from .index import IndexSpec, ShardedIndex, brute_force_topk, search_topk
from .stage import RetrieveSettings, run_retrieval, select_candidates

__all__ = ["EmbedderSpec", "IndexSpec", "RetrieveSettings", "ShardedIndex", "brute_force_topk", "embed_table_local",
           "embed_table_ray", "read_embeddings", "run_retrieval", "search_topk", "select_candidates"]
