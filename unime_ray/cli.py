"""``unime-ray``: one command line, a subcommand per stage and tool."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("unime_ray.cli")


def _add_config_args(p: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    from .run.config import settings_help

    p.epilog, p.formatter_class = settings_help(), argparse.RawDescriptionHelpFormatter
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None, help="a preset name (see `unime-ray config list`)"
                   + (f"; default {default_preset}" if default_preset else ""))
    g.add_argument("--config", default=None, help="a YAML config file")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. -o embed.pool.batch_size=8 (repeatable)")
    p.add_argument("--run-dir", default=None, help="shortcut for -o run_dir=PATH")
    p.set_defaults(default_preset=default_preset)


REPO_ROOT = Path(__file__).resolve().parents[1]   # a checkout (or a Ray job's copy of one): jobs/configs/ is here
JOB_CONFIGS = REPO_ROOT / "jobs" / "configs"


def find_config(name: str | os.PathLike) -> Path:
    """A ``--config`` file, wherever the command runs from: as given, then relative to the repo root, then in
    ``jobs/configs/`` (``--config smoke`` is ``jobs/configs/smoke.yaml``)."""
    p = Path(os.path.expanduser(name))
    tried = [p] if p.is_absolute() else [p, REPO_ROOT / p, JOB_CONFIGS / p, JOB_CONFIGS / f"{p}.yaml"]
    for cand in tried:
        if cand.is_file():
            return cand.resolve()
    raise FileNotFoundError(f"config {str(name)!r} not found; tried: {', '.join(str(t) for t in tried)}")


def _config_from_args(args):
    from .run.config import load_run_config
    from .utils.ray_utils import job_working_dir_warning

    overrides = list(args.override)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    preset = args.preset or (None if args.config else args.default_preset)
    config = find_config(args.config) if args.config else None
    cfg = load_run_config(preset=preset, config_path=config, overrides=overrides)
    warning = job_working_dir_warning(cfg.run_dir)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return cfg


def _add_console_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=os.environ.get("UNIME_VERBOSE", "") not in ("", "0"),
                   help="show Ray's and the libraries' own messages and the workers' output on the console (by "
                        "default they go to RUN_DIR/logs/console.log); env UNIME_VERBOSE=1")


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data.validate import DataError
    from .models.backbone import ModelNotFoundError, UnsupportedArchitectureError
    from .run.config import ConfigError

    from .utils.settings import FlagError

    return ConfigError, DataError, ModelNotFoundError, UnsupportedArchitectureError, FileNotFoundError, FlagError


def _run_logged(args, cfg, only: list[str] | None):
    """run_pipeline with the run's console set-up: (manifest, 0), or (None, exit code) after one error line."""
    from .run.runner import Manifest, failed_stage, run_pipeline
    from .utils.console import console, log_only, one_line_error, start_run_logging

    run_dir = Path(cfg.run_dir).resolve()
    run_log = start_run_logging(run_dir, verbose=args.verbose, level=args.log_level)
    try:
        logger.info("run directory: %s", run_dir)
        if not args.verbose:
            logger.info("Ray's, the libraries' and the workers' own messages: %s (--verbose shows them here)",
                        run_log.path)
        try:
            return run_pipeline(cfg, force=args.force, only=only), 0
        except Exception as exc:
            log_only(logger, logging.ERROR, "the run failed", exc_info=exc)
            stage = failed_stage(Manifest(run_dir))
            line = f"error: {f'stage {stage} failed: ' if stage else ''}{one_line_error(exc)}"
            if not args.verbose:
                line += f" (traceback and workers' output: {run_log.path})"
            print(line, file=console(), flush=True)
            return None, 2 if isinstance(exc, _user_errors()) else 1
        finally:
            _shutdown_ray()
    finally:
        run_log.close()


