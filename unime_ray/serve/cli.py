"""The ``index`` and ``serve`` commands; the main CLI adds them with :func:`register`.

    unime-ray index --model runs/demo/models/embedder --candidates data/candidates --out serving-index
    unime-ray serve --index serving-index --reranker runs/demo/models/reranker --port 8000
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

logger = logging.getLogger(__name__)


def _parse_overrides(pairs: list[str]) -> dict:
    """``-o embedder.max_batch_size=32`` -> nested dict, parsed as the run config's overrides are."""
    from ..run.config import apply_override

    out: dict = {}
    for pair in pairs:
        apply_override(out, pair)
    return out


# ------------------------------------------------------------------------------------------- index
def _one_line(exc: BaseException) -> str:
    """The innermost cause of an error (a Ray task error wraps the worker's), as one line."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def cmd_index(args) -> int:
    from ..models.backbone import ModelNotFoundError, load_config
    from ..models.encode import embedder_spec_from_arguments
    from ..utils.pool import Pool
    from ..utils.settings import from_flags
    from .index import IndexFormatError, build_serving_index, recorded_image_root

    image_root = args.image_root
    if image_root is None and os.path.exists(args.candidates):
        recorded = recorded_image_root(args.candidates)
        if recorded:
            image_root = recorded[0]
            print(f"image root: {image_root} (recorded in {recorded[1]}; --image-root overrides it)", flush=True)
    try:
        load_config(args.model)     # a model that does not exist stops here, before Ray starts
        if not os.path.exists(args.candidates):
            raise FileNotFoundError(f"no candidate table at {args.candidates}")
    except (ModelNotFoundError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = embedder_spec_from_arguments(args, image_root)
    pool = from_flags(Pool, args, Pool.FLAGS)

    def start_ray():
        from ..utils.ray_utils import init_ray

        init_ray(address=args.address, num_cpus=args.num_cpus)

    try:
        manifest = build_serving_index(args.candidates, args.out, spec, kind=args.kind, num_shards=args.num_shards,
                                       nlist=args.nlist, nprobe=args.nprobe, pool=pool,
                                       store_images=not args.no_store_images, overwrite=args.overwrite,
                                       check_images=not args.no_check_images, start_ray=start_ray)
    except (IndexFormatError, ModelNotFoundError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from ray.exceptions import RayError

        if not isinstance(exc, RayError):
            raise
        logger.debug("index build failed", exc_info=True)
        print(f"error: the index build failed: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(json.dumps({k: manifest[k] for k in ("format", "count", "dim", "index", "embedder")}, indent=1))
    acc = manifest["accounting"]
    reasons = ", ".join(f"{k}: {v}" for k, v in acc["reasons"].items())
    print(f"candidates: {acc['rows_in']} in = {acc['rows_out']} indexed + {acc['rows_quarantined']} quarantined"
          + (f" ({reasons})" if reasons else ""))
    print(f"quarantine: {os.path.join(os.path.abspath(args.out), acc['quarantine'])}")
    print(f"serving index: {os.path.abspath(args.out)}")
    return 0


# ------------------------------------------------------------------------------------------- serve
def _serve_config(args):
    from .app import load_serve_config

    over = _parse_overrides(args.override)
    for key, value in (("host", args.host), ("port", args.port), ("api_key_env", args.api_key_env),
                       ("api_key_file", args.api_key_file), ("image_root", args.image_root)):
        if value is not None:
            over[key] = value
    return load_serve_config(over, args.config)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args) -> int:
    from pydantic import ValidationError

    from .config import ApiKeyError
    from .index import IndexFormatError

    try:
        cfg = _serve_config(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"error: invalid serve config: {exc}", file=sys.stderr)
        return 2
    if not _is_loopback(cfg.host) and not cfg.auth_enabled and not args.allow_unauthenticated:
        print(f"error: refusing to listen on {cfg.host} without an API key: set --api-key-env/--api-key-file, "
              "or pass --allow-unauthenticated", file=sys.stderr)
        return 2

    if args.detach and not (args.address or os.environ.get("RAY_ADDRESS")):
        print("error: --detach needs a running Ray cluster (--address or RAY_ADDRESS): a local Ray stops with "
              "this process", file=sys.stderr)
        return 2

    from ray import serve

    from ..utils.ray_utils import init_ray
    from .app import build_application, cluster_capacity, fit_to_cluster
    from .config import ResourceFitError, read_api_key
    from .index import load_manifest
    from .ingress import wait_until_ready

    try:   # fail fast, before Ray starts
        load_manifest(args.index)
        read_api_key(cfg)
    except (IndexFormatError, ApiKeyError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.reranker:   # the reranker's validation decides whether it is served (and the resources it needs)
        from .app import rerank_plan

        plan = rerank_plan(args.reranker, cfg.reranker)
        print(("reranker: " if plan["use"] else "reranker not used: ") + plan["reason"], flush=True)
    joined = (args.address or os.environ.get("RAY_ADDRESS") or "local") != "local"
    init_ray(address=args.address, num_cpus=args.num_cpus, include_dashboard=False)
    if cfg.fit != "off":
        # a local Ray started here cannot grow; a cluster joined by address may (cluster_autoscales decides)
        can_grow = cfg.cluster_autoscales if cfg.cluster_autoscales is not None else joined
        try:
            cfg, layout = fit_to_cluster(args.index, cfg, args.reranker if not args.reranker or plan["use"] else None,
                                         cluster_capacity(can_grow))
        except ResourceFitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(layout.line(), flush=True)
    try:
        app = build_application(args.index, cfg, embedder=args.embedder, reranker=args.reranker, fit=False)
    except (IndexFormatError, ApiKeyError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    http = {"host": cfg.host, "port": cfg.port}
    if cfg.limits.request_timeout_s:   # above the ingress's own deadline, so its 504 (with a message) comes first
        http["request_timeout_s"] = cfg.limits.request_timeout_s + 5
    serve.start(http_options=http)
    serve.run_many([serve.RunTarget(app, name=cfg.app_name, route_prefix=cfg.route_prefix)],
                   wait_for_applications_running=False)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    try:
        wait_until_ready(cfg.app_name, report=lambda line: print(line, f"(meanwhile: {url}/readyz)", flush=True))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        serve.shutdown()
        return 2
    except KeyboardInterrupt:
        print("shutting down", flush=True)
        serve.shutdown()
        return 130
    print(f"UniME-V2 is serving at {url}  (API docs: {url}/docs; readiness: {url}/readyz; "
          f"auth: {'on' if cfg.auth_enabled else 'off'})", flush=True)
    if args.detach:
        return 0

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    print("press Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
    return 0


# ------------------------------------------------------------------------------------------- register
def register(subparsers) -> None:
    """Add ``index`` and ``serve`` to the main CLI's subparsers (each sets ``func``)."""
    from ..models.encode import add_embedder_arguments
    from ..utils.pool import Pool
    from ..utils.settings import add_flags

    p = subparsers.add_parser("index", help="build a serving index from a candidate table with a trained embedder")
    add_embedder_arguments(p, "folder that candidate image paths are relative to (default: the image root "
                              "recorded by the run that prepared the candidate table, if any)")
    p.add_argument("--candidates", required=True, help="candidate table (CANDIDATE_SCHEMA Parquet file or folder)")
    p.add_argument("--out", required=True, help="output folder (the serving index)")
    p.add_argument("--kind", default="flat", choices=["flat", "ivf"], help="flat: exact; ivf: approximate, large pools")
    p.add_argument("--num-shards", type=int, default=1, help="FAISS shards (a large index serves as parts of them)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists per shard (default ~4*sqrt(shard size))")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists visited per query")
    p.add_argument("--no-store-images", action="store_true",
                   help="do not copy inline candidate images into the index (no reranking/returning of them)")
    p.add_argument("--overwrite", action="store_true", help="discard embeddings of a previous build in --out")
    p.add_argument("--no-check-images", action="store_true",
                   help="do not decode every candidate image before embedding (faster on large pools; an "
                        "unreadable image then fails the build instead of being quarantined)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    add_flags(p, Pool, Pool.FLAGS)
    p.set_defaults(func=cmd_index)

    p = subparsers.add_parser("serve", help="serve search/embed/rerank over HTTP with Ray Serve (Ctrl-C stops)")
    p.add_argument("--index", required=True, help="a serving index folder (from `unime-ray index`)")
    p.add_argument("--embedder", default=None, help="embedder folder or hub id (default: the index's)")
    p.add_argument("--reranker", default=None, help="Qwen2.5-VL reranker folder or hub id (default: no reranking)")
    p.add_argument("--config", default=None,
                   help="YAML: a serve config, or a run config with a `serve:` section")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a serve config field, e.g. -o embedder.max_batch_size=32 (repeatable)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the API key")
    p.add_argument("--api-key-file", default=None, help="file holding the API key")
    p.add_argument("--image-root", default=None, help="where candidate image paths resolve (default: the index's)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="allow a non-loopback --host without an API key")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    p.add_argument("--detach", action="store_true", help="deploy and exit, leaving the application running")
    p.set_defaults(func=cmd_serve)
