"""The model card written next to saved weights: what a model is, how it was made, and how well it did.

``README.md`` in the model folder, as on the Hugging Face hub: the Hub's metadata (``library_name``,
``pipeline_tag``, ``license``, ``base_model``, ``datasets``, ``tags``, and ``model-index`` with the evaluation
results measured here, written with ``huggingface_hub.ModelCardData`` so the Hub parses it) and sections for
the recipe (objective, steps, batch, learning rate, adapter), the training data and the
evaluation results. The same facts are kept machine-readable in ``unime_card.json``, so that a later step
(evaluation) adds its results and the card is written again without losing what training recorded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

CARD_JSON = "unime_card.json"
_RECIPE_KEYS = ("task", "objective", "temperature", "num_negatives", "kl_form", "max_steps", "micro_batch_size",
                "grad_accum", "num_workers", "lr", "lr_schedule", "warmup_steps", "warmup_ratio", "lora", "lora_r",
                "lora_alpha", "use_dora", "lora_init", "zero_stage", "seed", "input_format", "positions")


def read_card(folder: str | os.PathLike) -> dict[str, Any]:
    """The card's facts as recorded (empty for a folder without one)."""
    f = Path(folder) / CARD_JSON
    return json.loads(f.read_text()) if f.is_file() else {}


def write_model_card(folder: str | os.PathLike, *, base_model: str | None = None,
                     recipe: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None,
                     metrics: Mapping[str, Any] | None = None, evaluation: Mapping[str, Any] | None = None,
                     validation: Mapping[str, Any] | None = None, name: str | None = None,
                     license: str | None = None, datasets: list[str] | None = None) -> Path:
    """Write (or update: given sections replace recorded ones, the others stay) the folder's model card.
    ``license``: none given or recorded, the base model's (its card, if the base is a local folder or cached)."""
    folder = Path(folder)
    facts = read_card(folder)
    if license is None and not facts.get("license") and (base_model or facts.get("base_model")):
        license = base_license(base_model or facts["base_model"])
    given = {"name": name, "base_model": base_model, "recipe": dict(recipe) if recipe else None,
             "data": dict(data) if data else None, "metrics": dict(metrics) if metrics else None,
             "evaluation": dict(evaluation) if evaluation else None,
             "validation": dict(validation) if validation else None, "license": license,
             "datasets": list(datasets) if datasets else None}
    facts.update({k: v for k, v in given.items() if v is not None})
    (folder / CARD_JSON).write_text(json.dumps(facts, indent=1, default=str))
    (folder / "README.md").write_text(render_card(facts))
    return folder / "README.md"


def base_license(base_model: str) -> str | None:
    """The license in a base model's own card: a local folder's README.md, or a hub id's cached one."""
    readme = Path(str(base_model)) / "README.md"
    if not readme.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(base_model), "README.md")
        except Exception:   # not a hub id
            cached = None
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None:
        return None
    from huggingface_hub import ModelCard

    return ModelCard.load(readme).data.license


