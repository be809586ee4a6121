"""Embedder training: accumulation is exact, ZeRO-2/3 on 2 Ray workers learn, a killed worker resumes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from unime_ray.data.io import write_rows
from unime_ray.data.schema import PAIR_SCHEMA, empty_row
from unime_ray.train.config import TrainConfig
from unime_ray.train.embedder import batch_loss, examples_from_rows
from unime_ray.train.trainer import TrainJob

from ..conftest import make_png


def training_rows(n=16, k=4, seed=0):
    """Queries with an informative judge: the positive scores 0.95, the negatives 0.4 down to 0.05."""
    rng = np.random.default_rng(seed)
    colours = ["red", "green", "blue", "yellow", "black", "white", "pink", "gray"]
    rows = []
    for i in range(n):
        row = empty_row(PAIR_SCHEMA)
        neg = [c for c in colours if c != colours[i % 8]]
        picks = rng.choice(len(neg), k, replace=False)
        row.update(id=f"q{i}", task="t", query_instruction="Find the colour name:", query_image=make_png(28, 28, i),
                   pos_id=f"p{i}", pos_text=f"a {colours[i % 8]} square", pos_score=0.95,
                   neg_id=[f"n{i}_{j}" for j in range(k)], neg_instruction=[""] * k,
                   neg_text=[f"a {neg[j]} square" for j in picks], neg_image=[None] * k,
                   neg_image_path=[None] * k, neg_score=list(np.linspace(0.4, 0.05, k)))
        rows.append(row)
    return rows


def test_examples_and_validation():
    ex = examples_from_rows(training_rows(2, 4), k=3)
    assert len(ex[0][1]) == 4 and ex[0][2][0] == 0.95 and ex[0][2][1:] == pytest.approx([0.4, 0.4 - 0.35 / 3, 0.4 - 0.7 / 3])
    with pytest.raises(ValueError, match="needs k=6"):
        examples_from_rows(training_rows(1, 4), k=6)
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="triplet")
    with pytest.raises(ValueError, match="DoRA"):
        TrainConfig(zero_stage=3, use_dora=True)
    with pytest.raises(ValueError, match="min_pixels"):   # the image budget is validated with the job
        TrainJob(TrainConfig(), "m", "o", images={"min_pixels": 9, "max_pixels": 4})


def test_lr_schedules_and_epoch_steps():
    from unime_ray.run.config import load_run_config
    from unime_ray.train.trainer import lr_lambda

    linear, cosine = lr_lambda(2, 10), lr_lambda(2, 10, "cosine")
    assert [linear(i) for i in (0, 1, 2, 6)] == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert [cosine(i) for i in (0, 1, 2, 6, 10)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    assert cosine(4) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.25)))   # above linear's 0.75 early on
    # max_steps unset: epochs over full global batches (micro 4 x accum 2 x workers 2 = 16); warm-up ratio rounds up
    s = TrainConfig(max_steps=None, epochs=2, micro_batch_size=4, grad_accum=2, warmup_ratio=0.03)
    assert s.steps_for(100) == 12 and s.steps_for(10) == 1
    with pytest.raises(ValueError, match="max_steps resolved"):
        s.warmup
    s.max_steps = s.steps_for(100)
    assert s.warmup == 1 and TrainConfig(max_steps=5, warmup_steps=3).steps_for(100) == 5
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")
    # the reranker's defaults are the paper's recipe; the embedder keeps fixed steps, linear
    cfg = load_run_config(preset="synthetic")
    assert (cfg.reranker.max_steps, cfg.reranker.epochs, cfg.reranker.lr_schedule, cfg.reranker.warmup_ratio) == (
        None, 1.0, "cosine", 0.03)
    assert (cfg.train.lr_schedule, cfg.train.warmup_ratio) == ("linear", 0.0) and cfg.train.max_steps is not None
    with pytest.raises(ValueError, match="warmup_steps or warmup_ratio"):
        load_run_config(preset="synthetic", overrides=["reranker.warmup_steps=10"])


def test_gradient_accumulation_equals_full_batch(tiny_models):
    """In float64 (the model and the loss alike) four micro-batches of 2 give the full batch's gradient to
    rounding; in float32 the sums' order alone moved single elements by ~1e-6 from one machine to the next."""
    from unime_ray.models import Embedder

    emb = Embedder.from_pretrained(tiny_models["qwen2_vl"], dtype=torch.float64)
    emb.model.train()
    ex = examples_from_rows(training_rows(8, 4), k=4)
    params = [p for p in emb.model.parameters() if p.requires_grad]

    def grads(chunks):
        for p in params:
            p.grad = None
        for chunk in chunks:
            loss, _ = batch_loss(emb, chunk, "judge_alignment", 0.02)
            (loss / len(chunks)).backward()
        return [p.grad.clone() for p in params if p.grad is not None]

    full = grads([ex])
    accumulated = grads([ex[i:i + 2] for i in range(0, 8, 2)])
    assert len(full) == len(accumulated) > 0
    for a, b in zip(full, accumulated):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


def mixed_rows(n=16, k=4):
    """training_rows with three queries in four text only (the colour's name): micro-batches with and without
    images, so that under data parallelism one rank can be text-only while another has images."""
    rows = training_rows(n, k)
    for i, row in enumerate(rows):
        if i % 4:
            row.update(query_image=None, query_text=row["pos_text"].split()[1])
    return rows


def one_rank_text_only(rows, plan, steps) -> bool:
    has_image = lambda step, rank: any(rows[i]["query_image"] for i in plan.rows(step, 0, rank))  # noqa: E731
    return any(has_image(s, 0) != has_image(s, 1) for s in range(steps))


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_table") / "train"
    write_rows(mixed_rows(16, 4), out, PAIR_SCHEMA, rows_per_shard=8)
    return out


