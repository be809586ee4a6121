"""The trainer trains as a plain single-process loop does: the same data order every worker count, the same loss
sequence and weights as a plain torch loop over the global batch, train-time embeddings equal to the exported
model's, and enough fit to memorise a small set (the checks that would have caught issue 25's two defects)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unime_ray.data.io import write_rows
from unime_ray.data.schema import PAIR_SCHEMA, Item, empty_row
from unime_ray.train.config import TrainConfig
from unime_ray.train.trainer import BatchPlan, TrainJob, epoch_order

from ..conftest import make_png


def test_batch_plan_reshuffles_every_epoch_and_splits_global_batches():
    plan = BatchPlan(num_rows=50, micro=4, accum=2, world=2, seed=3)
    assert plan.steps_per_epoch == 3                      # 50 // 16, the partial batch dropped
    epoch = lambda e: np.concatenate([plan.rows(s, m, r) for s in range(3 * e, 3 * e + 3)
                                      for m in range(2) for r in range(2)])
    e0, e1 = epoch(0), epoch(1)
    assert len(set(e0)) == len(e0) == 48 and len(set(e1)) == 48
    assert not np.array_equal(e0, e1)                     # a new order (and new batch-mates) every epoch
    assert np.array_equal(e0, epoch_order(50, 3, 0)[:48])
    assert np.array_equal(epoch_order(50, 3, 1), epoch_order(50, 3, 1))
    # 2 workers x micro 4 see exactly the micro-batches of 1 worker x micro 8, rank 0's rows first
    one = BatchPlan(num_rows=50, micro=8, accum=2, world=1, seed=3)
    for step in (0, 4):
        for m in range(2):
            assert np.array_equal(np.concatenate([plan.rows(step, m, 0), plan.rows(step, m, 1)]), one.rows(step, m, 0))
    with pytest.raises(ValueError, match="fewer than one global batch of 16"):
        BatchPlan(num_rows=15, micro=4, accum=2, world=2, seed=0)


WORDS = ["red", "green", "blue", "yellow", "black", "white", "pink", "gray", "brown", "orange", "purple", "cyan"]


def pair_rows(n=24, shared_label_every=0):
    """Image -> caption pairs (and, with ``shared_label_every``, some rows sharing a positive text)."""
    rows = []
    for i in range(n):
        row = empty_row(PAIR_SCHEMA)
        text = f"a {WORDS[i % 12]} {WORDS[(i // 12) % 12]} tile"
        if shared_label_every and i % shared_label_every == 0:
            text = "a shared label"
        row.update(id=f"q{i}", task="t", query_instruction="Find the caption:", query_image=make_png(28, 28, i),
                   pos_id=f"p{i}", pos_text=text, neg_id=[], neg_instruction=[], neg_text=[], neg_image=[],
                   neg_image_path=[], neg_score=[])
        rows.append(row)
    return rows


def plain_loop_setup(job):
    """(model, embedder, parameters, AdamW, the trainer's schedule) of one plain process from the job's init."""
    from unime_ray.models.embedder import Embedder
    from unime_ray.models.processor import VLProcessor
    from unime_ray.train.trainer import build_model, lr_lambda

    s = job.settings
    torch.manual_seed(job.seed)
    model = build_model(job).train()
    emb = Embedder(model, VLProcessor.from_pretrained(job.model), job.input_format, device="cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    return model, emb, params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.warmup, s.max_steps,
                                                                                      s.lr_schedule))


def plain_loop_reference(job, table_rows, steps):
    """One process, the global batch at once, plain torch: embeddings, in-batch InfoNCE with the shared-positive
    mask written out, AdamW, clipping at 1.0, the trainer's schedule. Returns (losses, final state dict)."""
    from unime_ray.train.embedder import examples_from_rows

    s = job.settings
    model, emb, params, opt, sched = plain_loop_setup(job)
    plan = BatchPlan(len(table_rows), s.global_batch, 1, 1, job.seed)   # the global batch, one process
    losses = []
    for step in range(steps):
        rows = [table_rows[i] for i in plan.rows(step, 0, 0)]
        ex = examples_from_rows(rows, 0)
        q = emb.embed_inputs(emb.prepare([e[0] for e in ex]))
        p = emb.embed_inputs(emb.prepare([e[1][0] for e in ex]))
        texts = [r["pos_text"] for r in rows]
        same = torch.tensor([[a == b and i != j for j, b in enumerate(texts)] for i, a in enumerate(texts)])
        loss = F.cross_entropy((q @ p.T / s.temperature).masked_fill(same, float("-inf")), torch.arange(len(rows)))
        if s.symmetric:
            back = F.cross_entropy((p @ q.T / s.temperature).masked_fill(same, float("-inf")), torch.arange(len(rows)))
            loss = 0.5 * (loss + back)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def parity_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "pairs"
    rows = pair_rows(24, shared_label_every=5)
    write_rows(rows, out, PAIR_SCHEMA, rows_per_shard=10)
    return out, rows


@pytest.mark.parametrize("workers,zero_stage,symmetric", [(1, 0, False), (2, 2, True)])
def test_trainer_matches_a_plain_loop(tiny_models, ray_local, parity_table, tmp_path, workers, zero_stage, symmetric):
    """22 steps (7 epochs of a 24-row table at global batch 8: 3 batches an epoch) on 1 worker (ZeRO-0) and on 2
    workers (ZeRO-2; gathered positives and, with the symmetric loss, gathered queries): the loss of every step and
    the final weights equal the plain loop's."""
    from unime_ray.models.backbone import load_backbone
    from unime_ray.train.trainer import fit

    table, rows = parity_table
    steps = 22
    job = TrainJob(TrainConfig(objective="infonce", num_negatives=0, temperature=0.05, lr=1e-3, weight_decay=0.01,
                               warmup_steps=3, max_steps=steps, micro_batch_size=8 // workers, num_workers=workers,
                               zero_stage=zero_stage, lora=False, checkpoint_every=steps, symmetric=symmetric),
                   model=str(tiny_models["qwen2_vl"]), output_dir=str(tmp_path / "run"), seed=4)
    out = fit(table, job, name=f"parity{workers}")
    logged = [json.loads(line)["loss"] for line in open(out["metrics"])]
    want, state = plain_loop_reference(job, rows, steps)
    assert len(logged) == steps
    np.testing.assert_allclose(logged, want, rtol=2e-4, atol=1e-5)
    assert want[-1] < 0.5 * want[0]                       # it learned, so the comparison is not of a flat line
    trained = load_backbone(out["model"], dtype="float32", device="cpu").state_dict()
    for name, ref in state.items():
        torch.testing.assert_close(trained[name], ref, atol=5e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


ITEMS = [Item(text="a red tile", instruction="Find the caption:"),
         Item(image=make_png(28, 28, 1), instruction="Represent the image:"),
         Item(text="a blue tile", image=make_png(56, 28, 2))]


@pytest.mark.parametrize("arch,input_format", [("qwen2_vl", "official"), ("qwen2_vl", "chat"),
                                               ("qwen2_5_vl", "official"), ("qwen2_5_vl", "chat")])
def test_training_embeddings_equal_the_exported_models(tiny_models, tmp_path, arch, input_format):
    """An item embedded inside a training step (train mode, LoRA unmerged, a mixed batch) and the same item
    encoded by Embedder.from_pretrained after export (adapters merged, eval mode, alone) agree."""
    from unime_ray.models.embedder import Embedder
    from unime_ray.models.processor import VLProcessor
    from unime_ray.train.embedder import EmbedderTask
    from unime_ray.train.trainer import build_model, export_model

    job = TrainJob(TrainConfig(lora=True, lora_dropout=0.0, zero_stage=0), model=str(tiny_models[arch]),
                   output_dir=str(tmp_path), input_format=input_format)
    model = build_model(job, training=False)
    torch.manual_seed(0)
    with torch.no_grad():                                  # LoRA B starts at 0: give the adapters something to merge
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    task = EmbedderTask(job)
    task.setup(model.train(), VLProcessor.from_pretrained(job.model), torch.device("cpu"))
    with torch.no_grad():
        in_training = task.embedder.embed_inputs(task.embedder.prepare(ITEMS)).numpy()
    ckpt = tmp_path / "ckpt"
    (ckpt / "ckpt").mkdir(parents=True)
    torch.save({"module": model.state_dict()}, ckpt / "ckpt" / "mp_rank_00_model_states.pt")
    exported = export_model(ckpt, job, tmp_path / "model")
    encoded = Embedder.from_pretrained(exported, input_format=input_format, dtype="float32").encode(ITEMS, batch_size=1)
    base = Embedder.from_pretrained(job.model, input_format=input_format, dtype="float32").encode(ITEMS)
    np.testing.assert_allclose(encoded, in_training, atol=2e-5)
    assert np.abs(encoded - base).max() > 1e-2             # the adapters changed the embeddings


def test_demo_sized_baseline_memorises_a_small_set(tiny_models, ray_local, tmp_path):
    """The demo preset's baseline recipe (2 workers, ZeRO-2, its lr, batch and temperature) on 192 image <->
    caption pairs for a fixed budget of steps: the exported model ranks the right caption first for at least
    90 % of the training images, and the right image first for 90 % of the captions."""
    from unime_ray.run.config import load_run_config
    from unime_ray.models.embedder import Embedder
    from unime_ray.train.trainer import fit

    n, rows = 192, []
    images = [make_png(56, 56, 1000 + i) for i in range(n)]
    captions = [f"a {WORDS[i % 12]} {WORDS[(i // 12) % 12]} {WORDS[(i // 144) % 12]} tile" for i in range(n)]
    for i in range(n):
        for kind in ("i2t", "t2i"):
            row = empty_row(PAIR_SCHEMA)
            image, text = (images[i], captions[i])
            row.update(id=f"{kind}{i}", task=kind, pos_id=f"{kind}p{i}", neg_id=[], neg_instruction=[], neg_text=[],
                       neg_image=[], neg_image_path=[], neg_score=[],
                       **({"query_image": image, "query_instruction": "Find the caption of this image:",
                           "pos_text": text} if kind == "i2t" else
                          {"query_text": text, "query_instruction": "Find the image of this caption:",
                           "pos_image": image}))
            rows.append(row)
    table = tmp_path / "pairs"
    write_rows(rows, table, PAIR_SCHEMA, rows_per_shard=200)
    recipe = load_run_config(preset="demo").baseline
    settings = TrainConfig(**recipe.model_dump(include=set(TrainConfig.model_fields))).model_copy(
        update={"max_steps": 300, "checkpoint_every": 300})
    out = fit(table, TrainJob(settings, model=str(tiny_models["qwen2_vl"]), output_dir=str(tmp_path / "run")),
              name="memorise")
    emb = Embedder.from_pretrained(out["model"], dtype="float32")
    top1 = lambda queries, candidates: np.mean((emb.encode(queries) @ emb.encode(candidates).T).argmax(1) == np.arange(n))
    i2t = top1([Item(image=im, instruction="Find the caption of this image:") for im in images],
               [Item(text=t) for t in captions])
    t2i = top1([Item(text=t, instruction="Find the image of this caption:") for t in captions],
               [Item(image=im) for im in images])
    assert i2t >= 0.9 and t2i >= 0.9, (i2t, t2i)


def test_gradient_accumulation_trains_as_one_large_batch_schedule_included(tiny_models, ray_local, tmp_path):
    """Micro-batches of 4 x grad_accum 2 (1 worker, ZeRO-0) against a plain loop on the global batch of 8: the
    same learning rate at every step (the warm-up and decay count optimizer steps, not micro-batches), the same
    losses and the same weights. judge_alignment's loss is per query, so the split changes nothing (in-batch
    InfoNCE's negatives change with the micro-batch by definition)."""
    from unime_ray.models.backbone import load_backbone
    from unime_ray.train.embedder import batch_loss, examples_from_rows
    from unime_ray.train.trainer import fit

    from ..train.test_train_embedder import training_rows

    rows, steps = training_rows(16, 4), 6
    write_rows(rows, tmp_path / "pairs", PAIR_SCHEMA)
    job = TrainJob(TrainConfig(num_negatives=4, lr=2e-3, warmup_steps=2, max_steps=steps, micro_batch_size=4,
                               grad_accum=2, num_workers=1, zero_stage=0, lora=False, checkpoint_every=steps),
                   model=str(tiny_models["qwen2_vl"]), output_dir=str(tmp_path / "run"), seed=3)
    out = fit(tmp_path / "pairs", job, name="accum")
    logged = [json.loads(line) for line in open(out["metrics"])]

    s = job.settings
    model, emb, params, opt, sched = plain_loop_setup(job)
    plan = BatchPlan(len(rows), 8, 1, 1, job.seed)
    losses, lrs = [], []
    for step in range(steps):
        loss, _ = batch_loss(emb, examples_from_rows([rows[i] for i in plan.rows(step, 0, 0)], 4), "judge_alignment",
                             s.temperature)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert lrs[0] < lrs[1] == max(lrs) and lrs[-1] < lrs[2]               # a warm-up, then the decay
    np.testing.assert_allclose([m["lr"] for m in logged], lrs, rtol=1e-6)
    np.testing.assert_allclose([m["loss"] for m in logged], losses, rtol=2e-4, atol=1e-5)
    trained = load_backbone(out["model"], dtype="float32", device="cpu").state_dict()
    for name, ref in model.state_dict().items():
        torch.testing.assert_close(trained[name], ref, atol=5e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
