"""Typed settings of the evaluation step (the run config's ``eval:`` section).

Imports only pydantic and the standard library, so the run config can include it without pulling in
torch, Ray or the models. Unknown keys are errors (``extra="forbid"``), like every other section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..utils.pool import Pool
from ..utils.settings import Section

RerankMode = Literal["listwise", "pairwise", "fused"]


class RerankSettings(Section):
    """Reranking of the embedder's top-K (method reference 5.2: K=5, listwise, reproduces Table 3).

    ``mode`` is the reranking the pipeline reports and the server applies; every mode of ``modes`` is measured
    beside it. The reranker is used only if, on the dev split (``data.dev_fraction``: rows no training step saw),
    ``mode`` beats the embedder alone (its gain's 95 % interval above 0); the fused ranking's weight is chosen on
    the dev split too, never on the eval split."""

    enabled: bool = Field(default=False, description="rerank the embedders' top-K in the evaluation")
    model: str | None = Field(default=None, description="reranker folder or hub id; null in a pipeline run: the "
                              "one it trained")
    top_k: int = Field(default=5, ge=1, description="the embedder's top candidates reranked per query (K)")
    mode: RerankMode = Field(default="listwise", description="the reranking the pipeline reports and the server "
                             "applies")
    modes: list[RerankMode] = Field(default_factory=lambda: ["listwise", "pairwise", "fused"],
                                    description="every reranking measured beside mode")
    fusion_weight: float | None = Field(default=None, ge=0, le=1, description="w of the fused ranking, "
                                        "(1 - w) * cosine + w * P(Yes); null: chosen on the dev split (0.5 without)")
    require_validation: bool = Field(default=True, description="false: rerank without a dev split to validate on "
                                     "(the reranker's effect is then unchecked)")
    batch_size: int = Field(default=16, ge=1, description="pairs per reranker forward")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description="the reranker's "
                                                                     "dtype; auto: bfloat16 on GPU, float32 on CPU")


class EvalConfig(Section):
    """What the pipeline's evaluation step measures, on which data, and the pool that encodes.

    ``sets``: ``pairs`` is a canonical eval pair table (the run's prepared ``eval_pairs`` unless ``table``
    is given), ``mmeb`` reads MMEB-eval in its published layout from ``mmeb_dir``. Retrieval and
    compositional sets are the ``unime-ray eval`` tool's (``--retrieval``, ``--compositional``).
    """

    sets: list[Literal["pairs", "mmeb"]] = Field(default_factory=lambda: ["pairs"], description="pairs: a "
                                                 "canonical eval pair table; mmeb: MMEB-eval from mmeb_dir")
    table: str | None = Field(default=None, description="the pairs set's table; null: the run's prepared "
                              "eval_pairs")
    mmeb_dir: str | None = Field(default=None, description="MMEB-eval in its published layout (needed by sets: "
                                 "mmeb)")
    mmeb_subsets: list[str] | None = Field(default=None, description="MMEB-eval subsets to evaluate; null: every "
                                           "subset folder found in mmeb_dir")
    image_root: str | None = Field(default=None, description="folder of the eval rows' relative image paths; "
                                   "null: the prepared data's")
    models: dict[str, str] = Field(default_factory=dict, description="extra labelled models evaluated besides the "
                                   "run's embedder (e.g. {\"baseline\": \"Qwen/Qwen2-VL-2B-Instruct\"})")
    max_rows_per_dataset: int | None = Field(default=None, ge=1, description="quick runs: the first N rows of "
                                             "each dataset of the pairs set; null: all")
    top_k_dump: int = Field(default=10, ge=1, description="embedder top-K per query written to topk.parquet")
    rerank: RerankSettings = Field(default_factory=RerankSettings)
    pool: Pool = Field(default_factory=Pool, description="where the embedders encode (ray: false = this process)")
    check_images: bool = Field(default=True, description="check that the pairs set's images exist and decode")
    judge_reference: bool = Field(default=True, description="a dual-encoder stand-in judge (judge_fit.kind: "
                                  "dual_encoder) is also evaluated as a retriever: how much more than the "
                                  "embedders the teacher knows about the eval items (a reference row, not a "
                                  "variant)")

    @model_validator(mode="after")
    def _consistent(self):
        if "mmeb" in self.sets and not self.mmeb_dir:
            raise ValueError("eval.sets has 'mmeb' but eval.mmeb_dir is not set")
        return self
