"""The Python API end to end on the bundled synthetic data: embed, judge, mine hard negatives, train a few
steps, evaluate, rerank. Nothing is downloaded: the models are tiny random Qwen2-VL checkpoints built here
(a real name such as "Qwen/Qwen2-VL-2B-Instruct" works the same where it is cached).

    python examples/python_api.py [--out DIR]

About 2 minutes on 2 CPU cores; tests/test_api.py runs it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

import unime_ray
from unime_ray.demo.data import make_demo_data
from unime_ray.demo.tiny import make_tiny_models


def user_rows(table_dir: Path) -> list[dict]:
    """Pairs the way a user holds them: dicts with short column names (see unime_ray.data.inputs)."""
    return [{"task": r["task"], "query": r["query_text"], "query_image": r["query_image_path"],
             "query_instruction": r["query_instruction"], "positive": r["pos_text"],
             "positive_image": r["pos_image_path"], "positive_instruction": r["pos_instruction"],
             **({"neg_text": r["neg_text"], "neg_image_path": r["neg_image_path"],
                 "neg_instruction": r["neg_instruction"]} if r["neg_text"] else {})}
            for r in pq.read_table(table_dir).to_pylist()]


def main(out: Path) -> dict:
    data = out / "data"
    make_demo_data(data, source="synthetic", max_items=24, progress=False)   # shapes: image <-> description
    models = make_tiny_models(out / "models", seed=0)
    base = models["qwen2_vl"]

    train_pairs = user_rows(data / "train" / "pairs")
    first = next(r for r in train_pairs if r["query_image"])          # an image query and its description
    picture, caption = first["query_image"], first["positive"]

    # 1. Embed: texts, images (paths under image_root, bytes or PIL) or both, with an instruction.
    embedder = unime_ray.Embedder.from_pretrained(base, image_root=data)
    texts = embedder.encode([caption, "large blue square"], instructions="Represent the shape description:")
    images = embedder.encode(images=[picture], instructions="Represent the given shape image:")
    print("similarity of an image to two descriptions:", embedder.similarity(images, texts).round(3))

    # 2. Judge: P(Yes) that a candidate matches a query.
    judge = unime_ray.Judge.from_pretrained(models["qwen2_5_vl"], image_root=data)
    print("judge scores:", judge.score({"image": picture}, [caption, "large blue square"]).round(3))

    # 3. Mine hard negatives for each (query, positive): retrieve top-k, judge, drop s > s_pos - beta, sample.
    mined = unime_ray.mine_hard_negatives(train_pairs, retriever=embedder, judge=judge, top_k=6, num_negatives=3,
                                          image_root=data, out_dir=out / "mined")
    print(f"mined {len(mined)} of {len(train_pairs)} pairs:", mined.stats)

    # 4. Train the embedder a few steps with judge-score alignment (UniME-V2), on Ray Train.
    result = unime_ray.train_embedder(mined.table, model=base, output_dir=out / "embedder", image_root=data,
                                      max_steps=3, micro_batch_size=4, num_negatives=3, num_workers=1,
                                      lora=False, lr=1e-3)
    print(f"trained {result.steps} steps, final loss {result.final['loss']:.4f}, model at {result.model}")

    # 5. Evaluate (MMEB protocol P@1 against the distractors of each eval query), before and after.
    eval_pairs = user_rows(data / "eval" / "pairs")
    before = unime_ray.evaluate(embedder, eval_pairs, image_root=data)
    after = unime_ray.evaluate(result.model, eval_pairs, image_root=data)   # also written into its model card
    print("before training:\n" + str(before) + "\nafter training:\n" + str(after))

    # 6. Rerank an embedder's top candidates with a Yes/No reranker (here the untrained tiny judge).
    reranker = unime_ray.Reranker.from_pretrained(models["qwen2_5_vl"], image_root=data)
    hits = reranker.rerank({"image": picture}, ["large blue square", caption])
    print("reranked:", hits)
    return {"mined": len(mined), "steps": result.steps, "before": before, "after": after, "hits": hits,
            "model": result.model}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    main(args.out or Path(tempfile.mkdtemp(prefix="unime-api-")))
