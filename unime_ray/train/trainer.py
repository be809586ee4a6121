"""The one trainer every model here goes through: Ray Train ``TorchTrainer`` workers wrapping a LoRA/DoRA
(or fully trainable) Qwen-VL backbone with ``deepspeed.initialize``.

What it does for every task: ZeRO stage 0-3, optional optimizer offload, bf16 on GPU / fp32 on CPU,
gradient accumulation, gradient checkpointing, frozen vision tower on request, a fresh data order every epoch
(:class:`BatchPlan`: the same global batches for any number of workers, so N workers train as one process on
the global batch would), per-step metrics in ``metrics.jsonl``, DeepSpeed checkpoints through
``ray.train.report`` from every rank, resume from the latest checkpoint at the data position it stopped,
restart after a worker failure (``FailureConfig``), and export of the final checkpoint as an ordinary model
folder (adapters merged).

What differs between tasks (:class:`TrainTask`): how rows become a loss. The embedder
(:mod:`.embedder`) and the reranker (:mod:`.reranker`) each register one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .config import TrainLoop
from .job import TrainJob

logger = logging.getLogger(__name__)


class TrainTask(Protocol):
    """How one kind of model learns from table rows."""

    metric_names: tuple[str, ...]

    def setup(self, module, processor, device) -> None: ...

    def loss(self, rows: list[dict[str, Any]], step: int) -> tuple[torch.Tensor, dict[str, float]]: ...


def make_task(job: TrainJob) -> TrainTask:
    if job.task == "reranker":
        from .reranker import RerankerTask

        return RerankerTask(job)
    from .embedder import EmbedderTask

    return EmbedderTask(job)


def lr_lambda(warmup: int, total: int, schedule: str = "linear"):
    """Linear warm-up, then decay to 0: linear (the official embedder schedule) or cosine (the reranker's)."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)
    return f


def default_lora_targets(task: str) -> list[str]:
    from ..models.lora import DEFAULT_TARGETS

    if task == "reranker":  # every linear layer of the language model, as the released reranker
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return list(DEFAULT_TARGETS)


def build_model(job: TrainJob, training: bool = True):
    """The backbone with the run's adapters and frozen parts (``training=False``: without gradient
    checkpointing, to load an exported checkpoint into)."""
    from ..models.backbone import architecture_of, load_backbone
    from ..models.lora import LoraSettings, apply_lora

    s = job.settings
    model = load_backbone(job.model, dtype="float32", device="cpu", role=job.task)
    arch = architecture_of(model.config, job.model)
    if s.gradient_checkpointing and training:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if s.lora:
        model = apply_lora(model, LoraSettings(r=s.lora_r, alpha=s.lora_alpha, dropout=s.lora_dropout,
                                                use_dora=s.use_dora, init=s.lora_init,
                                                target_modules=s.lora_targets or default_lora_targets(job.task),
                                                # the official list's vision-tower matches, unless frozen
                                                vision_targets=[] if s.freeze_vision
                                                else list(arch.vision_lora_targets),
                                                vision_module=arch.vision_modules[0]))
    if s.freeze_vision:  # with full fine-tuning (no LoRA) freeze the vision tower and its projector explicitly
        for name, p in model.named_parameters():
            if arch.is_vision_parameter(name):
                p.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------- data order
def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The table's row indices in one epoch's order: a fresh permutation every epoch (a fixed one repeats the
    same batches, and in-batch negatives stop varying), decided by (seed, epoch) alone, so every rank draws the
    same one without talking to the others."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


@dataclass
class BatchPlan:
    """Which table rows each rank trains on, at every step.

    Optimizer step ``b`` of an epoch takes rows ``[b*G, (b+1)*G)`` of that epoch's order (G = the global
    batch; the epoch's last partial batch is dropped). Its micro-batch ``m`` (of ``accum``) is the next
    ``micro * world`` rows, and rank ``r`` takes the r-th ``micro``-row slice of those. So the positives a rank
    gathers from all ranks are exactly the micro-batch one process would form, a run on 1 worker with micro-batch
    2n equals a run on 2 workers with n, and a run resumed at step k continues with step k's rows.
    """

    num_rows: int
    micro: int
    accum: int
    world: int
    seed: int
    _orders: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training table has {self.num_rows} rows, fewer than one global batch of "
                             f"{self.global_batch} (micro_batch_size {self.micro} x grad_accum {self.accum} x "
                             f"num_workers {self.world})")

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    def rows(self, step: int, micro_index: int, rank: int) -> np.ndarray:
        """Row indices of rank ``rank``'s micro-batch ``micro_index`` at optimizer step ``step`` (0-based)."""
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.num_rows, self.seed, epoch)}
        start = b * self.global_batch + (micro_index * self.world + rank) * self.micro
        return self._orders[epoch][start:start + self.micro]


