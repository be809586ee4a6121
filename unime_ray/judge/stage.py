"""Stage S2, MLLM-as-a-Judge: score each query's positive and retrieved candidates.

1. **Expand** the retrieval candidates table into a pairs-to-judge table, one lean row per (query,
   candidate): ids and ``is_positive`` only, the positive first, rows of a query contiguous (so a judge actor
   sees a query's pairs together and reuses its prefix). One output shard per candidates shard. The query and
   candidate content is not copied into the 51 rows of each query: the pairs and pool tables are copied once
   into memory-mapped lookups (:mod:`unime_ray.data.lookup`) that the judge actors join per batch, so no
   process holds more than its batch (a pairs-to-judge table that carries the content columns is used as is).
2. **Score** it through a pool of judge actors (Ray Data, ``ActorPoolStrategy``; one GPU each for
   vLLM). The scores table: ``query_id, cand_id, is_positive, score, error, judge, prompt_version``.
   Output shards live under a folder named by judge and prompt version and are written atomically, so a
   rerun skips what was scored with the same judge and prompt, and a killed run loses and duplicates
   nothing. Bad pairs (unreadable image, prompt longer than the context) get ``score = NaN`` and a reason,
   are listed in the quarantine file, and are never scored as 0.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from ..data.io import shard_paths, write_table_atomic
from ..data.schema import Item
from ..models.budget import ImageBudget
from ..utils.pool import Pool
from ..utils.shards import VISUAL_TOKENS_COLUMN, visual_tokens_column
from .config import JudgeConfig
from .prompt import JudgePrompt

logger = logging.getLogger(__name__)

_ITEM = ("instruction", "text", "image", "image_path")
JUDGE_PAIRS_SCHEMA = pa.schema(
    [pa.field("query_id", pa.string()), pa.field("cand_id", pa.string()), pa.field("is_positive", pa.bool_())]
    + [pa.field(f"query_{n}", pa.binary() if n == "image" else pa.string()) for n in _ITEM]
    + [pa.field(f"cand_{n}", pa.binary() if n == "image" else pa.string()) for n in _ITEM])
LEAN_PAIRS_SCHEMA = pa.schema(JUDGE_PAIRS_SCHEMA.field(n) for n in ("query_id", "cand_id", "is_positive"))
SCORES_SCHEMA = pa.schema([
    pa.field("query_id", pa.string()), pa.field("cand_id", pa.string()), pa.field("is_positive", pa.bool_()),
    pa.field("score", pa.float64()), pa.field("error", pa.string()), pa.field("judge", pa.string()),
    pa.field("prompt_version", pa.string()),
])


class JudgeSpec(BaseModel):
    """What a judge actor builds: the run's ``judge`` section plus what the run resolves (its checkpoint, image
    root and budget); the dump of it is what crosses to Ray workers."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str                           # the resolved checkpoint (encoder backend: a fitted judge folder)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    image_root: str | None = None
    budget: ImageBudget = Field(default_factory=ImageBudget)   # the judge role's image budget
    feature_cache: str | None = None     # encoder: a folder of cached tower features (read, and appended to)

    def judge_prompt(self) -> JudgePrompt:
        j = self.judge
        return JudgePrompt(version=j.prompt_version, **({"instruction": j.instruction} if j.instruction else {}))

    def build(self):
        j = self.judge
        if j.backend == "transformers":
            from .hf_backend import TransformersJudge

            return TransformersJudge(self.model, self.judge_prompt(), dtype=j.dtype, image_root=self.image_root,
                                     image_options=self.budget, batch_size=j.batch_size,
                                     prefix_reuse=j.prefix_reuse, max_length=j.max_length)
        if j.backend == "vllm":
            from .vllm_backend import VLLMJudge

            return VLLMJudge(self.model, j.vllm, self.judge_prompt(), image_root=self.image_root, budget=self.budget)
        from .encoder.backend import EncoderJudge

        return EncoderJudge.load(self.model, image_root=self.image_root, feature_cache=self.feature_cache,
                                 batch_size=max(j.batch_size, 256))

    def score_version(self) -> str:
        """What the scores were made with, stored per score: the prompt version (an encoder judge has none)."""
        if self.judge.backend == "encoder":
            from .encoder.backend import FORMAT, FORMAT_VERSION

            return f"{FORMAT}-v{FORMAT_VERSION}"
        return self.judge_prompt().version

    def identity(self) -> str:
        """Folder name for this judge + prompt: scores of another judge or prompt never mix in."""
        prompt = self.judge_prompt()
        key = f"{self.model}|{asdict(prompt)}" if self.judge.backend != "encoder" else f"{self.model}|encoder"
        h = hashlib.sha1(key.encode()).hexdigest()[:8]
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(self.model).name)
        return f"{name}-{self.score_version()}-{h}"


