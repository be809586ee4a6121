"""Does a reranker help? Reranker variants trained on a finished run's mined table, each measured by the guard.

Every variant is trained with ``unime_ray.train_reranker`` on the run's mined table and measured with the
pipeline's own guard (``unime_ray.eval.rerank.validate_reranker``) on the run's dev split against the run's
UniME-V2 embedder: P@1 of the embedder alone and of listwise, pairwise and fused reranking of its top-5, the
fused weight chosen on half the dev rows, the other half deciding. One run per variant.

    unime-ray pipeline --preset demo --run-dir RUN          # data.dev_fraction > 0 (the demo's 0.1)
    python benchmarks/reranker_measures.py --run-dir RUN [--variants demo,epoch,baseline-init,pairwise]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = {
    # name: (initial weights: "judge" (models.judge) or "baseline" (the run's trained retriever), overrides)
    "demo": ("judge", {}),
    "epoch": ("judge", {"max_steps": None, "epochs": 1}),
    "baseline-init": ("baseline", {"max_steps": None, "epochs": 1}),
    "pairwise": ("judge", {"max_steps": None, "epochs": 1, "list_weight": 0.0}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None, help="where the variants go (default RUN/reranker-measures)")
    args = ap.parse_args()
    import yaml

    from unime_ray import train_reranker
    from unime_ray.run.config import RunConfig
    from unime_ray.eval.guard import validate_reranker
    from unime_ray.eval.rerank import load_reranker
    from unime_ray.models.encode import EmbedderSpec
    from unime_ray.train.config import RerankerTrainConfig

    run = Path(args.run_dir).resolve()
    cfg = RunConfig(**yaml.safe_load((run / "config.yaml").read_text()))
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    out = Path(args.out or run / "reranker-measures")
    table = stages["mine"]["outputs"]["training_table"]
    image_root = stages["prepare"]["outputs"]["image_root"]
    dev = stages["prepare"]["outputs"]["tables"]["dev_pairs"]["path"]
    embedder = EmbedderSpec(model=stages["train"]["outputs"]["model"], dtype="float32", image_root=image_root)
    rows = []
    for name in args.variants.split(","):
        init, changes = VARIANTS[name]
        model = (cfg.model_ref(cfg.models.judge) if init == "judge" else stages["baseline"]["outputs"]["model"])
        settings = RerankerTrainConfig(**{**cfg.reranker.model_dump(include=set(RerankerTrainConfig.model_fields)),
                                          **changes})
        t0 = time.perf_counter()
        trained = train_reranker(table, settings, model=model, output_dir=out / name, seed=cfg.seed,
                                 image_root=image_root)
        t1 = time.perf_counter()
        reranker = load_reranker(trained.model, image_root=image_root, dtype="float32", batch_size=16)
        v = validate_reranker(embedder, reranker, dev, out / name / "validation", mode=cfg.eval.rerank.mode,
                              top_k=cfg.eval.rerank.top_k, image_root=image_root, embedder_label="unime-v2")
        rows.append({"variant": name, "init": init, "steps": trained.steps, "train_s": round(t1 - t0, 1),
                     "loss_pair": trained.final.get("loss_pair", float("nan")),
                     "loss_list": trained.final.get("loss_list", float("nan")),
                     **{k: getattr(v, k) for k in ("rows", "embedder_p1", "p1", "weight", "gain", "lo", "hi",
                                                    "one_slot", "used")}})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| variant | init | steps | train s | L_pair | L_list | embedder P@1 | listwise | pairwise | fused (w) | "
          "listwise gain [95 %] | used |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['init']} | {r['steps']} | {r['train_s']} | {r['loss_pair']:.3f} | "
              f"{r['loss_list']:.3f} | {r['embedder_p1']:.2f} | {r['p1']['listwise']:.2f} | "
              f"{r['p1']['pairwise']:.2f} | "
              f"{r['p1']['fused']:.2f} ({r['weight']}) | {r['gain']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]"
              f"{' (one slot)' if r['one_slot'] else ''} | {r['used']} |")


if __name__ == "__main__":
    main()
