"""Real-size, random-weight GPU throughput of the three model workloads (the prepared script for a lent GPU).

    python benchmarks/gpu_throughput.py [--cases judge,embedder,llava] [--out gpu_results.json]
    python benchmarks/gpu_throughput.py --tiny      # the same code on tiny models on CPU (a dry run)

Needs torch, transformers, peft and pydantic (imported by ``unime_ray.models``; carry its wheel where it is
missing); no Ray, no vLLM, no tokenizer: token ids are random, so nothing is downloaded. Models are built from the configs shipped in unime_ray/models/configs with random weights, in
bf16 on the GPU, and run through the project's own input code (``unime_ray.models.inputs``) and losses:

* ``judge``: Qwen2.5-VL-7B prefill of pairwise judge prompts (two 672x672 images = 2 x 576 visual tokens +
  ~110 text tokens), the answer logits only (``logits_to_keep=1``), as the transformers judge backend runs it:
  pairs/s per batch size and peak memory;
* ``embedder``: Qwen2-VL-2B training step with DoRA r16 (the paper's LoRA) and gradient checkpointing, each
  query with its positive and 8 hard negatives (10 sequences of one 672x672 image + ~40 text tokens), symmetric
  KL to random judge scores at t = 0.02, AdamW: queries/s per micro batch and peak memory;
* ``llava``: LLaVA-OneVision-7B embedding forward of 336x336 images (anyres tiles): items/s and peak memory.

Each case reports its steady state (after warm-up iterations), and stops at the first batch size that runs out of
memory (recorded as OOM).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unime_ray.models.backbone import build_random_backbone, load_backbone  # noqa: E402
from unime_ray.models.inputs import forward_kwargs, positions  # noqa: E402

REAL = {"judge": "Qwen/Qwen2.5-VL-7B-Instruct", "embedder": "Qwen/Qwen2-VL-2B-Instruct",
        "llava": "llava-hf/llava-onevision-qwen2-7b-ov-hf"}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _timed(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _qwen_image(config, tokens: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixel patches and the grid of one square image of ``tokens`` merged visual tokens."""
    v = config.vision_config
    merge = getattr(v, "spatial_merge_size", 2)
    side = merge * int(math.isqrt(tokens))
    t = getattr(v, "temporal_patch_size", 2)
    dim = getattr(v, "in_chans", getattr(v, "in_channels", 3)) * t * v.patch_size ** 2
    return torch.randn(side * side, dim, generator=generator), torch.tensor([1, side, side])


def _qwen_sequence(config, text_tokens: list[int], tokens: int, images: int, generator):
    """ids with ``images`` vision blocks of ``tokens`` pads between chunks of random text."""
    pad, start, end = config.image_token_id, config.vision_start_token_id, config.vision_end_token_id
    ids, pix, grids = [], [], []
    chunks = len(text_tokens)
    for i in range(chunks):
        ids += torch.randint(100, 150000 if config.text_config.vocab_size > 150000 else
                             config.text_config.vocab_size - 10, (text_tokens[i],), generator=generator).tolist()
        if i < images:
            p, g = _qwen_image(config, tokens, generator)
            ids += [start] + [pad] * tokens + [end]
            pix.append(p)
            grids.append(g)
    return ids, pix, grids


def _batch(model, seqs, device) -> tuple[dict, int]:
    """Forward kwargs of left-padded sequences (the project's positions and input assembly) and their width."""
    width = max(len(s[0]) for s in seqs)
    ids = torch.tensor([[0] * (width - len(s[0])) + s[0] for s in seqs])
    mask = torch.tensor([[0] * (width - len(s[0])) + [1] * len(s[0]) for s in seqs])
    pix = [p.to(model.dtype) for s in seqs for p in s[1]]
    grids = [gr for s in seqs for gr in s[2]]
    pad = model.config.image_token_id
    return forward_kwargs(model, pad, ids, mask, positions(model, pad, ids, mask, grids), pix, grids, device), width


def bench_judge(model, device, batch_sizes, tokens: int, warmup: int, iters: int) -> list[dict]:
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in batch_sizes:
        kwargs, width = _batch(model, [_qwen_sequence(cfg, [70, 30, 10], tokens, 2, g) for _ in range(b)], device)
        _reset_peak(device)
        try:
            with torch.inference_mode():
                sec = _timed(lambda: model(use_cache=False, logits_to_keep=1, **kwargs), device, warmup, iters)
        except torch.OutOfMemoryError:
            rows.append({"case": "judge", "batch": b, "oom": True})
            break
        rows.append({"case": "judge", "batch": b, "tokens_per_pair": width, "pairs_per_s": b / sec,
                     "peak_gib": _peak_gib(device)})
        print(rows[-1], flush=True)
    return rows