def mean_over_ranks(values: list[float]) -> float:
    """The mean of this step's micro-batch losses over every rank (a collective): the loss of the global batch,
    which is what a single process would log."""
    import torch.distributed as dist

    total = torch.tensor([sum(values), len(values)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1])


def rows_over_ranks(micro_rows: list[np.ndarray]) -> list[int]:
    """The table rows every rank trained on in this step (a collective), in the plan's global-batch order
    (micro-batch, then rank): what ``metrics.jsonl`` records per step, so a resumed run can be checked row by row."""
    import torch.distributed as dist

    mine = [[int(i) for i in rows] for rows in micro_rows]
    parts = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    return [i for m in range(len(mine)) for part in parts for i in part[m]]


def deepspeed_config(s: TrainLoop, bf16: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": s.zero_stage}
    if s.offload_optimizer and s.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg = {"train_micro_batch_size_per_gpu": s.micro_batch_size, "gradient_accumulation_steps": s.grad_accum,
           "zero_optimization": zero, "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0,
           "steps_per_print": 10 ** 9, "bf16": {"enabled": bf16}}
    if s.offload_optimizer:  # offload needs DeepSpeed's own (CPU) Adam
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": s.lr, "weight_decay": s.weight_decay}}
    return cfg


# ------------------------------------------------------------------------------------------- workers
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (torch.distributed already initialised by Ray). ``config``: the job
    (:meth:`TrainJob.to_dict`) and ``table``, the training table in Ray's object store."""
    job = TrainJob.from_dict(config["job"])
    s = job.settings
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "unime-ray" / "torch_extensions"))
    import deepspeed
    import ray
    import ray.train
    from ray.train import Checkpoint

    from ..models.auto_processor import load_processor

    torch.manual_seed(job.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    bf16 = s.bf16 if s.bf16 is not None else torch.cuda.is_available()
    model = build_model(job)
    optimizer = scheduler = None
    if not s.offload_optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(s.warmup, s.max_steps, s.lr_schedule))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(s, bf16),
        model_parameters=None if optimizer else [p for p in model.parameters() if p.requires_grad])
    task = make_task(job)
    processor = load_processor(job.model, engine.module.config.model_type, image_options=job.images)
    task.setup(engine.module, processor, engine.device)

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag="ckpt")
        step = int(client["step"])
        logger.info("rank %d resumed from step %d", rank, step)
    table = ray.get(config["table"])
    plan = BatchPlan(table.num_rows, s.micro_batch_size, s.grad_accum, world, job.seed)
    metrics_path = Path(job.output_dir) / "metrics.jsonl"
    tracker = None
    if rank == 0 and s.tracking != "none":   # a restarted group goes on in the run it started
        from .tracking import resume_tracking, start_tracking

        tracker = resume_tracking(job.output_dir) or start_tracking(
            s.tracking, job.output_dir, Path(job.output_dir).name, job.to_dict(), s.tracking_uri, s.tracking_project)
    t0, seen = time.perf_counter(), 0
    while step < s.max_steps:
        losses: list[float] = []
        infos: list[dict[str, float]] = []
        lr = float(engine.get_lr()[0])      # the rate this step applies (the scheduler moves on at its end)
        taken = [plan.rows(step, m, rank) for m in range(s.grad_accum)]
        for indices in taken:
            rows = table.take(indices).to_pylist()
            loss, info = task.loss(rows, step)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            infos.append(info)
            seen += len(rows)
        step += 1
        if job.fail_at_step is not None and step == job.fail_at_step and rank == 0:
            marker = Path(job.output_dir) / f".failed_at_{step}"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
                logger.warning("fail_at_step=%d: killing this worker to test recovery", step)
                # Ray Train's controller collects reports by polling; give it time to register the last
                # checkpoint, as it would have before a crash that comes at an arbitrary later moment.
                time.sleep(5)
                os._exit(1)
        elapsed = time.perf_counter() - t0
        metrics = {"step": step, "loss": mean_over_ranks(losses), "lr": lr,
                   "epoch": step / plan.steps_per_epoch, "samples_per_s": seen * world / max(elapsed, 1e-9),
                   **{k: float(np.mean([i[k] for i in infos if k in i])) for k in task.metric_names},
                   "rows": rows_over_ranks(taken)}   # every rank's table rows (the console and the plot skip it)
        if job.report_memory:
            metrics.update(rank_memory(engine))
        if step % s.checkpoint_every == 0 or step == s.max_steps:   # every rank: a collective
            metrics["visual_tokens"] = gather_visual_tokens(processor)
        if rank == 0:
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with metrics_path.open("a") as f:
                f.write(json.dumps({**metrics, "time": time.time()}) + "\n")
            if tracker is not None:
                tracker.log(metrics, step)
        # ray.train.report synchronises every worker with the controller (about 2 s a call here), so it
        # goes with checkpoints only; per-step metrics are in metrics.jsonl.
        if step % s.checkpoint_every == 0 or step == s.max_steps:
            with tempfile.TemporaryDirectory() as d:
                engine.save_checkpoint(d, tag="ckpt", client_state={"step": step})
                ray.train.report({k: v for k, v in metrics.items() if k != "rows"},
                                 checkpoint=Checkpoint.from_directory(d))
    if tracker is not None:
        tracker.close()


