"""Judge throughput: the batched / prefix-reuse transformers backend vs the naive one-call-per-pair baseline.

    python benchmarks/judge.py [--queries 24] [--candidates 20] [--batch-size 16] [--model DIR]

Same tiny Qwen2.5-VL (built offline, or --model), same pairs; every query has an image and ~--candidates
candidates (text and image), like the mining workload (a query with its ~51 candidates). Reports pairs/s
of: naive (one model(...) per pair), batched whole prompts, batched with query-prefix KV reuse, and the
judge stage in one process (expand + score + write), plus the largest score difference between paths.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unime_ray.data.schema import Item  # noqa: E402
from unime_ray.judge.hf_backend import TransformersJudge  # noqa: E402


def png(seed: int, size: int = 56) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def workload(n_queries: int, n_cands: int) -> list[tuple[Item, Item]]:
    pairs = []
    for q in range(n_queries):
        query = Item(instruction="Represent the given image with the following question:",
                     text=f"What is object number {q}?", image=png(q))
        for c in range(n_cands):
            cand = (Item(image=png(1000 + q * n_cands + c), instruction="Represent the given image")
                    if c % 4 == 0 else Item(text=f"candidate answer {c} for query {q}, a small red shape"))
            pairs.append((query, cand))
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=24)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", default=None, help="a Qwen2.5-VL folder (default: a tiny one built here)")
    args = ap.parse_args()

    import torch

    tmp = tempfile.mkdtemp(prefix="unime-judge-bench-")
    model = args.model
    if model is None:
        from unime_ray.demo.tiny import make_tiny_models

        model = str(make_tiny_models(tmp, archs=["qwen2_5_vl"])["qwen2_5_vl"])
    pairs = workload(args.queries, args.candidates)
    judge = TransformersJudge(model, dtype="float32", batch_size=args.batch_size)
    judge.score(pairs[:4])  # warm-up

    rows = []
    t = time.perf_counter()
    naive = np.array([judge.score_one(q, c) for q, c in pairs])
    t_naive = time.perf_counter() - t
    rows.append(("naive: one model(...) per pair", t_naive, 0.0))
    for reuse, name in ((False, "batched whole prompts"), (True, "batched + query-prefix KV reuse")):
        judge.prefix_reuse = reuse
        t = time.perf_counter()
        s = judge.score(pairs)
        rows.append((name, time.perf_counter() - t, float(np.abs(s - naive).max())))

    # The stage: pairs-to-judge table -> score shards (read, score, write), in this process.
    import pyarrow as pa

    from unime_ray.data.io import write_table_atomic
    from unime_ray.judge.stage import JUDGE_PAIRS_SCHEMA, JudgeSpec, score_pairs
    from unime_ray.utils.pool import Pool

    cols = {name: [] for name in JUDGE_PAIRS_SCHEMA.names}
    for i, (q, c) in enumerate(pairs):
        cols["query_id"].append(f"q{i // args.candidates}")
        cols["cand_id"].append(f"c{i}")
        cols["is_positive"].append(False)
        for prefix, item in (("query_", q), ("cand_", c)):
            cols[f"{prefix}instruction"].append(item.instruction)
            cols[f"{prefix}text"].append(item.text)
            cols[f"{prefix}image"].append(item.image)
            cols[f"{prefix}image_path"].append(item.image_path)
    per_shard = args.candidates * 8
    for j, lo in enumerate(range(0, len(pairs), per_shard)):
        write_table_atomic(pa.table({k: v[lo:lo + per_shard] for k, v in cols.items()}, schema=JUDGE_PAIRS_SCHEMA),
                           Path(tmp) / "pairs" / f"part-{j:05d}.parquet")
    spec = JudgeSpec(model=model, judge={"dtype": "float32", "batch_size": args.batch_size})
    stats = score_pairs(Path(tmp) / "pairs", Path(tmp) / "scores", spec, Pool.in_process(per_shard))
    rows.append(("judge stage, one process (read + score + write)", stats["seconds"], float("nan")))

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; model {Path(model).name}; {args.queries} queries x "
          f"{args.candidates} candidates = {len(pairs)} pairs; batch {args.batch_size}\n")
    print("| path | seconds | pairs/s | speed-up vs naive | max abs score diff vs naive |")
    print("|---|---|---|---|---|")
    for name, sec, diff in rows:
        d = "" if diff != diff else f"{diff:.1e}"
        print(f"| {name} | {sec:.2f} | {len(pairs) / sec:,.1f} | {t_naive / sec:.1f}x | {d} |")


if __name__ == "__main__":
    main()
