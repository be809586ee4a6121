"""The judge's pairwise prompt, its placement of images and texts, and the Yes/No score.

The judge reads one (query, candidate) pair in a single user turn of the Qwen chat template:

    I will provide you with a query and a candidate. Please evaluate whether the candidate meets the
    requirements of the query. If it does, respond with 'Yes'; if it doesn't, respond with 'No'.
    Query: [query image] <query text>, Candidate: [candidate image] <candidate text>.

and the score is s = e_yes / (e_yes + e_no) over the logits of the "Yes" and "No" tokens at the first
generated position (method reference, section 1, S2). Everything up to "Candidate:" depends on the query
alone, so a query's ~51 prompts share that prefix (prefix caching / KV reuse). The prefix ends on a token
boundary of the whole prompt, so prefix ids + suffix ids are the ids of the whole string
(:func:`judge_segments`, :func:`split_token_ids`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..data.schema import IMAGE_MARKER, Item
from ..models.formatting import DEFAULT_SYSTEM_PROMPT, chat_prompt

PAIRWISE_INSTRUCTION = (
    "I will provide you with a query and a candidate. Please evaluate whether the candidate meets the "
    "requirements of the query. If it does, respond with 'Yes'; if it doesn't, respond with 'No'."
)


@dataclass(frozen=True)
class JudgePrompt:
    """The pairwise prompt; ``version`` is stored with every score so reruns never mix prompts."""

    instruction: str = PAIRWISE_INSTRUCTION
    query_label: str = "Query: "
    candidate_label: str = ", Candidate: "
    closing: str = "."
    system: str | None = DEFAULT_SYSTEM_PROMPT
    yes: str = "Yes"
    no: str = "No"
    # v2: the query prefix ends before the space in front of the candidate, so the scored ids are the whole
    # prompt's ids (v1 cut after it: " " + "parking" instead of " parking"); scores differ from v1.
    version: str = "pairwise-v2"


def item_parts(item: Item) -> list[tuple[str, str]]:
    """An item's image (where its marker is, else first) and text, as chat parts."""
    text = item.prompt_text()
    parts: list[tuple[str, str]] = []
    if IMAGE_MARKER in text:
        before, after = text.split(IMAGE_MARKER, 1)
        before, after = before.strip(), after.strip()
    else:
        before, after = "", text.strip()
    if before:
        parts.append(("text", before + (" " if item.has_image or after else "")))
    if item.has_image:
        parts.append(("image", ""))
    if after:
        parts.append(("text", after))
    return parts


def judge_parts(query: Item, candidate: Item, prompt: JudgePrompt = JudgePrompt()) -> list[tuple[str, str]]:
    return ([("text", f"{prompt.instruction} {prompt.query_label}")] + item_parts(query)
            + [("text", prompt.candidate_label)] + item_parts(candidate) + [("text", prompt.closing)])


def judge_text(query: Item, candidate: Item, prompt: JudgePrompt = JudgePrompt()) -> str:
    """The full chat prompt (with one ``<|vision_start|><|image_pad|><|vision_end|>`` per image)."""
    return chat_prompt(merge_text(judge_parts(query, candidate, prompt)), prompt.system)


def judge_segments(query: Item, candidate: Item, prompt: JudgePrompt = JudgePrompt()) -> tuple[str, str]:
    """(prefix, suffix) of the prompt: the prefix depends on the query alone.

    Both backends tokenize the two segments separately and concatenate the ids, so the query's prefix is
    the same token sequence for all its candidates, and those ids must be the ids of the whole prompt (what
    the model read in pre-training, what the reranker is trained on). Qwen's byte-level BPE first cuts text
    into pieces with a regex and never merges across pieces; the space in front of the candidate belongs to
    the candidate's first piece (" parking", " (a)", " 's"), so the prefix ends *before* it, right after the
    label's last non-blank character (the ":" of ", Candidate: "), where a piece always ends: a run of
    punctuation stops at whitespace. (Cutting after the space would score " " + "parking".) Trailing spaces
    and tabs of the label move to the suffix; newlines stay (Qwen's regex attaches them to what precedes).
    Both backends check the property per pair (:func:`split_token_ids`), so a custom label that breaks it
    fails loudly instead of scoring tokens the model never saw.
    """
    full = judge_text(query, candidate, prompt)
    prefix = chat_prompt(merge_text([("text", f"{prompt.instruction} {prompt.query_label}")] + item_parts(query)
                                     + [("text", prompt.candidate_label)]), prompt.system,
                         add_generation_prompt=False)[: -len("<|im_end|>\n")].rstrip(" \t")
    if not full.startswith(prefix):  # cannot happen with chat_prompt; guards future template changes
        raise AssertionError("judge prompt prefix is not a prefix of the prompt")
    return prefix, full[len(prefix):]


class PromptSplitError(ValueError):
    """The prompt's prefix does not end on a token boundary of the whole prompt's tokenization."""


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_token_ids(tokenizer, prefix: str, suffix: str, prefix_ids: Sequence[int] | None = None
                    ) -> tuple[list[int], list[int]]:
    """(prefix ids, suffix ids) from one tokenization of the whole prompt ``prefix + suffix``, so their
    concatenation is exactly the whole prompt's ids; the prefix ids are the prefix's own (``prefix_ids`` when
    already known), the same for every candidate of a query. Raises :class:`PromptSplitError` when the whole
    prompt's ids do not start with them (BPE merged across the cut)."""
    whole = _ids(tokenizer, prefix + suffix)
    head = list(prefix_ids) if prefix_ids is not None else _ids(tokenizer, prefix)
    if whole[:len(head)] != head:
        raise PromptSplitError(split_error_message(prefix, suffix))
    return head, whole[len(head):]


def split_error_message(prefix: str, suffix: str) -> str:
    return (f"the judge prompt's query prefix does not end on a token boundary of the whole prompt (cut at "
            f"{prefix[-20:]!r} | {suffix[:20]!r}): BPE merges across it, so prefix + suffix ids would not be "
            f"the prompt's ids; end the candidate label with punctuation and a space (', Candidate: ')")


def collapse_image_pads(ids: Sequence[int], pad_id: int) -> list[int]:
    """``ids`` with every run of ``<|image_pad|>`` ids (one image, expanded) back to the single pad of the text."""
    return [t for k, t in enumerate(ids) if t != pad_id or k == 0 or ids[k - 1] != pad_id]


def merge_text(parts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Adjacent text parts joined into one (the chat prompt writes parts as they come)."""
    out: list[tuple[str, str]] = []
    for kind, value in parts:
        if kind == "text" and out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + value)
        else:
            out.append((kind, value))
    return out


def judge_images(query: Item, candidate: Item) -> list[Item]:
    """The items whose images appear in the prompt, in prompt order."""
    return [it for it in (query, candidate) if it.has_image]


def answer_token_ids(tokenizer, prompt: JudgePrompt = JudgePrompt()) -> tuple[int, int]:
    """Token ids of the answers; each must be a single token (it is for Qwen tokenizers)."""
    ids = []
    for word in (prompt.yes, prompt.no):
        tok = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tok) != 1:
            raise ValueError(f"the judge's answer {word!r} is {len(tok)} tokens for this tokenizer; it must be one")
        ids.append(tok[0])
    return ids[0], ids[1]


def yes_probability(logit_yes: float, logit_no: float) -> float:
    """s = e^yes / (e^yes + e^no), computed stably (a logistic of the difference)."""
    d = logit_yes - logit_no
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)
