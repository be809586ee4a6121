"""Start or join Ray the same way everywhere (CLI, jobs, tests), and set up a submitted job's driver."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Passed to every worker: offline hub access and quiet tokenizers, as on the driver.
WORKER_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS",
              "TOKENIZERS_PARALLELISM", "DS_ACCELERATOR", "TQDM_DISABLE")


def absolute_if_local(path: str | os.PathLike | None) -> str | None:
    """Ray workers may start in another directory: a path that exists here travels absolute; anything else (a hub
    name, None) as it is."""
    if not path:   # None, or an empty path (not the working directory)
        return None if path is None else str(path)
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def _job_runtime_env() -> dict | None:
    """The runtime_env of the Ray job this driver runs in (``ray job submit``), None outside a job."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw is None:
        return None
    try:
        return dict(json.loads(raw).get("runtime_env") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


def job_env_vars() -> dict[str, str] | None:
    """The env_vars of the Ray job this driver runs in (``ray job submit``), None outside a job."""
    runtime_env = _job_runtime_env()
    if runtime_env is None:
        return None
    try:
        return dict(runtime_env.get("env_vars") or {})
    except (ValueError, TypeError):
        return {}


def prepare_job_environment() -> dict[str, bool] | None:
    """Set up the environment of a submitted job's driver; None outside a job (nothing is changed there).

    Called first by ``unime_ray.cli.main``, before anything loads torch or an OpenMP runtime:

    * ``RAY_OVERRIDE_JOB_RUNTIME_ENV=1`` (unless set): the job's ``runtime_env`` (env vars such as
      ``HF_HUB_OFFLINE``, the working dir) reaches the driver, and :func:`init_ray` passes env vars to
      ``ray.init`` as well, which Ray refuses as a conflict unless told to merge them;
    * Ray gives the job's driver ``OMP_NUM_THREADS=1`` (its supervisor actor holds no CPU). It is dropped unless the
      job's own ``runtime_env`` ``env_vars`` set it, so the driver (FAISS search) and the workers
      :func:`init_ray` starts get their ``num_cpus`` threads rather than one.

    Returns what was done: ``{"override_runtime_env": ..., "dropped_omp_threads": ...}``.
    """
    job_env = job_env_vars()
    if job_env is None:
        return None
    override = "RAY_OVERRIDE_JOB_RUNTIME_ENV" not in os.environ
    if override:
        os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    dropped = os.environ.get("OMP_NUM_THREADS") == "1" and "OMP_NUM_THREADS" not in job_env
    if dropped:
        del os.environ["OMP_NUM_THREADS"]
    return {"override_runtime_env": override, "dropped_omp_threads": dropped}


def job_working_dir_warning(path: str | os.PathLike) -> str | None:
    """A warning when a submitted job's output ``path`` lies in the job's copy of its working dir, else None.

    A job with a ``working_dir`` runs in a temporary copy of it (its current directory), which Ray deletes with
    the session.
    """
    if not (_job_runtime_env() or {}).get("working_dir"):
        return None
    out, here = Path(path).expanduser().resolve(), Path.cwd().resolve()
    if out != here and here not in out.parents:
        return None
    return (f"outputs go to {out}, inside the job's copy of its working dir ({here}), which Ray deletes with the "
            "session; give an absolute path on shared storage (-o run_dir=... / --out ...)")


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             include_dashboard: bool = True, env_vars: dict[str, str] | None = None):
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray bound to 127.0.0.1."""
    import ray

    from .console import log_path, verbose

    if ray.is_initialized():
        _route_worker_output()
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
    # Workers' stdout/stderr: on the console when verbose (or outside a run's logging); else into the run's log file
    # (see _route_worker_output), or dropped where this Ray cannot be told where to send it. Errors raised in
    # workers reach the driver either way: Ray re-raises them there.
    to_driver = verbose() or log_path() is None or _stdstream_dispatcher() is not None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=to_driver)
    else:
        logger.info("starting a local Ray (num_cpus=%s)", num_cpus)
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                 dashboard_host="127.0.0.1", runtime_env=runtime_env, log_to_driver=to_driver,
                 configure_logging=True, logging_level=logging.WARNING)
    _route_worker_output()
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = verbose()   # our progress line replaces Ray Data's bars
        ctx.print_on_execution_start = False
    except Exception:  # older/newer Ray without these knobs: progress bars are cosmetic
        pass
    try:
        logs_dir = ray._private.worker._global_node.get_logs_dir_path()
        from .console import log_only

        log_only(logger, logging.INFO, "Ray's own logs (every process): %s", logs_dir)
    except Exception:
        pass
    return ray


def _stdstream_dispatcher():
    """Ray's dispatcher of the worker output it forwards to the driver (private API; None where it moved)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except Exception:
        return None
    if not all(hasattr(global_worker_stdstream_dispatcher, m) for m in ("add_handler", "remove_handler")):
        return None
    return global_worker_stdstream_dispatcher


_worker_logger = logging.getLogger("ray-workers")


def _worker_lines_to_log(data: dict) -> None:
    """One batch of forwarded worker output, as records of the ``ray-workers`` logger (the run's log file)."""
    lines = data.get("lines") or []
    if data.get("pid") == "autoscaler":  # as Ray prints them: its events only, not the periodic status
        try:
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        except Exception:
            lines = []
    who = data.get("actor_name") or data.get("task_name") or "worker"
    for line in lines:
        if "__ray_tqdm_magic_token__" in line:  # ray.experimental.tqdm_ray's bar updates
            continue
        _worker_logger.info("(%s pid=%s) %s", who, data.get("pid"), line)


def _route_worker_output() -> None:
    """While a run logs to its file and is not verbose: worker output goes there instead of the console."""
    from .console import log_path, verbose

    if log_path() is None or verbose():
        return
    dispatcher = _stdstream_dispatcher()
    if dispatcher is None:
        return
    dispatcher.remove_handler("ray_print_logs")   # Ray's printer (same name, so ray.shutdown still removes ours)
    dispatcher.add_handler("ray_print_logs", _worker_lines_to_log)
