"""Token ids and vision inputs of reranker conversations (any number of images), and their batching.

A prompt (in the canonical Qwen-VL placeholders, adapted per piece to the backbone's, see
``VLProcessor.adapt_chat``) is split after every ``<|vision_end|>`` so each piece holds at most one image; the pieces are
tokenized separately and concatenated (special tokens end BPE merges, so this equals tokenizing the whole
string) — the same ids at training time, at inference time and in tests. The answer (``Yes``, ``No`` or
``Ans: (i)``) and the end-of-turn token follow the assistant header; only they carry loss, and the answer's
decision (``Yes``/``No``, the index ``i``) is tokenized on its own so its tokens are known. Every encoding is
checked against one tokenization of the whole string (prompt + answer + end of turn, images collapsed to their
one pad), so what is trained on is exactly what pairwise inference (the judge's backend) scores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from ..data.images import ImageError, load_image
from ..data.schema import Item
from ..judge.prompt import collapse_image_pads
from ..models.processor import IMAGE_PAD, VISION_END, VLProcessor
from .prompt import END_OF_TURN

IGNORE_INDEX = -100


class ConversationError(ValueError):
    """A conversation that cannot be encoded (unreadable image, too long for the context)."""


@dataclass
class Encoded:
    ids: list[int]
    answer_start: int                    # index of the first answer token (== len(ids) without an answer)
    pixel_values: list[torch.Tensor]     # per image, prompt order
    grids: list[torch.Tensor]            # per image: Qwen-VL grid [3], LLaVA-OV image size [2]
    decision: tuple[int, int] | None = None   # [start, end) of the decision's tokens in ids


def encode_conversation(processor: VLProcessor, prompt: str, image_items: Sequence[Item], answer: str | None = None,
                        image_root: str | os.PathLike | None = None, max_length: int | None = None,
                        decision: tuple[int, int] | None = None) -> Encoded:
    """Encode ``prompt`` (one image placeholder per item of ``image_items``, in order) and the answer, whose
    characters ``decision`` [start, end) are its decision (``Encoded.decision`` gives their tokens)."""
    n_slots = prompt.count(IMAGE_PAD)
    multi = n_slots > 1          # LLaVA-OV reads the images of a multi-image prompt as base views
    if n_slots != len(image_items):
        raise ConversationError(f"prompt has {n_slots} image placeholders for {len(image_items)} images")
    pieces = prompt.split(VISION_END)
    pieces = [p + VISION_END for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    ids: list[int] = []
    pix: list[torch.Tensor] = []
    grids: list[torch.Tensor] = []
    images = iter(image_items)
    for piece in pieces:
        image = None
        if IMAGE_PAD in piece:
            item = next(images)
            try:
                image = load_image(item, image_root)
            except ImageError as exc:
                raise ConversationError(str(exc)) from None
        enc = processor([processor.adapt_chat(piece)], [image], multi_image=multi)
        ids.extend(enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist())
        for p, g in processor.per_image(enc):
            pix.append(p)
            grids.append(g)
    answer_start, token_span = len(ids), None
    if answer is not None:
        start, end = decision or (0, 0)
        pieces = [processor.tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
                  for piece in (answer[:start], answer[start:end], answer[end:] + END_OF_TURN)]
        if decision is not None:
            if not pieces[1]:
                raise ConversationError(f"answer {answer!r} has no decision at characters {decision}")
            token_span = (answer_start + len(pieces[0]), answer_start + len(pieces[0]) + len(pieces[1]))
        ids.extend(t for piece in pieces for t in piece)
    whole = processor.tokenizer(processor.adapt_chat(prompt) + ("" if answer is None else answer + END_OF_TURN),
                                add_special_tokens=False)["input_ids"]
    if collapse_image_pads(ids, processor.image_pad_id) != list(whole):
        raise ConversationError("the conversation's pieces do not tokenize to the whole conversation's ids "
                                f"(answer {answer!r}): BPE merged across a piece boundary")
    if max_length is not None and len(ids) > max_length:
        raise ConversationError(f"conversation is {len(ids)} tokens, more than the context of {max_length} "
                                "(too many or too large images? lower max_pixels or the number of candidates)")
    return Encoded(ids, answer_start, pix, grids, token_span)


def collate(encs: Sequence[Encoded], pad_id: int, side: str = "right") -> dict[str, torch.Tensor | list]:
    """Pad a batch; ``labels`` are the ids on answer tokens and IGNORE_INDEX everywhere else, ``decision`` marks
    the answers' decision tokens."""
    width = max(len(e.ids) for e in encs)
    ids, mask, labels, decision = [], [], [], []
    for e in encs:
        n, pad = len(e.ids), width - len(e.ids)
        lab = [IGNORE_INDEX] * e.answer_start + e.ids[e.answer_start:]
        start, end = e.decision or (0, 0)
        dec = [start <= t < end for t in range(n)]
        if side == "right":
            ids.append(e.ids + [pad_id] * pad)
            mask.append([1] * n + [0] * pad)
            labels.append(lab + [IGNORE_INDEX] * pad)
            decision.append(dec + [False] * pad)
        else:
            ids.append([pad_id] * pad + e.ids)
            mask.append([0] * pad + [1] * n)
            labels.append([IGNORE_INDEX] * pad + lab)
            decision.append([False] * pad + dec)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels),
            "decision": torch.tensor(decision),
            "pixel_values": [p for e in encs for p in e.pixel_values], "grids": [g for e in encs for g in e.grids]}
