"""Typed settings of the input data (the run config's ``data:`` section); pydantic and the standard library only."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..utils.settings import Section


class DataConfig(Section):
    """The input data: a built-in demo dataset, or a file in one of the supported formats."""

    source: Literal["emoji", "synthetic", "official", "mmeb-train", "mmeb-eval", "canonical"] = "emoji"
    train_path: str | None = None
    eval_path: str | None = None
    # the format of eval_path when it differs from source's (e.g. train on MMEB-train, evaluate on MMEB-eval
    # rows, whose candidate lists the train format cannot hold); null: source's
    eval_source: Literal["official", "mmeb-train", "mmeb-eval", "canonical"] | None = None
    image_root: str | None = None
    task: str | None = None
    seed: int = 0
    max_items: int | None = Field(default=None, ge=2)
    eval_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    # a development split held out of the training pairs (whole image groups), which no training step sees: the
    # reranker guard and the fused ranking's weight are decided on it, never on the eval split; 0: none
    dev_fraction: float = Field(default=0.0, ge=0.0, lt=0.5)
    dev_candidates: int = Field(default=100, ge=2)   # a dev row's candidates: its positive + other dev positives
    image_size: int = Field(default=64, ge=16)
    check_images: bool = True
    rows_per_shard: int = Field(default=2000, ge=1)

    @model_validator(mode="after")
    def _paths_for_files(self):
        if self.source not in ("emoji", "synthetic") and not (self.train_path or self.eval_path):
            raise ValueError(f"data.source={self.source!r} needs data.train_path and/or data.eval_path")
        if self.eval_source is not None and (self.source in ("emoji", "synthetic") or not self.eval_path):
            raise ValueError("data.eval_source is the format of data.eval_path: it needs a file source "
                             f"(data.source={self.source!r}) and data.eval_path")
        return self
