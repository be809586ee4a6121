"""Typed settings of the training steps: the loop every task shares (:class:`TrainLoop`) and what each task adds,
the embedder (``train``, ``baseline``, ``compare``), the reranker (``reranker``) and the stand-in judge
(``judge_fit``); a section declares only what its task reads. The trainer takes a section as it is
(:class:`unime_ray.train.job.TrainJob`). Only pydantic, so the run config imports it without torch or Ray."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from ..judge.config import EncoderJudgeFitConfig
from ..utils.settings import Section

Objective = Literal["judge_alignment", "hard_label", "infonce"]


class TrainLoop(Section):
    """How any model here is trained on Ray Train + DeepSpeed ZeRO (optimiser, schedule, steps, batch, LoRA/DoRA,
    ZeRO, checkpoints): the settings the trainer reads for every task. The embedder's, the reranker's and the
    stand-in judge's sections add what their task reads, and nothing else."""

    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_schedule: Literal["linear", "cosine"] = "linear"   # decay to 0 after the warm-up
    warmup_steps: int = Field(default=0, ge=0)
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)   # warm-up as a share of the steps (with warmup_steps 0)
    max_steps: int | None = Field(default=30, ge=1)  # null: epochs x (table rows // global batch)
    epochs: float = Field(default=1.0, gt=0)         # used when max_steps is null
    micro_batch_size: int = Field(default=8, ge=1)   # queries per worker per forward
    grad_accum: int = Field(default=1, ge=1)
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    bf16: bool | None = None                         # None: on GPU only
    gradient_checkpointing: bool = False
    lora: bool = True
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=64, ge=1)
    lora_dropout: float = Field(default=0.1, ge=0, lt=1)
    use_dora: bool = True
    # the adapters' A init: "gaussian" (the official embedder's), "kaiming" (PEFT's default: the official reranker's)
    lora_init: Literal["gaussian", "kaiming"] = "gaussian"
    lora_targets: list[str] | None = None            # None: the task's default projections
    freeze_vision: bool = False
    checkpoint_every: int = Field(default=10, ge=1)
    max_failures: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _loop(self):
        if self.zero_stage == 3 and self.lora and self.use_dora:
            # peft computes the DoRA weight norm from the whole base weight, which ZeRO-3 partitions
            raise ValueError("DoRA does not work under ZeRO-3: set use_dora: false or zero_stage <= 2")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both (set the other to 0)")
        return self

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.num_workers

    def steps_for(self, rows: int) -> int:
        """Optimizer steps of the run: max_steps, or epochs over a table of ``rows`` rows (full global batches;
        at least 1)."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.floor(self.epochs * rows / self.global_batch))

    @property
    def warmup(self) -> int:
        """Warm-up steps: warmup_steps, or warmup_ratio of max_steps rounded up (as Hugging Face's trainer)."""
        if self.warmup_steps or not self.warmup_ratio:
            return self.warmup_steps
        if self.max_steps is None:
            raise ValueError("warmup_ratio needs max_steps resolved (fit() sets it from the table size)")
        return math.ceil(self.warmup_ratio * self.max_steps)


class TrainConfig(TrainLoop):
    """The embedder's training: UniME-V2 (``train``), the baseline retriever (``baseline``) and the ablations."""

    objective: Objective = "judge_alignment"
    num_negatives: int = Field(default=8, ge=0)      # k; at most mine.num_negatives; 0: in-batch negatives only
    temperature: float = Field(default=0.02, gt=0)
    # judge_alignment's KL: "exact" = the paper's formula; "floored" = the official code's log(p + 1e-8)
    kl_form: Literal["exact", "floored"] = "exact"
    # in-batch InfoNCE: a batch row whose positive equals the query's own (a shared class label) is not one of
    # its negatives; false = VLM2Vec's loss, where it is
    mask_shared_positives: bool = True
    # in-batch InfoNCE in both directions (CLIP's loss): each positive is also a query against every query; false =
    # query -> positive only (VLM2Vec's)
    symmetric: bool = False
    # where the weights start: models.embedder as given, or the trained baseline (run dir's baseline stage)
    init: Literal["embedder", "baseline"] = "embedder"
    # processed images each worker keeps in memory (least recently used dropped first), so a small table's images
    # are decoded and processed once, not every epoch (Qwen-VL); 0: off
    image_cache_mb: int = Field(default=1024, ge=0)

    @model_validator(mode="after")
    def _negatives(self):
        if self.num_negatives == 0 and self.objective != "infonce":
            raise ValueError(f"objective {self.objective} needs mined negatives (num_negatives >= 1); "
                             "in-batch negatives only is objective infonce")
        return self


class BaselineConfig(TrainConfig):
    """The retriever of global retrieval, trained first with in-batch negatives (VLM2Vec's role in the paper).
    ``enabled: false`` retrieves with models.embedder as it is."""

    enabled: bool = False
    objective: Objective = "infonce"
    num_negatives: int = Field(default=0, ge=0)


class RerankerTrainConfig(TrainLoop):
    """Reranker training on the mined table: L = pair_weight * L_pair + list_weight * L_list (paper recipe, the
    defaults: LoRA r 128 / alpha 256 on every LLM linear layer, vision frozen, ZeRO-2, lr 2e-5, cosine schedule
    with 3% warm-up, one epoch)."""

    enabled: bool = False
    # where the weights start: models.judge, or the first fold's stand-in judge (demo; the paper's reranker
    # starts from the same MLLM that judges)
    init: Literal["judge", "fitted_judge"] = "judge"
    list_negatives: int = Field(default=4, ge=1)      # x: the list is the positive and the top-x negatives
    pair_weight: float = Field(default=1.0, ge=0)
    list_weight: float = Field(default=1.0, ge=0)
    # each conversation's CE: "decision" = the paper's CE(YES), CE(NO), CE(I) (the decision's tokens in full, plus
    # the mean CE of the answer's fixed tokens); "all_tokens" = the mean over all answer tokens (the released code's)
    answer_loss: Literal["decision", "all_tokens"] = "decision"
    # the pairwise "No" example: the top judge-scored negative, or one sampled from the top-x
    pair_negative: Literal["hardest", "sampled"] = "hardest"
    lr: float = Field(default=2e-5, gt=0)
    lr_schedule: Literal["linear", "cosine"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    max_steps: int | None = Field(default=None, ge=1)  # null: one pass (epochs) over the training table
    lora_r: int = Field(default=128, ge=1)
    lora_alpha: int = Field(default=256, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    use_dora: bool = False
    lora_init: Literal["gaussian", "kaiming"] = "kaiming"
    freeze_vision: bool = True

    @model_validator(mode="after")
    def _weights(self):
        if self.pair_weight + self.list_weight == 0:
            raise ValueError("pair_weight and list_weight must not both be 0")
        return self


class JudgeFitConfig(RerankerTrainConfig):
    """Offline stand-in for a pretrained MLLM judge: k-fold cross-fitted judges; each fold's queries are scored
    by a judge fitted on the other folds, because a judge scoring the very pairs it memorised returns near-hard
    labels. ``kind: mllm`` fine-tunes the judge checkpoint on pairwise Yes/No (the training fields below);
    ``kind: dual_encoder`` fits a judge on frozen pretrained text/image encoders (the ``encoder`` fields),
    which brings knowledge the embedder lacks."""

    enabled: bool = True                               # present = fitted, unless switched off here
    kind: Literal["mllm", "dual_encoder"] = "mllm"
    encoder: EncoderJudgeFitConfig = Field(default_factory=EncoderJudgeFitConfig)
    folds: int = Field(default=2, ge=2)
    negatives_per_query: int = Field(default=8, ge=1)   # retrieved candidates kept as "No" examples
    list_weight: float = Field(default=0.0, ge=0)      # pairwise only: the judge answers Yes/No
    pair_negative: Literal["hardest", "sampled"] = "sampled"
    lr_schedule: Literal["linear", "cosine"] = "linear"   # a short fit, not the reranker's recipe
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    max_steps: int | None = Field(default=30, ge=1)
    init: Literal["judge"] = "judge"                   # type: ignore[assignment]


class AblationConfig(Section):
    """One variant of the embedder training, compared with UniME-V2 in the report (paper Table 4)."""

    name: str
    objective: Objective
    num_negatives: int | None = Field(default=None, ge=0)   # None: train.num_negatives
    seeds: list[int] | None = None                        # None: compare.seeds (or the run's seed)


class CompareConfig(Section):
    """Ablations trained beside UniME-V2 (same init, steps and data) and the seeds of the comparison."""

    ablations: list[AblationConfig] = Field(default_factory=list)
    # UniME-V2 itself runs for every seed here; null: the run's seed only (the main run, nothing trained twice)
    seeds: list[int] | None = None
