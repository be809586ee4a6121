"""Typed settings of the evaluation step (the run config's ``eval:`` section).

Imports only pydantic and the standard library, so the run config can include it without pulling in
torch, Ray or the models. Unknown keys are errors (``extra="forbid"``), like every other section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RerankSettings(_Section):
    """Listwise reranking of the embedder's top-K (method reference 5.2: K=5 reproduces Table 3)."""

    enabled: bool = False
    model: str | None = None          # reranker folder or hub id; null in a pipeline run: the one it trained
    top_k: int = Field(default=5, ge=1)
    mode: Literal["listwise"] = "listwise"
    batch_size: int = Field(default=16, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @model_validator(mode="after")
    def _model_when_enabled(self):
        return self


class RetrievalSetConfig(_Section):
    """One zero-shot image-text retrieval set (Flickr30K / COCO / ShareGPT4V / Urban1K style)."""

    name: str
    path: str                          # JSONL / JSON / Parquet of {image_path, caption | captions}
    image_root: str | None = None
    # captions kept per image: 5 for Flickr30K/COCO (caption i -> image i//5), 1 for ShareGPT4V/Urban1K;
    # null keeps every caption of each image as given
    captions_per_image: int | None = Field(default=None, ge=1)


class CompositionalSetConfig(_Section):
    """A SugarCrepe-style set: a file or a folder with one file per subset (replace_obj, swap_att...)."""

    name: str = "sugarcrepe"
    path: str
    image_root: str | None = None


class EvalConfig(_Section):
    """What the evaluation step measures, on which data, and how it runs.

    ``sets``: ``pairs`` is a canonical eval pair table (the run's prepared ``eval_pairs`` unless ``table``
    is given), ``mmeb`` reads MMEB-eval in its published layout from ``mmeb_dir``; ``retrieval`` and
    ``compositional`` use the lists below.
    """

    sets: list[Literal["pairs", "mmeb", "retrieval", "compositional"]] = Field(default_factory=lambda: ["pairs"])
    table: str | None = None
    mmeb_dir: str | None = None
    mmeb_subsets: list[str] | None = None          # null: every subset folder found in mmeb_dir
    image_root: str | None = None
    retrieval: list[RetrievalSetConfig] = Field(default_factory=list)
    compositional: list[CompositionalSetConfig] = Field(default_factory=list)
    # extra labelled models evaluated besides the run's embedder (e.g. {"baseline": "Qwen/Qwen2-VL-2B-Instruct"})
    models: dict[str, str] = Field(default_factory=dict)
    max_rows_per_dataset: int | None = Field(default=None, ge=1)   # quick runs: the first N rows of each set
    batch_size: int = Field(default=16, ge=1)
    top_k_dump: int = Field(default=10, ge=1)
    rerank: RerankSettings = Field(default_factory=RerankSettings)
    use_ray: bool = True
    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=2, ge=1)
    num_cpus_per_actor: float = Field(default=1.0, gt=0)
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    check_images: bool = True

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")
        if "mmeb" in self.sets and not self.mmeb_dir:
            raise ValueError("eval.sets has 'mmeb' but eval.mmeb_dir is not set")
        if "retrieval" in self.sets and not self.retrieval:
            raise ValueError("eval.sets has 'retrieval' but eval.retrieval lists no set")
        if "compositional" in self.sets and not self.compositional:
            raise ValueError("eval.sets has 'compositional' but eval.compositional lists no set")
        return self
