"""Typed settings of embedding and global retrieval (the run config's ``embed:`` and ``retrieve:`` sections).

Imports only pydantic, the standard library and the Pool setting, so the run config can include them without
torch, Ray or faiss. The library functions take these objects as they are; nothing mirrors their fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..utils.pool import Pool
from ..utils.settings import Section


class EmbedConfig(Section):
    """Encoding tables with the embedder over an actor pool."""

    pool: Pool = Field(default_factory=Pool, description="where S1's embedder encodes, in the embed and retrieve "
                       "stages (ray: false = this process)")
    tables: list[Literal["eval_pairs", "eval_candidates", "train_pairs", "train_candidates"]] = Field(
        default_factory=lambda: ["eval_pairs", "eval_candidates"], description="prepared tables the embed stage "
        "encodes")


class RetrieveConfig(Section):
    """Global retrieval (stage S1): top-K candidates per query below the threshold delta, and the index searched
    (``index_kind`` .. ``nprobe`` also describe a saved :class:`~unime_ray.retrieval.index.ShardedIndex`)."""

    split: Literal["train", "eval"] = Field(default="train", description="whose pairs' queries are searched "
                                            "(among that split's candidates)")
    top_k: int = Field(default=50, ge=1, description="candidates kept per query")
    delta: Literal["positive"] | float | None = Field(default="positive", description="candidates at or above it "
                                                      "are dropped: positive = the query's similarity to its own "
                                                      "positive (the paper's Fig. 2); a number; or null (none)")
    fill: bool = Field(default=False, description="search deeper so top_k remain after the delta drop (paper's "
                       "Rank_50 over x<delta)")
    pool: Literal["task", "global"] = Field(default="task", description="candidates searched: the query's own "
                                            "task's (task) or every task's (global)")
    index_kind: Literal["flat", "ivf"] = Field(default="flat", description="FAISS index: exact (flat) or "
                                               "inverted lists (ivf)")
    num_shards: int = Field(default=1, ge=1, description="index shards the candidates are split into (searched "
                            "and merged exactly)")
    nlist: int | None = Field(default=None, ge=1, description="IVF lists per shard; null: about 4 * sqrt(shard "
                              "size)")
    nprobe: int = Field(default=16, ge=1, description="IVF lists visited per query")
    search_batch_size: int = Field(default=4096, ge=1, description="queries per index search call")
    search_actors: int = Field(default=0, ge=0, description="0: search in the driver; >0: that many Ray searcher "
                               "actors (embed.pool.num_cpus_per_actor CPUs each)")

    def threshold(self, pos_similarity: float) -> float:
        """The similarity at or above which a candidate is dropped."""
        if self.delta is None:
            return float("inf")
        return float(pos_similarity) if self.delta == "positive" else float(self.delta)
