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
    """``-o embedder.max_batch_size=32`` -> nested dict (values parsed as YAML)."""
    import yaml

    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"override {pair!r} is not KEY=VALUE")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


# ------------------------------------------------------------------------------------------- index
def cmd_index(args) -> int:
    from ..retrieval.embed import EmbedderSpec
    from .index import IndexFormatError, build_serving_index

    spec = EmbedderSpec(model=args.model, input_format=args.input_format, dtype=args.dtype, adapter=args.adapter,
                        image_root=args.image_root, positions=args.positions,
                        image_resize=tuple(args.image_resize) if args.image_resize else None,
                        min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    if not args.no_ray:
        from ..utils.ray_utils import init_ray

        init_ray(address=args.address, num_cpus=args.num_cpus)
    try:
        manifest = build_serving_index(args.candidates, args.out, spec, kind=args.kind, num_shards=args.num_shards,
                                       nlist=args.nlist, nprobe=args.nprobe, batch_size=args.batch_size,
                                       use_ray=not args.no_ray, min_actors=args.min_actors,
                                       max_actors=args.max_actors, num_gpus_per_actor=args.num_gpus_per_actor,
                                       store_images=not args.no_store_images, overwrite=args.overwrite)
    except IndexFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: manifest[k] for k in ("format", "count", "dim", "index", "embedder")}, indent=1))
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
    from .app import build_application

    try:
        app = build_application(args.index, cfg, embedder=args.embedder, reranker=args.reranker)
    except (IndexFormatError, ApiKeyError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    init_ray(address=args.address, num_cpus=args.num_cpus, include_dashboard=False)
    http = {"host": cfg.host, "port": cfg.port}
    if cfg.limits.request_timeout_s:
        http["request_timeout_s"] = cfg.limits.request_timeout_s
    serve.start(http_options=http)
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    print(f"UniME-V2 is serving at {url}  (API docs: {url}/docs; auth: {'on' if cfg.auth_enabled else 'off'})",
          flush=True)
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
    p = subparsers.add_parser("index", help="build a serving index from a candidate table with a trained embedder")
    p.add_argument("--model", required=True, help="embedder checkpoint folder or hub id")
    p.add_argument("--candidates", required=True, help="candidate table (CANDIDATE_SCHEMA Parquet file or folder)")
    p.add_argument("--out", required=True, help="output folder (the serving index)")
    p.add_argument("--kind", default="flat", choices=["flat", "ivf"], help="flat: exact; ivf: approximate, large pools")
    p.add_argument("--num-shards", type=int, default=1, help="FAISS shards (a large index serves as partitions of them)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists per shard (default ~4*sqrt(shard size))")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists visited per query")
    p.add_argument("--image-root", default=None, help="folder that candidate image paths are relative to")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder")
    p.add_argument("--input-format", default="official", choices=["official", "chat"])
    p.add_argument("--positions", default="auto", choices=["auto", "mrope", "sequential"])
    p.add_argument("--image-resize", type=int, nargs=2, default=None, metavar=("W", "H"))
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-store-images", action="store_true",
                   help="do not copy inline candidate images into the index (no reranking/returning of them)")
    p.add_argument("--overwrite", action="store_true", help="discard embeddings of a previous build in --out")
    p.add_argument("--no-ray", action="store_true", help="embed in this process instead of a Ray actor pool")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    p.add_argument("--min-actors", type=int, default=1)
    p.add_argument("--max-actors", type=int, default=2)
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
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
