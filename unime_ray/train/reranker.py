"""Reranker training: joint pairwise (Yes/No) and listwise ("Ans: (i)") objectives on the shared trainer.

    L = pair_weight * L_pair + list_weight * L_list
    L_pair = mean over queries of [CE(Yes | query, positive) + CE(No | query, hardest negative)]
    L_list = mean over queries of CE("Ans: (i*)" | query, shuffled positive + top-x negatives)

Each CE is, with ``answer_loss: decision`` (the paper's), the full CE of the decision (Yes/No, the index i)
plus the mean CE of the answer's fixed tokens, or with ``all_tokens`` the mean over the answer's tokens (answer
and end of turn); the prompt and role headers carry no loss. The weights are explicit (the released code mixed
everything in one token-mean, so the balance depended on token counts). Recipe defaults (paper): LoRA r 128 /
alpha 256 on every LLM linear layer, the vision tower frozen, ZeRO-2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..data.schema import Item
from ..models.embedder import vision_probe
from ..rerank.encoding import encode_conversation
from ..rerank.examples import conversations, examples_from_rows
from ..rerank.model import answer_token_losses
from ..rerank.prompt import RerankPrompt, pairwise_answer, pairwise_text
from .job import TrainJob


def reranker_loss(model, processor, rows: list[dict[str, Any]], job: TrainJob, epoch: int = 0,
                  prompt: RerankPrompt = RerankPrompt(), device=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The joint loss of a batch of training-table rows (differentiable through ``model``)."""
    s = job.settings
    examples = examples_from_rows(rows, s.list_negatives, job.seed, epoch, s.pair_negative)
    convs = [c for ex in examples for c in conversations(ex, prompt)]
    if s.list_weight == 0:   # pairwise only (a stand-in judge): skip the listwise forward altogether
        convs = [c for c in convs if c.kind != "list"]
    encs = [encode_conversation(processor, c.prompt, c.images, c.answer, job.image_root, decision=c.decision)
            for c in convs]
    # data parallel: a batch without an image runs the vision tower on a probe row anyway (its loss kept at weight
    # 0), so every rank runs the same modules and gives every parameter a gradient (see Embedder.embed_items)
    probe = dist.is_initialized() and dist.get_world_size() > 1 and not any(e.pixel_values for e in encs)
    if probe:
        query = vision_probe()
        yes = pairwise_answer(True, prompt)
        encs.append(encode_conversation(processor, pairwise_text(query, Item(text="a"), prompt), [query], yes,
                                        decision=(0, len(yes))))
    per_conv = answer_token_losses(model, processor, encs, device=device, answer_loss=s.answer_loss)
    if probe:
        per_conv = per_conv[:-1] + 0.0 * per_conv[-1]
    kinds = [c.kind for c in convs]
    n = len(examples)
    is_pair = torch.tensor([k != "list" for k in kinds], device=per_conv.device)
    l_pair = per_conv[is_pair].sum() / n
    l_list = per_conv[~is_pair].sum() / n if (~is_pair).any() else per_conv.new_zeros(())
    loss = s.pair_weight * l_pair + s.list_weight * l_list
    with torch.no_grad():
        p = per_conv.detach()
        info = {"loss_pair": float(l_pair), "loss_list": float(l_list),
                # exp(-loss): all_tokens, the geometric-mean probability of the right answer's tokens; decision,
                # P(right decision) x that of the fixed tokens
                "answer_p_pair_pos": float(torch.exp(-p[[i for i, k in enumerate(kinds) if k == "pair_pos"]]).mean()),
                "answer_p_pair_neg": float(torch.exp(-p[[i for i, k in enumerate(kinds) if k == "pair_neg"]]).mean()),
                "answer_p_list": float(torch.exp(-p[[i for i, k in enumerate(kinds) if k == "list"]]).mean())
                if "list" in kinds else float("nan")}
    return loss, info


class RerankerTask:
    metric_names = ("loss_pair", "loss_list", "answer_p_pair_pos", "answer_p_pair_neg", "answer_p_list")

    def __init__(self, job: TrainJob):
        self.job = job

    def setup(self, module, processor, device) -> None:
        self.module, self.processor, self.device = module, processor, device

    def loss(self, rows: list[dict[str, Any]], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        # a fresh listwise order at every step, the same one when a resumed run repeats the step
        return reranker_loss(self.module, self.processor, rows, self.job, epoch=step, device=self.device)
