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
from .tracking import Tracking

Objective = Literal["judge_alignment", "hard_label", "infonce"]


class TrainLoop(Section):
    """How any model here is trained on Ray Train + DeepSpeed ZeRO (optimiser, schedule, steps, batch, LoRA/DoRA,
    ZeRO, checkpoints): the settings the trainer reads for every task. The embedder's, the reranker's and the
    stand-in judge's sections add what their task reads, and nothing else."""

    lr: float = Field(default=1e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW's weight decay")
    lr_schedule: Literal["linear", "cosine"] = Field(default="linear", description="decay to 0 after the warm-up")
    warmup_steps: int = Field(default=0, ge=0, description="steps the learning rate rises linearly to lr")
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="warm-up as a share of the steps (with "
                                "warmup_steps 0)")
    max_steps: int | None = Field(default=30, ge=1, description="optimizer steps; null: epochs x (table rows // "
                                  "global batch)")
    epochs: float = Field(default=1.0, gt=0, description="passes over the training table, used when max_steps is "
                          "null")
    micro_batch_size: int = Field(default=8, ge=1, description="queries per worker per forward")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step (global batch: "
                            "micro_batch_size x grad_accum x num_workers)")
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers (data-parallel ranks)")
    use_gpu: bool = Field(default=False, description="one GPU per worker (NCCL); false: one CPU each (gloo)")
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="DeepSpeed ZeRO stage (0: plain data "
                                            "parallel)")
    offload_optimizer: bool = Field(default=False, description="keep the optimizer state in CPU memory "
                                    "(DeepSpeed's CPU AdamW; ZeRO stage >= 1)")
    bf16: bool | None = Field(default=None, description="bfloat16 mixed precision; null: on GPU only")
    gradient_checkpointing: bool = Field(default=False, description="recompute activations in the backward pass "
                                         "(less memory, slower)")
    lora: bool = Field(default=True, description="train LoRA/DoRA adapters; false: full fine-tuning")
    lora_r: int = Field(default=16, ge=1, description="rank of the adapters")
    lora_alpha: int = Field(default=64, ge=1, description="scale of the adapters' update (alpha / r)")
    lora_dropout: float = Field(default=0.1, ge=0, lt=1, description="dropout on the adapters' input")
    use_dora: bool = Field(default=True, description="DoRA (weight-decomposed) adapters; not under ZeRO-3")
    lora_init: Literal["gaussian", "kaiming"] = Field(default="gaussian", description="the adapters' A init: "
                                                      "gaussian (the official embedder's), kaiming (PEFT's "
                                                      "default: the official reranker's)")
    lora_targets: list[str] | None = Field(default=None, description="language-model projections that get "
                                           "adapters; null: the task's default")
    freeze_vision: bool = Field(default=False, description="freeze the vision tower and its projector (no "
                                "adapters there)")
    checkpoint_every: int = Field(default=10, ge=1, description="steps between checkpoints (a rerun resumes from "
                                  "the last)")
    max_failures: int = Field(default=1, ge=0, description="worker failures Ray Train recovers from, restarting "
                              "at the last checkpoint")
    tracking: Tracking = Field(
        default="none", description="also send metrics.jsonl's records, the settings and the final eval there")
    tracking_uri: str | None = Field(default=None, description="MLflow tracking URI, or the TensorBoard / W&B "
                                     "folder; null: MLFLOW_TRACKING_URI, else a folder in the training's output")
    tracking_project: str = Field(default="unime-ray", description="MLflow experiment / W&B project")

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

    objective: Objective = Field(default="judge_alignment", description="judge_alignment: UniME-V2's KL to the "
                                 "judge's scores; hard_label: cross-entropy of the positive against the mined "
                                 "negatives; infonce: in-batch negatives plus any mined ones")
    num_negatives: int = Field(default=8, ge=0, description="mined negatives per query (k); at most "
                               "mine.num_negatives; 0: in-batch negatives only")
    temperature: float = Field(default=0.02, gt=0, description="softmax temperature of the similarities")
    kl_form: Literal["exact", "floored"] = Field(default="exact", description="judge_alignment's KL: exact = the "
                                                 "paper's formula; floored = the official code's log(p + 1e-8)")
    mask_shared_positives: bool = Field(default=True, description="in-batch InfoNCE: a batch row whose positive "
                                        "equals the query's own (a shared class label) is not one of its "
                                        "negatives; false = VLM2Vec's loss, where it is")
    symmetric: bool = Field(default=False, description="in-batch InfoNCE in both directions (CLIP's loss): each "
                            "positive is also a query against every query; false = query -> positive only "
                            "(VLM2Vec's)")
    init: Literal["embedder", "baseline"] = Field(default="embedder", description="where the weights start: "
                                                  "models.embedder as given, or the trained baseline (run dir's "
                                                  "baseline stage)")
    image_cache_mb: int = Field(default=1024, ge=0, description="processed images each worker keeps in memory "
                                "(least recently used dropped first), so a small table's images are decoded and "
                                "processed once, not every epoch (Qwen-VL); 0: off")

    @model_validator(mode="after")
    def _negatives(self):
        if self.num_negatives == 0 and self.objective != "infonce":
            raise ValueError(f"objective {self.objective} needs mined negatives (num_negatives >= 1); "
                             "in-batch negatives only is objective infonce")
        return self


