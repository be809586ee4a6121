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


def write_run_report(run_dir: Path, manifest: dict[str, Any]) -> Path:
    stages = manifest.get("stages", {})
    parts = [f"# unime-ray run report\n\nRun directory: `{run_dir}`\n"]
    parts.append("## Stages\n")
    parts.append(markdown_table(["stage", "status", "seconds"],
                                [[n, s.get("status"), s.get("seconds")] for n, s in stages.items()
                                 if n != "report"]))
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
        parts.append(f"Judge: `{jud['judge']}` ({jud['backend']}, prompt {jud['prompt_version']})\n")
        parts.append(markdown_table(
            ["pairs", "scored", "quarantined", "pairs/s", "mean score (positives)", "mean score (candidates)"],
            [[jud["pairs"], jud["scored"], jud["quarantined"], jud["pairs_per_s"], jud["mean_score_positive"],
              jud["mean_score_candidates"]]]))
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
    path = run_dir / "report.md"
    path.write_text("\n".join(parts) + "\n")
    logger.info("report written to %s", path)
    return path
