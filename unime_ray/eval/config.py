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

    enabled: bool = False
    model: str | None = None          # reranker folder or hub id; null in a pipeline run: the one it trained
    top_k: int = Field(default=5, ge=1)
    mode: RerankMode = "listwise"
    modes: list[RerankMode] = Field(default_factory=lambda: ["listwise", "pairwise", "fused"])
    fusion_weight: float | None = Field(default=None, ge=0, le=1)   # null: chosen on the dev split (0.5 without)
    # false: rerank without a dev split to validate on (the reranker's effect is then unchecked)
    require_validation: bool = True
    batch_size: int = Field(default=16, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class EvalConfig(Section):
    """What the pipeline's evaluation step measures, on which data, and the pool that encodes.

    ``sets``: ``pairs`` is a canonical eval pair table (the run's prepared ``eval_pairs`` unless ``table``
    is given), ``mmeb`` reads MMEB-eval in its published layout from ``mmeb_dir``. Retrieval and
    compositional sets are the ``unime-ray eval`` tool's (``--retrieval``, ``--compositional``).
    """

    sets: list[Literal["pairs", "mmeb"]] = Field(default_factory=lambda: ["pairs"])
    table: str | None = None
    mmeb_dir: str | None = None
    mmeb_subsets: list[str] | None = None          # null: every subset folder found in mmeb_dir
    image_root: str | None = None
    # extra labelled models evaluated besides the run's embedder (e.g. {"baseline": "Qwen/Qwen2-VL-2B-Instruct"})
    models: dict[str, str] = Field(default_factory=dict)
    max_rows_per_dataset: int | None = Field(default=None, ge=1)   # quick runs: the first N rows of each set
    top_k_dump: int = Field(default=10, ge=1)
    rerank: RerankSettings = Field(default_factory=RerankSettings)
    pool: Pool = Field(default_factory=Pool)       # where the embedders encode (ray: false = this process)
    check_images: bool = True
    # a dual-encoder stand-in judge (judge_fit.kind: dual_encoder) is also evaluated as a retriever: how much
    # more than the embedders the teacher knows about the eval items (a reference row, not a variant)
    judge_reference: bool = True

    @model_validator(mode="after")
    def _consistent(self):
        if "mmeb" in self.sets and not self.mmeb_dir:
            raise ValueError("eval.sets has 'mmeb' but eval.mmeb_dir is not set")
        return self