class YesNoScorer(Protocol):
    """What scores (query, candidate) pairs with P(Yes): the judge backends, and the reranker when serving."""

    def score_or_errors(self, pairs: Sequence[tuple[Item, Item]]) -> tuple[np.ndarray, list[str | None]]:
        """Scores in pair order (NaN where a pair cannot be scored) and each pair's error or None."""
        ...


class JudgeActor:
    """Builds the judge once (or takes one built by the caller); maps rows of the pairs-to-judge table to
    score rows."""

    def __init__(self, spec: dict[str, Any], backend: YesNoScorer | None = None,
                 content: dict[str, str] | None = None):
        from ..data.lookup import RowLookup

        self.spec = JudgeSpec.model_validate(spec)
        # {"query_": lookup file, "cand_": lookup file}: what joins a lean row's content by its ids
        self.content = {side: RowLookup(path) for side, path in (content or {}).items()}
        self.backend: YesNoScorer = backend if backend is not None else self.spec.build()
        self.judge_name = self.spec.model
        self.prompt_version = self.spec.score_version()

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        from ..models.encode import items_from_columns

        n = len(batch["query_id"])
        for side, lookup in self.content.items():
            if f"{side}text" not in batch:
                batch = {**batch, **lookup.columns(batch[f"{side}id"], side, what=side[:-1])}
        pairs = list(zip(items_from_columns({**batch, "id": batch["query_id"]}, "query_"),
                         items_from_columns({**batch, "id": batch["query_id"]}, "cand_")))
        scores, errors = self.backend.score_or_errors(pairs)
        return {"query_id": list(batch["query_id"]), "cand_id": list(batch["cand_id"]),
                "is_positive": [bool(x) for x in batch["is_positive"]], "score": [float(s) for s in scores],
                "error": errors, "judge": [self.judge_name] * n, "prompt_version": [self.prompt_version] * n,
                VISUAL_TOKENS_COLUMN: visual_tokens_column(self.backend, n)}


def _scores_table(cols: dict[str, list]) -> pa.Table:
    if not cols:
        return SCORES_SCHEMA.empty_table()
    # Through Ray Data an all-None column arrives as NaN floats: strings are strings or missing.
    errors = [e if isinstance(e, str) else None for e in cols["error"]]
    return pa.table({**{k: cols[k] for k in SCORES_SCHEMA.names}, "error": errors}, schema=SCORES_SCHEMA)


