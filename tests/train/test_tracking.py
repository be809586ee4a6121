"""Experiment tracking (train.tracking): each backend's records read back with its own reader, and a Ray Train
run whose rank 0 logs to MLflow from inside the loop."""

from __future__ import annotations

import json
import struct

import pytest

from unime_ray.train.tracking import log_final_evaluation, start_tracking

RECORDS = [{"step": 1, "loss": 2.5, "lr": 1e-3, "visual_tokens": {"images": 4}, "time": 1.0},
           {"step": 2, "loss": 1.25, "lr": 5e-4, "rows": [1, 2], "time": 2.0}]
EXPECTED = {"loss": [(1, 2.5), (2, 1.25)], "lr": [(1, 1e-3), (2, 5e-4)], "visual_tokens/images": [(1, 4.0)]}
CONFIG = {"lr": 1e-3, "lora": {"r": 16}}


def _track(kind, tmp_path):
    out = tmp_path / "train"
    tracker = start_tracking(kind, out, "demo", CONFIG)
    for r in RECORDS:
        tracker.log(r, r["step"])
    tracker.close()
    assert log_final_evaluation(out, {"precision_at_1": {"shapes_i2t": 61.5}}, step=2)
    return out


def test_mlflow_records_read_back(tmp_path):
    from mlflow import MlflowClient

    out = _track("mlflow", tmp_path)
    rec = json.loads((out / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=rec["where"])
    got = {k: [(m.step, m.value) for m in client.get_metric_history(rec["run_id"], k)] for k in EXPECTED}
    assert got == EXPECTED
    evaluation = client.get_metric_history(rec["run_id"], "eval/precision_at_1/shapes_i2t")
    assert [(m.step, m.value) for m in evaluation] == [(2, 61.5)]
    run = client.get_run(rec["run_id"])
    assert run.data.params["lora.r"] == "16" and run.info.status == "FINISHED" and run.info.run_name == "demo"


def test_tensorboard_event_files_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _track("tensorboard", tmp_path)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    got = {k: [(e.step, pytest.approx(e.value)) for e in acc.Scalars(k)] for k in EXPECTED}
    assert got == EXPECTED
    assert [(e.step, e.value) for e in acc.Scalars("eval/precision_at_1/shapes_i2t")] == [(2, 61.5)]
    assert "config/text_summary" in acc.Tags()["tensors"]


def _wandb_records(path):
    """An offline W&B run file, read with no W&B reader: a 7-byte ':W&B' header, then 32 KiB blocks of
    (crc32, length, type) chunks (LevelDB's log format) holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:    # block padding
            pos += left
            continue
        chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):   # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(chunks)
            chunks = b""
            yield rec


def test_wandb_offline_run_reads_back(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = _track("wandb", tmp_path)
    history, config = {}, {}
    for f in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        for rec in _wandb_records(f):
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                for k, v in items.items():
                    if not k.startswith("_"):
                        history.setdefault(k, []).append((items["_step"], v))
            elif rec.WhichOneof("record_type") == "config":
                config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    assert {k: history[k] for k in EXPECTED} == EXPECTED
    assert history["eval/precision_at_1/shapes_i2t"] == [(2, 61.5)]
    assert config["lora"] == {"r": 16}


def test_an_untracked_training_logs_nothing(tmp_path):
    assert start_tracking("none", tmp_path, "x", {}) is None
    assert not log_final_evaluation(tmp_path, {"precision_at_1": {"a": 1.0}}, step=1)
