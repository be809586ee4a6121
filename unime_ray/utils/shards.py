"""Resumable shard-to-shard maps, locally or over a Ray Data actor pool.

Every long stage (embedding, search, judging) has the same shape: an input table of Parquet shards,
a function that turns each input row into exactly one output row, and an output folder with one shard
per input shard. An output shard is written atomically once all of its rows are back, and a shard whose
output exists is skipped, so a killed stage rerun loses nothing and duplicates nothing. Memory is
bounded by the shards in flight, never by the dataset.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .parquet import iter_batches, shard_paths, write_table_atomic
from .progress import Progress

logger = logging.getLogger(__name__)

# An output table from the columns an actor returned for one shard (lists of per-row values).
TableBuilder = Callable[[dict[str, list]], pa.Table]

# Fault injection for the resume tests: "judged pairs:2" SIGKILLs this process after it wrote 2 output
# shards of a map labelled "judged pairs" (the ``what`` of map_shards_*).
KILL_ENV = "UNIME_KILL_AFTER_SHARDS"
_written: dict[str, int] = {}

# An actor may return this column besides its outputs: a JSON histogram {visual tokens: images} of the
# images it processed for the batch on one row, "" on the others (see :func:`visual_tokens_column`). The
# drivers sum it into the ``visual_tokens`` tally they return (utils.tallies); it never reaches a table.
VISUAL_TOKENS_COLUMN = "__visual_tokens__"


def visual_tokens_column(owner: Any, n: int) -> list[str]:
    """The :data:`VISUAL_TOKENS_COLUMN` of an ``n``-row batch: what ``owner``'s processor recorded since the
    last call (drained), on the first row."""
    from .tallies import drain_visual_tokens

    hist = drain_visual_tokens(owner)
    col = [""] * n
    if hist and n:
        col[0] = json.dumps({str(k): v for k, v in sorted(hist.items())})
    return col


def _add_visual_tokens(total: Counter, values) -> None:
    for v in values if values is not None else ():
        if isinstance(v, str) and v:
            total.update({int(k): int(c) for k, c in json.loads(v).items()})


def _write_shard(table: pa.Table, path: Path, what: str) -> None:
    write_table_atomic(table, path)
    spec = os.environ.get(KILL_ENV, "")
    if spec:
        label, _, n = spec.rpartition(":")
        _written[what] = _written.get(what, 0) + 1
        if label == what and _written[what] >= int(n):
            import signal

            logger.warning("%s=%s: killing this process", KILL_ENV, spec)
            os.kill(os.getpid(), signal.SIGKILL)


def pending_shards(table: str | os.PathLike, out_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(input shard, output shard) pairs whose output does not exist yet."""
    out_dir = Path(out_dir)
    return [(s, out_dir / s.name) for s in shard_paths(table) if not (out_dir / s.name).exists()]


def shard_rows(shard: Path) -> int:
    return pq.ParquetFile(shard).metadata.num_rows


def map_shards_local(fn: Callable[[dict[str, list]], dict[str, Any]], table: str | os.PathLike,
                     out_dir: str | os.PathLike, build_table: TableBuilder, columns: list[str] | None = None,
                     batch_size: int = 64, what: str = "rows") -> dict[str, Any]:
    """Single-process driver: ``fn(batch columns) -> output columns`` (same row count)."""
    todo = pending_shards(table, out_dir)
    total = sum(shard_rows(s) for s, _ in todo)
    progress = Progress(logger, f"{what} ({Path(table).name})", total, unit="rows")
    tokens: Counter = Counter()
    for shard, out in todo:
        acc: dict[str, list] = defaultdict(list)
        for batch in iter_batches(shard, batch_size=batch_size, columns=columns):
            cols = batch.to_pydict()
            res = {k: list(v) for k, v in fn(cols).items()}
            _add_visual_tokens(tokens, res.pop(VISUAL_TOKENS_COLUMN, None))
            n = len(next(iter(cols.values()))) if cols else 0
            for k, v in res.items():
                if len(v) != n:
                    raise RuntimeError(f"map function returned {len(v)} values of {k!r} for {n} rows")
                acc[k].extend(v)
            progress.update(n)
        _write_shard(build_table(dict(acc)), out, what)
    return {"rows": total, "shards_written": len(todo), "seconds": round(progress.elapsed, 3),
            "rows_per_s": round(progress.rate, 2) if total else 0.0, "visual_tokens": _tally(tokens)}


