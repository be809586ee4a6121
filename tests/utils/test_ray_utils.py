"""Ray start-up inside a submitted job: the job's own env vars are not sent twice."""

from __future__ import annotations

import json

from unime_ray.utils import ray_utils


def test_job_env_vars(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_utils.job_env_vars() is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}}}))
    assert ray_utils.job_env_vars() == {"HF_HUB_OFFLINE": "1"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{not json")
    assert ray_utils.job_env_vars() == {}


def test_init_ray_inside_a_job_leaves_the_jobs_keys_alone(monkeypatch):
    seen = {}

    class FakeRay:   # records what init_ray would hand to ray.init (a real start is tested in test_ops)
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kwargs):
            seen.update(kwargs)

    import sys

    monkeypatch.setitem(sys.modules, "ray", FakeRay)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}}}))
    ray_utils.init_ray(address="127.0.0.1:1")
    env = seen["runtime_env"]["env_vars"]
    assert "HF_HUB_OFFLINE" not in env and "OMP_NUM_THREADS" not in env and env["TOKENIZERS_PARALLELISM"] == "false"
    seen.clear()
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    ray_utils.init_ray(address="127.0.0.1:1")
    assert seen["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"
