"""Typed run configuration: YAML presets + command-line overrides, validated with clear errors.

One :class:`RunConfig` describes a whole run; each stage reads its own section. Presets live in
``unime_ray/run/presets/*.yaml``; ``-o section.key=value`` overrides any field (values parsed as YAML).
Unknown keys are errors, with the dotted path of the key in the message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ..data.config import DataConfig
from ..eval.config import EvalConfig
from ..judge.config import JudgeConfig
from ..mining.config import MineConfig
from ..models.budget import ROLES, ImageBudget
from ..models.config import ModelsConfig
from ..retrieval.config import EmbedConfig, RetrieveConfig
from ..serve.config import ServeConfig
from ..train.config import BaselineConfig, CompareConfig, JudgeFitConfig, RerankerTrainConfig, TrainConfig
from ..utils.settings import Section, commented_yaml, deep_merge, settings_rows

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    pass


class RayConfig(Section):
    """Where stages run: ``address: null`` starts a local Ray on this machine."""

    address: str | None = Field(default=None, description="a Ray cluster to join (else RAY_ADDRESS); null: start "
                                "a local Ray on this machine")
    num_cpus: int | None = Field(default=2, ge=1, description="CPUs of the local Ray (null: all of this machine's)")
    num_gpus: int | None = Field(default=None, ge=0, description="GPUs of the local Ray (null: those Ray detects)")
    include_dashboard: bool = Field(default=True, description="start the Ray dashboard (on 127.0.0.1) with the "
                                    "local Ray")
    env_vars: dict[str, str] = Field(default_factory=dict, description="environment variables of every Ray worker")


class RunConfig(Section):
    name: str = Field(default="run", description="the run's name (its embedder training's in Ray Train and the logs)")
    run_dir: str = Field(default="runs/demo", description="folder of the stages' outputs, the manifest and the "
                         "report; relative paths in the config start here")
    seed: int = Field(default=0, description="seed of the stages' random choices (retrieval, judge-fit folds, "
                      "mining, training); data.seed: the data's")
    stages: list[str] | None = Field(default=None, description="stages to run, in the pipeline's order; null: "
                                     "every stage the pipeline knows")
    ray: RayConfig = Field(default_factory=RayConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    retrieve: RetrieveConfig = Field(default_factory=RetrieveConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    mine: MineConfig = Field(default_factory=MineConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    judge_fit: JudgeFitConfig | None = Field(default=None, description="offline stand-in judges, k-fold "
                                             "cross-fitted; null: S2 scores with the judge as it is")
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
        """The image budget of a model role (models.budget.ROLES): ``models.images.<role>``, or the checkpoint's
        own setting when it is null."""
        if role not in ROLES:
            raise ValueError(f"unknown image budget role {role!r}; roles: {', '.join(ROLES)}")
        return getattr(self.models.images, role) or ImageBudget()

    def to_yaml(self) -> str:
        """The config as YAML that loads back to it, every setting followed by its description."""
        return commented_yaml(self) + "\n"


def settings_help(config: RunConfig | None = None) -> str:
    """Every ``-o KEY=VALUE`` setting with its default and description (``--help`` of the config commands)."""
    rows = settings_rows(config or RunConfig())
    width = max(len(key) for key, _, _ in rows)
    return "settings (-o KEY=VALUE; `unime-ray config show` prints a preset's values):\n" + "\n".join(
        f"  {key:<{width}}  {json.dumps(value, default=str)}" + (f"  {text}" if text else "")
        for key, value, text in rows)


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
    return deep_merge(parent, data), f"{source} (extends preset {base})"


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