def expand_pairs(candidates_table: str | os.PathLike, pairs_table: str | os.PathLike,
                 pool_table: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write the lean pairs-to-judge table, one shard per candidates shard (resumable per shard), and the
    content lookups of the queries and the pool next to it (``content``: what :class:`JudgeActor` joins with)."""
    from ..data.lookup import build_lookup

    out_dir = Path(out_dir)
    content_dir = out_dir.parent / "content"
    content = {"query_": str(build_lookup(pairs_table, content_dir / "queries.arrow",
                                          [f"query_{n}" for n in _ITEM], strip="query_")),
               "cand_": str(build_lookup(pool_table, content_dir / "pool.arrow", _ITEM))}
    written = total = 0
    for shard in shard_paths(candidates_table):
        target = out_dir / shard.name
        if target.exists():
            total += _rows(target)
            continue
        t = pq.read_table(shard, columns=["query_id", "pos_id", "cand_ids"])
        per_query = 1 + np.asarray(pc.fill_null(pc.list_value_length(t.column("cand_ids")), 0), dtype=np.int64)
        query_ids = pc.take(t.column("query_id"), np.repeat(np.arange(t.num_rows), per_query))
        # each query's positive, then its candidates: the positive is the first row of the query's block
        starts = np.concatenate([[0], np.cumsum(per_query)[:-1]]).astype(np.int64)
        is_positive = np.zeros(int(per_query.sum()), dtype=bool)
        is_positive[starts] = True
        cand_ids = np.empty(len(is_positive), dtype=object)
        cand_ids[starts] = t.column("pos_id").to_pylist()
        cand_ids[~is_positive] = pc.list_flatten(t.column("cand_ids")).to_pylist()
        lean = pa.table([query_ids, pa.array(cand_ids, type=pa.string()), pa.array(is_positive)],
                        schema=LEAN_PAIRS_SCHEMA)
        _check_known(lean, content)
        write_table_atomic(lean, target)
        written += 1
        total += lean.num_rows
    return {"pairs": total, "shards_written": written, "content": content}


def _check_known(lean: pa.Table, content: dict[str, str]) -> None:
    """Fail before judging when a query or a candidate (positive included) is missing from its table."""
    from ..data.lookup import RowLookup

    RowLookup(content["query_"]).take(lean.column("query_id").unique().to_pylist(), what="query")
    _, found = RowLookup(content["cand_"]).find(lean.column("cand_id").to_pylist())
    if not found.all():
        i = int(np.argmin(found))
        raise KeyError(f"candidate {lean.column('cand_id')[i].as_py()!r} of query "
                       f"{lean.column('query_id')[i].as_py()!r} is not in the pool")


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def score_pairs(pairs_dir: str | os.PathLike, out_dir: str | os.PathLike, spec: JudgeSpec,
                pool: Pool | None = None, scorer: YesNoScorer | None = None,
                content: dict[str, str] | None = None) -> dict[str, Any]:
    """Score every pending shard of the pairs-to-judge table (``pool`` None: in this process, handing
    ``judge.pool.batch_size`` pairs at a time; ``scorer``: a judge already loaded here, used in process;
    ``content``: the lookups a lean table's rows are joined with, see :func:`expand_pairs`)."""
    pool = pool or Pool.in_process(spec.judge.pool.batch_size)
    if scorer is not None and pool.ray:
        raise ValueError("a Ray pool builds the judge in its actors from the spec: pass no loaded scorer")
    kwargs = {"spec": spec.model_dump(), "content": content}
    if pool.ray:   # whole shards per actor: each scores shard is on disk as soon as it is judged
        from ..utils.shards import map_shards_actors

        return map_shards_actors(JudgeActor, kwargs, pairs_dir, out_dir, _scores_table, batch_size=pool.batch_size,
                                 max_actors=pool.max_actors, num_cpus=pool.num_cpus_per_actor,
                                 num_gpus=pool.num_gpus_per_actor, what="judged pairs")
    actor = JudgeActor(**kwargs, backend=scorer) if scorer is not None else None
    return pool.map_shards(JudgeActor, kwargs, pairs_dir, out_dir, _scores_table, what="judged pairs", actor=actor)


def write_quarantine(scores_dir: str | os.PathLike, path: str | os.PathLike) -> int:
    """The pairs the judge could not score, read one score shard at a time."""
    parts = [bad.select(["query_id", "cand_id", "is_positive", "error"]) for shard in shard_paths(scores_dir)
             for t in [pq.read_table(shard, columns=["query_id", "cand_id", "is_positive", "error"])]
             for bad in [t.filter(pc.invert(pc.is_null(t.column("error"))))]]
    bad = pa.concat_tables(parts) if parts else SCORES_SCHEMA.empty_table().select(["query_id", "cand_id",
                                                                                      "is_positive", "error"])
    write_table_atomic(bad, path)
    return bad.num_rows


def score_means(scores_dir: str | os.PathLike) -> dict[str, Any]:
    """Scored pairs and the mean score of positives and of candidates, summed one score shard at a time."""
    n, sums = np.zeros(2, dtype=np.int64), np.zeros(2)     # [candidates, positives]
    for shard in shard_paths(scores_dir):
        t = pq.read_table(shard, columns=["score", "is_positive", "error"])
        ok = t.filter(pc.is_null(t.column("error")))
        positive = ok.column("is_positive").to_numpy(zero_copy_only=False).astype(bool)
        scores = ok.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        n += [(~positive).sum(), positive.sum()]
        sums += [scores[~positive].sum(), scores[positive].sum()]
    return {"scored": int(n.sum()),
            "mean_score_positive": float(sums[1] / n[1]) if n[1] else None,
            "mean_score_candidates": float(sums[0] / n[0]) if n[0] else None}


def run_judge(candidates_table: str | os.PathLike, pairs_table: str | os.PathLike, pool_table: str | os.PathLike,
              out_dir: str | os.PathLike, spec: JudgeSpec, pool: Pool | None = None,
              scorer: YesNoScorer | None = None) -> dict[str, Any]:
    """The whole stage: expand -> score -> quarantine file and summary (``scorer``: see :func:`score_pairs`)."""
    out_dir = Path(out_dir)
    expanded = expand_pairs(candidates_table, pairs_table, pool_table, out_dir / "pairs")
    scores_dir = out_dir / "scores" / spec.identity()
    stats = score_pairs(out_dir / "pairs", scores_dir, spec, pool, scorer, content=expanded["content"])
    n_bad = write_quarantine(scores_dir, out_dir / "quarantine.parquet")
    means = score_means(scores_dir)
    return {"pairs": expanded["pairs"], "scored": means["scored"], "quarantined": n_bad,
            "scores_table": str(scores_dir), "quarantine": str(out_dir / "quarantine.parquet"),
            "judge": spec.model, "backend": spec.judge.backend, "prompt_version": spec.score_version(),
            "pairs_per_s": stats["rows_per_s"], "seconds": stats["seconds"],
            "visual_tokens": stats.get("visual_tokens"),
            "mean_score_positive": means["mean_score_positive"],
            "mean_score_candidates": means["mean_score_candidates"]}
