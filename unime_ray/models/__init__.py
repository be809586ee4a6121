"""MLLM backbones (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision): loading, input processing, the embedder and encoding
of tables with it (locally or on a Ray pool), adapters.

Names are imported lazily, so ``unime_ray.models.budget`` (pydantic only) stays cheap to import from the
run config.
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

_EXPORTS = {
    "SUPPORTED_ARCHITECTURES": "backbone", "ModelNotFoundError": "backbone", "UnsupportedArchitectureError": "backbone",
    "build_random_backbone": "backbone", "load_backbone": "backbone", "load_config": "backbone",
    "Embedder": "embedder", "last_token_pool": "embedder",
    "EmbedderSpec": "encode", "embed_table": "encode", "read_embeddings": "encode",
    "INPUT_FORMATS": "formatting", "format_item": "formatting",
    "LoraSettings": "lora", "apply_lora": "lora", "load_adapter": "lora", "merged": "lora", "save_adapter": "lora",
    "ImageOptions": "processor", "VLProcessor": "processor",
    "ImageBudget": "budget",
    "ModelsConfig": "config", "TinyModelConfig": "config",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
