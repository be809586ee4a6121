"""Reranker training examples from the mined training table: per query, three conversations.

1. pairwise positive: (query, positive) -> "Yes";
2. pairwise negative: (query, hardest negative = the highest judge score) -> "No";
3. listwise: the positive and the top-x negatives by judge score, in a uniformly random order ->
   "Ans: (i)" where i is the positive's 1-based position.

The random order is drawn from a generator keyed by (seed, query id, epoch), so a rerun (or a resumed run)
sees the same order, and each epoch sees a new one.

Negatives are de-duplicated first: when mining found fewer survivors than it stores, it cycles them
(``A, P, A, A, A``), and a list must never show one candidate twice (two correct-looking answers, or a
"(i)" that is not unique). A negative repeats another when it has the same ``neg_id`` or the same content
(identical candidates cannot be told apart in a prompt whatever their ids); the first occurrence in
judge-score order is kept. When fewer than x distinct
negatives remain, the list is shorter (the positive and every distinct negative): it never pads with
repeats, and the answer stays uniform over the slots it has. (The released code always used the first 5 stored
negatives, 6 candidates whatever was asked, and a position skewed to the front that never reached the last
slot; none of that is reproduced.)
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..data.schema import Item, item_from_row, negatives_from_row
from .prompt import RerankPrompt, listwise_answer, listwise_decision, listwise_text, pairwise_answer, pairwise_text


@dataclass
class Conversation:
    kind: str                 # "pair_pos" | "pair_neg" | "list"
    prompt: str               # the chat prompt up to the assistant header
    images: list[Item]        # the items whose images the prompt shows, in order
    answer: str
    decision: tuple[int, int]  # the characters of the answer that are its decision (Yes/No, the index)


@dataclass
class RerankExample:
    query_id: str
    query: Item
    positive: Item
    hardest_negative: Item
    list_candidates: list[Item]
    answer_index: int         # 0-based position of the positive in list_candidates


def ranked_negatives(row: Mapping[str, Any]) -> list[Item]:
    """The row's distinct negatives, highest judge score first (stable: stored order among equal or missing
    scores). A negative with the id or the content of an earlier one is dropped."""
    negs = negatives_from_row(row)
    keyed = [(-(s if s is not None and s == s else float("-inf")), j, it, nid) for j, (it, s, nid) in enumerate(negs)]
    out, seen = [], set()
    for _, _, it, nid in sorted(keyed, key=lambda t: (t[0], t[1])):
        keys = {("content", it.content_key())} | ({("id", nid)} if nid else set())
        if not keys & seen:
            seen |= keys
            out.append(it)
    return out


def _rng(seed: int, query_id: str, epoch: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{query_id}:{epoch}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def example_from_row(row: Mapping[str, Any], list_negatives: int = 4, seed: int = 0, epoch: int = 0,
                     pair_negative: str = "hardest") -> RerankExample:
    """One query's example; ``list_negatives`` = x (the list holds x + 1 candidates when the row has x
    distinct negatives, fewer when it has fewer: see the module docstring). ``pair_negative``: the pairwise
    "No" example is the hardest negative (the paper), or one drawn from the top-x distinct negatives
    (``sampled``: a stand-in judge then sees more of each query's candidates)."""
    negs = ranked_negatives(row)
    qid = str(row.get("id"))
    if not negs:
        raise ValueError(f"row {qid!r} has no negatives; the reranker trains on mined negatives")
    query, positive = item_from_row(row, "query_"), item_from_row(row, "pos_")
    top = negs[:list_negatives]
    rng = _rng(seed, qid, epoch)
    position = rng.randrange(len(top) + 1)    # uniform over the len(top)+1 slots
    listed = top[:position] + [positive] + top[position:]
    negative = negs[0] if pair_negative == "hardest" else top[rng.randrange(len(top))]
    return RerankExample(qid, query, positive, negative, listed, position)


def conversations(ex: RerankExample, prompt: RerankPrompt = RerankPrompt()) -> list[Conversation]:
    """The three conversations of an example; query and candidate texts are always in the prompts."""
    def images(*items: Item) -> list[Item]:
        return [it for it in items if it.has_image]

    yes, no = pairwise_answer(True, prompt), pairwise_answer(False, prompt)
    return [
        Conversation("pair_pos", pairwise_text(ex.query, ex.positive, prompt), images(ex.query, ex.positive),
                     yes, (0, len(yes))),
        Conversation("pair_neg", pairwise_text(ex.query, ex.hardest_negative, prompt),
                     images(ex.query, ex.hardest_negative), no, (0, len(no))),
        Conversation("list", listwise_text(ex.query, ex.list_candidates, prompt),
                     images(ex.query, *ex.list_candidates), listwise_answer(ex.answer_index, prompt),
                     listwise_decision(ex.answer_index, prompt)),
    ]


def examples_from_rows(rows: Sequence[Mapping[str, Any]], list_negatives: int = 4, seed: int = 0,
                       epoch: int = 0, pair_negative: str = "hardest") -> list[RerankExample]:
    return [example_from_row(r, list_negatives, seed, epoch, pair_negative) for r in rows]
