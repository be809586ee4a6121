"""Shared fixtures: tiny checkpoints built once per session, a local Ray, small images."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"qwen2_vl": folder, "qwen2_5_vl": folder}: tiny random checkpoints, loaded like real ones."""
    from unime_ray.demo.tiny import make_tiny_models

    out = tmp_path_factory.mktemp("tiny_models")
    return make_tiny_models(out, seed=0)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray shared by every test that needs one (2 CPUs, bound to 127.0.0.1)."""
    from unime_ray.utils.ray_utils import init_ray

    ray = init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def make_png(width: int = 40, height: int = 30, seed: int = 0, fmt: str = "PNG") -> bytes:
    from PIL import Image

    rng = np.random.RandomState(seed)
    im = Image.fromarray(rng.randint(0, 255, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def png_bytes():
    return make_png


# The whole method on the synthetic data, every stage small: used by tests/run/test_pipeline_full.py (which checks
# it) and by tests/ops/test_readme_commands.py (which runs the README's commands on it in place of `make demo`).
WHOLE_METHOD_OVERRIDES = [
    "data.max_items=24", "data.rows_per_shard=16", "data.dev_fraction=0.25", "models.tiny.vocab_size=512",
    "embed.tables=[]", "embed.pool.ray=false", "judge.pool.ray=false",   # pools on Ray: tests/run/test_*pipeline*.py
    "retrieve.top_k=6", "mine.num_negatives=4", "train.num_negatives=4", "judge.pool.batch_size=16",
    "baseline.enabled=true", "baseline.max_steps=3", "baseline.micro_batch_size=4", "baseline.lora=false",
    "baseline.checkpoint_every=3",
    "judge_fit={folds: 2, negatives_per_query: 4, list_negatives: 4, max_steps: 2, micro_batch_size: 2, "
    "lora: false, lr: 0.001, checkpoint_every: 2}",
    "train.init=baseline", "train.max_steps=2", "train.checkpoint_every=2", "train.lora=false",
    "compare={seeds: [0], ablations: [{name: hard-labels, objective: hard_label}]}",
    "reranker={enabled: true, init: fitted_judge, list_negatives: 3, max_steps: 2, micro_batch_size: 2, "
    "lora: false, lr: 0.001, checkpoint_every: 2}",
    "eval={rerank: {enabled: true, top_k: 3}, pool: {ray: false, batch_size: 16}}",
]


@pytest.fixture(scope="session")
def whole_method_run(tmp_path_factory):
    """(run dir, command, completed process) of ``unime-ray pipeline --preset synthetic`` with every stage on."""
    run = tmp_path_factory.mktemp("whole_method") / "run"
    cmd = [sys.executable, "-m", "unime_ray.cli", "pipeline", "--preset", "synthetic", "--run-dir", str(run)]
    for o in WHOLE_METHOD_OVERRIDES:
        cmd += ["-o", o]
    proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=900)
    return run, cmd, proc


def pytest_collection_modifyitems(config, items):
    """Tests marked ``own_ray`` run first: they start Ray clusters on Ray's fixed default ports (as the README's
    commands do), which the suite's shared local Ray would otherwise already hold."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("own_ray") else 1)
