"""The data stages: ``data`` (build the demo data, or locate the input files) and ``prepare`` (convert and
validate them into canonical tables, quarantining bad rows: in = out + quarantined for every table, plus the rows
held out as the development split, ``data.dev_fraction``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ...utils.markdown import markdown_table
from ...utils.plots import pyplot
from ..results import DataResult, PrepareResult
from ..stage import Context, Section, Stage

logger = logging.getLogger(__name__)


def run_data(ctx: Context) -> DataResult:
    d = ctx.cfg.data
    if d.source in ("emoji", "synthetic"):
        from ...demo.data import make_demo_data

        out = ctx.dir
        summary = make_demo_data(out, source=d.source, seed=d.seed, eval_fraction=d.eval_fraction,
                                 max_items=d.max_items, image_size=d.image_size, rows_per_shard=d.rows_per_shard)
        inputs = {"train_pairs": out / "train/pairs", "train_candidates": out / "train/candidates",
                  "eval_pairs": out / "eval/pairs", "eval_candidates": out / "eval/candidates"}
        return DataResult(format="canonical", image_root=str(out), inputs={k: str(v) for k, v in inputs.items()},
                          summary=summary)
    inputs = {}
    if d.train_path:
        inputs["train_pairs"] = str(ctx.cfg.path(d.train_path))
    if d.eval_path:
        inputs["eval_pairs"] = str(ctx.cfg.path(d.eval_path))
    for k, v in inputs.items():
        if not Path(v).exists():
            raise FileNotFoundError(f"data.{k.split('_')[0]}_path: {v} does not exist")
    return DataResult(format=d.source, eval_format=d.eval_source,
                      image_root=str(ctx.cfg.path(d.image_root)) if d.image_root else None, inputs=inputs)


def plot_accounting(rows: list[list[Any]], path: Path) -> Path | None:
    if not rows:
        return None
    plt = pyplot()
    if plt is None:
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


def report_data(s: Section) -> list[str]:
    summ = s.result.summary
    if not summ:
        return []
    items = summ.get("items", {})
    return ["\n## Data\n", f"Source: {summ.get('source')}, seed {summ.get('seed')}; items: "
            + ", ".join(f"{k} {v}" for k, v in items.items()) + ".\n"]


def run_prepare(ctx: Context) -> PrepareResult:
    from ...data.convert import import_table

    data = ctx.result("data", DataResult)
    out_root = ctx.dir
    results: dict[str, Any] = {}
    for table, src in data.inputs.items():
        final = out_root / table
        account_file = out_root / f"{table}.account.json"
        if final.is_dir() and account_file.is_file():  # finished in an earlier, interrupted run
            results[table] = json.loads(account_file.read_text())
            continue
        tmp = out_root / f".{table}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        kind = "candidates" if table.endswith("candidates") else "pairs"
        fmt = data.format if kind == "pairs" else "canonical"
        if table == "eval_pairs" and data.eval_format:
            fmt = data.eval_format
        if fmt == "mmeb-eval" and table == "train_pairs":
            raise ValueError("data.source mmeb-eval describes evaluation rows; give it as data.eval_path")
        start = time.perf_counter()
        account = import_table(src, fmt, tmp, quarantine_path=out_root / "quarantine" / f"{table}.parquet",
                               kind=kind, task=ctx.cfg.data.task, image_root=data.image_root,
                               check_images=ctx.cfg.data.check_images, rows_per_shard=ctx.cfg.data.rows_per_shard)
        os.replace(tmp, final)
        results[table] = {**account.as_dict(), "path": str(final), "seconds": round(time.perf_counter() - start, 2)}
        if table == "train_pairs" and ctx.cfg.data.dev_fraction > 0:
            results["dev_pairs"] = hold_out_dev(final, out_root / "dev_pairs", results[table], ctx.cfg.data)
        account_file.write_text(json.dumps(results[table], indent=1))
        logger.info("prepare %s: %s", table, account.summary())
    if "dev_pairs" not in results and (out_root / "dev_pairs.account.json").is_file():
        results["dev_pairs"] = json.loads((out_root / "dev_pairs.account.json").read_text())
    return PrepareResult(tables=results, image_root=data.image_root)


def hold_out_dev(train: Path, out: Path, account: dict[str, Any], d) -> dict[str, Any]:
    """Move the dev groups' rows out of the prepared training pairs into ``out`` (MMEB-eval form, see
    :mod:`unime_ray.data.dev`); the training table's account records them (in = out + quarantined + held out)."""
    from ...data.dev import dev_pairs, split_dev
    from ...data.io import iter_rows, write_rows
    from ...data.schema import PAIR_SCHEMA

    keep, dev = split_dev(list(iter_rows(train)), d.dev_fraction, d.seed)
    if not keep or not dev:
        raise ValueError(f"data.dev_fraction {d.dev_fraction} leaves {len(keep)} training and {len(dev)} dev rows: "
                         "both need some")
    tmp = train.parent / f".{train.name}.dev.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_rows(keep, tmp / "train", PAIR_SCHEMA, d.rows_per_shard)
    write_rows(dev_pairs(dev, d.dev_candidates, d.seed), tmp / "dev", PAIR_SCHEMA, d.rows_per_shard)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp / "dev", out)
    shutil.rmtree(train)
    os.replace(tmp / "train", train)
    shutil.rmtree(tmp)
    account.update(rows_out=len(keep), rows_held_out=len(dev))
    dev_account = {"rows_in": len(dev), "rows_out": len(dev), "rows_quarantined": 0, "reasons": {},
                   "path": str(out), "held_out_of": "train_pairs", "fraction": d.dev_fraction}
    (out.parent / "dev_pairs.account.json").write_text(json.dumps(dev_account, indent=1))
    logger.info("prepare dev_pairs: %d rows held out of train_pairs (%d left to train on)", len(dev), len(keep))
    return dev_account


def report_prepare(s: Section) -> list[str]:
    rows = []
    for name, acc in s.result.tables.items():
        reasons = ", ".join([f"{k}: {v}" for k, v in acc.get("reasons", {}).items()]
                            + ([f"held out as dev_pairs: {acc['rows_held_out']}"] if acc.get("rows_held_out") else [])
                            ) or "-"
        rows.append([name, acc["rows_in"], acc["rows_out"], acc["rows_quarantined"], reasons])
    if not rows:
        return []
    parts = ["\n## Row accounting (in = out + quarantined)\n",
             markdown_table(["table", "in", "out", "quarantined", "reasons"], rows)]
    plot = plot_accounting(rows, s.run_dir / "report_rows.png")
    if plot:
        parts.append(f"\n![rows]({plot.name})\n")
    return parts


DATA = Stage("data", "build the demo data, or locate the input files", run_data, result=DataResult,
             reads=tuple(f"data.{k}" for k in ("source", "eval_source", "seed", "eval_fraction", "max_items",
                                                 "image_size", "rows_per_shard", "train_path", "eval_path",
                                                 "image_root")), report=report_data, command="")
PREPARE = Stage("prepare", "convert + validate the inputs into canonical tables (bad rows quarantined)", run_prepare,
                reads=tuple(f"data.{k}" for k in ("task", "check_images", "rows_per_shard", "dev_fraction",
                                                    "dev_candidates", "seed")),
                result=PrepareResult, report=report_prepare, command="")
