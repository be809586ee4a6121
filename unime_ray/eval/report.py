"""The eval stage's report section: the paper's Table 4 on the run's data (P@1 per eval set, mean ± std over
seeds, with and without reranking), a plot, and the statistics over seeds (:mod:`unime_ray.eval.stats`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..utils.markdown import markdown_table

VARIANT_ORDER = {"initial-embedder": 0, "baseline": 1, "infonce-inbatch": 2, "hard-labels": 3, "unime-v2": 4,
                 "judge": 5}
VARIANT_TEXT = {
    "initial-embedder": "the initial embedder (models.embedder), untrained here",
    "baseline": "retriever: in-batch InfoNCE from the initial model (VLM2Vec's role)",
    "infonce-inbatch": "ablation: no mined negatives, no soft scores (in-batch InfoNCE)",
    "hard-labels": "ablation: mined negatives, hard labels",
    "unime-v2": "UniME-V2: mined negatives + judge-score alignment",
    "judge": "reference: the stand-in judge as a retriever (pretrained towers + fitted heads, fold 0; not trained here)",
}


def _spread(values: list[float]) -> str:
    """mean ± sample std over seeds (the mean alone for one seed)."""
    from .stats import seed_spread

    spread = seed_spread(values)
    return "-" if spread is None else spread.text()


def comparison_rows(models: dict[str, Any]) -> tuple[list[str], list[list[Any]], dict[str, list[float]]]:
    """Rows of the variant comparison: P@1 per dataset and overall, mean ± sample std over seeds."""
    from .mmeb import headline   # Overall over the 36 MMEB datasets; the mean of the custom sets without them
    datasets: list[str] = []
    for m in models.values():
        for d in (m.get("per_dataset") or {}):
            if d not in datasets:
                datasets.append(d)
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for m in models.values():
        if m.get("per_dataset") is None:
            continue
        groups.setdefault((m["variant"], False), []).append({**m["per_dataset"],
                                                            "overall": headline(m["summary"])[1]})
        rr = m.get("rerank")
        if rr:
            groups.setdefault((m["variant"], True), []).append({**rr["per_dataset"],
                                                               "overall": headline(rr["summary"])[1],
                                                               "fallbacks": rr.get("fallbacks")})
    headers = ["variant", "reranked (top-5, listwise)", "seeds"] + [f"P@1 {d}" for d in datasets] + ["P@1 mean"]
    rows, overall = [], {}
    for (variant, reranked), runs in sorted(groups.items(), key=lambda kv: (VARIANT_ORDER.get(kv[0][0], 9),
                                                                               kv[0][0], kv[0][1])):
        label = variant + (" + reranker" if reranked else "")
        overall[label] = [r["overall"] for r in runs]
        fb = sum(r.get("fallbacks") or 0 for r in runs) if reranked else None
        rows.append([VARIANT_TEXT.get(variant, variant), f"yes ({fb} fallbacks)" if reranked else "no", len(runs)]
                    + [_spread([r.get(d) for r in runs]) for d in datasets] + [_spread(overall[label])])
    return headers, rows, overall


def _plot_comparison(overall: dict[str, list[float]], chance: float | None, path: Path) -> Path | None:
    from ..utils.plots import pyplot

    plt = pyplot()
    if plt is None:
        return None
    labels = list(overall)
    means = [sum(v) / len(v) for v in overall.values()]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.barh(labels, means, color="#4c72b0")
    for i, vals in enumerate(overall.values()):
        ax.plot(vals, [i] * len(vals), "k|", markersize=12)
    if chance is not None:
        ax.axvline(chance, color="grey", linestyle="--", label=f"chance {chance:.2f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("P@1 mean over eval sets (%); ticks = seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def comparison_section(ev: dict[str, Any], run_dir: Path) -> list[str]:
    """The comparison (the paper's Table 4 on the run's data), from the eval stage's result."""
    models = ev.get("models") or {}
    if not models:
        return []
    parts = ["\n## Comparison (the paper's Table 4, on this run's data)\n"]
    any_model = next(iter(models.values()))
    sizes = (any_model.get("sizes") or {}).get("rows_per_dataset", {})
    chance = any_model.get("chance") or {}
    parts.append("Protocol: MMEB precision@1 (ground truth at candidate 0, cosine, a tie with a distractor counts as "
                 "a miss) on the eval split; every query ranks its dataset's whole candidate list.\n")
    parts.append(markdown_table(["eval set", "queries", "chance P@1 (%)"],
                                [[d, sizes.get(d), chance.get(d)] for d in sizes]))
    headers, rows, overall = comparison_rows(models)
    parts.append("")
    parts.append(markdown_table(headers, rows))
    chance_mean = sum(chance.values()) / len(chance) if chance else None
    plot = _plot_comparison(overall, chance_mean, run_dir / "report_comparison.png")
    if plot:
        parts.append(f"\n![comparison]({plot.name})\n")
    reranked = [(label, m["rerank"]) for label, m in models.items() if m.get("rerank")]
    if reranked:
        parts.append("Reranking can only help where the ground truth is in the embedder's top-K; with a chance-level "
                     "reranker the reranked P@1 tends to (GT in top-K) / K. Per reranked model (GT in top-K % -> P@1 "
                     "before -> after):\n")
        for label, rr in reranked:
            before = models[label]["per_dataset"]
            parts.append(f"- {label}: " + "; ".join(
                f"{d} {rr['gt_in_top_k'].get(d, 0):.1f} -> {before.get(d, 0):.2f} -> {v:.2f}"
                for d, v in rr["per_dataset"].items()) + f" (fallbacks {rr.get('fallbacks', 0)})"
                + _choice_text(rr.get("choice_ranks")) + _answers_text(((rr.get("modes") or {}).get("listwise") or {})
                                                                     .get("answers")))
        parts.append("")
    parts += _guard_section(ev.get("rerank_validation"))
    parts += _statistics_section(models, chance)
    return parts