def gather_visual_tokens(processor) -> dict[str, Any] | None:
    """The visual tokens per image every rank's processor has seen so far in this attempt (a tally, see
    models.budget), summed over ranks; called by every rank at the same step."""
    import torch.distributed as dist

    from ..utils.tallies import token_tally

    hist = dict(getattr(processor, "visual_tokens", None) or {})   # a processor that records none: {}
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, hist)
        total: dict[int, int] = {}
        for part in parts:
            for k, v in (part or {}).items():
                total[k] = total.get(k, 0) + v
        hist = total
    return token_tally(hist)


def _tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def rank_memory(engine) -> dict[str, int]:
    """Bytes this rank holds: its parameters (ZeRO-3: its partition) and its optimizer state (Adam moments,
    and fp32 master partitions where DeepSpeed keeps them)."""
    params = 0
    for p in engine.module.parameters():
        local = getattr(p, "ds_tensor", None)
        params += (local.numel() * local.element_size()) if local is not None else p.numel() * p.element_size()
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    state = _tensor_bytes(list(getattr(inner, "state", {}).values()))
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        state += _tensor_bytes(getattr(opt, name, []))
    return {"param_bytes_per_rank": int(params), "optimizer_bytes_per_rank": int(state)}


def read_training_table(path: str | os.PathLike):
    """The training table as one contiguous chunk: a step's ``take`` from a table of many shards walks every
    chunk (64 rows: 11 ms from 100 shards of 2,000 rows, 0.13 ms from one chunk), and slows as the table grows."""
    from ..data.io import read_table

    return read_table(path).combine_chunks()