def _shutdown_ray() -> None:
    """Stop (or leave) Ray while its exit messages still go to the run's log."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    except Exception:  # shutting down is best effort; the process ends next
        logger.debug("ray.shutdown", exc_info=True)


# ------------------------------------------------------------------------------------------- commands
def cmd_pipeline(args) -> int:
    from .run.runner import run_summary

    cfg = _config_from_args(args)
    only = args.stages.split(",") if args.stages else None
    manifest, rc = _run_logged(args, cfg, only)
    if manifest is not None:
        print("\n" + run_summary(cfg.run_dir, manifest))
    return rc


def cmd_stage(args) -> int:
    """A pipeline stage on its own (after the stages it needs, which are skipped when complete)."""
    from .run.runner import stages_through

    cfg = _config_from_args(args)
    manifest, rc = _run_logged(args, cfg, stages_through(args.stage))
    if manifest is None:
        return rc
    st = manifest.stage(args.stage)
    print(json.dumps(st.get("outputs", {}), indent=1, default=str))
    return 0


def cmd_prepare(args) -> int:
    from .data.convert import import_table

    out = Path(args.out)
    quarantine = Path(args.quarantine) if args.quarantine else out.parent / f"{out.name}.quarantine.parquet"
    account = import_table(args.input, args.format, out, quarantine_path=quarantine, kind=args.kind,
                           task=args.task, image_root=args.image_root, check_images=not args.no_check_images,
                           rows_per_shard=args.rows_per_shard, mmeb_split=args.mmeb_split,
                           max_records=args.max_records)
    print(f"{args.input} -> {out}: {account.summary()}")
    print(f"quarantine: {quarantine}")
    return 0


def cmd_export(args) -> int:
    from .data.convert import export_pairs

    n = export_pairs(args.input, args.format, args.out, image_dir=args.image_dir)
    print(f"wrote {n} records to {args.out}")
    return 0


def cmd_embed(args) -> int:
    from .models.encode import embed_table, embedder_spec_from_arguments
    from .utils.pool import Pool
    from .utils.settings import from_flags

    spec = embedder_spec_from_arguments(args)
    prefix = args.prefix if args.prefix is not None else ("query_" if _is_pair_table(args.table) else "")
    pool = from_flags(Pool, args, Pool.FLAGS)
    if pool.ray:
        from .utils.ray_utils import init_ray

        init_ray(num_cpus=args.num_cpus)
    stats = embed_table(spec, args.table, args.out, prefix=prefix, pool=pool)
    print(json.dumps(stats, indent=1))
    return 0


def _is_pair_table(path: str) -> bool:
    import pyarrow.parquet as pq

    from .data.io import shard_paths

    shards = shard_paths(path)
    return bool(shards) and "query_text" in pq.read_schema(shards[0]).names


def cmd_make_tiny_models(args) -> int:
    from .demo.tiny import make_tiny_models
    from .models.config import TinyModelConfig

    corpus: list[str] = []
    if args.corpus:
        from .data.io import iter_rows

        for row in iter_rows(args.corpus):
            corpus.extend(v for k, v in row.items() if isinstance(v, str) and v and
                          k.endswith(("text", "instruction")))
    spec = TinyModelConfig(hidden_size=args.hidden_size, num_hidden_layers=args.layers, vocab_size=args.vocab_size)
    archs = args.arch or ["qwen2_vl", "qwen2_5_vl"]
    written = make_tiny_models(args.out, seed=args.seed, spec=spec, corpus=corpus, archs=archs)
    for arch, path in written.items():
        print(f"{arch}: {path}")
    return 0


def cmd_make_demo_data(args) -> int:
    from .demo.data import MissingSystemPackages, make_demo_data

    try:
        summary = make_demo_data(args.out, source="synthetic" if args.synthetic else "emoji", seed=args.seed,
                                 eval_fraction=args.eval_fraction, max_items=args.max_items,
                                 image_size=args.image_size)
    except MissingSystemPackages as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_config(args) -> int:
    from .run.config import list_presets

    if args.action == "list":
        for name in list_presets():
            print(name)
        return 0
    print(_config_from_args(args).to_yaml())
    return 0


def cmd_push(args) -> int:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from .models.card import push_to_hub

    try:
        url = push_to_hub(args.model, args.repo, private=args.private, datasets=args.dataset or None,
                          license=args.license, token=os.environ.get("HF_TOKEN"))
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as exc:
        print(f"error: push to {args.repo} failed: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    print(url)
    return 0


def cmd_export_model(args) -> int:
    from .models.encode import embedder_spec_from_arguments

    prompts = dict(p.split("=", 1) for p in args.prompt or [])
    spec = embedder_spec_from_arguments(args)
    if args.role == "reranker":
        from .models.budget import ImageBudget
        from .rerank import Reranker

        if prompts or spec.adapter:
            raise SystemExit("error: --prompt and --adapter are for embedders (a reranker's instructions go in each "
                             "pair's texts; merge its adapter first)")
        budget = ImageBudget.from_parts(spec.image_resize, spec.min_pixels, spec.max_pixels)
        model = Reranker.from_pretrained(spec.model, dtype=spec.dtype, image_options=budget)
        print(model.save_pretrained(args.out, format=args.format))
        return 0
    print(spec.build().save_pretrained(args.out, format=args.format, prompts=prompts))
    return 0


def cmd_model_info(args) -> int:
    from .models.backbone import SHIPPED_CONFIGS, architecture_of, build_random_backbone, count_parameters

    if args.name in SHIPPED_CONFIGS or args.name.replace(".json", "") in {Path(v).stem for v in
                                                                           SHIPPED_CONFIGS.values()}:
        model = build_random_backbone(args.name, device="meta", dtype=args.dtype)
        source = "shipped config, meta device"
    else:
        from .models.backbone import load_backbone

        model = load_backbone(args.name, dtype=args.dtype)
        source = "checkpoint"
    arch = architecture_of(model.config, args.name)
    n = count_parameters(model)
    bytes_per = 2 if args.dtype in ("bfloat16", "float16") else 4
    text = getattr(model.config, "text_config", model.config)
    print(f"{args.name} ({source})\n  architecture: {arch.model_type}\n  parameters: {n:,}\n"
          f"  embedding dim: {text.hidden_size}\n  weights in {args.dtype}: {n * bytes_per / 2**30:.2f} GiB")
    return 0


# ------------------------------------------------------------------------------------------- parser
def _prompt_flag(value: str) -> str:
    if "=" not in value or not value.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected NAME=INSTRUCTION, got {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .models.encode import add_embedder_arguments
    from .utils.pool import Pool
    from .utils.settings import add_flags

    parser = argparse.ArgumentParser(prog="unime-ray", description="UniME-V2 universal multimodal embeddings on Ray.")
    parser.add_argument("--log-level", default=os.environ.get("UNIME_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("pipeline", help="run (or resume) the staged pipeline")
    _add_config_args(p, default_preset="demo")
    p.add_argument("--stages", default=None, help="comma-separated subset of stages to run")
    p.add_argument("--force", action="store_true", help="rerun stages even if complete")
    _add_console_args(p)
    p.set_defaults(func=cmd_pipeline)

    from .run.runner import STAGES

    for stage in STAGES:   # a command per stage, named and described by the stage's one declaration
        if stage.command_name is None:
            continue
        p = sub.add_parser(stage.command_name, help=stage.help + " (after the stages it needs)")
        _add_config_args(p, default_preset="demo")
        p.add_argument("--force", action="store_true", help="rerun the stage even if complete")
        _add_console_args(p)
        p.set_defaults(func=cmd_stage, stage=stage.name)

    from .data.convert import FORMATS

    p = sub.add_parser("prepare", help="convert + validate a dataset into a canonical table (bad rows quarantined)")
    p.add_argument("--input", required=True, help="JSON / JSONL / Parquet file or folder")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="retrieval / sharegpt4v / urban1k write a retrieval table (eval --retrieval reads it)")
    p.add_argument("--out", required=True, help="output folder of Parquet shards")
    p.add_argument("--kind", default="pairs", choices=["pairs", "candidates"])
    p.add_argument("--task", default=None, help="task/dataset name (MMEB rows carry none)")
    p.add_argument("--image-root", default=None, help="folder that image paths are relative to")
    p.add_argument("--no-check-images", action="store_true", help="skip decoding images (faster, less safe)")
    p.add_argument("--quarantine", default=None, help="quarantine file (default OUT.quarantine.parquet)")
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--mmeb-split", default=None,
                   help="mmeb-train / mmeb-eval folders: the split read per subset (default: train, else original; "
                        "test)")
    p.add_argument("--max-records", type=int, default=None,
                   help="read only the first N input records (ShareGPT4V's protocol: 1000)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("export", help="export a canonical pair table (official JSON, MMEB-train/eval JSONL)")
    p.add_argument("--input", required=True)
    p.add_argument("--format", required=True, choices=["official", "mmeb-train", "mmeb-eval"])
    p.add_argument("--out", required=True)
    p.add_argument("--image-dir", default=None, help="where inline images are written as files")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("embed", help="encode a canonical table with an embedder (Ray Data actor pool)")
    add_embedder_arguments(p)
    p.add_argument("--table", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prefix", default=None, help="item columns prefix (default: query_ for pair tables)")
    add_flags(p, Pool, Pool.FLAGS)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("make-tiny-models", help="write tiny Qwen2-VL / Qwen2.5-VL checkpoints (offline)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default=None, help="a canonical table whose texts train the tokenizer")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--arch", action="append", choices=["qwen2_vl", "qwen2_5_vl", "llava_onevision"],
                   help="architectures to write (repeatable; default qwen2_vl and qwen2_5_vl)")
    p.set_defaults(func=cmd_make_tiny_models)

    p = sub.add_parser("make-demo-data", help="build the offline emoji (or synthetic shapes) dataset")
    p.add_argument("out")
    p.add_argument("--synthetic", action="store_true", help="shapes and colours; needs no system packages")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-items", type=int, default=None)
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--image-size", type=int, default=64)
    p.set_defaults(func=cmd_make_demo_data)

    p = sub.add_parser("config", help="list presets or show a resolved config")
    p.add_argument("action", choices=["list", "show"])
    _add_config_args(p, default_preset="demo")
    p.set_defaults(func=cmd_config)

    from .eval.cli import register as register_eval
    from .serve.cli import register as register_serve

    register_eval(sub)
    register_serve(sub)

    p = sub.add_parser("push", help="upload a model folder to the Hugging Face Hub (token: HF_TOKEN or a login)")
    p.add_argument("--model", required=True, help="a model folder saved by unime-ray (weights + model card)")
    p.add_argument("--repo", required=True, help="the Hub repository id, e.g. you/unime-v2-qwen2vl-2b")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dataset", action="append", help="a Hub dataset id it was trained on (repeatable; card)")
    p.add_argument("--license", default=None, help="the card's license (default: the base model's, else other)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("export-model", help="write an embedder or reranker as a folder another library loads")
    add_embedder_arguments(p)
    p.add_argument("--format", required=True, choices=["sentence-transformers"],
                   help="sentence-transformers: SentenceTransformer(OUT) encodes as unime-ray does")
    p.add_argument("--out", required=True)
    p.add_argument("--role", default="embedder", choices=["embedder", "reranker"],
                   help="reranker: a pairwise Yes/No reranker (or judge) as a CrossEncoder whose score is P(Yes)")
    p.add_argument("--prompt", action="append", type=_prompt_flag, metavar="NAME=INSTRUCTION",
                   help="an instruction saved as a named prompt (encode(..., prompt_name=NAME)); repeatable")
    p.set_defaults(func=cmd_export_model)

    p = sub.add_parser("model-info", help="architecture and size of a model (shipped configs build on meta)")
    p.add_argument("name", help="a hub id with a shipped config (e.g. Qwen/Qwen2-VL-2B-Instruct) or a folder")
    p.add_argument("--dtype", default="bfloat16")
    p.set_defaults(func=cmd_model_info)
    return parser


def commands() -> dict[str, argparse.ArgumentParser]:
    """``{command: its parser}``: the subcommands of ``unime-ray`` (``python -m unime_ray COMMAND``)."""
    parser = build_parser()
    # argparse keeps the subcommands on the action add_subparsers returned; this is the one place that finds it
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _job_started(argv: list[str], job: dict[str, bool]) -> None:
    """What a submitted job's log starts with: the command, the code and python it runs, the cluster it joins."""
    import unime_ray

    address = os.environ.get("RAY_ADDRESS")
    lines = [f"unime-ray {' '.join(argv)}",
             f"python {sys.executable}; unime_ray from {Path(unime_ray.__file__).parent}; cwd {Path.cwd()}",
             "Ray: " + (f"joining the cluster at RAY_ADDRESS={address}" if address else
                        "no RAY_ADDRESS (the config's ray.address, else a local Ray)")]
    if job["dropped_omp_threads"]:
        lines.append("dropped the job driver's OMP_NUM_THREADS=1 (set by Ray, not by the job): workers get their "
                     "num_cpus threads")
    print("\n".join(f"[unime-ray job] {line}" for line in lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 ok, 2 for a config or data error (or a usage error), 1 for a crash."""
    from .utils.ray_utils import job_working_dir_warning, prepare_job_environment

    job = prepare_job_environment()   # first: before anything loads torch or an OpenMP runtime
    from .utils.console import console, setup_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if job is not None:
        _job_started(argv, job)
        warning = job_working_dir_warning(args.out) if isinstance(getattr(args, "out", None), str) else None
        if warning:  # eval / index / prepare: their own --out (run-config commands: _config_from_args)
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=console())
        return 2


if __name__ == "__main__":
    sys.exit(main())
