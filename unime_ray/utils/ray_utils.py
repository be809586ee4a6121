"""Start or join Ray the same way everywhere (CLI, jobs, tests)."""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)

# Passed to every worker: offline hub access and quiet tokenizers, as on the driver.
WORKER_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS",
              "TOKENIZERS_PARALLELISM", "DS_ACCELERATOR")


def job_env_vars() -> dict[str, str] | None:
    """The env_vars of the Ray job this driver runs in (``ray job submit``), None outside a job."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw is None:
        return None
    try:
        return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return {}


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             include_dashboard: bool = True, env_vars: dict[str, str] | None = None):
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return ray
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(env_vars or {})
    job_env = job_env_vars()
    if job_env is not None:
        # Inside a submitted job: the job's runtime env already reaches every worker, and Ray refuses to merge
        # a second value for any of its keys. Ray also gives the job's driver OMP_NUM_THREADS=1 (its supervisor
        # holds no CPU); that is not the job's wish, so it is not passed on.
        env = {k: v for k, v in env.items() if k not in job_env}
        if os.environ.get("OMP_NUM_THREADS") == "1" and (env_vars or {}).get("OMP_NUM_THREADS") is None:
            env.pop("OMP_NUM_THREADS", None)
    runtime_env = {"env_vars": env}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        logger.info("starting a local Ray (num_cpus=%s)", num_cpus)
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                 dashboard_host="127.0.0.1", runtime_env=runtime_env, log_to_driver=True,
                 configure_logging=True, logging_level=logging.WARNING)
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    except Exception:  # older/newer Ray without these knobs: progress bars are cosmetic
        pass
    return ray