class BaselineConfig(TrainConfig):
    """The retriever of global retrieval, trained first with in-batch negatives (VLM2Vec's role in the paper).
    ``enabled: false`` retrieves with models.embedder as it is."""

    enabled: bool = Field(default=False, description="train the baseline and retrieve with it (S1)")
    objective: Objective = Field(default="infonce", description="the baseline's loss (infonce: VLM2Vec's)")
    num_negatives: int = Field(default=0, ge=0, description="mined negatives per query; 0: in-batch negatives only")


class RerankerTrainConfig(TrainLoop):
    """Reranker training on the mined table: L = pair_weight * L_pair + list_weight * L_list (paper recipe, the
    defaults: LoRA r 128 / alpha 256 on every LLM linear layer, vision frozen, ZeRO-2, lr 2e-5, cosine schedule
    with 3% warm-up, one epoch)."""

    enabled: bool = Field(default=False, description="train the reranker (the rerank stage)")
    init: Literal["judge", "fitted_judge"] = Field(default="judge", description="where the weights start: "
                                                   "models.judge, or the first fold's stand-in judge (demo; the "
                                                   "paper's reranker starts from the same MLLM that judges)")
    list_negatives: int = Field(default=4, ge=1, description="x: the list is the positive and the top-x negatives")
    pair_weight: float = Field(default=1.0, ge=0, description="weight of the pairwise Yes/No loss")
    list_weight: float = Field(default=1.0, ge=0, description="weight of the listwise loss (name the positive's "
                               "place in the list)")
    answer_loss: Literal["decision", "all_tokens"] = Field(
        default="decision", description="each conversation's CE: decision = the paper's CE(YES), CE(NO), CE(I) "
        "(the decision's tokens in full, plus the mean CE of the answer's fixed tokens); all_tokens = the mean over "
        "all answer tokens (the released code's)")
    pair_negative: Literal["hardest", "sampled"] = Field(default="hardest", description="the pairwise \"No\" "
                                                         "example: the top judge-scored negative, or one sampled "
                                                         "from the top-x")
    lr: float = Field(default=2e-5, gt=0)
    lr_schedule: Literal["linear", "cosine"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    max_steps: int | None = Field(default=None, ge=1, description="optimizer steps; null: one pass (epochs) over "
                                  "the training table")
    lora_r: int = Field(default=128, ge=1)
    lora_alpha: int = Field(default=256, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    use_dora: bool = False
    lora_init: Literal["gaussian", "kaiming"] = Field(default="kaiming", description="the adapters' A init: "
                                                      "kaiming (PEFT's default: the official reranker's) or "
                                                      "gaussian (the official embedder's)")
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

    enabled: bool = Field(default=True, description="present = fitted, unless switched off here")
    kind: Literal["mllm", "dual_encoder"] = Field(default="mllm", description="mllm: fine-tune the judge "
                                                  "checkpoint on pairwise Yes/No; dual_encoder: fit heads on "
                                                  "frozen text/image encoders (encoder)")
    encoder: EncoderJudgeFitConfig = Field(default_factory=EncoderJudgeFitConfig)
    folds: int = Field(default=2, ge=2, description="query folds; each fold is scored by a judge fitted on the "
                       "others")
    negatives_per_query: int = Field(default=8, ge=1, description="retrieved candidates kept as \"No\" examples")
    list_weight: float = Field(default=0.0, ge=0, description="weight of the listwise loss; 0: pairwise only, the "
                               "judge answers Yes/No")
    pair_negative: Literal["hardest", "sampled"] = "sampled"
    lr_schedule: Literal["linear", "cosine"] = Field(default="linear", description="decay to 0 after the warm-up "
                                                     "(a short fit, not the reranker's recipe)")
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    max_steps: int | None = Field(default=30, ge=1, description="optimizer steps of each fold's judge; null: "
                                  "epochs over its table")
    init: Literal["judge"] = Field(default="judge",  # type: ignore[assignment]
                                   description="where the weights start: models.judge")


class AblationConfig(Section):
    """One variant of the embedder training, compared with UniME-V2 in the report (paper Table 4)."""

    name: str = Field(description="the variant's label in the report")
    objective: Objective = Field(description="its loss (as train.objective)")
    num_negatives: int | None = Field(default=None, ge=0, description="mined negatives per query; null: "
                                      "train.num_negatives")
    seeds: list[int] | None = Field(default=None, description="seeds it is trained with; null: compare.seeds (or "
                                    "the run's seed)")


class CompareConfig(Section):
    """Ablations trained beside UniME-V2 (same init, steps and data) and the seeds of the comparison."""

    ablations: list[AblationConfig] = Field(default_factory=list, description="the variants: each a name, an "
                                            "objective, and optionally num_negatives and seeds")
    seeds: list[int] | None = Field(default=None, description="UniME-V2 itself runs for every seed here; null: the "
                                    "run's seed only (the main run, nothing trained twice)")
