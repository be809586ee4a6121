"""The ``models`` stage: builds the tiny checkpoints the demo and tests use (when configured), then checks that
every model role names a checkpoint with a supported architecture, so a typo fails in seconds, not hours."""

from __future__ import annotations

from typing import Any

from ..results import DataResult, ModelsResult
from ..stage import Context, Stage


def _training_texts(ctx: Context) -> list[str]:
    """Texts of the training split only (the tiny tokenizer must not see eval texts)."""
    from ...data.io import iter_rows


    data = ctx.result("data", DataResult)
    path = data.inputs.get("train_pairs")
    if not path or data.format != "canonical":
        return []
    texts = []
    for row in iter_rows(path, columns=["query_instruction", "query_text", "pos_instruction", "pos_text"]):
        texts.extend(v for v in row.values() if v)
    return texts


def run_models(ctx: Context) -> dict[str, Any]:
    from ...demo.tiny import make_tiny_models
    from ...models.backbone import architecture_of, load_config

    cfg = ctx.cfg
    out: dict[str, Any] = {}
    if cfg.models.tiny.make:
        corpus = _training_texts(ctx)
        written = make_tiny_models(ctx.dir, spec=cfg.models.tiny, corpus=corpus)
        out["tiny_models"] = {k: str(v) for k, v in written.items()}
        out["tokenizer_corpus_texts"] = len(corpus)
    roles = {"embedder": cfg.models.embedder, "judge": cfg.models.judge}
    r = cfg.models.retriever
    if r is not None and not cfg.baseline.enabled and not (cfg.data.source == "official"
                                                           and cfg.mine.from_imported == "use"):
        roles["retriever"] = r.model  # an imported official file skips S1: its retriever need not be here
    for role, name in roles.items():  # fail now, with a clear message, on unknown names or architectures
        ref = cfg.model_ref(name)
        as_role = "embedder" if role == "retriever" else role   # S1's retriever is an embedder backbone
        out[role] = {"ref": ref, "architecture": architecture_of(load_config(ref), ref, as_role).model_type}
    return out


MODELS = Stage("models", "build the tiny checkpoints (demo) and check every model role's checkpoint", run_models,
               reads=("models.tiny", "models.embedder", "models.judge", "models.retriever", "baseline.enabled",
                      "data.source", "mine.from_imported"), result=ModelsResult, command="")
