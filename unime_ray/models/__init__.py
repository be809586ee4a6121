"""MLLM backbones (Qwen2-VL, Qwen2.5-VL): loading, input processing, the embedder, adapters, tiny models."""

from .backbone import (SUPPORTED_ARCHITECTURES, ModelNotFoundError, UnsupportedArchitectureError,
                       build_random_backbone, load_backbone, load_config)
from .embedder import Embedder, last_token_pool
from .formatting import INPUT_FORMATS, format_item
from .lora import LoraSettings, apply_lora, load_adapter, merged, save_adapter
from .processor import ImageOptions, VLProcessor
from .tiny import TinySpec, make_tiny_models

__all__ = [
    "Embedder", "INPUT_FORMATS", "ImageOptions", "LoraSettings", "ModelNotFoundError", "SUPPORTED_ARCHITECTURES",
    "TinySpec", "UnsupportedArchitectureError", "VLProcessor", "apply_lora", "build_random_backbone", "format_item",
    "last_token_pool", "load_adapter", "load_backbone", "load_config", "make_tiny_models", "merged", "save_adapter",
]
