"""Reranker prompts: the pairwise Yes/No prompt (the judge's) and the listwise "(i)" prompt, plus the
strict parser of listwise answers.

Unlike the official training code (which looked texts up under the wrong key and so trained on images and
"(i)" markers alone), every prompt here carries the query's and each candidate's instruction and text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from ..data.schema import Item
from ..judge.prompt import JudgePrompt, item_parts, judge_text, merge_text
from ..models.formatting import DEFAULT_SYSTEM_PROMPT, chat_prompt

LISTWISE_INSTRUCTION = (
    "I will provide you with a query followed by multiple candidates in the format: (1) cand1 (2) cand2, etc. "
    "Each candidate is independent of the others. Evaluate each candidate against the query, and respond with "
    "the number corresponding to the candidate that best meets the requirements of the query."
)
END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class RerankPrompt:
    """Both reranker prompts. ``pairwise`` is exactly the judge's prompt, so a judge checkpoint and a trained
    reranker are scored by the same code (:class:`~unime_ray.judge.hf_backend.TransformersJudge`)."""

    pairwise: JudgePrompt = field(default_factory=JudgePrompt)
    listwise_instruction: str = LISTWISE_INSTRUCTION
    query_label: str = "Query: "
    candidates_label: str = " Candidates: "
    answer_template: str = "Ans: ({index})"        # 1-based index of the chosen candidate
    system: str | None = DEFAULT_SYSTEM_PROMPT
    version: str = "rerank-v2"   # v2: pairwise inference scores the whole prompt's ids (judge prompt pairwise-v2)


def pairwise_text(query: Item, candidate: Item, prompt: RerankPrompt = RerankPrompt()) -> str:
    """The pairwise prompt up to and including the assistant header (the answer is Yes or No)."""
    return judge_text(query, candidate, prompt.pairwise)


def pairwise_answer(relevant: bool, prompt: RerankPrompt = RerankPrompt()) -> str:
    return prompt.pairwise.yes if relevant else prompt.pairwise.no


def listwise_text(query: Item, candidates: Sequence[Item], prompt: RerankPrompt = RerankPrompt()) -> str:
    """The listwise prompt: instruction, the query, then ``(1) cand1 (2) cand2 ...`` with images inline."""
    if not candidates:
        raise ValueError("a listwise prompt needs at least one candidate")
    parts: list[tuple[str, str]] = [("text", f"{prompt.listwise_instruction} {prompt.query_label}")]
    parts += item_parts(query)
    parts.append(("text", prompt.candidates_label))
    for i, cand in enumerate(candidates, start=1):
        parts.append(("text", f"({i}) "))
        parts += item_parts(cand)
        parts.append(("text", " "))
    return chat_prompt(merge_text(parts), prompt.system)


def listwise_answer(index: int, prompt: RerankPrompt = RerankPrompt()) -> str:
    """The target answer for the 0-based ``index`` of the right candidate, e.g. ``Ans: (3)``."""
    return prompt.answer_template.format(index=index + 1)


def listwise_decision(index: int, prompt: RerankPrompt = RerankPrompt()) -> tuple[int, int]:
    """The characters [start, end) of the index in :func:`listwise_answer` (``3`` in ``Ans: (3)``)."""
    start = prompt.answer_template.index("{index}")
    return start, start + len(str(index + 1))


def _answer_patterns(prompt: RerankPrompt) -> tuple[re.Pattern, re.Pattern]:
    """(the whole answer as trained, ``<lead-in> <open>N<close>`` with the lead-in ``Ans:`` optional; one choice
    ``<open>N<close>`` anywhere) from the template (``Ans: (`` + N + ``)``)."""
    head, tail = prompt.answer_template.split("{index}")
    opening = head[-1:] if head.rstrip()[-1:] in "([{" else ""
    lead = head[: len(head) - len(opening)].strip()
    lead_re = r"(?:" + re.escape(lead).replace(r"\ ", r"\s*") + r")?\s*" if lead else ""
    choice = re.escape(opening) + r"(\d{1,3})" + re.escape(tail)
    return re.compile(r"\s*" + lead_re + choice + r"\s*"), re.compile(choice)


ANSWER_KINDS = ("exact", "first", "out_of_range", "unparsable")


def read_listwise_answer(text: str | None, num_candidates: int,
                         prompt: RerankPrompt = RerankPrompt()) -> tuple[int | None, str]:
    """(0-based candidate index or None, how the answer was read): ``exact``, the trained form (``Ans: (3)``);
    ``first``, the first ``(i)`` of a longer answer (``Ans: (3).``, ``(3) is best``, ``Ans: (3) (4)``), as the
    official parser reads it; ``out_of_range`` (a choice outside ``1..num_candidates``); ``unparsable``."""
    text = (text or "").replace(END_OF_TURN, "")
    whole, anywhere = _answer_patterns(prompt)
    m, kind = whole.fullmatch(text), "exact"
    if m is None:
        m, kind = anywhere.search(text), "first"
    if m is None:
        return None, "unparsable"
    index = int(m.group(1))
    return (index - 1, kind) if 1 <= index <= num_candidates else (None, "out_of_range")


def parse_listwise_answer(text: str | None, num_candidates: int, prompt: RerankPrompt = RerankPrompt()) -> int | None:
    """The 0-based candidate index of an answer such as ``Ans: (3)`` or the first ``(i)`` of a longer one; None
    when there is none or it points outside ``1..num_candidates`` (see :func:`read_listwise_answer`)."""
    return read_listwise_answer(text, num_candidates, prompt)[0]