def _guard_section(val: dict[str, Any] | None) -> list[str]:
    """The reranker guard's verdict and every mode against the embedder alone on the dev split."""
    if not val:
        return []
    parts = ["\n### Reranker guard (dev split)\n", str(val.get("reason", "")) + "\n"]
    if val.get("p1"):
        rows = [["embedder alone", f"{val['embedder_p1']:.2f}", "-"]]
        rows += [[m + (f" (weight {val['weight']})" if m == "fused" else "") + (" (configured)" if m == val["mode"]
                                                                                   else ""),
                  f"{v:.2f}", f"{v - val['embedder_p1']:+.2f}"] for m, v in val["p1"].items()]
        parts += [f"P@1 (%) on {val['rows']} dev rows, top-{val['top_k']} reranked:\n",
                  markdown_table(["ranking", "P@1", "change"], rows), ""]
    return parts


def _answers_text(answers: dict[str, dict[str, int]] | None) -> str:
    """``; listwise answers read: exact 90, first (i) 8, unparsable 2`` over every eval set."""
    total: dict[str, int] = {}
    for per_set in (answers or {}).values():
        for kind, n in per_set.items():
            total[kind] = total.get(kind, 0) + int(n)
    names = {"exact": "as trained", "first": "first (i) of a longer answer", "out_of_range": "out of range",
             "unparsable": "unparsable"}
    return ("; listwise answers: " + ", ".join(f"{names.get(k, k)} {n}" for k, n in total.items())) if total else ""


def _choice_text(choice_ranks: dict[str, dict[str, int]] | None) -> str:
    """``; picks by embedder rank: 1 62%, 2 20%, ...`` over every eval set: a reranker that always names the
    same slot has learned a position, not the content."""
    from .stats import one_slot

    total: dict[int, int] = {}
    for per_set in (choice_ranks or {}).values():
        for rank, n in per_set.items():
            total[int(rank)] = total.get(int(rank), 0) + int(n)
    n = sum(total.values())
    if not n:
        return ""
    text = "; picks by embedder rank: " + ", ".join(f"{r} {100.0 * total[r] / n:.0f}%" for r in sorted(total))
    if one_slot(choice_ranks):
        text += " (one slot for nearly every query: a position bias, not a judgement of the content)"
    return text


