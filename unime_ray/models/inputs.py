"""Model inputs for every caller that assembles token ids itself (the judge, the reranker), on any backbone.

The callers keep, per image, its pixel tensor and its "grid" (Qwen-VL: ``image_grid_thw`` [3]; LLaVA-OV: the
image size [2]) and hand batches of ids to :func:`positions` and :func:`forward_kwargs`:

* **Qwen-VL** (M-RoPE): positions are [3, B, T] from the model's own ``get_rope_index``; images go in as
  ``pixel_values`` / ``image_grid_thw`` and the model places them on the ``<|image_pad|>`` tokens.
* **LLaVA-OneVision** (1-D RoPE): positions are [1, B, T] over the real tokens; the image features are computed
  here with the model's own ``get_image_features`` (anyres for an image alone in its prompt, the base view
  plus its newline for an image in a multi-image prompt, as ``LlavaOnevisionProcessor`` counts them; an image
  stored with a single tile is a base view) and written into the text embeddings at the ``<image>`` tokens, so
  a prompt can be split anywhere (prefix KV reuse) and every image keeps its own mode.
"""

from __future__ import annotations

import torch


def positions(model, image_pad_id: int, ids: torch.Tensor, mask: torch.Tensor,
              grids: list[torch.Tensor]) -> torch.Tensor:
    """Position ids [A, B, T] of a padded batch (left or right padding); A = 3 for M-RoPE, 1 for 1-D RoPE.
    Computed once and passed explicitly: transformers 5 models otherwise keep per-call state (rope deltas)."""
    from .backbone import uses_mrope
    from .embedder import language_core

    if not uses_mrope(model):
        pos = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        return pos.unsqueeze(0)
    mm = (ids == image_pad_id).long()
    grid = torch.stack(grids) if grids else None
    pos, _ = language_core(model).get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid,
                                                 attention_mask=mask)
    return pos


def forward_kwargs(model, image_pad_id: int, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                   pixel_values: list[torch.Tensor], grids: list[torch.Tensor], device) -> dict:
    """Keyword arguments of one forward (the model or its ``language_core``) for a batch of ids with per-image
    pixels and grids in prompt order (row by row)."""
    from .backbone import uses_mrope

    kwargs = {"attention_mask": mask.to(device)}
    if uses_mrope(model):
        kwargs.update(input_ids=ids.to(device), position_ids=pos.to(device),
                      mm_token_type_ids=(ids == image_pad_id).long().to(device))
        if pixel_values:
            kwargs.update(pixel_values=torch.cat(pixel_values).to(device, model.dtype),
                          image_grid_thw=torch.stack(grids).to(device))
        return kwargs
    kwargs["position_ids"] = pos[0].to(device)
    if not pixel_values:
        kwargs["input_ids"] = ids.to(device)
        return kwargs
    kwargs["inputs_embeds"] = _llava_embeds(model, image_pad_id, ids.to(device), pixel_values, grids, device)
    return kwargs


def _llava_embeds(model, image_token_id: int, ids: torch.Tensor, pixel_values: list[torch.Tensor],
                  sizes: list[torch.Tensor], device) -> torch.Tensor:
    from .embedder import language_core

    core = language_core(model)
    cfg = core.config
    common = dict(vision_feature_layer=cfg.vision_feature_layer,
                  vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                  vision_aspect_ratio=cfg.vision_aspect_ratio)
    features: list[torch.Tensor | None] = [None] * len(pixel_values)
    tiled = [i for i, p in enumerate(pixel_values) if p.shape[0] > 1]
    base = [i for i, p in enumerate(pixel_values) if p.shape[0] == 1]
    if tiled:   # anyres: each image alone in its prompt (the model packs tiles by image size)
        width = max(pixel_values[i].shape[0] for i in tiled)
        pix = torch.stack([torch.cat([pixel_values[i], pixel_values[i].new_zeros(
            (width - pixel_values[i].shape[0], *pixel_values[i].shape[1:]))]) for i in tiled])
        out = core.get_image_features(pix.to(device, model.dtype), torch.stack([sizes[i] for i in tiled]).to(device),
                                      **common).pooler_output
        for i, f in zip(tiled, out):
            features[i] = f
    if base:    # base views of a multi-image prompt: the model's multi-image path (one group of >= 2 images)
        group = base if len(base) > 1 else base * 2
        pix = torch.stack([pixel_values[i] for i in group])
        out = core.get_image_features(pix.to(device, model.dtype), torch.stack([sizes[i] for i in group]).to(device),
                                      batch_num_images=torch.tensor([len(group)]), **common).pooler_output
        for i, f in zip(base, out):
            features[i] = f
    embeds = core.get_input_embeddings()(ids)
    flat = torch.cat([f.to(embeds.dtype) for f in features])   # type: ignore[misc]
    slots = ids == image_token_id
    if int(slots.sum()) != flat.shape[0]:
        raise ValueError(f"{int(slots.sum())} <image> tokens for {flat.shape[0]} image features")
    return embeds.masked_scatter(slots.unsqueeze(-1).expand_as(embeds), flat)
