"""Stage S4 and the reranker: one trainer (Ray Train + DeepSpeed ZeRO) for the embedder (judge-score alignment,
hard-label and InfoNCE ablations) and the reranker (pairwise Yes/No + listwise), with the losses."""
