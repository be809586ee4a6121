"""The processor of any supported checkpoint, chosen by its architecture (as transformers' AutoProcessor):
LLaVA-OneVision's own (models/llava_onevision.py), else Qwen-VL's; both have one interface."""

from __future__ import annotations

import os

from .backbone import load_config
from .llava_onevision import LlavaOVProcessor
from .processor import ImageOptions, VLProcessor


def load_processor(path: str | os.PathLike, model_type: str | None = None, backend: str = "auto",
                   image_options: ImageOptions | None = None) -> VLProcessor:
    """``path``'s processor; ``model_type`` saves reading its config when the caller has it."""
    model_type = model_type or load_config(path).model_type
    if model_type == "llava_onevision":
        return LlavaOVProcessor.from_pretrained(path, backend, image_options)  # type: ignore[return-value]
    return VLProcessor.from_pretrained(path, model_type, backend, image_options)
