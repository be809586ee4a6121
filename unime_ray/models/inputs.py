"""Model inputs shared by every backbone caller that assembles token ids itself (judge, reranker)."""

from __future__ import annotations

import torch


def rope_positions(model, image_pad_id: int, ids: torch.Tensor, mask: torch.Tensor,
                   grids: list[torch.Tensor]) -> torch.Tensor:
    """M-RoPE position ids [3, B, T] of a padded batch (left or right padding), computed once and passed
    explicitly: transformers 5 models otherwise keep per-call state (rope deltas) between forwards."""
    from .backbone import UnsupportedArchitectureError, uses_mrope
    from .embedder import language_core

    if not uses_mrope(model):
        raise UnsupportedArchitectureError(
            f"{model.config.model_type} has 1-D RoPE: the judge and the reranker take Qwen-VL (M-RoPE) backbones only")
    mm = (ids == image_pad_id).long()
    grid = torch.stack(grids) if grids else None
    pos, _ = language_core(model).get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid,
                                                 attention_mask=mask)
    return pos


def vision_inputs(model, pixel_values: list[torch.Tensor], grids: list[torch.Tensor], device) -> dict:
    """``pixel_values`` / ``image_grid_thw`` keyword arguments for per-image tensors (none without images)."""
    if not pixel_values:
        return {}
    return {"pixel_values": torch.cat(pixel_values).to(device, model.dtype),
            "image_grid_thw": torch.stack(grids).to(device)}
