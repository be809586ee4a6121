"""Forward passes of the reranker: answer-token cross-entropy for training, greedy decoding for inference."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..models.embedder import language_core
from ..models.inputs import forward_kwargs, positions
from ..models.processor import VLProcessor
from .encoding import IGNORE_INDEX, Encoded, collate


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_token_losses(model, processor: VLProcessor, encs: Sequence[Encoded], device=None,
                        answer_loss: str = "decision") -> torch.Tensor:
    """Per conversation, the cross-entropy of its answer tokens (answer + end of turn) given everything before
    them. ``decision`` (the paper's CE(YES), CE(NO), CE(I)): the full CE of the decision's tokens (their sum,
    -log P(decision)) plus the mean CE of the answer's fixed tokens (``Ans: (``, ``)``, end of turn), one term at
    the weight of one decision whatever the template's length, so greedy decoding still writes the trained form;
    ``all_tokens``: the mean CE over all answer tokens (the released code's token-mean). Prompt, role headers and
    padding carry no loss. Logits are computed for answer positions only (the LM head over a 150k vocabulary on
    every token would dominate memory)."""
    if answer_loss not in ("decision", "all_tokens"):
        raise ValueError(f"answer_loss must be 'decision' or 'all_tokens', not {answer_loss!r}")
    if answer_loss == "decision":
        missing = [i for i, e in enumerate(encs) if e.decision is None]
        if missing:
            raise ValueError(f"answer_loss 'decision' needs the decision span of every conversation; "
                             f"conversations {missing} were encoded without one")
    device = device or next(model.parameters()).device
    batch = collate(encs, processor.pad_id, side="right")
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    pos = positions(model, processor.image_pad_id, ids, mask, batch["grids"])
    out = language_core(model)(use_cache=False, return_dict=True,
                               **forward_kwargs(model, processor.image_pad_id, ids, mask, pos,
                                                batch["pixel_values"], batch["grids"], device))
    hidden = out.last_hidden_state
    target = labels[:, 1:].to(device)                 # token t is predicted from position t-1
    rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)
    if len(rows) == 0:
        raise ValueError("no answer tokens in the batch")
    logits = _base(model).lm_head(hidden[rows, cols])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    token_loss = F.cross_entropy(logits, target[rows, cols], reduction="none")
    is_decision = batch["decision"][:, 1:].to(device)[rows, cols]
    if answer_loss == "all_tokens":
        is_decision = torch.zeros_like(is_decision)
    n_seq = len(encs)

    def per_conv(keep: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_seq, device=device, dtype=values.dtype).index_add(0, rows[keep], values[keep])

    fixed_mean = per_conv(~is_decision, token_loss) / per_conv(~is_decision, torch.ones_like(token_loss)).clamp(min=1)
    return per_conv(is_decision, token_loss) + fixed_mean


@torch.inference_mode()
def greedy_generate(model, processor: VLProcessor, encs: Sequence[Encoded], max_new_tokens: int = 8,
                    stop_ids: Sequence[int] = (), device=None) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (left-padded, KV cache, explicit positions, M-RoPE or 1-D:
    each new token sits one past the largest position of its prompt, as the model's own decoding does)."""
    from transformers import DynamicCache

    device = device or next(model.parameters()).device
    batch = collate(encs, processor.pad_id, side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = positions(model, processor.image_pad_id, ids, mask, batch["grids"])
    next_pos = (pos.masked_fill(~mask.bool().unsqueeze(0), -1).amax(dim=(0, 2)) + 1)  # [B]
    cache = DynamicCache(config=model.config)
    out = model(past_key_values=cache, use_cache=True, logits_to_keep=1,
                **forward_kwargs(model, processor.image_pad_id, ids, mask, pos, batch["pixel_values"],
                                 batch["grids"], device))
    n = len(encs)
    generated: list[list[int]] = [[] for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool)
    stop = torch.tensor(list(stop_ids) or [-1])
    attn = mask.to(device)
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1).cpu()
        for b in range(n):
            if not done[b]:
                generated[b].append(int(token[b]))
        done |= torch.isin(token, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones(n, 1, dtype=attn.dtype, device=device)], dim=1)
        step_pos = (next_pos + step).view(1, n, 1).expand(pos.shape[0], n, 1)
        out = model(past_key_values=cache, use_cache=True, logits_to_keep=1,
                    **forward_kwargs(model, processor.image_pad_id, token.view(n, 1), attn, step_pos, [], [],
                                     device))
    return generated
