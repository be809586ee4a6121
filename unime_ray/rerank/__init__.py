"""The reranker (UniME-V2-Reranker): prompts, training examples, pairwise/listwise inference, two-stage
retrieve-then-rerank. Training itself runs on the shared trainer (:mod:`unime_ray.train`)."""

from .inference import (ListwiseChoice, Reranker, RerankStats, apply_listwise_choice, apply_pairwise_scores,
                        rerank_topk)
from .prompt import (RerankPrompt, listwise_answer, listwise_text, pairwise_text, parse_listwise_answer,
                     read_listwise_answer)

__all__ = ["ListwiseChoice", "RerankPrompt", "RerankStats", "Reranker", "apply_listwise_choice",
           "apply_pairwise_scores", "listwise_answer", "listwise_text", "pairwise_text", "parse_listwise_answer",
           "read_listwise_answer", "rerank_topk"]
