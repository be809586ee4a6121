"""What one training run is (:class:`TrainJob`), apart from how it runs: the trainer, and the tasks it trains,
read it; so it sits below both."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..models.budget import ImageBudget
from .config import RerankerTrainConfig, TrainConfig, TrainLoop


@dataclass(frozen=True)
class TrainJob:
    """One training run: a config section's settings as they are (a :class:`RerankerTrainConfig` trains the
    reranker, any other :class:`TrainConfig` the embedder) and what the run itself decides: the weights it
    starts from, where it writes, the inputs' format and the image budget. Goes to the Ray Train workers as
    :meth:`to_dict` (also what a run records as its settings) and is rebuilt there with :meth:`from_dict`."""

    settings: TrainLoop                      # TrainConfig (the embedder) or RerankerTrainConfig
    model: str
    output_dir: str
    input_format: str = "official"
    positions: str = "auto"
    image_root: str | None = None
    seed: int = 0
    images: ImageBudget = field(default_factory=ImageBudget)   # the role's budget (models.budget)
    fail_at_step: int | None = None          # testing: kill rank 0 once at this step (see max_failures)
    report_memory: bool = False              # add per-rank parameter / optimizer-state bytes to the metrics

    def __post_init__(self):
        # a copy of the task's fields only: a section's own switches (baseline.enabled, judge_fit's kind, folds,
        # encoder...) are not training settings, and the job does not share the run config's section
        cls = RerankerTrainConfig if isinstance(self.settings, RerankerTrainConfig) else TrainConfig
        object.__setattr__(self, "settings", cls(**self.settings.model_dump(include=set(cls.model_fields))))
        if not isinstance(self.images, ImageBudget):
            object.__setattr__(self, "images", ImageBudget(**(self.images or {})))

    @property
    def task(self) -> str:
        return "reranker" if isinstance(self.settings, RerankerTrainConfig) else "embedder"

    def to_dict(self) -> dict[str, Any]:
        run = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("settings", "images")}
        return {**self.settings.model_dump(mode="json"), **run, "task": self.task,
                "images": self.images.model_dump(mode="json")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainJob":
        conf = RerankerTrainConfig if d["task"] == "reranker" else TrainConfig
        run = {f.name for f in fields(cls)} - {"settings"}
        return cls(settings=conf(**{k: v for k, v in d.items() if k in conf.model_fields}),
                   **{k: v for k, v in d.items() if k in run})
