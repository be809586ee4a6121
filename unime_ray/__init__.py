"""unime-ray: UniME-V2 (MLLM-as-a-Judge for universal multimodal embeddings) as a Ray pipeline and service.

Stages, one package each: ``data`` -> ``retrieval`` (S1) -> ``judge`` (S2) -> ``mining`` (S3) -> ``train`` (S4,
embedder and reranker) -> ``eval`` -> ``serve``; ``models`` holds the backbones they share. The command line is
``unime-ray`` (or ``python -m unime_ray``); ``unime_ray.pipeline`` runs the stages in order.
"""

__version__ = "0.1.0"