def fit(training_table: str | os.PathLike, job: TrainJob, name: str = "train") -> dict[str, Any]:
    """Fit on Ray (must be initialised), export the final model; returns paths and the last metrics."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(job.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    s = job.settings
    # Materialised up front: on a small cluster the training workers hold every CPU, and a streaming read
    # would wait for a CPU forever. The table holds references to images, so it stays small.
    # The table holds references to images, so it is small: every worker reads its rows from one copy in the
    # object store (zero-copy on a node), in the order BatchPlan gives, whatever the number of workers.
    table = read_training_table(training_table)
    rows = table.num_rows
    if s.max_steps is None:  # an epoch-based run: the steps follow from the table size and the global batch
        s = s.model_copy(update={"max_steps": s.steps_for(rows)})
        logger.info("%s: %g epoch(s) of %d rows at global batch %d = %d steps", name, s.epochs, rows,
                    s.global_batch, s.max_steps)
    BatchPlan(rows, s.micro_batch_size, s.grad_accum, s.num_workers, job.seed)   # a too-small table fails here
    job = replace(job, settings=s, output_dir=str(out))
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"job": job.to_dict(), "table": ray.put(table)},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=None if s.use_gpu else {"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(out / "ray_results"), name=name,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=s.max_failures)))
    from .watch import watch_metrics

    # Rank 0 appends a line per step to metrics.jsonl; a thread here turns it into the console's progress line.
    with watch_metrics(out / "metrics.jsonl", f"train {name}", s.max_steps, logger):
        result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        model_dir = export_model(d, job, out / "model")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:   # each step's table rows stay in the file only (not in the card, the result or the plot)
        m.pop("rows", None)
    from ..models.card import write_model_card

    write_model_card(model_dir, name=name, base_model=job.model, recipe=job.to_dict(),
                     data={"training_table": str(training_table), "rows": rows},
                     metrics=metrics[-1] if metrics else None)
    plot = plot_training_curve(metrics, out / "training_curve.png")
    tokens = next((m["visual_tokens"] for m in reversed(metrics) if m.get("visual_tokens")), None)
    for m in metrics:   # the tally is reported apart from the final step's metrics
        m.pop("visual_tokens", None)
    return {"visual_tokens": tokens,
            "model": str(model_dir), "checkpoint": result.checkpoint.path, "metrics": str(out / "metrics.jsonl"),
            "final": metrics[-1] if metrics else {}, "steps": metrics[-1]["step"] if metrics else 0,
            "plot": str(plot) if plot else None, "global_batch": s.global_batch, "max_steps": s.max_steps,
            "warmup_steps": s.warmup, "lr_schedule": s.lr_schedule,
            "settings": job.to_dict()}   # every setting the run trained with (max_steps resolved)


def export_model(checkpoint_dir: str | os.PathLike, job: TrainJob, out_dir: str | os.PathLike) -> Path:
    """DeepSpeed checkpoint (any ZeRO stage) -> model folder with LoRA merged, tokenizer and image processor."""
    from ..models.auto_processor import load_processor
    from ..models.embedder import Embedder

    ckpt = Path(checkpoint_dir)
    if job.settings.zero_stage == 0:
        state = torch.load(ckpt / "ckpt" / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ckpt")
    model = build_model(job, training=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trainable_missing = [k for k in missing if k in trainable or "lora_" in k]
    if unexpected or trainable_missing:
        raise RuntimeError(f"checkpoint does not match the model: unexpected {unexpected[:5]}, "
                           f"missing {trainable_missing[:5]}")
    processor = load_processor(job.model, image_options=job.images)
    # Embedder.save writes the backbone (adapters merged) with its tokenizer and image processor (at the training
    # budget's pixel range): the same folder layout for an embedder and a reranker.
    return Embedder(model.eval(), processor, job.input_format).save(out_dir)


def plot_training_curve(metrics: list[dict[str, Any]], path: Path) -> Path | None:
    if not metrics:
        return None
    from ..utils.plots import pyplot

    plt = pyplot()
    if plt is None:
        return None
    steps = [m["step"] for m in metrics]
    extra = [k for k in metrics[-1] if k not in ("step", "loss", "lr", "samples_per_s", "time")
             and not k.endswith("_per_rank") and isinstance(metrics[-1][k], (int, float))]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3))
    ax[0].plot(steps, [m["loss"] for m in metrics])
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("loss")
    for k in extra:
        ax[1].plot(steps, [m.get(k, float("nan")) for m in metrics], label=k.replace("_", " "))
    ax[1].set_xlabel("step")
    if extra:
        ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