def _tally(tokens: Counter) -> dict[str, Any] | None:
    from .tallies import token_tally

    return token_tally(tokens)


class _WithPath:
    """Wraps a callable actor class so each output batch carries its input shard's name."""

    def __init__(self, fn_cls, fn_kwargs: dict[str, Any]):
        self.fn = fn_cls(**fn_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        paths = batch.pop("path")
        out = self.fn({k: list(v) for k, v in batch.items()})
        out = {k: (v if isinstance(v, np.ndarray) else _object_array(v)) for k, v in out.items()}
        out["__shard__"] = np.array([os.path.basename(str(p)) for p in paths], dtype=object)
        return out


def _object_array(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def map_shards_ray(fn_cls, fn_kwargs: dict[str, Any], table: str | os.PathLike, out_dir: str | os.PathLike,
                   build_table: TableBuilder, columns: list[str] | None = None, batch_size: int = 64,
                   min_actors: int = 1, max_actors: int = 2, num_cpus: float = 1.0, num_gpus: float = 0.0,
                   what: str = "rows") -> dict[str, Any]:
    """Ray Data driver: pending shards stream through an autoscaling pool of ``fn_cls(**fn_kwargs)`` actors."""
    import ray
    from ray.data import ActorPoolStrategy

    todo = pending_shards(table, out_dir)
    expected = {s.name: shard_rows(s) for s, _ in todo}
    outputs = {s.name: o for s, o in todo}
    total = sum(expected.values())
    progress = Progress(logger, f"{what} ({Path(table).name}, Ray)", total, unit="rows")
    tokens: Counter = Counter()
    for name, n in list(expected.items()):
        if n == 0:  # an empty shard yields no batch: its output is an empty table
            write_table_atomic(build_table({}), outputs[name])
            del expected[name]
    if expected:
        files = [str(s) for s, _ in todo if s.name in expected]
        # a read task per shard: small shards would otherwise merge into one block, leaving all but one actor idle
        ds = ray.data.read_parquet(files, columns=columns, include_paths=True, override_num_blocks=len(files))
        mapped = ds.map_batches(_WithPath, fn_constructor_kwargs={"fn_cls": fn_cls, "fn_kwargs": fn_kwargs},
                                batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus, num_gpus=num_gpus,
                                compute=ActorPoolStrategy(min_size=min_actors, max_size=max_actors))
        # per shard: the output batches' slices (arrays, not per-row Python objects) and the rows they hold
        buffers: dict[str, dict[str, list]] = {}
        done: Counter = Counter()
        for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
            names = batch.pop("__shard__")
            _add_visual_tokens(tokens, batch.pop(VISUAL_TOKENS_COLUMN, None))
            for name in np.unique(names):
                name = str(name)
                idx = np.nonzero(names == name)[0]
                buf = buffers.setdefault(name, defaultdict(list))
                for k, v in batch.items():
                    buf[k].append(v[idx])
                done[name] += len(idx)
                progress.update(len(idx))
                if done[name] == expected[name]:
                    cols = {k: list(np.concatenate(parts)) for k, parts in buffers.pop(name).items()}
                    _write_shard(build_table(cols), outputs[name], what)
        if buffers:
            raise RuntimeError(f"incomplete output for shards {sorted(buffers)}")
    return {"rows": total, "shards_written": len(todo), "seconds": round(progress.elapsed, 3),
            "rows_per_s": round(progress.rate, 2) if total else 0.0, "visual_tokens": _tally(tokens)}


class _ShardWorker:
    """A Ray actor that maps whole shards: reads one, calls its ``fn_cls`` instance a batch at a time, writes the
    output shard itself (atomically), so a shard is on disk the moment it is done."""

    def __init__(self, fn_cls, fn_kwargs: dict[str, Any], build_table: TableBuilder, columns: list[str] | None,
                 batch_size: int, what: str):
        self.fn, self.build_table, self.columns, self.batch_size, self.what = (
            fn_cls(**fn_kwargs), build_table, columns, batch_size, what)

    def ready(self) -> str:
        return node_id()

    def run(self, shard: str, out: str) -> tuple[int, dict[int, int]]:
        """(rows mapped, the visual-token histogram of the images they held)."""
        acc: dict[str, list] = defaultdict(list)
        tokens: Counter = Counter()
        rows = 0
        for batch in iter_batches(shard, batch_size=self.batch_size, columns=self.columns):
            res = self.fn(batch.to_pydict())
            _add_visual_tokens(tokens, res.pop(VISUAL_TOKENS_COLUMN, None))
            for k, v in res.items():
                if len(v) != batch.num_rows:
                    raise RuntimeError(f"map function returned {len(v)} values of {k!r} for {batch.num_rows} rows")
                acc[k].extend(v)
            rows += batch.num_rows
        _write_shard(self.build_table(dict(acc)), Path(out), self.what)
        return rows, dict(tokens)


def map_shards_actors(fn_cls, fn_kwargs: dict[str, Any], table: str | os.PathLike, out_dir: str | os.PathLike,
                      build_table: TableBuilder, columns: list[str] | None = None, batch_size: int = 64,
                      max_actors: int = 2, num_cpus: float = 1.0, num_gpus: float = 0.0,
                      what: str = "rows") -> dict[str, Any]:
    """Ray driver handing whole pending shards to ``max_actors`` actors (the output folder must be on storage the
    actors share). Each output shard is written as soon as it is done, so a killed run keeps every finished shard;
    memory is one shard per actor, and the driver holds none."""
    todo = pending_shards(table, out_dir)
    total = sum(shard_rows(s) for s, _ in todo)
    progress = Progress(logger, f"{what} ({Path(table).name}, Ray)", total, unit="rows")
    tokens: Counter = Counter()
    per_node: dict[str, int] = {}
    if todo:
        actors = spread_actors(_ShardWorker, min(max_actors, len(todo)), fn_cls, fn_kwargs, build_table, columns,
                               batch_size, what, num_cpus=num_cpus, num_gpus=num_gpus)

        def done(result: tuple[int, dict[int, int]]) -> None:
            tokens.update(result[1])
            progress.update(result[0])

        per_node = run_shards_on(actors, todo, done)
    return {"rows": total, "shards_written": len(todo), "seconds": round(progress.elapsed, 3),
            "rows_per_s": round(progress.rate, 2) if total else 0.0, "visual_tokens": _tally(tokens),
            "shards_per_node": per_node}


def node_id() -> str:
    """The Ray node this process runs on: the first 12 hex digits of its id (enough to tell nodes apart)."""
    import ray

    return ray.get_runtime_context().get_node_id()[:12]


def spread_actors(cls, count: int, *args, num_cpus: float = 1.0, num_gpus: float = 0.0) -> dict[Any, str]:
    """``count`` Ray actors of ``cls(*args)`` spread over the cluster's nodes (a pool of judges or searchers
    should use every node, not fill the driver's first), each built; ``{actor: its node}``. ``cls`` has a
    ``ready()`` that returns :func:`node_id`."""
    import ray

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy="SPREAD")(cls)
    actors = [remote.remote(*args) for _ in range(count)]
    return dict(zip(actors, ray.get([a.ready.remote() for a in actors])))


def run_shards_on(actors: dict[Any, str], jobs: list[tuple[Path, Path]], on_result: Callable[[Any], None]
                  ) -> dict[str, int]:
    """Hand each (input shard, output shard) to the next free actor's ``run``; ``on_result`` sees each result
    as it comes. Returns how many shards each node ran."""
    import ray

    free, running, queue, per_node = list(actors), {}, list(jobs), Counter()
    while queue or running:
        while free and queue:
            actor, (shard, out) = free.pop(), queue.pop(0)
            running[actor.run.remote(str(shard), str(out))] = actor
        [ref], _ = ray.wait(list(running), num_returns=1)
        actor = running.pop(ref)
        on_result(ray.get(ref))
        free.append(actor)
        per_node[actors[actor]] += 1
    return dict(sorted(per_node.items()))
