"""MLLM backbones (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision): loading, input processing, the embedder, adapters, tiny models.

Names are imported lazily, so ``unime_ray.models.budget`` (pydantic only) stays cheap to import from the
run config.
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

_EXPORTS = {
    "SUPPORTED_ARCHITECTURES": "backbone", "ModelNotFoundError": "backbone", "UnsupportedArchitectureError": "backbone",
    "build_random_backbone": "backbone", "load_backbone": "backbone", "load_config": "backbone",
    "Embedder": "embedder", "last_token_pool": "embedder",
    "INPUT_FORMATS": "formatting", "format_item": "formatting",
    "LoraSettings": "lora", "apply_lora": "lora", "load_adapter": "lora", "merged": "lora", "save_adapter": "lora",
    "ImageOptions": "processor", "VLProcessor": "processor",
    "ImageBudget": "budget",
    "TinyModelConfig": "config", "make_tiny_models": "tiny",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
