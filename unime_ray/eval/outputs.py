"""What an evaluation leaves in its run folder, and side-by-side comparison of two runs.

Each evaluator writes ``results.json`` (everything, machine-readable; ``metrics`` is the flat
``{label: value}`` view), ``results.md`` (Markdown tables) and ``results.png`` (a bar plot). A run folder
may hold sub-folders with their own ``results.json`` (the CLI writes ``retrieval/`` and
``compositional/`` next to the MMEB results); :func:`compare_runs` lines all of them up.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ..utils.files import write_json_atomic
from ..utils.markdown import markdown_table

logger = logging.getLogger(__name__)


def _f(v: Any) -> Any:
    return None if v is None else (round(v, 2) if isinstance(v, float) else v)


def _pairs_markdown(r: Mapping[str, Any]) -> str:
    rr = r.get("rerank")
    head = ["dataset", "group", "split", "rows", "candidates (mean)", "chance %", "P@1 %", "R@5 %", "R@10 %", "MRR %"]
    if rr:
        head += [f"reranked P@1 % (top-{rr['top_k']})", "GT in top-K %", "fallbacks"]
    rows = []
    for name, d in r["datasets"].items():
        row = [name, d.get("group") or "-", d.get("split") or "-", d["rows"], d["mean_candidates"], d["chance"],
               d["p_at_1"], d.get("r_at_5"), d.get("r_at_10"), d.get("mrr")]
        if rr:
            row += [d.get("reranked_p_at_1"), d.get("gt_in_top_k"), d.get("rerank_fallbacks")]
        rows.append(row)
    parts = [f"# Evaluation: {r.get('model')}\n", f"Kind: {r.get('kind')}; tables: "
             + ", ".join(f"`{t}`" for t in r.get("tables", [])) + "\n",
             f"Metric: precision@1 (ground truth = candidate 0). Tie rule: {r.get('tie_rule')}.\n",
             markdown_table(head, rows), "\n## Summary\n"]
    shead = ["group", "datasets", "mean P@1 %", "mean chance %"] + (["mean reranked P@1 %"] if rr else [])
    srows = []
    for key, s in r["summary"].items():
        row = [key, s["count"], _f(s["mean"]), _f(r["chance_summary"][key]["mean"])]
        if rr:
            row.append(_f(rr["summary"][key]["mean"]))
        srows.append(row)
    parts.append(markdown_table(shead, srows))
    notes = []
    if r.get("outside_mmeb"):
        notes.append(f"Datasets outside the 36 of MMEB are reported under Other and are not in Overall/IND/OOD: "
                     f"{', '.join(r['outside_mmeb'])}.")
    if rr:
        notes.append(f"Reranking: listwise over the embedder's top-{rr['top_k']}; the reranker's choice becomes "
                     f"rank 1, other ranks keep the embedder order. Unusable answers (fallback to the embedder's "
                     f"top-1): {rr['fallbacks']}.")
    dropped = sum(d.get("gt_duplicates_dropped", 0) for d in r["datasets"].values())
    if dropped:
        notes.append(f"{dropped} distractors identical to their row's ground truth were dropped.")
    if notes:
        parts.append("\n" + "\n".join(f"- {n}" for n in notes))
    return "\n".join(parts) + "\n"


def _retrieval_markdown(r: Mapping[str, Any]) -> str:
    ks = r.get("ks", [1, 5, 10])
    head = ["set", "images", "captions", "captions/image"] + [f"i2t R@{k}" for k in ks] + [f"t2i R@{k}" for k in ks]
    rr = r.get("rerank")
    if rr:
        head += ["i2t R@1 reranked", "t2i R@1 reranked", "fallbacks"]
    rows = []
    for name, s in r["sets"].items():
        row = [name, s["images"], s["captions"], s["captions_per_image"]]
        row += [s["i2t"][f"R@{k}"] for k in ks] + [s["t2i"][f"R@{k}"] for k in ks]
        if rr:
            x = rr["sets"].get(name, {})
            row += [x.get("i2t_R@1"), x.get("t2i_R@1"), x.get("fallbacks")]
        rows.append(row)
    parts = [f"# Zero-shot retrieval: {r.get('model')}\n",
             "i2t = image query, text candidates; t2i = text query, image candidates. "
             f"Tie rule: {r.get('tie_rule')}.\n", markdown_table(head, rows)]
    agg = r.get("aggregates") or {}
    if agg:
        parts.append("\n" + markdown_table(["aggregate", "mean R@1 %", "numbers"],
                                           [[k, _f(v["mean"]), v["count"]] for k, v in agg.items()]))
    return "\n".join(parts) + "\n"


def _compositional_markdown(r: Mapping[str, Any]) -> str:
    rr = r.get("rerank")
    head = ["subset", "pairs", "accuracy %"] + (["reranker accuracy %"] if rr else [])
    rows = [[n, s["pairs"], s["accuracy"]] + ([rr["per_subset"].get(n)] if rr else [])
            for n, s in r["subsets"].items()]
    parts = [f"# Compositional pairs: {r.get('model')}\n",
             "Hit iff the image scores the positive caption strictly above the negative one"
             + (" (reranker: P(Yes|positive) > P(Yes|negative))" if rr else "") + ".\n",
             markdown_table(head, rows), "\n"]
    ghead = ["group", "subsets", "mean %"] + (["reranker mean %"] if rr else [])
    grows = [[k, v["count"], _f(v["mean"])] + ([_f(rr["summary"][k]["mean"])] if rr else [])
             for k, v in r["summary"].items()]
    parts.append(markdown_table(ghead, grows))
    return "\n".join(parts) + "\n"


def results_markdown(results: Mapping[str, Any]) -> str:
    kind = results.get("kind")
    if kind in ("pairs", "mmeb"):
        return _pairs_markdown(results)
    if kind == "retrieval":
        return _retrieval_markdown(results)
    if kind == "compositional":
        return _compositional_markdown(results)
    raise ValueError(f"unknown results kind {kind!r}")


def plot_results(results: Mapping[str, Any], path: Path) -> Path | None:
    """Bar plot of the headline numbers (per dataset / set / subset), with chance and reranked bars."""
    from ..utils.plots import pyplot

    plt = pyplot()
    if plt is None:
        return None
    kind = results.get("kind")
    series: dict[str, list[float | None]] = {}
    if kind in ("pairs", "mmeb"):
        names = list(results["per_dataset"])
        series["P@1"] = [results["per_dataset"][n] for n in names]
        if results.get("rerank"):
            series["reranked P@1"] = [results["rerank"]["per_dataset"].get(n) for n in names]
        chance = [results["chance"][n] for n in names]
        ylabel = "precision@1 (%)"
    elif kind == "retrieval":
        names = list(results["sets"])
        series["i2t R@1"] = [results["sets"][n]["i2t"]["R@1"] for n in names]
        series["t2i R@1"] = [results["sets"][n]["t2i"]["R@1"] for n in names]
        chance, ylabel = None, "recall@1 (%)"
    else:
        names = list(results["subsets"])
        series["embedder"] = [results["subsets"][n]["accuracy"] for n in names]
        if results.get("rerank"):
            series["reranker"] = [results["rerank"]["per_subset"].get(n) for n in names]
        chance, ylabel = [50.0] * len(names), "accuracy (%)"
    if not names:
        return None
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) * len(series) + 1.5), 3.2))
    for j, (label, vals) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width=width, label=label)
    if chance is not None:
        ax.scatter(range(len(names)), chance, marker="_", s=400, color="black", label="chance", zorder=3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center",
                       fontsize=8)
    ax.set_ylabel(ylabel)
    top = max([v for vals in series.values() for v in vals if v is not None] + (chance or []) + [1.0])
    ax.set_ylim(0, min(100.0, max(5.0, 1.15 * top)))  # near-chance numbers stay visible
    ax.set_title(str(results.get("model", ""))[-60:], fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(out_dir: str | os.PathLike, results: dict[str, Any]) -> dict[str, str]:
    """Write results.json / results.md / results.png; returns their paths (also stored in results.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results_json": str(out / "results.json"), "results_md": str(out / "results.md")}
    (out / "results.md").write_text(results_markdown(results))
    png = plot_results(results, out / "results.png")
    if png is not None:
        paths["plot"] = str(png)
    if results.get("top_k_dump", {}).get("file"):
        paths["topk"] = str(out / results["top_k_dump"]["file"])
    results["outputs"] = paths
    write_json_atomic(results, out / "results.json")
    logger.info("evaluation results in %s", out)
    return paths


# ------------------------------------------------------------------------------------ comparison
def _load_results(run: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(run)
    if p.is_file():
        return [json.loads(p.read_text())]
    if not p.is_dir():
        raise FileNotFoundError(f"no evaluation run at {p}")
    files = ([p / "results.json"] if (p / "results.json").is_file() else []) + sorted(p.glob("*/results.json"))
    if not files:
        raise FileNotFoundError(f"no results.json in {p} or its sub-folders")
    return [json.loads(f.read_text()) for f in files]


def run_metrics(run: str | os.PathLike) -> tuple[str, dict[str, float | None]]:
    """(model label, flat metrics) of a run folder (all of its results.json files) or one results.json."""
    metrics: dict[str, float | None] = {}
    models = []
    for r in _load_results(run):
        models.append(str(r.get("model")))
        prefix = "" if r.get("kind") in ("pairs", "mmeb") else f"{r.get('kind')}: "
        for k, v in r.get("metrics", {}).items():
            metrics[prefix + k] = v
    return " / ".join(dict.fromkeys(models)), metrics


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike) -> str:
    """Markdown table of every metric of two runs side by side, with B - A (metrics missing in one are blank)."""
    model_a, a = run_metrics(run_a)
    model_b, b = run_metrics(run_b)
    labels = list(a) + [k for k in b if k not in a]
    rows = []
    for k in labels:
        va, vb = a.get(k), b.get(k)
        delta = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
        rows.append([k, _f(va), _f(vb), None if delta is None or math.isnan(delta) else f"{delta:+.2f}"])
    head = f"A: `{run_a}` ({model_a})\n\nB: `{run_b}` ({model_b})\n\n"
    return head + markdown_table(["metric", "A", "B", "B - A"], rows) + "\n"
