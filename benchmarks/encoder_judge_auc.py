"""Positive-vs-candidate AUC of the cross-fitted dual-encoder judge on a run's judged pairs.

Needs a run directory whose ``prepare`` and ``retrieve`` stages are complete (the pairs the judge stage would
score: each training query's positive plus its retrieved candidates), e.g. the demo's:

    unime-ray pipeline --preset demo --run-dir /tmp/demo --stages data,models,prepare,baseline,retrieve
    python benchmarks/encoder_judge_auc.py --run-dir /tmp/demo [--method ridge] [--pool multi] ...

Cross-fitting exactly as the pipeline's judge_fit/judge stages do: queries are split into folds by content
group (:func:`unime_ray.judge.crossfit.query_folds`), the judge fitted on fold ``f`` (its queries' positives and
top retrieved candidates, :func:`~unime_ray.judge.crossfit.build_fit_tables`) scores the queries of fold
``f+1 mod k``. Prints the AUC per task and overall, and fit/score times. Features are cached under
``--cache`` (default ``RUN_DIR/encoder_judge_bench/features``), so a second run with other head settings
skips the towers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--negatives-per-query", type=int, default=8)
    p.add_argument("--method", default="contrastive", choices=["contrastive", "ridge"])
    p.add_argument("--pool", default="multi", choices=["final", "multi"], help="EfficientNet pooling")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--ridge-alpha", type=float, default=1000.0)
    p.add_argument("--no-hard-negatives", action="store_true", help="fit on in-batch negatives only")
    p.add_argument("--text-input", default="text", choices=["text", "prompt"])
    p.add_argument("--cache", default=None)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)

    from unime_ray.data.io import iter_rows
    from unime_ray.data.schema import item_from_row
    from unime_ray.judge.crossfit import build_fit_tables, query_folds, scoring_judge
    from unime_ray.judge.encoder.fit import EncoderFitSettings, examples_from_table, fit_encoder_judge
    from unime_ray.judge.encoder.towers import FeatureStore

    run = Path(args.run_dir).resolve()
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    prepared, retrieved = stages["prepare"]["outputs"], stages["retrieve"]["outputs"]
    pairs_table = prepared["tables"]["train_pairs"]["path"]
    image_root = prepared.get("image_root")
    work = run / "encoder_judge_bench"
    cache = args.cache or str(work / "features")
    store = FeatureStore(cache)
    settings = EncoderFitSettings(method=args.method, dim=args.dim, steps=args.steps, lr=args.lr,
                                  weight_decay=args.weight_decay, ridge_alpha=args.ridge_alpha,
                                  text_input=args.text_input, hard_negatives=not args.no_hard_negatives,
                                  image_tower={"kind": "efficientnet-lite0", "pool": args.pool})

    tables = build_fit_tables(retrieved["candidates_table"], pairs_table, retrieved["candidate_pool"],
                              work / "tables", args.folds, args.negatives_per_query, seed=0)
    assignment = query_folds(pairs_table, args.folds, seed=0)
    # the judged pairs: each query's positive, then its retrieved candidates (what stage_judge expands)
    pool = {r["id"]: item_from_row(r) for r in iter_rows(retrieved["candidate_pool"])}
    cands = {r["query_id"]: r["cand_ids"] or [] for r in iter_rows(retrieved["candidates_table"])}
    queries = {r["id"]: r for r in iter_rows(pairs_table)}

    judges, fit_s = {}, {}
    for f, info in tables.items():
        t0 = time.perf_counter()
        ex = examples_from_table(info["table"])
        judges[f] = fit_encoder_judge(ex, settings, image_root=image_root, store=store, name=f"fold{f}")
        fit_s[f] = time.perf_counter() - t0
        store.flush()
        print(f"fold {f}: fitted on {info['queries']} queries in {fit_s[f]:.1f} s, held-out AUC "
              f"{judges[f].config['fit']['heldout_auc']:.3f} (best step {judges[f].config['fit'].get('best_step')})",
              flush=True)

    per_task = defaultdict(lambda: [0.0, 0])
    probs_pos, probs_neg, n_pairs, n_bad = [], [], 0, 0
    t0 = time.perf_counter()
    for f in range(args.folds):
        judge = judges[scoring_judge(f, args.folds)]
        qids = [q for q in cands if assignment.get(q) == f and cands[q]]
        pairs, owners = [], []
        for qid in qids:
            row = queries[qid]
            q = item_from_row(row, "query_")
            pairs.append((q, pool[row["pos_id"]]))
            owners.append((qid, True))
            for c in cands[qid]:
                pairs.append((q, pool[c]))
                owners.append((qid, False))
        scores, errors = judge.score_or_errors(pairs)
        n_pairs += len(pairs)
        n_bad += sum(e is not None for e in errors)
        pos = {qid: s for (qid, is_pos), s in zip(owners, scores) if is_pos}
        for (qid, is_pos), s in zip(owners, scores):
            if is_pos:
                probs_pos.append(s)
                continue
            probs_neg.append(s)
            d = pos[qid] - s
            w = 1.0 if d > 0 else 0.5 if d == 0 else 0.0
            task = queries[qid]["task"]
            for key in (task, "all"):
                per_task[key][0] += w
                per_task[key][1] += 1
    score_s = time.perf_counter() - t0
    aucs = {k: round(v[0] / v[1], 4) for k, v in sorted(per_task.items())}
    import numpy as np

    out = {"aucs": aucs, "pairs": n_pairs, "bad_pairs": n_bad, "fit_seconds": {str(k): round(v, 1) for k, v in fit_s.items()},
           "score_seconds": round(score_s, 1), "pairs_per_s": round(n_pairs / score_s, 1),
           "mean_prob_positive": round(float(np.nanmean(probs_pos)), 4),
           "mean_prob_candidate": round(float(np.nanmean(probs_neg)), 4),
           "settings": {k: v for k, v in vars(args).items() if k not in ("run_dir", "json", "cache")},
           "heldout_auc": {str(f): j.config["fit"]["heldout_auc"] for f, j in judges.items()}}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