def bench_embedder(model, device, micro_batches, tokens: int, negatives: int, warmup: int, iters: int,
                   lora: bool) -> list[dict]:
    import torch.nn.functional as F

    from unime_ray.models.embedder import language_core, last_token_pool
    from unime_ray.train.losses import judge_alignment_loss

    if lora:
        from unime_ray.models.lora import LoraSettings, apply_lora

        model = apply_lora(model, LoraSettings())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    group = 2 + negatives                            # query, positive, negatives
    rows = []
    for q in micro_batches:
        kwargs, width = _batch(model, [_qwen_sequence(cfg, [25, 15], tokens, 1, g) for _ in range(q * group)], device)
        scores = torch.rand(q, 1 + negatives, generator=g).to(device)

        def step():
            out = language_core(model)(use_cache=False, return_dict=True, **kwargs)
            emb = F.normalize(last_token_pool(out.last_hidden_state, kwargs["attention_mask"]).float(), dim=-1)
            emb = emb.view(q, group, -1)
            sim = torch.einsum("qd,qkd->qk", emb[:, 0], emb[:, 1:])
            loss = judge_alignment_loss(sim, scores, temperature=0.02)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        _reset_peak(device)
        try:
            sec = _timed(step, device, warmup, iters)
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            rows.append({"case": "embedder", "micro_batch": q, "oom": True})
            break
        rows.append({"case": "embedder", "micro_batch": q, "sequences": q * group, "tokens_per_sequence": width,
                     "queries_per_s": q / sec, "peak_gib": _peak_gib(device), "lora": lora})
        print(rows[-1], flush=True)
    return rows


def bench_llava(model, device, batch_sizes, size: int, warmup: int, iters: int) -> list[dict]:
    from unime_ray.models.llava_onevision import image_feature_count

    cfg = model.config
    tile, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    count = image_feature_count(size, size, tile=tile, patch=patch, pinpoints=cfg.image_grid_pinpoints,
                                aspect_ratio=cfg.vision_aspect_ratio, select_strategy=cfg.vision_feature_select_strategy)
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    tiles = image_size_to_num_patches((size, size), cfg.image_grid_pinpoints, tile)
    g = torch.Generator().manual_seed(2)
    rows = []
    for b in batch_sizes:
        text = torch.randint(100, cfg.text_config.vocab_size - 200, (b, 40), generator=g)
        ids = torch.cat([text[:, :5], torch.full((b, count), cfg.image_token_id), text[:, 5:]], dim=1)
        inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                  "pixel_values": torch.randn(b, tiles, 3, tile, tile, generator=g).to(device, model.dtype),
                  "image_sizes": torch.tensor([[size, size]] * b).to(device)}
        _reset_peak(device)
        try:
            with torch.inference_mode():
                sec = _timed(lambda: model.model(**inputs, use_cache=False), device, warmup, iters)
        except torch.OutOfMemoryError:
            rows.append({"case": "llava", "batch": b, "oom": True})
            break
        rows.append({"case": "llava", "batch": b, "image_tokens": count, "tiles": tiles, "items_per_s": b / sec,
                     "peak_gib": _peak_gib(device)})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="judge,embedder,llava")
    ap.add_argument("--tiny", action="store_true", help="tiny models on CPU: check the script, measure nothing")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "tiny": args.tiny}
    print(info, flush=True)
    tiny = {}
    if args.tiny:
        from unime_ray.demo.tiny import make_tiny_models

        tiny = make_tiny_models(tempfile.mkdtemp(prefix="gpu-bench-"), seed=0,
                                archs=["qwen2_vl", "qwen2_5_vl", "llava_onevision"])

    def build(case: str):
        start = time.perf_counter()
        if args.tiny:
            key = {"judge": "qwen2_5_vl", "embedder": "qwen2_vl", "llava": "llava_onevision"}[case]
            model = load_backbone(tiny[key], dtype="float32", device="cpu")
        else:
            model = build_random_backbone(REAL[case], device=device, dtype="bfloat16").eval()
        print(f"{case}: built in {time.perf_counter() - start:.1f}s", flush=True)
        return model

    rows: list[dict] = []
    small = args.tiny
    for case in cases:
        model = build(case)
        try:
            if case == "judge":
                rows += bench_judge(model, device, [1, 2] if small else [1, 4, 8, 16, 32], 4 if small else 576,
                                    args.warmup, args.iters)
            elif case == "embedder":
                rows += bench_embedder(model, device, [1] if small else [1, 2, 4, 8], 4 if small else 576, 8,
                                       args.warmup, args.iters, lora=True)
            elif case == "llava":
                rows += bench_llava(model, device, [1, 2] if small else [1, 4, 8, 16], 56 if small else 336,
                                    args.warmup, args.iters)
            else:
                raise SystemExit(f"unknown case {case!r}")
        finally:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result = {"info": info, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
