"""Start or join Ray the same way everywhere (CLI, jobs, tests)."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

# Passed to every worker: offline hub access and quiet tokenizers, as on the driver.
WORKER_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS",
              "TOKENIZERS_PARALLELISM", "DS_ACCELERATOR")


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             include_dashboard: bool = True, env_vars: dict[str, str] | None = None):
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return ray
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(env_vars or {})
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
