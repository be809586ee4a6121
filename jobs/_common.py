"""Shared plumbing of the Ray job entrypoints in ``jobs/``.

Every ``jobs/<name>.py`` is a thin script that calls :func:`run_entrypoint`, which maps the script's name to a
``unime-ray`` subcommand (:data:`ENTRYPOINTS`) and runs ``unime_ray.cli.main([subcommand, ...])`` in-process.
Adding a stage is one line in :data:`ENTRYPOINTS` plus a copy of any of the five-line scripts. Subcommands
that read a run config (pipeline, stages) get the config handling below; others (``eval``, ``index``) get
their arguments unchanged.

Written for ``ray job submit --working-dir . -- python jobs/<name>.py --config jobs/configs/demo.yaml``:

* no assumption about the current directory: ``--config`` is looked up as given, then relative to the repo
  root, then in ``jobs/configs/`` (``--config demo`` works); without ``--config``/``--preset`` the job runs
  ``jobs/configs/demo.yaml``;
* the repo root goes first on ``sys.path``, so the uploaded working dir is what runs (Ray puts the working dir
  first on the workers' ``PYTHONPATH`` too; driver and workers run the same code even where an older
  ``unime-ray`` is installed in the image);
* inside a submitted job Ray sets ``RAY_ADDRESS``, and the pipeline's ``init_ray`` joins that cluster whenever
  the config's ``ray.address`` is null (the demo, synthetic and smoke configs) or ``auto`` (paper);
* the exit code is the CLI's (0 ok, 2 for config/data errors, 1 for a crash), and the run directory and the
  manifest's stage states are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
JOBS_DIR = REPO_ROOT / "jobs"
CONFIG_DIR = JOBS_DIR / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"

# entrypoint script (jobs/<key>.py) -> `unime-ray` subcommand it runs
ENTRYPOINTS: dict[str, str] = {
    "pipeline": "pipeline",
    "retrieve": "retrieve",
    "judge": "judge",
    "mine": "mine",
    "train_embedder": "train-embedder",
    "train_baseline": "train-baseline",
    "fit_judge": "fit-judge",
    "train_ablations": "train-ablations",
    "train_reranker": "train-reranker",
    "evaluate": "evaluate",
    "eval": "eval",
    "build_index": "index",
}

TAG = "[unime-ray job]"


def ensure_importable() -> None:
    """Put the repo root (the job's working dir) first on ``sys.path``."""
    root = str(REPO_ROOT)
    if (REPO_ROOT / "unime_ray").is_dir() and (not sys.path or sys.path[0] != root):
        if root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)


def resolve_config(name: str) -> Path:
    """A config file named on the command line, wherever the job was started from."""
    p = Path(os.path.expanduser(name))
    tried = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"]
    for cand in tried:
        if cand.is_file():
            return cand.resolve()
    raise FileNotFoundError(f"config {name!r} not found; tried: {', '.join(str(t) for t in tried)}")


def _peek_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--config", default=None)
    p.add_argument("--preset", default=None)
    p.add_argument("-o", "--override", action="append", default=[])
    p.add_argument("--run-dir", default=None)
    return p


def build_argv(name: str, argv: list[str], takes_config: bool = True) -> tuple[list[str], argparse.Namespace]:
    """The ``unime_ray.cli.main`` argv for ``jobs/<name>.py ARGV``.

    For a subcommand that reads a run config (``--config``/``--preset``/``-o``): ``[subcommand, --config ABS |
    --preset P, -o ..., --run-dir ..., rest...]``, with ``jobs/configs/demo.yaml`` when neither is given. Other
    subcommands (``eval``, ``index``: explicit ``--model``/``--out`` options) get ARGV unchanged.
    """
    if name not in ENTRYPOINTS:
        raise KeyError(f"unknown job entrypoint {name!r}; known: {', '.join(ENTRYPOINTS)}")
    sub = ENTRYPOINTS[name]
    if not takes_config:
        known, _ = _out_parser().parse_known_args(argv)
        return [sub, *argv], known
    known, rest = _peek_parser().parse_known_args(argv)
    if known.config and known.preset:
        raise ValueError("give --config or --preset, not both")
    out = [sub]
    if known.preset:
        out += ["--preset", known.preset]
    else:
        known.config = str(resolve_config(known.config) if known.config else DEFAULT_CONFIG)
        out += ["--config", known.config]
    for o in known.override:
        out += ["-o", o]
    if known.run_dir:
        out += ["--run-dir", known.run_dir]
    return out + rest, known


def _out_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--out", default=None)
    return p


