"""Rerank inference: pairwise P(Yes) scores and listwise choices, and two-stage retrieve-then-rerank.

Pairwise scoring is the judge's transformers backend run with the reranker's checkpoint (same prompt, same
prefix-reuse batching). Listwise reranking generates the answer greedily and parses it strictly; an
unparsable or out-of-range answer (or a prompt that cannot be built) leaves the embedder's order in place and
is counted, never guessed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.schema import Item
from ..judge.hf_backend import TransformersJudge
from ..models.processor import ImageOptions
from .encoding import ConversationError, encode_conversation
from .model import greedy_generate
from .prompt import END_OF_TURN, RerankPrompt, listwise_text, parse_listwise_answer

logger = logging.getLogger(__name__)


@dataclass
class ListwiseChoice:
    index: int | None            # 0-based index into the candidate list; None: unparsable / out of range / error
    raw: str                     # the generated answer (or the error message)
    error: str | None = None


@dataclass
class RerankStats:
    queries: int = 0
    fallbacks: int = 0           # listwise answers that could not be used (embedder order kept)
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, choice: ListwiseChoice) -> None:
        self.queries += 1
        if choice.index is None:
            self.fallbacks += 1
            key = "error" if choice.error else "unparsable or out of range"
            self.reasons[key] = self.reasons.get(key, 0) + 1


class Reranker:
    """A Qwen-VL reranker checkpoint (or any Qwen-VL chat model) for pairwise and listwise reranking."""

    def __init__(self, model: str | os.PathLike, prompt: RerankPrompt = RerankPrompt(), dtype: str = "auto",
                 device: str | None = None, image_root: str | os.PathLike | None = None,
                 image_options: ImageOptions | None = None, batch_size: int = 8, max_new_tokens: int = 8):
        self.judge = TransformersJudge(model, prompt.pairwise, dtype=dtype, device=device, image_root=image_root,
                                       image_options=image_options, batch_size=batch_size)
        self.model, self.processor = self.judge.model, self.judge.processor
        self.prompt = prompt
        self.image_root = image_root
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.model_name = str(model)
        self.stop_ids = [self.processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)]

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, **kwargs) -> "Reranker":
        return cls(model, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, *, format: str = "hf") -> Path:
        """The checkpoint as an ordinary Hugging Face folder (adapter merged); ``format="sentence-transformers"``
        adds what ``sentence_transformers.CrossEncoder(path).predict`` needs to give :meth:`score_pairs`' P(Yes)
        (see :mod:`unime_ray.rerank.st_export`)."""
        from ..models.lora import merged

        if format not in ("hf", "sentence-transformers"):
            raise ValueError(f"format must be 'hf' or 'sentence-transformers', not {format!r}")
        path = Path(path)
        merged(self.model).save_pretrained(path)
        self.processor.tokenizer.save_pretrained(path)
        self.processor.image_processor.save_pretrained(path)
        if format == "sentence-transformers":
            from .st_export import write_cross_encoder

            budget = self.processor.image_options
            if budget.resize is not None:
                logger.warning("sentence-transformers export of %s: not carried: the fixed resize to %dx%d", path,
                               *budget.resize)
            write_cross_encoder(path, tokenizer=self.processor.tokenizer, prompt=self.prompt.pairwise, budget=budget,
                                image_processor=self.processor.image_processor)
        return path

    # ---------------------------------------------------------------------------------------- pairwise
    def score_pairs(self, pairs: Sequence[tuple[Item, Item]]) -> np.ndarray:
        """P(Yes) per (query, candidate); NaN where a pair cannot be scored (see :meth:`score_or_errors`)."""
        return self.score_or_errors(pairs)[0]

    def score_or_errors(self, pairs: Sequence[tuple[Item, Item]]) -> tuple[np.ndarray, list[str | None]]:
        return self.judge.score_or_errors(list(pairs))

    # ---------------------------------------------------------------------------------------- listwise
    def choose_many(self, queries: Sequence[Item], candidate_lists: Sequence[Sequence[Item]]) -> list[ListwiseChoice]:
        """One listwise choice per query (batched greedy decoding)."""
        if len(queries) != len(candidate_lists):
            raise ValueError(f"{len(queries)} queries but {len(candidate_lists)} candidate lists")
        choices: list[ListwiseChoice | None] = [None] * len(queries)
        encoded = []
        for i, (q, cands) in enumerate(zip(queries, candidate_lists)):
            try:
                if not cands:
                    raise ConversationError("no candidates")
                text = listwise_text(q, cands, self.prompt)
                images = [it for it in (q, *cands) if it.has_image]
                encoded.append((i, encode_conversation(self.processor, text, images, None, self.image_root,
                                                       self.judge.max_length - self.max_new_tokens)))
            except ConversationError as exc:
                choices[i] = ListwiseChoice(None, str(exc), error=str(exc))
        for j in range(0, len(encoded), self.batch_size):
            chunk = encoded[j:j + self.batch_size]
            outs = greedy_generate(self.model, self.processor, [e for _, e in chunk], self.max_new_tokens,
                                   self.stop_ids, device=self.judge.device)
            for (i, _), toks in zip(chunk, outs):
                raw = self.processor.tokenizer.decode(toks, skip_special_tokens=False)
                choices[i] = ListwiseChoice(parse_listwise_answer(raw, len(candidate_lists[i]), self.prompt), raw)
        return choices  # type: ignore[return-value]

    def choose(self, query: Item, candidates: Sequence[Item]) -> ListwiseChoice:
        return self.choose_many([query], [candidates])[0]

    # ---------------------------------------------------------------------------------------- the API
    def rerank(self, query: Any, candidates: Sequence[Any], top_k: int | None = None,
               mode: str = "pairwise", similarities: Sequence[float] | None = None,
               weight: float = 0.5) -> list[dict[str, Any]]:
        """Reorder ``candidates`` (given best first, e.g. an embedder's top-K) for ``query``; items are strings,
        dicts (``text``/``image``/``instruction``), images or ``Item``s. Returns the first ``top_k`` as
        ``{"index": position in candidates, "score": P(Yes) or None}``, best first.

        ``pairwise`` sorts by P(Yes) (unscorable candidates keep their place after the scored ones); ``listwise``
        asks the model to name the best candidate, moves it first and keeps the given order for the rest (an
        unusable answer keeps the given order); ``fused`` sorts by ``(1 - weight) * similarities + weight *
        P(Yes)`` (the embedder's cosines, one per candidate). The rule is :func:`reorder`, the eval's.

        >>> hits = reranker.rerank("a red circle", ["blue square", "red circle", "green star"], top_k=2)
        >>> len(hits), sorted(hits[0])
        (2, ['index', 'score'])
        """
        from ..data.inputs import to_item

        if mode not in RERANK_MODES:
            raise ValueError(f"unknown rerank mode {mode!r}; choose one of {', '.join(RERANK_MODES)}")
        q = to_item(query)
        cands = [to_item(c) for c in candidates]
        scores: list[float | None] = [None] * len(cands)
        choice = values = None
        if mode == "listwise":
            choice = self.choose(q, cands).index if cands else None
        else:
            values = self.score_pairs([(q, c) for c in cands])
            scores = [None if v != v else float(v) for v in values]
        order, _ = reorder(mode, list(range(len(cands))), choice=choice, p_yes=values, similarities=similarities,
                           weight=weight)
        return [{"index": i, "score": scores[i]} for i in order[:top_k]]


# ------------------------------------------------------------------------------------------- two-stage
def move_choice_first(order: Sequence[int], index) -> tuple[list[int], bool]:
    """(new order, fell back?): the chosen entry of ``order`` moves to rank 1 and the others keep the
    embedder's order (as the released evaluation and the paper's authors combine them). ``index`` is the
    0-based choice; None, a non-integer or an index outside the list is a fallback (order unchanged)."""
    order = [int(i) for i in order]
    valid = isinstance(index, (int, np.integer)) and not isinstance(index, bool) and 0 <= int(index) < len(order)
    if not valid:
        return order, True
    chosen = order[int(index)]
    return [chosen] + [c for c in order if c != chosen], False


def apply_listwise_choice(order: Sequence[int], choice: ListwiseChoice | None) -> list[int]:
    """The reranked order of a query's top-K given the reranker's choice (see :func:`move_choice_first`)."""
    return move_choice_first(order, None if choice is None else choice.index)[0]


def apply_pairwise_scores(order: Sequence[int], scores: Sequence[float]) -> list[int]:
    """Reorder by P(Yes), highest first; ties and unscored (NaN) candidates keep the embedder's order."""
    keyed = [(-(s if s == s else -np.inf), rank, c) for rank, (c, s) in enumerate(zip(order, scores))]
    return [c for _, _, c in sorted(keyed)]


RERANK_MODES = ("listwise", "pairwise", "fused")
"""How a reranker reorders an embedder's top-K: ``listwise`` (the paper's: it names the best candidate, which
moves first), ``pairwise`` (by P(Yes) of each pair) or ``fused`` ((1 - w) * cosine + w * P(Yes), with w chosen
on held-out training rows)."""


def fused_scores(similarities: Sequence[float], p_yes: Sequence[float], weight: float) -> np.ndarray:
    """``(1 - weight) * cosine + weight * P(Yes)`` per candidate; NaN where the reranker gave no score."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    return (1.0 - weight) * np.asarray(similarities, dtype=np.float64) + weight * np.asarray(p_yes, dtype=np.float64)


def reorder(mode: str, order: Sequence[int], *, choice: Any = None, p_yes: Sequence[float] | None = None,
            similarities: Sequence[float] | None = None, weight: float = 0.5) -> tuple[list[int], bool]:
    """(new order of a query's top-K, fell back?) in ``mode``: the one rule the eval measures and the server
    applies. ``order``: the top-K best first; ``choice``: the listwise answer's 0-based index into it;
    ``p_yes``/``similarities``: per entry of ``order``. A fallback (an unusable listwise answer; no pair scored)
    keeps the embedder's order."""
    if mode == "listwise":
        return move_choice_first(order, choice)
    if mode not in ("pairwise", "fused"):
        raise ValueError(f"unknown rerank mode {mode!r}; choose one of {', '.join(RERANK_MODES)}")
    if p_yes is None or len(p_yes) != len(order):
        raise ValueError(f"{mode} reranking needs one P(Yes) per candidate")
    scores = np.asarray(p_yes, dtype=np.float64)
    if mode == "fused":
        if similarities is None or len(similarities) != len(order):
            raise ValueError("fused reranking needs one cosine per candidate")
        scores = fused_scores(similarities, scores, weight)
    return apply_pairwise_scores(order, scores), bool(len(order) and np.isnan(scores).all())


def rerank_topk(reranker: Reranker, queries: Sequence[Item], candidates: Sequence[Item], topk_ids: np.ndarray,
                mode: str = "listwise", stats: RerankStats | None = None) -> list[list[int]]:
    """Two-stage retrieval: for each query, its embedder top-K (``topk_ids[i]`` = candidate indices, best
    first, -1 = none) reordered by the reranker. Returns the final orders (candidate indices)."""
    stats = stats if stats is not None else RerankStats()
    orders = [[int(c) for c in row if c >= 0] for row in np.asarray(topk_ids)]
    if mode == "listwise":
        choices = reranker.choose_many(queries, [[candidates[c] for c in o] for o in orders])
        for ch in choices:
            stats.add(ch)
        return [apply_listwise_choice(o, ch) for o, ch in zip(orders, choices)]
    if mode == "pairwise":
        pairs = [(q, candidates[c]) for q, o in zip(queries, orders) for c in o]
        scores = reranker.score_pairs(pairs)
        out, k = [], 0
        for o in orders:
            out.append(apply_pairwise_scores(o, scores[k:k + len(o)]))
            k += len(o)
        stats.queries += len(orders)
        return out
    raise ValueError(f"unknown rerank mode {mode!r}; choose listwise or pairwise")