def hub_metadata(facts: Mapping[str, Any]):
    """The Hub's card metadata (``huggingface_hub.ModelCardData``) of a card's facts; model-index from the
    evaluation's per-dataset P@1 (and reranked P@1)."""
    from huggingface_hub import EvalResult, ModelCardData

    reranker = (facts.get("recipe") or {}).get("task") == "reranker"
    base = facts.get("base_model")
    name = facts.get("name") or ("unime-v2-reranker" if reranker else "unime-v2-embedder")
    task = "text-ranking" if reranker else "feature-extraction"
    ev = facts.get("evaluation") or {}
    results = [EvalResult(task_type=task, dataset_type=ds, dataset_name=ds, dataset_split="test",
                          metric_type="precision_at_1", metric_name=metric, metric_value=float(v))
               for per, metric in ((ev.get("per_dataset"), "P@1"), (ev.get("reranked"), "P@1 reranked"))
               for ds, v in (per or {}).items() if isinstance(v, (int, float))]
    return ModelCardData(
        library_name="transformers", pipeline_tag=task, license=facts.get("license") or "other",
        base_model=base if base and not Path(str(base)).is_absolute() else None,
        datasets=facts.get("datasets") or None, model_name=name if results else None, eval_results=results or None,
        tags=["unime-ray", "uniME-v2", "reranker" if reranker else "multimodal-embedding"])


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                datasets: list[str] | None = None, license: str | None = None) -> str:
    """Upload a model folder saved here to the Hub (``huggingface_hub``), its card first brought up to date
    (``datasets``/``license`` recorded). Returns the commit's URL. The folder must hold a card and weights."""
    from huggingface_hub import HfApi, ModelCard

    folder = Path(folder)
    if not (folder / CARD_JSON).is_file():
        raise FileNotFoundError(f"{folder} has no {CARD_JSON}: push takes a model folder saved by unime-ray")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise FileNotFoundError(f"{folder} holds no weights (*.safetensors)")
    write_model_card(folder, datasets=datasets, license=license)
    ModelCard.load(folder / "README.md")   # the metadata the Hub will parse
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message=f"unime-ray: {read_card(folder).get('name') or folder.name}")
    return str(getattr(commit, "commit_url", commit))


def _table(rows: Mapping[str, Any]) -> list[str]:
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows.items()]
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def render_card(facts: Mapping[str, Any]) -> str:
    base = facts.get("base_model")
    recipe = facts.get("recipe") or {}
    task = recipe.get("task", "embedder")
    front = ["---", hub_metadata(facts).to_yaml(), "---"]
    title = "UniME-V2 " + ("reranker" if task == "reranker" else "embedder") + (
        f": {facts['name']}" if facts.get("name") else "")
    out = front + ["", f"# {title}", ""]
    what = ("a reranker (pairwise Yes/No and listwise choice) for retrieve-then-rerank" if task == "reranker" else
            "a universal multimodal embedder: the last token's hidden state, L2-normalised, for text, images "
            "and both together")
    out += [f"This is {what}, trained with [unime-ray](https://arxiv.org/abs/2510.13515) (UniME-V2: "
            "MLLM-as-a-Judge for universal multimodal embedding learning).", ""]
    out += [f"* Base model: `{base}`" if base else "* Base model: not recorded"]
    out += ["", "```python", "import unime_ray",
            f"model = unime_ray.{'Reranker' if task == 'reranker' else 'Embedder'}.from_pretrained(\"<this folder>\")",
            "```", ""]
    if recipe:
        out += ["## Recipe", ""] + _table({k: recipe[k] for k in _RECIPE_KEYS if k in recipe}) + [""]
    if facts.get("data"):
        out += ["## Training data", ""] + _table(facts["data"]) + [""]
    if facts.get("metrics"):
        m = {k: v for k, v in facts["metrics"].items() if isinstance(v, (int, float, str)) and k != "time"}
        out += ["## Last training step", ""] + _table(m) + [""]
    ev = facts.get("evaluation")
    if ev:
        out += ["## Evaluation", ""]
        if ev.get("protocol"):
            out += [str(ev["protocol"]), ""]
        per = ev.get("per_dataset") or {}
        chance = ev.get("chance") or {}
        reranked = ev.get("reranked") or {}
        head = ["eval set", "P@1 (%)", "chance (%)"] + (["reranked P@1 (%)"] if reranked else [])
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, v in per.items():
            row = [name, _fmt(v), _fmt(chance.get(name, ""))] + ([_fmt(reranked.get(name, ""))] if reranked else [])
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    val = facts.get("validation")
    if val:   # a reranker's guard (eval.rerank): measured on rows no training step saw
        out += ["## Validation against the embedder alone", "", str(val.get("reason", "")), ""]
        if val.get("p1"):
            out += _table({"embedder alone P@1 (%)": val.get("embedder_p1"),
                           **{f"{m} P@1 (%)": v for m, v in val["p1"].items()},
                           "fused weight": val.get("weight"), "used": val.get("used")}) + [""]
    return "\n".join(out)