def in_ray_job() -> bool:
    """True inside the driver of a submitted Ray job (``ray job submit`` / KubeRay RayJob)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def drop_forced_omp_threads() -> bool:
    """Undo ``OMP_NUM_THREADS=1`` that Ray gives a submitted job's driver (its supervisor actor has 0 CPUs).

    ``init_ray`` forwards the driver's ``OMP_NUM_THREADS`` to every worker, which would pin every Ray Data actor
    and Ray Train worker (and FAISS search in the driver) to one thread. Without it each worker gets Ray's default,
    its ``num_cpus``. A value set in the job's own ``runtime_env`` ``env_vars`` is kept.
    """
    if not in_ray_job() or os.environ.get("OMP_NUM_THREADS") != "1":
        return False
    try:
        job_env = (json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"]).get("runtime_env") or {}).get("env_vars")
    except (ValueError, AttributeError):
        job_env = None
    if "OMP_NUM_THREADS" in (job_env or {}):
        return False
    del os.environ["OMP_NUM_THREADS"]
    return True


def _run_dir(known: argparse.Namespace) -> Path | None:
    from unime_ray.config import ConfigError, load_run_config

    overrides = list(known.override) + ([f"run_dir={known.run_dir}"] if known.run_dir else [])
    try:
        cfg = load_run_config(preset=known.preset, config_path=None if known.preset else known.config,
                              overrides=overrides)
    except (ConfigError, OSError):
        return None  # the CLI reports the error itself
    return Path(cfg.run_dir).expanduser().resolve()


def _print_outputs(run_dir: Path | None) -> None:
    if run_dir is None:
        return
    print(f"{TAG} run directory: {run_dir}")
    manifest = run_dir / "manifest.json"
    if not manifest.is_file():
        return
    print(f"{TAG} manifest: {manifest}")
    try:
        stages = json.loads(manifest.read_text()).get("stages", {})
    except (OSError, ValueError):
        return
    for stage, st in stages.items():
        print(f"{TAG}   {stage:<14} {st.get('status', '?')}")
    report = run_dir / "report.md"
    if report.is_file():
        print(f"{TAG} report: {report}")
    log = run_dir / "logs" / "console.log"   # Ray's, the libraries' and the workers' messages (unless --verbose)
    if log.is_file():
        print(f"{TAG} log: {log}")


def run_entrypoint(script: str | os.PathLike, argv: list[str] | None = None) -> int:
    """Run the ``unime-ray`` subcommand of ``jobs/<script>.py``; returns the exit code."""
    name = Path(script).stem
    argv = sys.argv[1:] if argv is None else list(argv)
    ensure_importable()
    # A submitted job's runtime_env (env_vars such as HF_HUB_OFFLINE, working_dir) reaches the driver; init_ray
    # passes the same env vars to ray.init, which Ray refuses as a conflict unless told to merge them.
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    omp_dropped = drop_forced_omp_threads()  # before anything loads an OpenMP runtime
    if name not in ENTRYPOINTS:
        print(f"{TAG} error: unknown job entrypoint {name!r}; known: {', '.join(ENTRYPOINTS)}", file=sys.stderr)
        return 2

    from unime_ray import cli

    sub = ENTRYPOINTS[name]
    commands = subcommand_parsers(cli.build_parser())
    if sub not in commands:
        print(f"{TAG} error: this unime_ray ({Path(cli.__file__).parent}) has no `{sub}` subcommand "
              f"(has: {', '.join(sorted(commands))})", file=sys.stderr)
        return 2
    takes_config = takes_run_config(commands[sub])
    try:
        cli_argv, known = build_argv(name, argv, takes_config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{TAG} error: {exc}", file=sys.stderr)
        return 2
    address = os.environ.get("RAY_ADDRESS")
    print(f"{TAG} {name}: unime-ray {' '.join(cli_argv)}")
    print(f"{TAG} python {sys.executable}; unime_ray from {Path(cli.__file__).parent}; cwd {Path.cwd()}")
    print(f"{TAG} Ray: " + (f"joining the cluster at RAY_ADDRESS={address}" if address else
                            "no RAY_ADDRESS (the config's ray.address, else a local Ray)"))
    if omp_dropped:
        print(f"{TAG} dropped the job driver's OMP_NUM_THREADS=1 (set by Ray, not by the job): workers get their "
              "num_cpus threads")
    out_dir = _run_dir(known) if takes_config else (Path(known.out).resolve() if known.out else None)
    if in_ray_job() and out_dir is not None and str(out_dir).startswith(str(REPO_ROOT)):
        print(f"{TAG} warning: outputs go to {out_dir}, inside the job's copy of the working dir, which Ray "
              "deletes with the session; give an absolute path on shared storage (-o run_dir=... / --out ...)",
              file=sys.stderr)
    sys.stdout.flush()
    try:
        rc = cli.main(cli_argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        rc = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except Exception:  # a crash: the traceback, then the run dir and manifest (which marks the failed stage)
        traceback.print_exc()
        rc = 1
    if takes_config:
        _print_outputs(out_dir)
    elif out_dir is not None:
        print(f"{TAG} outputs: {out_dir}")
    print(f"{TAG} {name}: {'ok' if rc == 0 else f'failed (exit {rc})'}")
    sys.stdout.flush()
    return int(rc or 0)


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``{subcommand: its parser}`` of the ``unime-ray`` parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def takes_run_config(parser: argparse.ArgumentParser) -> bool:
    """Whether a subcommand reads a run config (has ``--config``), like the pipeline and stage commands."""
    return "--config" in parser._option_string_actions
