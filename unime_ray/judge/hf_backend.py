"""The transformers judge backend (CPU and small GPUs): batched forwards with query-prefix KV reuse.

Every prompt is ``tokens(prefix) + tokens(suffix)`` (see :func:`~unime_ray.judge.prompt.judge_segments`),
which is checked per pair to be the tokens of the whole prompt string; the prefix (system turn,
instruction, the query and its image) is the same for all of a query's candidates. With ``prefix_reuse``
the prefix runs once per query, its KV cache is copied across a batch of candidate suffixes, and only the
suffixes run; without it, whole prompts are batched. Positions (M-RoPE on Qwen-VL, 1-D on LLaVA-OneVision)
are computed once on the full sequence and passed explicitly, so both paths (and the one-pair-at-a-time
baseline) see identical positions and give the same scores. On LLaVA-OV an image alone in its prompt is read
with anyres tiles and the two images of an image-image pair as base views (its multi-image convention), see
:mod:`unime_ray.models.inputs`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..data.images import ImageError, load_image
from ..data.schema import Item
from ..models.auto_processor import load_processor
from ..models.backbone import load_backbone
from ..models.inputs import forward_kwargs, positions
from ..models.processor import ImageOptions
from .prompt import JudgePrompt, answer_token_ids, collapse_image_pads, judge_segments, split_error_message

logger = logging.getLogger(__name__)


def _item_key(item: Item) -> str:
    if item.image:
        return "bytes:" + hashlib.sha1(item.image).hexdigest()
    return "path:" + (item.image_path or "")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class PairError(ValueError):
    """A pair the judge cannot score (unreadable image, prompt longer than the context)."""


@dataclass
class _Encoded:
    prefix_ids: list[int]
    suffix_ids: list[int]
    pixel_values: list[torch.Tensor]      # per image, prompt order
    grids: list[torch.Tensor]             # per image [3]
    prefix_images: int                    # how many of the images belong to the prefix


class TransformersJudge:
    """Scores (query, candidate) pairs with a Qwen-VL or LLaVA-OneVision model loaded through
    :func:`load_backbone`."""

    name = "transformers"

    def __init__(self, model: str | os.PathLike, prompt: JudgePrompt = JudgePrompt(), dtype: str = "auto",
                 device: str | None = None, image_root: str | os.PathLike | None = None,
                 image_options: ImageOptions | None = None, batch_size: int = 16, prefix_reuse: bool = True,
                 max_length: int | None = None):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_backbone(model, dtype=dtype, device=device, role="judge")
        self.device = torch.device(device)
        self.processor = load_processor(model, self.model.config.model_type, "manual", image_options)
        self.prompt = prompt
        self.image_root = image_root
        self.batch_size = batch_size
        self.prefix_reuse = prefix_reuse
        text_cfg = getattr(self.model.config, "text_config", self.model.config)
        self.max_length = max_length or text_cfg.max_position_embeddings
        self.yes_id, self.no_id = answer_token_ids(self.processor.tokenizer, prompt)
        self.model_name = str(model)

    # ------------------------------------------------------------------------------------- encoding
    def _segment(self, text: str, items: list[Item], multi_image: bool = False
                 ) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        images = []
        for it in items:
            try:
                images.append(load_image(it, self.image_root))
            except ImageError as exc:
                raise PairError(str(exc)) from None
        if len(images) > 1:
            raise PairError("more than one image in one prompt segment")
        enc = self.processor([self.processor.adapt_chat(text)], [images[0] if images else None],
                             multi_image=multi_image)
        ids = enc["input_ids"][0].tolist()
        if not images:
            return ids, [], []
        (pix, grid), = self.processor.per_image(enc)
        return ids, [pix], [grid]

    def _prefix(self, query: Item, prefix: str, cache: dict | None, multi_image: bool):
        key = (prefix, _item_key(query), multi_image)
        if cache is not None and key in cache:
            return cache[key]
        enc = self._segment(prefix, [query] if query.has_image else [], multi_image)
        if cache is not None:
            cache[key] = enc
        return enc

    def _assemble(self, prefix_enc, suffix_enc) -> _Encoded:
        (p_ids, p_pix, p_grid), (s_ids, s_pix, s_grid) = prefix_enc, suffix_enc
        total = len(p_ids) + len(s_ids)
        if total > self.max_length:
            raise PairError(f"prompt is {total} tokens, more than the judge's context of {self.max_length} "
                            f"(too many image tokens? lower max_pixels)")
        return _Encoded(p_ids, s_ids, p_pix + s_pix, p_grid + s_grid, len(p_pix))

    def encode(self, query: Item, candidate: Item, prefix_cache: dict | None = None) -> _Encoded:
        """Token ids and vision inputs of one pair; ``prefix_cache`` reuses a query's encoded prefix."""
        enc = self.encode_all([(query, candidate)], prefix_cache)[0]
        if isinstance(enc, PairError):
            raise enc
        return enc

    def encode_all(self, pairs: Sequence[tuple[Item, Item]], prefix_cache: dict | None = None
                   ) -> list[_Encoded | PairError]:
        """:meth:`encode` for many pairs: prefixes once per query, text-only suffixes tokenized together.
        A pair whose prefix + suffix ids (images collapsed to their one pad) are not the ids of the whole
        prompt string is a :class:`PairError` (see :func:`~unime_ray.judge.prompt.judge_segments`)."""
        prefix_cache = {} if prefix_cache is None else prefix_cache
        out: list[_Encoded | PairError | None] = [None] * len(pairs)
        prefixes: list = [None] * len(pairs)
        text_suffixes: list[tuple[int, str]] = []
        segments = [judge_segments(q, c, self.prompt) for q, c in pairs]
        for i, (q, c) in enumerate(pairs):
            prefix, suffix = segments[i]
            # LLaVA-OV: base views in a two-image prompt (Qwen-VL encodes the query the same either way)
            multi = q.has_image and c.has_image and self.processor.multi_image_base_views
            try:
                prefixes[i] = self._prefix(q, prefix, prefix_cache, multi)
                if c.has_image:
                    out[i] = self._assemble(prefixes[i], self._segment(suffix, [c], multi))
                else:
                    text_suffixes.append((i, suffix))
            except PairError as exc:
                out[i] = exc
        for j in range(0, len(text_suffixes), 256):
            chunk = text_suffixes[j:j + 256]
            enc = self.processor([self.processor.adapt_chat(t) for _, t in chunk], [None] * len(chunk))
            for row, (i, _) in enumerate(chunk):
                ids = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
                try:
                    out[i] = self._assemble(prefixes[i], (ids, [], []))
                except PairError as exc:
                    out[i] = exc
        self._check_whole(segments, out)
        return out  # type: ignore[return-value]

    def _check_whole(self, segments: list[tuple[str, str]], out: list) -> None:
        """Replace by a PairError every encoding that is not the tokenization of its whole prompt string."""
        todo = [i for i, e in enumerate(out) if isinstance(e, _Encoded)]
        pad = self.processor.image_pad_id
        for j in range(0, len(todo), 256):
            chunk = todo[j:j + 256]
            whole = self.processor.tokenizer([self.processor.adapt_chat(segments[i][0] + segments[i][1])
                                              for i in chunk],
                                             add_special_tokens=False)["input_ids"]
            for i, ids in zip(chunk, whole):
                if collapse_image_pads(out[i].prefix_ids + out[i].suffix_ids, pad) != list(ids):
                    out[i] = PairError(split_error_message(*segments[i]))

    # ------------------------------------------------------------------------------------- forwards
    def _positions(self, ids: torch.Tensor, mask: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        return positions(self.model, self.processor.image_pad_id, ids, mask, grids)

    def _inputs(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, pix: list[torch.Tensor],
                grids: list[torch.Tensor]) -> dict:
        return forward_kwargs(self.model, self.processor.image_pad_id, ids, mask, pos, pix, grids, self.device)

    def _yes_no(self, logits: torch.Tensor) -> np.ndarray:
        two = logits[:, [self.yes_id, self.no_id]].float()
        return torch.softmax(two, dim=-1)[:, 0].double().cpu().numpy()

    @torch.inference_mode()
    def _score_full(self, encs: list[_Encoded]) -> np.ndarray:
        """Whole prompts, left-padded into one batch."""
        seqs = [e.prefix_ids + e.suffix_ids for e in encs]
        width = max(map(len, seqs))
        pad = self.processor.pad_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        grids = [g for e in encs for g in e.grids]
        pos = self._positions(ids, mask, grids)
        out = self.model(use_cache=False, logits_to_keep=1,
                         **self._inputs(ids, mask, pos, [p for e in encs for p in e.pixel_values], grids))
        return self._yes_no(out.logits[:, -1])

    @torch.inference_mode()
    def _score_with_prefix(self, encs: list[_Encoded]) -> np.ndarray:
        """One query's candidates: the prefix runs once, its KV cache is copied across each suffix batch."""
        from transformers import DynamicCache

        head = encs[0]
        n_p = len(head.prefix_ids)
        p_ids = torch.tensor([head.prefix_ids])
        # Positions of the first pair's full sequence; the prefix part is the same for every candidate.
        first = self._positions(torch.tensor([head.prefix_ids + head.suffix_ids]),
                                torch.ones(1, n_p + len(head.suffix_ids), dtype=torch.long), head.grids)
        cache = DynamicCache(config=self.model.config)
        self.model(past_key_values=cache, use_cache=True, logits_to_keep=1,
                   **self._inputs(p_ids, torch.ones_like(p_ids), first[:, :, :n_p],
                                  head.pixel_values[:head.prefix_images], head.grids[:head.prefix_images]))
        scores = []
        for j in range(0, len(encs), self.batch_size):
            scores.append(self._score_suffixes(encs[j:j + self.batch_size], cache, n_p))
        return np.concatenate(scores)

    def _score_suffixes(self, encs: list[_Encoded], cache, n_p: int) -> np.ndarray:
        seqs = [e.prefix_ids + e.suffix_ids for e in encs]
        width_full = max(map(len, seqs))
        pad = self.processor.pad_id
        ids_full = torch.tensor([q + [pad] * (width_full - len(q)) for q in seqs])
        mask_full = torch.tensor([[1] * len(q) + [0] * (width_full - len(q)) for q in seqs])
        pos_all = self._positions(ids_full, mask_full, [g for e in encs for g in e.grids])
        lengths = [len(e.suffix_ids) for e in encs]
        width = max(lengths)
        s_ids = torch.tensor([e.suffix_ids + [pad] * (width - len(e.suffix_ids)) for e in encs])  # right-padded
        mask = torch.tensor([[1] * n_p + [1] * n + [0] * (width - n) for n in lengths])
        pos = torch.stack([torch.cat([pos_all[:, b, n_p:n_p + n], pos_all[:, b, n_p + n - 1:n_p + n]
                                      .expand(-1, width - n)], dim=1) for b, n in enumerate(lengths)], dim=1)
        batch_cache = copy.deepcopy(cache)
        batch_cache.batch_repeat_interleave(len(encs))
        s_pix = [p for e in encs for p in e.pixel_values[e.prefix_images:]]
        s_grid = [g for e in encs for g in e.grids[e.prefix_images:]]
        out = self.model(past_key_values=batch_cache, use_cache=True,
                         **self._inputs(s_ids, mask, pos, s_pix, s_grid))
        last = torch.tensor(lengths) - 1
        return self._yes_no(out.logits[torch.arange(len(encs)), last.to(out.logits.device)])

    # ------------------------------------------------------------------------------------- public
    def score(self, pairs: Sequence[tuple[Item, Item]]) -> np.ndarray:
        """Scores in pair order; raises :class:`PairError` for a bad pair (use :meth:`score_or_errors`)."""
        scores, errors = self.score_or_errors(pairs)
        for e in errors:
            if e:
                raise PairError(e)
        return scores

    def score_or_errors(self, pairs: Sequence[tuple[Item, Item]]) -> tuple[np.ndarray, list[str | None]]:
        """(scores with NaN for bad pairs, error message or None per pair)."""
        scores = np.full(len(pairs), np.nan)
        errors: list[str | None] = [None] * len(pairs)
        encoded: list[tuple[int, _Encoded]] = []
        for i, enc in enumerate(self.encode_all(pairs)):
            if isinstance(enc, PairError):
                errors[i] = str(enc)
            else:
                encoded.append((i, enc))
        if self.prefix_reuse:
            groups: dict[tuple, list[tuple[int, _Encoded]]] = {}
            for i, e in encoded:  # same prefix tokens and the same query image (all of its pixels) -> one group
                key = (tuple(e.prefix_ids), _digest(e.pixel_values[0]) if e.prefix_images else "")
                groups.setdefault(key, []).append((i, e))
            batches = list(groups.values())   # _score_with_prefix splits a group into suffix batches
            run = self._score_with_prefix
        else:
            batches = [encoded[j:j + self.batch_size] for j in range(0, len(encoded), self.batch_size)]
            run = self._score_full
        for batch in batches:
            scores[[i for i, _ in batch]] = run([e for _, e in batch])
        return scores, errors

    @torch.inference_mode()
    def score_one(self, query: Item, candidate: Item) -> float:
        """The naive baseline: one full forward for one pair, positions computed by the model itself."""
        e = self.encode(query, candidate)
        ids = torch.tensor([e.prefix_ids + e.suffix_ids])
        mask = torch.ones_like(ids)
        kwargs = self._inputs(ids, mask, self._positions(ids, mask, e.grids), e.pixel_values, e.grids)
        kwargs.pop("position_ids")     # the model numbers the positions itself
        out = self.model(use_cache=False, **kwargs)
        return float(self._yes_no(out.logits[:, -1])[0])
