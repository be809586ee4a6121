"""Experiment tracking: what the trainer writes to ``metrics.jsonl`` (every step's record), the run's settings
and, later, the final evaluation, also sent to MLflow, TensorBoard or Weights & Biases.

Rank 0 logs from inside the Ray Train loop. ``tracking.json`` in the training folder says where the run went, so
the evaluation (another process, maybe another day) adds its results to the same run. Each backend is an extra
(``pip install unime-ray[tracking]``); a missing one is an error that names the package.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Literal, Mapping

from ..utils.files import write_json_atomic

Tracking = Literal["none", "mlflow", "tensorboard", "wandb"]
RECORD = "tracking.json"


def _scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a record (nested dicts flattened with '/'); lists, strings and the clock are not metrics."""
    out = {}
    for k, v in record.items():
        if isinstance(v, Mapping):
            out.update(_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
            out[prefix + k] = float(v)
    return out


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = json.dumps(v, default=str)[:500]
    return out


def _need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"tracking needs {package}: pip install {package} (or unime-ray[tracking])") from None


class Tracker:
    """One tracked run: :meth:`log` a step's record, :meth:`close` at the end. Built by :func:`start_tracking`
    (a new run) or :func:`resume_tracking` (the same run, from its ``tracking.json``)."""

    def __init__(self, kind: str, where: str, name: str, run_id: str | None = None, project: str = "unime-ray"):
        self.kind, self.where, self.name, self.project = kind, where, name, project
        if kind == "mlflow":
            if where.startswith("file:"):   # the local store (MLflow keeps it, in maintenance mode): one run's records
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            client = _need("mlflow", "mlflow-skinny").MlflowClient(tracking_uri=where)
            if run_id is None:
                exp = client.get_experiment_by_name(project)
                exp_id = exp.experiment_id if exp else client.create_experiment(project)
                run_id = client.create_run(exp_id, run_name=name).info.run_id
            self._client = client
        elif kind == "tensorboard":
            _need("tensorboard", "tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=where)
        elif kind == "wandb":
            wandb = _need("wandb", "wandb")
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self._run = wandb.init(project=project, name=name, dir=where, id=run_id, resume="allow", mode=mode,
                                   reinit="create_new")
            run_id = self._run.id
        else:
            raise ValueError(f"unknown tracking {kind!r}; one of mlflow, tensorboard, wandb")
        self.run_id = run_id

    def log_config(self, config: Mapping[str, Any]) -> None:
        if self.kind == "mlflow":
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in _flat(config).items()]
            for i in range(0, len(params), 100):   # MLflow takes at most 100 params a batch
                self._client.log_batch(self.run_id, params=params[i:i + 100])
        elif self.kind == "tensorboard":
            self._writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```")
        else:
            self._run.config.update(dict(config), allow_val_change=True)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        values = _scalars(record)
        if self.kind == "mlflow":
            from mlflow.entities import Metric

            now = int(time.time() * 1000)   # MLflow names: alphanumerics and _-. :/ only
            self._client.log_batch(self.run_id, metrics=[Metric(re.sub(r"[^\w\-. :/]", "_", k), v, now, step)
                                                         for k, v in values.items()])
        elif self.kind == "tensorboard":
            for k, v in values.items():
                self._writer.add_scalar(k, v, step)
            self._writer.flush()
        else:
            self._run.log(values, step=step)

    def close(self) -> None:
        if self.kind == "mlflow":
            self._client.set_terminated(self.run_id)
        elif self.kind == "tensorboard":
            self._writer.close()
        else:
            self._run.finish()

    def save(self, folder: str | os.PathLike) -> None:
        """Record where this run went (``tracking.json``), for :func:`resume_tracking`."""
        record = {"kind": self.kind, "where": self.where, "name": self.name, "run_id": self.run_id,
                  "project": self.project}
        write_json_atomic(record, Path(folder) / RECORD)


def start_tracking(kind: Tracking, out_dir: str | os.PathLike, name: str, config: Mapping[str, Any],
                   uri: str | None = None, project: str = "unime-ray") -> Tracker | None:
    """A new tracked run for a training in ``out_dir`` (None for ``none``). ``uri``: the MLflow tracking URI (else
    MLFLOW_TRACKING_URI, else a local store in out_dir/mlruns), or the TensorBoard / W&B folder (else in out_dir)."""
    if kind == "none":
        return None
    out = Path(out_dir).resolve()
    if kind == "mlflow":
        where = uri or os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").as_uri()
    else:   # W&B writes into a wandb/ folder of its own
        where = uri or str(out / "tensorboard" if kind == "tensorboard" else out)
        Path(where).mkdir(parents=True, exist_ok=True)
    tracker = Tracker(kind, where, name, project=project)
    tracker.log_config(config)
    tracker.save(out)
    return tracker


def resume_tracking(out_dir: str | os.PathLike) -> Tracker | None:
    """The run a training in ``out_dir`` was tracked in (None if it was not)."""
    f = Path(out_dir) / RECORD
    if not f.is_file():
        return None
    r = json.loads(f.read_text())
    return Tracker(r["kind"], r["where"], r["name"], run_id=r["run_id"], project=r.get("project", "unime-ray"))


def log_final_evaluation(out_dir: str | os.PathLike, results: Mapping[str, Any], step: int) -> bool:
    """Add an evaluation's numbers (``eval/...``) to the tracked run of the training in ``out_dir``; False if
    that training was not tracked."""
    tracker = resume_tracking(out_dir)
    if tracker is None:
        return False
    tracker.log({"eval": dict(results)}, step)
    tracker.close()
    return True
