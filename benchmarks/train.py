"""Embedder training: Ray Train + DeepSpeed vs a plain single-process torch loop; ZeRO memory per rank.

    python benchmarks/train.py [--steps 12] [--hidden 256] [--layers 4]

1. Throughput at equal work: the same tiny Qwen2-VL (LoRA), the same training table and the same global
   batch (8 queries x 1+6 candidates per optimizer step): one process with torch AdamW, vs Ray Train with 2
   CPU workers (gloo) under DeepSpeed ZeRO-2. Steady state: samples/s between the 2nd and the last step.
2. Memory: a larger tiny config trained in full (no LoRA, so parameters and Adam moments dominate), one step
   under ZeRO-0/2/3 with 2 workers; parameter and optimizer-state bytes held by one rank.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unime_ray.data.io import write_rows  # noqa: E402
from unime_ray.data.schema import PAIR_SCHEMA  # noqa: E402


def steady_rate(metrics: list[dict], batch: int) -> float:
    t = [m["time"] for m in metrics]
    return batch * (len(t) - 2) / (t[-1] - t[1]) if len(t) > 2 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    import torch

    from tests.test_train_embedder import training_rows  # the same synthetic table the tests train on
    from unime_ray.models.config import TinyModelConfig
    from unime_ray.demo.tiny import make_tiny_models
    from unime_ray.train.config import TrainConfig
    from unime_ray.train.embedder import batch_loss, examples_from_rows
    from unime_ray.train.trainer import fit
    from unime_ray.train.trainer import TrainJob, build_model
    from unime_ray.utils.ray_utils import init_ray

    work = Path(tempfile.mkdtemp(prefix="unime-train-bench-"))
    small = make_tiny_models(work / "small", archs=["qwen2_vl"])["qwen2_vl"]
    large = make_tiny_models(work / "large", archs=["qwen2_vl"],
                             spec=TinyModelConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                                  num_hidden_layers=args.layers, num_attention_heads=4,
                                                  num_key_value_heads=4))["qwen2_vl"]
    rows = training_rows(64, 6)
    write_rows(rows, work / "table", PAIR_SCHEMA, rows_per_shard=32)

    # 1a. plain loop: one process, global batch 8
    s = TrainJob(TrainConfig(num_negatives=6, lr=1e-3, lora_dropout=0.0), str(small), str(work / "plain"))
    from unime_ray.models.embedder import Embedder
    from unime_ray.models.processor import VLProcessor

    model = build_model(s).train()
    emb = Embedder(model, VLProcessor.from_pretrained(small), "official")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    examples = examples_from_rows(rows, 6)
    times = []
    for step in range(args.steps):
        batch = [examples[(step * 8 + j) % len(examples)] for j in range(8)]
        loss, _ = batch_loss(emb, batch, "judge_alignment", 0.02)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter())
    plain = 8 * (len(times) - 2) / (times[-1] - times[1])

    # 1b. Ray Train + DeepSpeed ZeRO-2, 2 workers x micro 4 = global 8
    init_ray(num_cpus=2, include_dashboard=False)
    s = TrainJob(TrainConfig(num_negatives=6, lr=1e-3, max_steps=args.steps, micro_batch_size=4, num_workers=2,
                             zero_stage=2, checkpoint_every=args.steps, lora_dropout=0.0), str(small), str(work / "ray"))
    out = fit(work / "table", s, name="bench")
    metrics = [json.loads(line) for line in open(out["metrics"])]
    ray_rate = steady_rate(metrics, 8)

    # 2. memory per rank under ZeRO-0/2/3 (full fine-tuning of the larger config)
    mem = {}
    for zero in (0, 2, 3):
        s = TrainJob(TrainConfig(num_negatives=6, lr=1e-4, max_steps=2, micro_batch_size=2, num_workers=2,
                                 zero_stage=zero, lora=False, checkpoint_every=2),
                     str(large), str(work / f"mem{zero}"), report_memory=True)
        out = fit(work / "table", s, name=f"mem{zero}")
        last = [json.loads(line) for line in open(out["metrics"])][-1]
        mem[zero] = (last["param_bytes_per_rank"], last["optimizer_bytes_per_rank"])
    n_params = sum(p.numel() for p in build_model(TrainJob(TrainConfig(lora=False), str(large),
                                                           str(work))).parameters())

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; {args.steps} steps, "
          f"global batch 8 queries x 7 candidates\n")
    print("| path | samples/s (steady state) | time vs plain |")
    print("|---|---|---|")
    print(f"| plain torch loop, 1 process | {plain:.2f} | 1.00x |")
    print(f"| Ray Train + DeepSpeed ZeRO-2, 2 workers | {ray_rate:.2f} | {plain / ray_rate:.2f}x |")
    print(f"\nfull fine-tuning, {n_params:,} parameters (hidden {args.hidden}, {args.layers} layers), 2 workers:\n")
    print("| ZeRO | parameter MiB / rank | optimizer-state MiB / rank | total MiB / rank | vs ZeRO-0 |")
    print("|---|---|---|---|---|")
    base = sum(mem[0])
    for zero, (p, o) in mem.items():
        print(f"| {zero} | {p / 2**20:.2f} | {o / 2**20:.2f} | {(p + o) / 2**20:.2f} | {(p + o) / base:.2f} |")


if __name__ == "__main__":
    main()
