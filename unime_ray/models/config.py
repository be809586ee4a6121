"""Typed settings of the model roles (the run config's ``models:`` section) and of the tiny checkpoints.

Imports only pydantic and the standard library (and :mod:`.budget`, pydantic too), so the run config can
include it without pulling in torch or the models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..utils.settings import Section
from .budget import ImageBudget


class TinyModelConfig(Section):
    """Tiny random-weight checkpoints built offline (tests and the demo); the defaults build in well under a
    second. :func:`~unime_ray.demo.tiny.make_tiny_models` takes it as its size spec."""

    make: bool = True
    seed: int = 0
    hidden_size: int = Field(default=64, ge=8)
    intermediate_size: int = Field(default=128, ge=8)
    num_hidden_layers: int = Field(default=2, ge=1)
    num_attention_heads: int = Field(default=4, ge=1)
    num_key_value_heads: int = Field(default=2, ge=1)
    vision_depth: int = Field(default=2, ge=1)
    vision_embed_dim: int = Field(default=32, ge=8)
    vision_heads: int = Field(default=4, ge=1)
    vocab_size: int = Field(default=1024, ge=300)
    min_pixels: int = Field(default=28 * 28 * 4, ge=1)      # at least 2x2 merged tokens
    max_pixels: int = Field(default=28 * 28 * 16, ge=1)     # at most 4x4 merged tokens: keeps CPU tests fast
    max_position_embeddings: int = Field(default=4096, ge=64)
    extra: dict[str, Any] = Field(default_factory=dict)     # more fields of the Hugging Face model config

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 8:
            raise ValueError("hidden_size / num_attention_heads must be a multiple of 8")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class RetrieverModelConfig(Section):
    """The embedder of S1 global retrieval when it is not the embedder's init (the paper: VLM2Vec, Qwen2-VL-7B),
    with its own input format and image-token positions. ``models.retriever: <ref>`` is short for ``{model: <ref>}``."""

    model: str
    adapter: str | None = None          # a peft adapter folder applied on top of ``model`` (merged on load)
    input_format: Literal["official", "chat"] = "official"
    positions: Literal["auto", "mrope", "sequential"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _from_ref(cls, v: Any) -> Any:
        return {"model": v} if isinstance(v, str) else v


class ImageBudgets(Section):
    """One image budget per model role (``models.images.<role>``; null: see :meth:`RunConfig.image_budget`).

    ``retriever``: S1 embedding (the embed and retrieve stages); ``judge``: S2 scoring and the stand-in
    judge's training (judge_fit); ``embedder``: embedder training (baseline, train, ablations);
    ``reranker``: reranker training and inference (eval reranking, serving); ``eval``: the embedders at
    evaluation. Paper values: presets/paper-qwen2vl-2b.yaml.
    """

    retriever: ImageBudget | None = None
    judge: ImageBudget | None = None
    embedder: ImageBudget | None = None
    reranker: ImageBudget | None = None
    eval: ImageBudget | None = None


class ModelsConfig(Section):
    """Which checkpoints each role uses: hub ids (e.g. Qwen/Qwen2-VL-2B-Instruct) or folders (``./`` = run dir)."""

    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    embedder: str = "./models/tiny-qwen2-vl"
    judge: str = "./models/tiny-qwen2.5-vl"
    # S1's retriever; null: the embedder's init (models.embedder), or the trained baseline with baseline.enabled
    retriever: RetrieverModelConfig | None = None
    input_format: Literal["official", "chat"] = "official"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    processor_backend: Literal["auto", "hf", "manual"] = "auto"
    # image-token positions: sequential (as the released UniME-V2 models), mrope, or auto (by input_format)
    positions: Literal["auto", "mrope", "sequential"] = "auto"
    images: ImageBudgets = Field(default_factory=ImageBudgets)
