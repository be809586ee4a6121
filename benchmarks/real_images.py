"""The demo's settings on real photographs the project was never tuned on: Fashion-MNIST in MMEB form.

No real image-caption set installs offline (see ../shared/reference/offline_data.md), but Fashion-MNIST does
(Debian package ``dataset-fashion-mnist``: Zalando product photos, 10 classes). This script writes a sample
of it as MMEB files, the way MMEB ships its classification sets (ImageNet-1K, N24News, ...):

* ``OUT/train/fashion_cls.jsonl``, MMEB-train rows: ``qry`` = the image marker and the instruction,
  ``qry_image_path``, ``pos_text`` = the class name;
* ``OUT/eval/fashion_cls.jsonl``, MMEB-eval rows: the image query and all 10 class names, ground truth first
  (chance P@1 = 10 %).

Then ``--run`` runs the whole pipeline with the demo preset's settings on them, importing both files with the
project's MMEB converters (``data.source: mmeb-train``, ``data.eval_source: mmeb-eval``):

    apt-get install dataset-fashion-mnist
    python benchmarks/real_images.py --out /tmp/fashion --run [--run-dir /tmp/fashion-run]

Nothing in the demo preset was chosen for this data; the report (``RUN_DIR/report.md``) holds the comparison.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
INSTRUCTION = "Represent the given image for classification"   # MMEB's wording for its classification sets
TASK = "fashion_cls"


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N]) of the ``train`` or ``t10k`` split."""
    images, labels = DATA_DIR / f"{split}-images-idx3-ubyte.gz", DATA_DIR / f"{split}-labels-idx1-ubyte.gz"
    if not images.is_file():
        raise SystemExit(f"{images} not found: install the Debian package dataset-fashion-mnist")
    x = np.frombuffer(gzip.open(images).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    y = np.frombuffer(gzip.open(labels).read(), np.uint8, offset=8)
    return x, y


def write_sets(out: Path, n_train: int, n_eval: int, seed: int) -> dict[str, Path]:
    """Sample class-balanced training and eval images (train split and test split), write PNGs and the two
    MMEB files; returns their paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = {}
    for split, source, n, fmt in (("train", "train", n_train, "mmeb-train"), ("eval", "t10k", n_eval, "mmeb-eval")):
        x, y = load_split(source)
        per_class = n // len(CLASSES)
        picked = np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False)
                                 for c in range(len(CLASSES))])
        rng.shuffle(picked)
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        records = []
        for i in picked:
            rel = f"images/{split}/{source}-{i:05d}.png"
            Image.fromarray(x[i]).convert("RGB").save(out / rel)
            label = CLASSES[y[i]]
            query = f"<|image_1|>\n{INSTRUCTION}"
            if fmt == "mmeb-train":
                records.append({"qry": query, "qry_image_path": rel, "pos_text": label, "pos_image_path": ""})
            else:
                others = [c for c in CLASSES if c != label]
                records.append({"qry_text": query, "qry_img_path": rel, "tgt_text": [label] + others,
                                "tgt_img_path": [""] * len(CLASSES)})
        path = out / split / f"{TASK}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        paths[split] = path
        print(f"{split}: {len(records)} rows ({per_class} per class) -> {path}")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/fashion-mmeb", help="where the images and MMEB files go")
    p.add_argument("--train", type=int, default=2000, help="training images (from the train split)")
    p.add_argument("--eval", type=int, default=500, help="eval images (from the test split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", action="store_true", help="then run the pipeline with the demo preset on them")
    p.add_argument("--run-dir", default=None, help="the pipeline's run dir (default OUT/run)")
    p.add_argument("-o", "--override", action="append", default=[], help="more pipeline overrides")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    paths = write_sets(out, args.train, args.eval, args.seed)
    cmd = [sys.executable, "-m", "unime_ray.cli", "pipeline", "--preset", "demo",
           "--run-dir", str(Path(args.run_dir or out / "run").resolve()),
           "-o", "data.source=mmeb-train", "-o", f"data.train_path={paths['train']}",
           "-o", f"data.eval_path={paths['eval']}", "-o", "data.eval_source=mmeb-eval",
           "-o", f"data.image_root={out}"]
    for o in args.override:
        cmd += ["-o", o]
    print(" ".join(cmd))
    if not args.run:
        return 0
    return subprocess.call(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})


if __name__ == "__main__":
    sys.exit(main())
