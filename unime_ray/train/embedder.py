"""Embedder training (stage S4): judge-score distribution alignment, and the ablation objectives.

The library part (:func:`examples_from_rows`, :func:`batch_loss`) runs in any process; :class:`EmbedderTask`
plugs it into the shared trainer (:mod:`.trainer`: Ray Train + DeepSpeed ZeRO, checkpoints, resume, export).
Objectives: ``judge_alignment`` (UniME-V2), ``hard_label`` (mined negatives, hard labels) and ``infonce``
(in-batch negatives plus any mined ones; with ``num_negatives: 0`` the VLM2Vec-style baseline).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..data.schema import Item, item_from_row, negatives_from_row
from .job import TrainJob
from .losses import hard_label_loss, infonce, judge_alignment_loss

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- library
def examples_from_rows(rows: Sequence[dict[str, Any]], k: int) -> list[tuple[Item, list[Item], list[float]]]:
    """(query, [positive, k negatives], [s_pos, k negative scores]) per training-table row."""
    out = []
    for row in rows:
        negs = negatives_from_row(row)
        if len(negs) < k:
            raise ValueError(f"row {row.get('id')!r} has {len(negs)} negatives; training needs k={k}")
        scores = [row.get("pos_score")] + [s for _, s, _ in negs[:k]]
        out.append((item_from_row(row, "query_"), [item_from_row(row, "pos_")] + [it for it, _, _ in negs[:k]],
                    [float(s) if s is not None else float("nan") for s in scores]))
    return out


def content_ids(items: Sequence[Item]) -> torch.Tensor:
    """One int64 per item from its content (equal items, equal ids): what in-batch masking compares."""
    return torch.tensor([int.from_bytes(bytes.fromhex(it.content_key())[:8], "little", signed=True)
                         for it in items], dtype=torch.int64)


def batch_loss(embedder, examples, objective: str, temperature: float,
               gather_positives=None, kl_form: str = "exact",
               mask_shared_positives: bool = True, symmetric: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of a batch of examples and its agreement metric (differentiable through ``embedder``).
    ``kl_form``: the judge_alignment KL, ``exact`` or the official code's ``floored`` (see the loss).
    ``mask_shared_positives``: in-batch InfoNCE does not count a positive that equals the query's own as a
    negative; ``symmetric``: it runs both ways (see :func:`~.losses.infonce`)."""
    queries = [q for q, _, _ in examples]
    cands = [c for _, cs, _ in examples for c in cs]
    n, width = len(examples), len(examples[0][1])
    q = embedder.embed_items(queries)
    c = embedder.embed_items(cands).view(n, width, -1)
    sim = torch.einsum("nd,nkd->nk", q, c)
    scores = torch.tensor([s for _, _, s in examples], dtype=torch.float32, device=sim.device)
    if objective == "judge_alignment":
        if torch.isnan(scores).any():
            raise ValueError("judge_alignment needs judge scores for the positive and every negative")
        loss = judge_alignment_loss(sim, scores, temperature, kl_form)
    elif objective == "hard_label":
        loss = hard_label_loss(sim, temperature)
    else:
        positives = c[:, 0]
        all_pos, offset = gather_positives(positives) if gather_positives else (positives, 0)
        keys = None
        if mask_shared_positives:
            keys = content_ids([cs[0] for _, cs, _ in examples]).to(q.device)
            keys = gather_positives(keys)[0] if gather_positives else keys
        all_q = (gather_positives(q)[0] if gather_positives else q) if symmetric else None
        loss = infonce(q, all_pos, c[:, 1:], temperature, positive_offset=offset, positive_keys=keys,
                       all_queries=all_q)
    with torch.no_grad():
        info = {"positive_top1": (sim.argmax(1) == 0).float().mean().item()}
        if width > 1:  # with in-batch negatives only there is nothing to agree on
            info["agreement_top1"] = (sim.argmax(1) == scores.nan_to_num(-1).argmax(1)).float().mean().item()
        if objective == "infonce":  # the in-batch view: is each query's own positive the best of the batch?
            own = torch.arange(n, device=q.device)
            info["inbatch_top1"] = ((q @ positives.T).argmax(1) == own).float().mean().item()
    return loss, info


def gather_with_grad(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(all ranks' rows, where this rank's rows start). The gather is differentiable end to end: the backward
    pass returns to each rank the gradient that every rank's loss sends to its rows, so N ranks, each taking the
    loss of its own queries against all positives (the losses then averaged by data parallelism), get exactly the
    gradient of one process over the global batch. (A gather that keeps only the local slice's gradient drops
    the other ranks' share: the positives learn from 1/N of their negatives' pull.) Every rank must pass the same
    number of rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous())), dist.get_rank() * len(t)


class EmbedderTask:
    """Rows of a training table -> the embedder's loss (on a Ray Train worker)."""

    def __init__(self, job: TrainJob):
        self.job, self.s = job, job.settings
        s = self.s
        self.metric_names = (("inbatch_top1",) if s.objective == "infonce" else ()) + (
            ("agreement_top1",) if s.num_negatives else ()) + ("positive_top1",)

    def setup(self, module, processor, device) -> None:
        from ..models.embedder import Embedder

        self.embedder = Embedder(module, processor, self.job.input_format, self.job.image_root, device=device,
                                 positions=self.job.positions)
        self.embedder.cache_images(self.s.image_cache_mb << 20)
        self.embedder.vision_every_batch = dist.is_initialized() and dist.get_world_size() > 1

    def loss(self, rows: list[dict[str, Any]], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        examples = examples_from_rows(rows, self.s.num_negatives)
        return batch_loss(self.embedder, examples, self.s.objective, self.s.temperature,
                          gather_with_grad if self.s.objective == "infonce" else None, self.s.kl_form,
                          self.s.mask_shared_positives, self.s.symmetric)
