"""Shared fixtures: tiny checkpoints built once per session, a local Ray, small images."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"qwen2_vl": folder, "qwen2_5_vl": folder}: tiny random checkpoints, loaded like real ones."""
    from unime_ray.models.tiny import make_tiny_models

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
