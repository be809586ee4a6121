"""The run report: Markdown tables (and a plot) summarising what each stage did, from the manifest."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _rel(path: str | Path, run_dir: Path) -> str:
    """A link target relative to the report when the file is inside the run directory."""
    p = Path(path)
    return str(p.relative_to(run_dir)) if p.is_relative_to(run_dir) else str(p)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _data_accounting(stages: dict[str, Any]) -> list[list[Any]]:
    tables = stages.get("prepare", {}).get("outputs", {}).get("tables", {})
    rows = []
    for name, acc in tables.items():
        reasons = ", ".join(f"{k}: {v}" for k, v in acc.get("reasons", {}).items()) or "-"
        rows.append([name, acc["rows_in"], acc["rows_out"], acc["rows_quarantined"], reasons])
    return rows


def _plot_accounting(rows: list[list[Any]], path: Path) -> Path | None:
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is a dependency; stay useful without it anyway
        return None
    names = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.barh(names, [r[2] for r in rows], label="kept", color="#4c72b0")
    ax.barh(names, [r[3] for r in rows], left=[r[2] for r in rows], label="quarantined", color="#dd8452")
    ax.set_xlabel("rows")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


VARIANT_ORDER = {"initial-embedder": 0, "baseline": 1, "infonce-inbatch": 2, "hard-labels": 3, "unime-v2": 4}
VARIANT_TEXT = {
    "initial-embedder": "the initial embedder (models.embedder), untrained here",
    "baseline": "retriever: in-batch InfoNCE from the initial model (VLM2Vec's role)",
    "infonce-inbatch": "ablation: no mined negatives, no soft scores (in-batch InfoNCE)",
    "hard-labels": "ablation: mined negatives, hard labels",
    "unime-v2": "UniME-V2: mined negatives + judge-score alignment",
}


def _spread(values: list[float]) -> str:
    """mean ± sample std over seeds (the mean alone for one seed)."""
    from .eval.stats import seed_spread

    spread = seed_spread(values)
    return "-" if spread is None else spread.text()


def comparison_rows(models: dict[str, Any]) -> tuple[list[str], list[list[Any]], dict[str, list[float]]]:
    """Rows of the variant comparison: P@1 per dataset and overall, mean ± sample std over seeds."""
    from .eval.mmeb import headline   # Overall over the 36 MMEB datasets; the mean of the custom sets without them
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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


def _comparison_section(stages: dict[str, Any], run_dir: Path) -> list[str]:
    ev = stages.get("eval", {}).get("outputs", {})
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
                for d, v in rr["per_dataset"].items()) + f" (fallbacks {rr.get('fallbacks', 0)})")
        parts.append("")
    parts += _statistics_section(models, chance)
    return parts


def _statistics_section(models: dict[str, Any], chance: dict[str, float]) -> list[str]:
    """Paired comparisons over seeds (see :mod:`unime_ray.eval.stats`): the paper's order, the reranker's
    effect, and each variant's P@1 as a multiple of chance."""
    from .eval.stats import MEAN_KEY, PAPER_ORDER, order_verdict, paired_difference, per_seed, rerank_effect

    plain, reranked = per_seed(models), per_seed(models, reranked=True)
    parts = ["\n### Statistics over seeds\n",
             "Each variant starts from the same weights and trains on the same data for the same steps, once per "
             "seed; runs with the same seed are paired. Cells: mean ± sample standard deviation (n - 1) of the "
             "paired differences in P@1 points, and that mean in standard deviations (sd).\n"]
    keys = [d for d in chance if any(d in v for v in plain.values())] + [MEAN_KEY]
    pairs = list(zip(PAPER_ORDER[1:], PAPER_ORDER)) + [(PAPER_ORDER[-1], PAPER_ORDER[0])]
    rows = []
    for better, worse in pairs:
        if better in plain and worse in plain:
            cells = [paired_difference(plain[better].get(k, {}), plain[worse].get(k, {}), better, worse) for k in keys]
            n = max((len(c.seeds) for c in cells if c), default=0)
            rows.append([f"{better} - {worse}", n] + [c.text() if c else "-" for c in cells])
    if rows:
        parts.append(markdown_table(["difference", "seeds"] + [f"P@1 {k}" for k in keys], rows))
        parts.append("")
    parts.append(order_verdict(plain).sentence() + "\n")
    if reranked:
        parts.append(rerank_effect(plain, reranked)[1] + "\n")
    if chance:
        ratio_rows = []
        for variant, scores in plain.items():
            ratio_rows.append([variant] + [f"{sum(scores[d].values()) / len(scores[d]) / chance[d]:.1f}x"
                                           if d in scores and chance.get(d) else "-" for d in chance])
        parts.append("P@1 as a multiple of chance (mean over seeds / chance P@1):\n")
        parts.append(markdown_table(["variant"] + list(chance), ratio_rows))
        parts.append("")
    return parts


