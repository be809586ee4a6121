"""Embedder training objectives: UniME-V2's judge-score alignment and the two ablation baselines.

All losses take cosine similarities (embeddings are L2-normalised) and compute in float32 whatever the
model's dtype: a temperature of 0.02 multiplies similarities by 50, which bf16 cannot hold precisely. A float64
model computes in float64 throughout (what exact reference tests use).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KL_FORMS = ("exact", "floored")
"""How :func:`judge_alignment_loss` takes logarithms: ``exact`` (the paper's formula, log-softmax) or
``floored`` (the official code: ``log(p + 1e-8)`` of the softmax of the other side)."""
KL_FLOOR_EPS = 1e-8


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or as it is when it is already float64."""
    return t if t.dtype == torch.float64 else t.float()


def judge_alignment_loss(similarity: torch.Tensor, judge_scores: torch.Tensor,
                         temperature: float = 0.02, kl_form: str = "exact") -> torch.Tensor:
    """Symmetric KL between the embedder's and the judge's distributions over each query's candidates.

    ``similarity`` and ``judge_scores`` are [N, 1+k] with the positive in column 0 and the k mined hard
    negatives after it. With P = softmax(similarity / t) and Q = softmax(judge_scores / t) per row,

        loss = mean_n 0.5 * (KL(Q_n || P_n) + KL(P_n || Q_n)),   KL(A || B) = sum_j A_j (log A_j - log B_j).

    (The paper calls this a JS divergence; it is the symmetrised KL.) There is no term across queries, so
    the loss of a batch is the mean of per-query losses and gradient accumulation reproduces large batches
    exactly; no in-batch negatives, as in the official recipe.

    ``kl_form``: ``"exact"`` (default) is the formula above, computed with log-softmax. ``"floored"``
    reproduces the official code, which passes ``log(B + 1e-8)`` as the second argument of each KL:
    KL(A || B) = sum_j A_j (log A_j - log(B_j + 1e-8)), with 0 log 0 = 0. A log-probability then never
    goes below log(1e-8) = -18.4; at t = 0.02 that floor is reached by a candidate about 0.37 or more
    below the row's best in similarity or judge score, so the two forms differ on confident rows.
    """
    if similarity.shape != judge_scores.shape or similarity.dim() != 2:
        raise ValueError(f"similarity {tuple(similarity.shape)} and judge_scores {tuple(judge_scores.shape)} "
                         "must both be [N, 1+k]")
    if kl_form not in KL_FORMS:
        raise ValueError(f"unknown kl_form {kl_form!r}; choose one of {', '.join(KL_FORMS)}")
    log_p = F.log_softmax(wide(similarity) / temperature, dim=-1)
    log_q = F.log_softmax(judge_scores.to(similarity.device, log_p.dtype) / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if kl_form == "exact":
        kl_qp = (q * (log_q - log_p)).sum(-1)
        kl_pq = (p * (log_p - log_q)).sum(-1)
    else:
        # A log A with the exact log (0 where A underflows, as F.kl_div's target term), whose gradient stays
        # finite there; only the second argument's log is floored
        kl_qp = (q * (log_q - torch.log(p + KL_FLOOR_EPS))).sum(-1)
        kl_pq = (p * (log_p - torch.log(q + KL_FLOOR_EPS))).sum(-1)
    return (0.5 * (kl_qp + kl_pq)).mean()


def hard_label_loss(similarity: torch.Tensor, temperature: float = 0.02) -> torch.Tensor:
    """Ablation "mined negatives, hard labels": cross-entropy with the positive (column 0) as the target."""
    logits = wide(similarity) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def infonce(query: torch.Tensor, positives: torch.Tensor, hard_negatives: torch.Tensor | None = None,
            temperature: float = 0.02, positive_offset: int = 0,
            positive_keys: torch.Tensor | None = None, all_queries: torch.Tensor | None = None) -> torch.Tensor:
    """VLM2Vec-style InfoNCE: each query against every positive of the batch (in-batch negatives) plus,
    optionally, its own mined negatives ([N, k, d]). Under data parallelism pass the gathered positives.

    ``query`` [N, d] and ``positives`` [M, d] with M >= N; query i's positive is at row
    ``positive_offset + i`` (under data parallelism: this rank's index times N, where its slice of the
    gathered positives starts).

    ``positive_keys`` [M] (content ids of the positives): another row's positive with the same key as query
    i's own (a class label or caption that two queries share) is its positive too, not a negative, so it is
    left out of query i's softmax. Without keys every other row counts as a negative (VLM2Vec's loss), which
    on classification-style data pushes a query away from its own label.

    ``all_queries`` [M, d] (every rank's queries, gathered like the positives): adds the reverse direction, each
    of this rank's positives against every query (CLIP's symmetric loss; the same shared-positive mask), and
    returns the mean of the two directions. Mined negatives take part in the forward direction only.
    """
    if positive_offset < 0 or positive_offset + len(query) > len(positives):
        raise ValueError(f"positive_offset {positive_offset} + {len(query)} queries exceeds {len(positives)} positives")
    q = wide(query)
    target = torch.arange(len(q), device=q.device) + positive_offset
    positives = positives.to(q.dtype)
    logits = q @ positives.T
    same = None
    if positive_keys is not None:
        if positive_keys.shape != (len(positives),):
            raise ValueError(f"positive_keys has shape {tuple(positive_keys.shape)}; expected ({len(positives)},)")
        keys = positive_keys.to(q.device)
        same = keys.unsqueeze(0) == keys[target].unsqueeze(1)
        same[torch.arange(len(q), device=q.device), target] = False
        logits = logits.masked_fill(same, float("-inf"))
    if hard_negatives is not None and hard_negatives.numel():
        logits = torch.cat([logits, torch.einsum("nd,nkd->nk", q, hard_negatives.to(q.dtype))], dim=1)
    loss = F.cross_entropy(logits / temperature, target)
    if all_queries is None:
        return loss
    if all_queries.shape != positives.shape:
        raise ValueError(f"all_queries has shape {tuple(all_queries.shape)}; expected {tuple(positives.shape)}")
    reverse = positives[target] @ all_queries.to(q.dtype).T
    if same is not None:
        reverse = reverse.masked_fill(same, float("-inf"))
    return 0.5 * (loss + F.cross_entropy(reverse / temperature, target))

