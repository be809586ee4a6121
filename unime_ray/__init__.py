"""unime-ray: UniME-V2 (MLLM-as-a-Judge for universal multimodal embeddings) as a Ray pipeline, a Python API
and a service.

Stages, one package each: ``data`` -> ``retrieval`` (S1) -> ``judge`` (S2) -> ``mining`` (S3) -> ``train`` (S4,
embedder and reranker) -> ``eval`` -> ``serve``; ``models`` holds the backbones they share. The command line is
``unime-ray`` (or ``python -m unime_ray``); ``unime_ray.run.runner`` runs the stages in order.

The Python API (the same functions the stages call)::

    import unime_ray
    model = unime_ray.Embedder.from_pretrained("Qwen/Qwen2-VL-2B-Instruct")      # or a local folder
    vectors = model.encode(texts=["a dog on a beach"], images=["dog.jpg"])
    judge = unime_ray.Judge.from_pretrained("Qwen/Qwen2-VL-7B-Instruct")
    mined = unime_ray.mine_hard_negatives(pairs, retriever=model, judge=judge)   # a table with scored negatives
    result = unime_ray.train_embedder(mined.table, model="Qwen/Qwen2-VL-2B-Instruct", output_dir="out")
    print(unime_ray.evaluate(result.model, eval_pairs))

Names load on first use, so ``import unime_ray`` imports neither torch nor Ray.
"""

from .utils.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "Embedder": "models.embedder", "EmbedderSpec": "models.encode",
    "Judge": "judge.api", "JudgeConfig": "judge.config",
    "Reranker": "rerank.inference",
    "MinedNegatives": "mining.api", "mine_hard_negatives": "mining.api", "MineConfig": "mining.config",
    "RetrieveConfig": "retrieval.config",
    "TrainResult": "train.api", "train_embedder": "train.api", "train_reranker": "train.api",
    "TrainConfig": "train.config", "RerankerTrainConfig": "train.config",
    "Evaluation": "eval.api", "evaluate": "eval.api",
    "Item": "data.schema", "load_table": "data.inputs", "to_items": "data.inputs",
    "Pool": "utils.pool",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
