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

    make: bool = Field(default=True, description="build the tiny checkpoints in the models stage")
    seed: int = Field(default=0, description="seed of the tiny checkpoints' random weights")
    hidden_size: int = Field(default=64, ge=8, description="width of the language model")
    intermediate_size: int = Field(default=128, ge=8, description="width of the language model's MLP")
    num_hidden_layers: int = Field(default=2, ge=1, description="language model layers")
    num_attention_heads: int = Field(default=4, ge=1, description="attention heads of the language model")
    num_key_value_heads: int = Field(default=2, ge=1, description="key/value heads (grouped-query attention)")
    vision_depth: int = Field(default=2, ge=1, description="vision tower blocks")
    vision_embed_dim: int = Field(default=32, ge=8, description="width of the vision tower")
    vision_heads: int = Field(default=4, ge=1, description="attention heads of the vision tower")
    vocab_size: int = Field(default=1024, ge=300, description="size of the BPE vocabulary trained on the data's "
                            "texts")
    min_pixels: int = Field(default=28 * 28 * 4, ge=1, description="image processor's pixel floor: at least 2x2 "
                            "merged tokens")
    max_pixels: int = Field(default=28 * 28 * 16, ge=1, description="image processor's pixel cap: at most 4x4 "
                            "merged tokens, keeps CPU tests fast")
    max_position_embeddings: int = Field(default=4096, ge=64, description="longest sequence, in tokens")
    extra: dict[str, Any] = Field(default_factory=dict, description="more fields of the Hugging Face model config")

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

    model: str = Field(description="the retriever's checkpoint: hub id or folder")
    adapter: str | None = Field(default=None, description="a peft adapter folder applied on top of model (merged "
                                "on load)")
    input_format: Literal["official", "chat"] = Field(default="official", description="its text format (as "
                                                      "models.input_format)")
    positions: Literal["auto", "mrope", "sequential"] = Field(default="auto", description="its image-token "
                                                              "positions (as models.positions)")

    @model_validator(mode="before")
    @classmethod
    def _from_ref(cls, v: Any) -> Any:
        return {"model": v} if isinstance(v, str) else v


class ImageBudgets(Section):
    """One image budget per model role (``models.images.<role>``; null: the checkpoint's own setting, see
    :meth:`RunConfig.image_budget`). Paper values: presets/paper-qwen2vl-2b.yaml."""

    retriever: ImageBudget | None = Field(default=None, description="S1 embedding (embed, retrieve); null: the "
                                          "checkpoint's own")
    judge: ImageBudget | None = Field(default=None, description="S2 scoring and the stand-in judge's training; "
                                      "null: the checkpoint's own")
    embedder: ImageBudget | None = Field(default=None, description="embedder training (baseline, train, "
                                         "ablations); null: the checkpoint's own")
    reranker: ImageBudget | None = Field(default=None, description="reranker training and inference (eval "
                                         "reranking, serving); null: the checkpoint's own")
    eval: ImageBudget | None = Field(default=None, description="the embedders at evaluation; null: the "
                                     "checkpoint's own")


class ModelsConfig(Section):
    """Which checkpoints each role uses: hub ids (e.g. Qwen/Qwen2-VL-2B-Instruct) or folders (``./`` = run dir)."""

    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    embedder: str = Field(default="./models/tiny-qwen2-vl", description="the embedder's starting checkpoint")
    judge: str = Field(default="./models/tiny-qwen2.5-vl", description="the MLLM judge (S2), also the "
                       "reranker's starting checkpoint")
    retriever: RetrieverModelConfig | None = Field(default=None, description="S1's retriever; null: the "
                                                   "embedder's init (models.embedder), or the trained baseline "
                                                   "with baseline.enabled")
    input_format: Literal["official", "chat"] = Field(default="official", description="official: the released "
                                                      "UniME-V2's raw text with a bare image pad; chat: the chat "
                                                      "template")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description="the embedders' "
                                                                     "dtype when encoding; auto: bfloat16 on "
                                                                     "GPU, float32 on CPU")
    processor_backend: Literal["auto", "hf", "manual"] = Field(default="auto", description="the embedders' "
                                                               "processor: Hugging Face's (hf), this package's "
                                                               "(manual), or hf when it can be built (auto)")
    positions: Literal["auto", "mrope", "sequential"] = Field(default="auto", description="image-token positions: "
                                                              "sequential (as the released UniME-V2 models), "
                                                              "mrope, or auto (by input_format)")
    images: ImageBudgets = Field(default_factory=ImageBudgets)
