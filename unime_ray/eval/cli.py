"""``unime-ray eval`` and ``unime-ray compare``: :func:`register` adds them to the main parser's subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..models.encode import add_embedder_arguments
from ..utils.pool import Pool
from ..utils.settings import add_flags, from_flags
from .config import RerankSettings

RERANK_FLAGS = ("top_k", "batch_size")   # of RerankSettings, as --rerank-top-k, --rerank-batch-size


def cmd_eval(args) -> int:
    from ..models.budget import budget_from_arguments
    from ..models.encode import embedder_spec_from_arguments
    from .encode import ItemEncoder
    from .rerank import load_reranker

    if not (args.table or args.mmeb_dir or args.retrieval or args.compositional):
        print("error: give --table or --mmeb-dir (and/or --retrieval / --compositional)", file=sys.stderr)
        return 2
    if args.top_k_dump <= 0:
        print("error: --top-k-dump must be positive", file=sys.stderr)
        return 2
    pool = from_flags(Pool, args, Pool.FLAGS)
    rerank = from_flags(RerankSettings, args, RERANK_FLAGS, prefix="rerank-")
    if pool.ray:
        from ..utils.ray_utils import init_ray

        init_ray(num_cpus=args.num_cpus)
    out = Path(args.out)
    # the eval budget (paper: --image-resize 1344 1344, 1280*28*28 cap); none given: the model's training budget
    spec = embedder_spec_from_arguments(args)
    encoder = ItemEncoder(spec, image_root=args.image_root, pool=pool, work_dir=out)
    rerank_budget = budget_from_arguments(args, args.reranker, ("rerank_resize", "rerank_min_pixels",
                                                                 "rerank_max_pixels"))
    reranker = load_reranker(args.reranker, image_root=args.image_root, batch_size=rerank.batch_size,
                             image_options=rerank_budget)
    subsets = [s for s in args.subsets.split(",") if s] if args.subsets else None
    common = dict(reranker=reranker, rerank_top_k=rerank.top_k, label=args.label)
    written = []
    if args.table or args.mmeb_dir:
        from .mmeb import evaluate_mmeb_dir, evaluate_pairs_table

        kw = dict(common, top_k_dump=args.top_k_dump, max_rows_per_dataset=args.max_rows)
        if args.mmeb_dir:
            evaluate_mmeb_dir(encoder, args.mmeb_dir, out, image_root=args.image_root, subsets=subsets,
                              check_images=not args.no_check_images, **kw)
        else:
            evaluate_pairs_table(encoder, args.table, out, image_root=args.image_root, datasets=subsets,
                                 check_images=not args.no_check_images, **kw)
        written.append(out)
    if args.retrieval:
        from .retrieval import evaluate_retrieval_sets, load_retrieval_set

        sets = [load_retrieval_set(p, image_root=args.image_root, captions_per_image=args.captions_per_image,
                                   max_images=args.max_rows, check_images=not args.no_check_images)
                for p in args.retrieval]
        evaluate_retrieval_sets(encoder, sets, out / "retrieval", **common)
        written.append(out / "retrieval")
    if args.compositional:
        from .compositional import evaluate_compositional, load_compositional

        data = load_compositional(args.compositional, image_root=args.image_root, max_rows=args.max_rows,
                                  check_images=not args.no_check_images)
        evaluate_compositional(encoder, data, out / "compositional", image_root=args.image_root,
                               reranker=reranker, label=args.label)
        written.append(out / "compositional")
    for folder in written:
        print((folder / "results.md").read_text())
    print(f"results: {', '.join(str(f / 'results.json') for f in written)}")
    return 0


def cmd_compare(args) -> int:
    from .outputs import compare_runs

    text = compare_runs(args.run_a, args.run_b)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` and ``compare`` to the main parser's subcommands (each sets ``func``)."""
    p = subparsers.add_parser("eval", help="evaluate an embedder (MMEB-form table or MMEB-eval folder, "
                                           "retrieval, compositional pairs), optionally with a reranker")
    add_embedder_arguments(p)
    p.add_argument("--label", default=None, help="name of the model in the results (default: the model path)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--table", default=None, help="canonical pair table in MMEB-eval form (task = dataset)")
    src.add_argument("--mmeb-dir", default=None, help="MMEB-eval download: one folder of Parquet/JSONL per subset")
    p.add_argument("--subsets", default=None, help="comma-separated datasets/subsets to evaluate (default: all)")
    p.add_argument("--retrieval", action="append", default=[], metavar="PATH",
                   help="a retrieval set {image_path, caption|captions} (JSONL/JSON/Parquet; repeatable)")
    p.add_argument("--captions-per-image", type=int, default=None,
                   help="retrieval: keep the first k captions per image (5: Flickr30K/COCO, 1: ShareGPT4V/Urban1K)")
    p.add_argument("--compositional", default=None, help="SugarCrepe-style folder or file")
    p.add_argument("--out", required=True, help="run folder for results.json / results.md / results.png")
    p.add_argument("--reranker", default=None, help="reranker folder: listwise rerank of the top-K (pairwise for "
                                                    "compositional pairs)")
    add_flags(p, RerankSettings, RERANK_FLAGS, prefix="rerank-")
    p.add_argument("--rerank-min-pixels", type=int, default=None,
                   help="reranker pixel floor per image (default: the checkpoint's; paper: 3136 = 4*28*28)")
    p.add_argument("--rerank-max-pixels", type=int, default=None,
                   help="reranker pixel cap per image (default: the checkpoint's; paper: 235200 = 300*28*28)")
    p.add_argument("--top-k-dump", type=int, default=10, help="embedder top-K per query written to topk.parquet")
    p.add_argument("--max-rows", type=int, default=None, help="first N rows per dataset (images per retrieval set)")
    p.add_argument("--no-check-images", action="store_true", help="skip checking that image files exist/decode")
    add_flags(p, Pool, Pool.FLAGS)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("compare", help="side-by-side table of two evaluation runs, with deltas")
    p.add_argument("run_a", metavar="RUN_A", help="run folder (or results.json)")
    p.add_argument("run_b", metavar="RUN_B", help="run folder (or results.json)")
    p.add_argument("--out", default=None, help="also write the Markdown here")
    p.set_defaults(func=cmd_compare)
