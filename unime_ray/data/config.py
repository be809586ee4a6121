"""Typed settings of the input data (the run config's ``data:`` section); pydantic and the standard library only."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..utils.settings import Section


class DataConfig(Section):
    """The input data: a built-in demo dataset, or a file in one of the supported formats."""

    source: Literal["emoji", "synthetic", "official", "mmeb-train", "mmeb-eval", "canonical"] = Field(
        default="emoji", description="emoji, synthetic: a built-in demo set; else the format of train_path / "
        "eval_path (official: the UniME-V2 training JSON; canonical: this package's pair table)")
    train_path: str | None = Field(default=None, description="the training pairs (file or folder) of a file "
                                   "source")
    eval_path: str | None = Field(default=None, description="the evaluation pairs (file or folder) of a file "
                                  "source")
    eval_source: Literal["official", "mmeb-train", "mmeb-eval", "canonical"] | None = Field(
        default=None, description="the format of eval_path when it differs from source's (e.g. train on "
        "MMEB-train, evaluate on MMEB-eval rows, whose candidate lists the train format cannot hold); null: source's")
    image_root: str | None = Field(default=None, description="folder that the input rows' relative image paths "
                                   "start from")
    task: str | None = Field(default=None, description="task name of input rows that name none; null: from the "
                             "input's folder or file name")
    seed: int = Field(default=0, description="seed of the demo data and of the dev split")
    max_items: int | None = Field(default=None, ge=2, description="demo data: a seeded subset of this many items; "
                                  "null: all")
    eval_fraction: float = Field(default=0.2, gt=0.0, lt=1.0, description="demo data: share of the items held "
                                 "out for evaluation")
    dev_fraction: float = Field(default=0.0, ge=0.0, lt=0.5, description="a development split held out of the "
                                "training pairs (whole image groups), which no training step sees: the reranker "
                                "guard and the fused ranking's weight are decided on it, never on the eval split; "
                                "0: none")
    dev_candidates: int = Field(default=100, ge=2, description="a dev row's candidates: its positive + other dev "
                                "positives")
    image_size: int = Field(default=64, ge=16, description="demo data: side of the rendered images, in pixels")
    check_images: bool = Field(default=True, description="check that every input image exists and decodes (bad "
                               "rows are quarantined)")
    rows_per_shard: int = Field(default=2000, ge=1, description="rows per Parquet shard of the prepared tables")

    @model_validator(mode="after")
    def _paths_for_files(self):
        if self.source not in ("emoji", "synthetic") and not (self.train_path or self.eval_path):
            raise ValueError(f"data.source={self.source!r} needs data.train_path and/or data.eval_path")
        if self.eval_source is not None and (self.source in ("emoji", "synthetic") or not self.eval_path):
            raise ValueError("data.eval_source is the format of data.eval_path: it needs a file source "
                             f"(data.source={self.source!r}) and data.eval_path")
        return self