def _metrics(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("zero_stage", [2, 3, pytest.param(0, marks=pytest.mark.slow)])
def test_zero_training_learns_and_exports(tiny_models, ray_local, table, tmp_path, zero_stage):
    """Two gloo workers learn and export at every ZeRO stage, also at steps where one rank's micro-batch has no
    image and the other's has: ZeRO-3 partitions the vision tower, so the text-only rank must still run it (and
    send it zero gradients) or the ranks run different collectives; before Embedder.embed_items' probe row the
    ZeRO-3 run hung (the reported Qwen-VL ZeRO-3 hang)."""
    from unime_ray.models import Embedder
    from unime_ray.train.trainer import BatchPlan, fit

    s = TrainJob(TrainConfig(max_steps=12, micro_batch_size=4, num_negatives=4, zero_stage=zero_stage, lr=5e-3,
                             lora_dropout=0.0, checkpoint_every=6, num_workers=2, use_dora=zero_stage < 3),
                 model=str(tiny_models["qwen2_vl"]), output_dir=str(tmp_path / "run"))
    assert one_rank_text_only(mixed_rows(16, 4), BatchPlan(16, 4, 1, 2, s.seed), 12)
    out = fit(table, s, name=f"zero{zero_stage}")
    m = _metrics(out["metrics"])
    assert [x["step"] for x in m] == list(range(1, 13))
    assert np.mean([x["loss"] for x in m[-3:]]) < 0.7 * np.mean([x["loss"] for x in m[:3]])
    assert (tmp_path / "run" / "training_curve.png").is_file()
    # the exported folder loads through the ordinary path and embeds; it differs from the base model
    ex = examples_from_rows(training_rows(4, 4), k=4)
    items = [q for q, _, _ in ex]
    trained = Embedder.from_pretrained(out["model"], dtype="float32").encode(items)
    base = Embedder.from_pretrained(tiny_models["qwen2_vl"], dtype="float32").encode(items)
    np.testing.assert_allclose(np.linalg.norm(trained, axis=1), 1.0, atol=1e-5)
    assert np.abs(trained - base).max() > 1e-3


def test_killed_worker_resumes_from_checkpoint(tiny_models, ray_local, table, tmp_path):
    """A worker killed at step 5 restarts the group from the step-3 checkpoint, and every step trains on the rows a
    run without a kill trains on (recorded per step in metrics.jsonl, every rank's): each epoch a fresh
    permutation of the table keyed by (seed, epoch), computed here with numpy, split into global batches, so
    every row of an epoch is trained on exactly once and none is lost or repeated across the kill."""
    from unime_ray.train.trainer import fit

    s = TrainJob(TrainConfig(max_steps=8, micro_batch_size=2, grad_accum=2, num_negatives=4, zero_stage=2,
                             lr=5e-3, checkpoint_every=3, max_failures=1, tracking="mlflow"),
                 model=str(tiny_models["qwen2_vl"]), output_dir=str(tmp_path / "run"), fail_at_step=5, seed=7)
    out = fit(table, s, name="resume")
    records = _metrics(out["metrics"])
    # steps 1-4 ran, the worker died at 5, the group restarted from the step-3 checkpoint: 4, 5, ... 8 again
    assert [x["step"] for x in records] == [1, 2, 3, 4, 4, 5, 6, 7, 8]
    assert out["steps"] == 8 and (tmp_path / "run" / ".failed_at_5").exists()
    n, batch = 16, 2 * 2 * 2                                  # table rows; micro x accum x workers
    per_epoch = n // batch
    expected = {step: np.random.default_rng([7, (step - 1) // per_epoch]).permutation(n)
                [(step - 1) % per_epoch * batch:][:batch].tolist() for step in range(1, 9)}
    assert records[3]["rows"] == records[4]["rows"] == expected[4]     # step 4 before and after the kill
    kept = {x["step"]: x["rows"] for x in records}                      # the run's steps, as resumed
    assert kept == expected
    for epoch in range(8 // per_epoch):
        seen = [r for step in range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1) for r in kept[step]]
        assert sorted(seen) == list(range(n))                          # each row once per epoch
    assert kept[1] + kept[2] != kept[3] + kept[4]                       # each epoch its own order
    assert "rows" not in out["final"]                                   # the file keeps them, the summary does not
    # train.tracking: rank 0 logged every record to MLflow from inside the loop; the restarted group went on in
    # the same run (its step 4 logged twice, as in metrics.jsonl)
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")   # the local store the trainer wrote (tracking.py)
    rec = json.loads((tmp_path / "run" / "tracking.json").read_text())
    history = MlflowClient(tracking_uri=rec["where"]).get_metric_history(rec["run_id"], "loss")
    assert sorted((h.step, h.value) for h in history) == sorted((x["step"], x["loss"]) for x in records)



def test_training_takes_the_first_k_stored_negatives_not_the_top_k_by_score():
    """The official trainer reads the first k negatives in stored (mined) order; a table whose scores do not fall
    tells that apart from the top k by score (every other fixture's scores fall)."""
    row = training_rows(1, 5)[0]
    row.update(neg_text=[f"negative {j}" for j in range(5)], neg_score=[0.1, 0.5, 0.3, 0.9, 0.2])
    (query, items, scores), = examples_from_rows([row], k=3)
    assert [it.text for it in items[1:]] == ["negative 0", "negative 1", "negative 2"]
    assert scores == pytest.approx([0.95, 0.1, 0.5, 0.3])
