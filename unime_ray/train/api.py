"""Training from Python: the embedder (UniME-V2 and its ablations) and the reranker, on any pair data.

These are the functions the pipeline's training stages call too (``baseline``, ``train``, ``ablations``,
``judge_fit``, ``rerank``): one implementation. A run trains on Ray Train (a local Ray is started when none is
running), checkpoints every ``checkpoint_every`` steps and resumes from its last checkpoint when called again
after an interruption; a finished run writes ``done.json`` last, and calling again returns it without training.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from pydantic import BaseModel, ConfigDict

from ..models.budget import ImageBudget
from .config import RerankerTrainConfig, TrainConfig, TrainLoop

if TYPE_CHECKING:
    from .job import TrainJob

logger = logging.getLogger(__name__)


class TrainResult(BaseModel):
    """A training run: the exported model folder (an ordinary Hugging Face folder with its model card), its steps
    and last metrics, and the visual tokens per image it trained on."""

    model_config = ConfigDict(frozen=True, extra="allow")

    model: str | None = None
    steps: int | None = None
    final: dict[str, Any] = {}
    visual_tokens: dict[str, Any] | None = None


def _settings(config: Any, cls: type[TrainLoop], overrides: Mapping[str, Any]) -> TrainLoop:
    if config is None:
        config = {}
    if isinstance(config, TrainLoop):
        if not isinstance(config, cls):
            raise TypeError(f"expected a {cls.__name__}, got {type(config).__name__}")
        return type(config).model_validate({**config.model_dump(), **overrides}) if overrides else config
    if isinstance(config, Mapping):
        return cls.model_validate({**config, **overrides})
    raise TypeError(f"config must be a {cls.__name__} or a dict, not {type(config).__name__}")


def training_table(data: Any, output_dir: Path, columns: Mapping[str, str] | None = None,
                   image_root: str | os.PathLike | None = None) -> str:
    """A canonical pair table to train on: a path to one is used as it is; anything else (a dataset, a table,
    a data frame, rows, a file in another format) is converted and validated into ``output_dir/data``."""
    from ..data.inputs import is_table_path, load_table
    from ..data.io import shard_paths
    from ..data.schema import PAIR_SCHEMA

    if is_table_path(data) and Path(data).exists() and not columns:
        shards = shard_paths(data)
        if shards:
            import pyarrow.parquet as pq

            if set(PAIR_SCHEMA.names) <= set(pq.read_schema(shards[0]).names):
                return str(Path(data).resolve())
    path, account = load_table(data, output_dir / "data", columns=columns, image_root=image_root)
    logger.info("training data: %s", account.summary())
    if not account.rows_out:
        raise ValueError(f"no valid training rows ({account.summary()}); see {path}.quarantine.parquet")
    return str(path.resolve())


def run_job(data: Any, job: "TrainJob", name: str, columns: Mapping[str, str] | None = None) -> TrainResult:
    """Run one training job (what every training function and stage ends in): skip it when ``done.json`` says
    it finished, else convert the data if needed, start a local Ray if none is running, fit and export."""
    from ..utils.ray_utils import init_ray
    from .trainer import fit

    out = Path(job.output_dir)
    done = out / "done.json"
    if done.is_file():
        logger.info("%s: already trained (%s)", name, out)
        return TrainResult(**json.loads(done.read_text()))
    out.mkdir(parents=True, exist_ok=True)
    table = training_table(data, out, columns, job.image_root)
    init_ray()
    result = fit(table, job, name)
    result = {k: v for k, v in result.items() if k != "checkpoint"} | {"checkpoint": str(result.get("checkpoint"))}
    done.write_text(json.dumps(result, indent=1, default=str))
    return TrainResult(**result)


def _train(data: Any, settings: TrainLoop, *, model: str | os.PathLike, output_dir: str | os.PathLike,
           seed: int, image_root: str | os.PathLike | None, input_format: str, positions: str,
           images: ImageBudget | None, columns: Mapping[str, str] | None, name: str) -> TrainResult:
    from ..utils.ray_utils import absolute_if_local
    from .job import TrainJob

    # Ray Train workers do not share this process's working directory: local paths go to them absolute
    job = TrainJob(settings=settings, model=absolute_if_local(model), output_dir=str(Path(output_dir).resolve()),
                   input_format=input_format, positions=positions, image_root=absolute_if_local(image_root),
                   seed=seed, images=images or ImageBudget())
    return run_job(data, job, name, columns)


def train_embedder(data: Any, config: TrainConfig | Mapping[str, Any] | None = None, *, model: str | os.PathLike,
                   output_dir: str | os.PathLike, seed: int = 0, image_root: str | os.PathLike | None = None,
                   input_format: str = "official", positions: str = "auto", images: ImageBudget | None = None,
                   columns: Mapping[str, str] | None = None, name: str = "embedder", **overrides: Any) -> TrainResult:
    """Train an embedder from ``model`` (a folder or hub name) on pair ``data`` and save it to
    ``output_dir/model`` with its model card.

    ``config``: a :class:`~unime_ray.train.config.TrainConfig` or a dict of its fields (``overrides`` too, e.g.
    ``objective="infonce"``, ``max_steps=100``). The UniME-V2 objective (``judge_alignment``, the default) needs
    rows with judge-scored negatives, as :func:`unime_ray.mine_hard_negatives` returns them; ``hard_label``
    needs negatives; ``infonce`` with ``num_negatives=0`` trains on bare (query, positive) pairs.

    >>> result = train_embedder(mined.table, model=tiny_embedder, output_dir=tmp / "embedder",
    ...                         max_steps=2, micro_batch_size=2, num_negatives=2, num_workers=1, lora=False)
    >>> result.steps, (Path(result.model) / "README.md").is_file()
    (2, True)
    """
    settings = _settings(config, TrainConfig, overrides)
    return _train(data, settings, model=model, output_dir=output_dir, seed=seed,
                  image_root=image_root, input_format=input_format, positions=positions, images=images,
                  columns=columns, name=name)


def train_reranker(data: Any, config: RerankerTrainConfig | Mapping[str, Any] | None = None, *,
                   model: str | os.PathLike, output_dir: str | os.PathLike, seed: int = 0,
                   image_root: str | os.PathLike | None = None, images: ImageBudget | None = None,
                   columns: Mapping[str, str] | None = None, name: str = "reranker", **overrides: Any) -> TrainResult:
    """Train a reranker (pairwise Yes/No + listwise "(i)", the paper's recipe by default) from ``model`` on
    judge-scored pair ``data`` and save it to ``output_dir/model`` with its model card; ``config``: a
    :class:`~unime_ray.train.config.RerankerTrainConfig` or a dict of its fields (``overrides`` too).

    >>> result = train_reranker(mined.table, model=tiny_judge, output_dir=tmp / "reranker", max_steps=1,
    ...                         micro_batch_size=2, list_negatives=2, num_workers=1, lora=False)
    >>> best = Reranker.from_pretrained(result.model).rerank("a red circle", ["red circle", "blue"])[0]
    >>> result.steps, best["index"] in (0, 1)
    (1, True)
    """
    settings = _settings(config, RerankerTrainConfig, overrides)
    return _train(data, settings, model=model, output_dir=output_dir, seed=seed,
                  image_root=image_root, input_format="official", positions="auto", images=images,
                  columns=columns, name=name)