def visual_token_rows(stages: dict[str, Any]) -> list[list[Any]]:
    """(stage, budget role, configured budget, images, min / median / max visual tokens per image) of every
    stage that recorded its ``visual_tokens`` (see unime_ray.models.budget)."""
    rows = []
    for name, st in stages.items():
        for role, t in ((st.get("outputs") or {}).get("visual_tokens") or {}).items():
            if isinstance(t, dict) and t.get("images"):
                rows.append([name, role, t.get("budget"), t["images"], t.get("min"), t.get("median"), t.get("max")])
    return rows


def write_run_report(run_dir: Path, manifest: dict[str, Any]) -> Path:
    stages = manifest.get("stages", {})
    parts = [f"# unime-ray run report\n\nRun directory: `{run_dir}`\n"]
    parts += _comparison_section(stages, run_dir)
    parts.append("## Stages\n")
    parts.append(markdown_table(["stage", "status", "seconds"],
                                [[n, s.get("status"), s.get("seconds")] for n, s in stages.items()
                                 if n != "report"]))
    token_rows = visual_token_rows(stages)
    if token_rows:
        parts.append("\n## Images: visual tokens per image\n")
        parts.append("Tokens each stage's model actually received per image (image grid / merge size^2, counted "
                     "where images are processed), against the budget configured for its role (models.images).\n")
        parts.append(markdown_table(["stage", "role", "budget", "images", "min", "median", "max"], token_rows))
    data = stages.get("data", {}).get("outputs", {})
    if data.get("summary"):
        summ = data["summary"]
        parts.append("\n## Data\n")
        items = summ.get("items", {})
        parts.append(f"Source: {summ.get('source')}, seed {summ.get('seed')}; items: "
                     + ", ".join(f"{k} {v}" for k, v in items.items()) + ".\n")
    acc_rows = _data_accounting(stages)
    if acc_rows:
        parts.append("\n## Row accounting (in = out + quarantined)\n")
        parts.append(markdown_table(["table", "in", "out", "quarantined", "reasons"], acc_rows))
        plot = _plot_accounting(acc_rows, run_dir / "report_rows.png")
        if plot:
            parts.append(f"\n![rows]({plot.name})\n")
    emb = stages.get("embed", {}).get("outputs", {})
    if emb.get("tables"):
        parts.append("\n## Embedding\n")
        parts.append(f"Embedder: `{emb.get('embedder')}`\n")
        parts.append(markdown_table(["table", "rows embedded (this run)", "seconds", "items/s"],
                                    [[t, s["rows_embedded"], s["seconds"], s["items_per_s"]]
                                     for t, s in emb["tables"].items()]))
    ret = stages.get("retrieve", {}).get("outputs", {})
    if ret.get("queries") is not None:
        parts.append("\n## Global retrieval\n")
        parts.append(markdown_table(
            ["queries", "mean candidates", "queries without candidates", "mean dropped by delta", "pools",
             "search rows/s"],
            [[ret["queries"], ret["mean_candidates"], ret["queries_without_candidates"], ret["mean_dropped_by_delta"],
              ret["pools"], ret["search"]["rows_per_s"]]]))
    jud = stages.get("judge", {}).get("outputs", {})
    if jud.get("pairs") is not None:
        parts.append("\n## MLLM-as-a-Judge\n")
        parts.append(f"Judge: `{jud['judge']}` ({jud.get('backend', 'transformers')}, prompt "
                     f"{jud.get('prompt_version', 'unrecorded')})\n")
        parts.append(markdown_table(
            ["pairs", "scored", "quarantined", "pairs/s", "mean score (positives)", "mean score (candidates)",
             "P(positive outscores a candidate)"],
            [[jud["pairs"], jud["scored"], jud["quarantined"], jud["pairs_per_s"], jud["mean_score_positive"],
              jud["mean_score_candidates"], jud.get("positive_auc")]]))
        if jud.get("positive_auc") is not None and jud["positive_auc"] < 0.6:
            parts.append("\nThe judge barely separates positives from retrieved candidates (0.5 = chance): its soft "
                         "scores carry little information, so UniME-V2's score alignment has little to learn from "
                         "in this run.\n")
    mine = stages.get("mine", {}).get("outputs", {})
    if mine.get("queries") is not None:
        parts.append("\n## Hard-negative mining\n")
        st = mine.get("settings", {})
        parts.append(f"num_negatives {st.get('num_negatives')}, beta {st.get('beta')}, interval {st.get('interval')}; "
                     f"training table `{mine.get('training_table')}`"
                     + (f", official JSON `{mine['official_json']}`" if mine.get("official_json") else "") + "\n")
        parts.append(markdown_table(
            ["queries", "mined", "quarantined", "false negatives dropped", "fallbacks (no survivor)",
             "cyclic repeats (< k survivors)", "mean positive score", "mean negative score"],
            [[mine["queries"], mine["mined"], mine["quarantined"], mine["false_negatives"], mine["fallbacks"],
              mine["repeated_fill"], mine.get("mean_positive_score"), mine.get("mean_negative_score")]]))
        if mine.get("histogram"):
            parts.append(f"\n![judge scores]({_rel(mine['histogram'], run_dir)})\n")
    if mine.get("imported"):
        parts.append("\n## Hard negatives (imported)\n")
        parts.append("Global retrieval, the judge and mining did not run: the training table "
                     f"`{mine['training_table']}` came with judge-scored negatives from `{mine.get('imported_from')}` "
                     f"({mine.get('format')}; mine.from_imported: use).\n")
        parts.append(markdown_table(["rows", "negatives per row", "mean positive score", "mean negative score"],
                                    [[mine["rows"], f"{mine['min_negatives']}-{mine['max_negatives']}",
                                      mine.get("mean_positive_score"), mine.get("mean_negative_score")]]))
        if mine.get("histogram"):
            parts.append(f"\n![judge scores]({_rel(mine['histogram'], run_dir)})\n")
    base = stages.get("baseline", {}).get("outputs", {})
    if base.get("enabled"):
        f = base.get("final", {})
        parts.append("\n## Baseline retriever training (in-batch InfoNCE)\n")
        parts.append(markdown_table(["steps", "final loss", "in-batch top-1", "samples/s", "model"],
                                    [[base["steps"], f.get("loss"), f.get("inbatch_top1"), f.get("samples_per_s"),
                                      f"`{base['model']}`"]]))
    fit = stages.get("judge_fit", {}).get("outputs", {})
    if fit.get("enabled") and fit.get("kind") == "dual_encoder":
        parts.append("\n## Stand-in judge: dual encoder (offline: no pretrained MLLM judge)\n")
        parts.append(f"Frozen pretrained towers (text `{fit['text_tower'].get('kind')}` "
                     f"{fit['text_tower'].get('path') or ''}, image `{fit['image_tower'].get('kind')}`) with "
                     f"{fit['method']}-fitted projection heads and a Platt calibration on held-out pairs, "
                     f"{fit['num_folds']}-fold cross-fitted: each fold's queries were scored by the judge fitted on "
                     f"another fold. Tower features for the {fit.get('feature_items')} distinct query and pool "
                     f"items (each distinct image and text encoded once) took {fit.get('feature_seconds')} s.\n")
        parts.append(markdown_table(["fold", "training queries", "held-out AUC (fitting fold)", "fit seconds",
                                     "judge"],
                                    [[k, v["queries"], v.get("heldout_auc"), v.get("seconds"), f"`{v['model']}`"]
                                     for k, v in fit["folds"].items()]))
    elif fit.get("enabled"):
        parts.append("\n## Stand-in judge (offline: no pretrained MLLM judge)\n")
        parts.append(f"The judge checkpoint was fine-tuned on pairwise Yes/No (positive vs retrieved candidates) with "
                     f"{fit['num_folds']}-fold cross-fitting: each fold's queries were scored by the judge fitted on "
                     "another fold, so no judge scored pairs it was trained on. Its scores stand in for a "
                     "Qwen2.5-VL-7B judge's; numbers below are not the paper's judge.\n")
        parts.append(markdown_table(["fold", "training queries", "steps", "final loss", "answer prob. (Yes, positive)",
                                     "answer prob. (No, negative)"],
                                    [[k, v["queries"], v["steps"], v["final"].get("loss"),
                                      v["final"].get("answer_p_pair_pos"), v["final"].get("answer_p_pair_neg")]
                                     for k, v in fit["folds"].items()]))
    tr = stages.get("train", {}).get("outputs", {})
    if tr.get("model"):
        f = tr.get("final", {})
        parts.append("\n## Embedder training\n")
        parts.append(f"Model: `{tr['model']}`; global batch {tr.get('global_batch')}\n")
        parts.append(markdown_table(["steps", "final loss", "top-1 agrees with judge", "positive ranked first",
                                     "samples/s"],
                                    [[tr["steps"], f.get("loss"), f.get("agreement_top1"), f.get("positive_top1"),
                                      f.get("samples_per_s")]]))
        if tr.get("plot"):
            parts.append(f"\n![training curve]({_rel(tr['plot'], run_dir)})\n")
    rr = stages.get("rerank", {}).get("outputs", {})
    if rr.get("enabled"):
        f = rr.get("final", {})
        parts.append("\n## Reranker training (pairwise Yes/No + listwise (i))\n")
        parts.append(f"Initial weights: `{rr.get('init')}`\n")
        parts.append(markdown_table(["steps", "final loss", "L_pair", "L_list", "P(answer) list", "model"],
                                    [[rr["steps"], f.get("loss"), f.get("loss_pair"), f.get("loss_list"),
                                      f.get("answer_p_list"), f"`{rr['model']}`"]]))
    path = run_dir / "report.md"
    path.write_text("\n".join(parts) + "\n")
    logger.info("report written to %s", path)
    return path