def _statistics_section(models: dict[str, Any], chance: dict[str, float]) -> list[str]:
    """Every variant's R@1/R@5/R@10/MRR over seeds, the paired differences with their bootstrap intervals, the
    verdicts on the paper's order and on the reranker (see :mod:`unime_ray.eval.stats`), and each variant's P@1
    as a multiple of chance."""
    from .stats import (MEAN_KEY, PAPER_ORDER, RANK_METRICS, metric_values, one_slot, order_verdict, paired_interval,
                        per_seed, rerank_verdict, seed_spread, seeds_by_variant)

    plain, reranked = seeds_by_variant(models), seeds_by_variant(models, reranked=True)
    parts = ["\n### Statistics over seeds and queries\n"]
    if plain:
        parts.append("Each variant starts from the same weights and trains on the same data for the same steps, once "
                     "per seed, and is evaluated on the same queries. Metrics in percent, averaged over the eval sets "
                     "(R@1 is MMEB's P@1; R@K: the ground truth among the top K; MRR: mean of 1 / rank), mean ± sample "
                     "std over seeds:\n")
        rows = []
        for variant, seeds in plain.items():
            sets = list(next(iter(seeds.values())))
            rows.append([variant, len(seeds)] + [seed_spread(
                float(np.mean([metric_values(seeds[s][d], metric).mean() for d in sets])) for s in seeds).text()
                for metric in RANK_METRICS])
        parts += [markdown_table(["variant", "seeds"] + list(RANK_METRICS), rows), ""]
        sets = [d for d in chance if any(d in next(iter(v.values())) for v in plain.values())]
        pairs = list(zip(PAPER_ORDER[1:], PAPER_ORDER)) + [(PAPER_ORDER[-1], PAPER_ORDER[0])]
        cells = [(b, w, plain[b], plain[w]) for b, w in pairs if b in plain and w in plain]
        cells += [(f"{v} + reranker", v, reranked[v], plain[v]) for v in reranked if v in plain]
        rows = []
        for better, worse, a, b in cells:
            row = [paired_interval(a, b, "R@1", d, better, worse) for d in sets]
            row += [paired_interval(a, b, metric, MEAN_KEY, better, worse)
                    for metric in (RANK_METRICS if "reranker" not in better else RANK_METRICS[:1])]
            ok = [c for c in row if c]
            rows.append([f"{better} - {worse}", ok[0].seeds if ok else 0]
                        + [("**" + c.text() + "**" if c.resolved else c.text()) if c else "-" for c in row]
                        + ["-"] * (len(sets) + len(RANK_METRICS) - len(row)))
        if rows:
            parts.append("Paired differences in points, with 95 % two-way bootstrap intervals over seeds and queries "
                         "(bold: the interval excludes 0; otherwise the difference is not resolvable at this n). "
                         "The reranked rows compare R@1 only:\n")
            parts += [markdown_table(["difference", "seeds"] + [f"R@1 {d}" for d in sets]
                                     + [f"{m} mean" for m in RANK_METRICS], rows), ""]
        mode_rows = []
        for variant in reranked:
            modes = next(((m.get("rerank") or {}).get("modes") or {} for m in models.values()
                          if m.get("variant") == variant and m.get("rerank")), {})
            for mode in modes:
                by_mode = seeds_by_variant(models, reranked=True, mode=mode).get(variant)
                gap = by_mode and paired_interval(by_mode, plain[variant], "R@1", MEAN_KEY, mode, variant)
                if gap:
                    mode_rows.append([variant, mode, gap.seeds, seed_spread(
                        float(np.mean([metric_values(by_mode[s][d], "R@1").mean() for d in by_mode[s]]))
                        for s in by_mode).text(), ("**" + gap.text() + "**") if gap.resolved else gap.text()])
        if mode_rows:
            parts.append("Every reranking mode on the eval sets (R@1 averaged over the sets, mean ± std over seeds; "
                         "the change against the same embedder alone with its 95 % interval):\n")
            parts += [markdown_table(["variant", "mode", "seeds", "R@1", "change"], mode_rows), ""]
        parts.append(order_verdict(plain).sentence() + "\n")
        for variant in reranked:
            bias = any(one_slot((m.get("rerank") or {}).get("choice_ranks")) for m in models.values()
                       if m.get("variant") == variant)
            parts.append(rerank_verdict(plain, reranked, variant, bias)[1] + "\n")
    scores_by_seed = per_seed(models)
    if chance:
        ratio_rows = []
        for variant, scores in scores_by_seed.items():
            ratio_rows.append([variant] + [f"{sum(scores[d].values()) / len(scores[d]) / chance[d]:.1f}x"
                                           if d in scores and chance.get(d) else "-" for d in chance])
        for m in models.values():   # single references (the judge as a retriever, eval.models): their one run
            scores = m.get("per_dataset") or {}
            if m.get("seed") is None and scores and m["variant"] not in scores_by_seed:
                ratio_rows.append([m.get("label", m["variant"])]
                                  + [f"{scores[d] / chance[d]:.1f}x" if scores.get(d) is not None and chance.get(d)
                                     else "-" for d in chance])
        parts.append("P@1 as a multiple of chance (mean over seeds / chance P@1):\n")
        parts.append(markdown_table(["variant"] + list(chance), ratio_rows))
        parts.append("")
    return parts
