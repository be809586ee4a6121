"""Image budgets (how large images reach the vision tower) and the tally of visual tokens they produce.

An :class:`ImageBudget` is the one type every model role uses (run config ``models.images.<role>``, the
stage specs, the CLI flags, the server): an optional fixed resize, then the Qwen-VL processor's pixel range
(``min_pixels`` / ``max_pixels``; None keeps the checkpoint's own setting). The processor rounds each side
to a multiple of ``patch_size * merge_size`` (28 for Qwen2-VL / Qwen2.5-VL) and scales the image into the
range, so an image becomes ``(h / 28) * (w / 28)`` visual tokens (method reference 3.1; 672x672 -> 576).

A *tally* is what a stage records of the tokens it actually used (:mod:`unime_ray.utils.tallies`).

Only pydantic, PIL (lazily) and the standard library: the run config imports this module.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ROLES = ("retriever", "judge", "embedder", "reranker", "eval")

logger = logging.getLogger(__name__)


class ImageBudget(BaseModel):
    """How images are sized before the vision tower: ``resize`` to (width, height) first (None: keep the
    image's size), then the processor's pixel range (None: the checkpoint's image-processor setting)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize: tuple[int, int] | None = Field(default=None, description="(width, height) images are resized to "
                                           "first (bicubic; one number: a square); null: the image's own size")
    min_pixels: int | None = Field(default=None, ge=1, description="processor's pixel floor per image, e.g. "
                                   "200704 = 256*28*28; null: the checkpoint's")
    max_pixels: int | None = Field(default=None, ge=1, description="processor's pixel cap per image, e.g. "
                                   "1003520 = 1280*28*28; null: the checkpoint's")

    @field_validator("resize", mode="before")
    @classmethod
    def _square(cls, v: Any) -> Any:
        return (v, v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _consistent(self):
        if self.resize is not None and min(self.resize) <= 0:
            raise ValueError(f"resize must be (width, height) with positive sizes, got {self.resize}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        return self

    @property
    def is_default(self) -> bool:
        return self.resize is None and self.min_pixels is None and self.max_pixels is None

    def prepare(self, image):
        """The image after ``resize`` (bicubic), unchanged without one."""
        if self.resize is not None and image.size != tuple(self.resize):
            from PIL import Image

            return image.resize(tuple(self.resize), Image.Resampling.BICUBIC)
        return image

    def size_kwargs(self, image_processor) -> dict[str, Any]:
        """``size=`` for a Qwen-VL image processor call (empty: the processor's own range)."""
        if self.min_pixels is None and self.max_pixels is None:
            return {}
        size = dict(image_processor.size) if image_processor.size is not None else {}
        lo = self.min_pixels if self.min_pixels is not None else size.get("shortest_edge")
        hi = self.max_pixels if self.max_pixels is not None else size.get("longest_edge")
        return {"size": {"shortest_edge": lo, "longest_edge": hi}}

    def describe(self) -> str:
        """Short text for reports, e.g. ``672x672, 200704-1003520 px``."""
        if self.is_default:
            return "checkpoint default"
        parts = [f"{self.resize[0]}x{self.resize[1]}" if self.resize else "native size"]
        if self.min_pixels is not None or self.max_pixels is not None:
            parts.append(f"{self.min_pixels or 'default'}-{self.max_pixels or 'default'} px")
        return ", ".join(parts)

    @classmethod
    def from_parts(cls, resize=None, min_pixels=None, max_pixels=None) -> "ImageBudget":
        """From the three values as specs and command lines carry them (a resize as any pair)."""
        return cls(resize=tuple(resize) if resize else None, min_pixels=min_pixels, max_pixels=max_pixels)


# ---------------------------------------------------------------------------------------------- CLI
def add_budget_arguments(parser, what: str = "images") -> None:
    """``--image-resize W H``, ``--min-pixels``, ``--max-pixels`` (an :class:`ImageBudget`) on a parser."""
    parser.add_argument("--image-resize", type=int, nargs=2, default=None, metavar=("W", "H"),
                        help=f"resize {what} to W x H before the processor (e.g. 1344 1344 for evaluation)")
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="processor pixel floor per image (default: the checkpoint's), e.g. 200704 = 256*28*28")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="processor pixel cap per image (default: the checkpoint's), e.g. 1003520 = 1280*28*28")


def training_budget(folder: str | os.PathLike) -> ImageBudget | None:
    """The image budget a unime-ray model was trained with (its card's recipe), or None (no card, or a model not
    trained here)."""
    from .card import read_card

    images = (read_card(folder).get("recipe") or {}).get("images") if Path(str(folder)).is_dir() else None
    return ImageBudget(**images) if images else None


def budget_from_arguments(args, model: str | None = None, flags: tuple[str, ...] = ("image_resize", "min_pixels",
                                                                                      "max_pixels")) -> ImageBudget:
    """The budget the flags give; with none given, the one ``model`` was trained with (its model card records it),
    else the checkpoint's own setting."""
    values = [getattr(args, f, None) for f in flags]
    if any(v is not None for v in values) or model is None:
        return ImageBudget.from_parts(*values)
    trained = training_budget(model)
    if trained is not None:
        logger.info("image budget: %s, as %s was trained (its model card); flags override it", trained.describe(),
                    model)
    return trained or ImageBudget()
