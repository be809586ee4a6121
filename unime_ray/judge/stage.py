"""Stage S2, MLLM-as-a-Judge: score each query's positive and retrieved candidates.

1. **Expand** the retrieval candidates table into a pairs-to-judge table, one row per (query, candidate),
   the positive first, rows of a query contiguous (so a judge actor sees a query's pairs together and
   reuses its prefix). One output shard per candidates shard; the query items come from the matching
   shard of the pair table (shards are aligned stage to stage), the candidates from the pool.
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
from pydantic import BaseModel, ConfigDict, Field

from ..data.io import iter_rows, read_table, shard_paths, write_table_atomic
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

    def __init__(self, spec: dict[str, Any], backend: YesNoScorer | None = None):
        self.spec = JudgeSpec.model_validate(spec)
        self.backend: YesNoScorer = backend if backend is not None else self.spec.build()
        self.judge_name = self.spec.model
        self.prompt_version = self.spec.score_version()

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        from ..models.encode import items_from_columns

        n = len(batch["query_id"])
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
                 pool_table: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, int]:
    """Write the pairs-to-judge table, one shard per candidates shard (resumable per shard)."""
    out_dir = Path(out_dir)
    pair_shards = {p.name: p for p in shard_paths(pairs_table)}
    pool: dict[str, dict[str, Any]] | None = None
    written = total = 0
    for shard in shard_paths(candidates_table):
        target = out_dir / shard.name
        if target.exists():
            total += _rows(target)
            continue
        if pool is None:
            pool = {r["id"]: r for r in iter_rows(pool_table, columns=["id", *_ITEM])}
        source = pair_shards.get(shard.name)
        if source is None:
            raise FileNotFoundError(f"pair table {pairs_table} has no shard {shard.name} to match {shard}")
        queries = {r["id"]: r for r in iter_rows(source, columns=["id", *(f"query_{n}" for n in _ITEM)])}
        cols: dict[str, list] = {name: [] for name in JUDGE_PAIRS_SCHEMA.names}
        for row in iter_rows(shard, columns=["query_id", "pos_id", "cand_ids"]):
            q = queries[row["query_id"]]
            for cand_id, positive in [(row["pos_id"], True)] + [(c, False) for c in row["cand_ids"]]:
                c = pool.get(cand_id)
                if c is None:
                    raise KeyError(f"candidate {cand_id!r} of query {row['query_id']!r} is not in the pool")
                cols["query_id"].append(row["query_id"])
                cols["cand_id"].append(cand_id)
                cols["is_positive"].append(positive)
                for n in _ITEM:
                    cols[f"query_{n}"].append(q[f"query_{n}"])
                    cols[f"cand_{n}"].append(c[n])
        write_table_atomic(pa.table(cols, schema=JUDGE_PAIRS_SCHEMA), target)
        written += 1
        total += len(cols["query_id"])
    return {"pairs": total, "shards_written": written}


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def score_pairs(pairs_dir: str | os.PathLike, out_dir: str | os.PathLike, spec: JudgeSpec,
                pool: Pool | None = None, scorer: YesNoScorer | None = None) -> dict[str, Any]:
    """Score every pending shard of the pairs-to-judge table (``pool`` None: in this process, handing
    ``judge.pool.batch_size`` pairs at a time; ``scorer``: a judge already loaded here, used in process)."""
    pool = pool or Pool.in_process(spec.judge.pool.batch_size)
    if scorer is not None and pool.ray:
        raise ValueError("a Ray pool builds the judge in its actors from the spec: pass no loaded scorer")
    kwargs = {"spec": spec.model_dump()}
    actor = JudgeActor(**kwargs, backend=scorer) if scorer is not None else None
    return pool.map_shards(JudgeActor, kwargs, pairs_dir, out_dir, _scores_table, what="judged pairs", actor=actor)


def write_quarantine(scores_dir: str | os.PathLike, path: str | os.PathLike) -> int:
    t = read_table(scores_dir)
    bad = t.filter(pc.invert(pc.is_null(t.column("error"))))
    write_table_atomic(bad.select(["query_id", "cand_id", "is_positive", "error"]), path)
    return bad.num_rows


def run_judge(candidates_table: str | os.PathLike, pairs_table: str | os.PathLike, pool_table: str | os.PathLike,
              out_dir: str | os.PathLike, spec: JudgeSpec, pool: Pool | None = None,
              scorer: YesNoScorer | None = None) -> dict[str, Any]:
    """The whole stage: expand -> score -> quarantine file and summary (``scorer``: see :func:`score_pairs`)."""
    out_dir = Path(out_dir)
    expanded = expand_pairs(candidates_table, pairs_table, pool_table, out_dir / "pairs")
    scores_dir = out_dir / "scores" / spec.identity()
    stats = score_pairs(out_dir / "pairs", scores_dir, spec, pool, scorer)
    n_bad = write_quarantine(scores_dir, out_dir / "quarantine.parquet")
    t = read_table(scores_dir, ["score", "is_positive", "error"])
    ok = t.filter(pc.is_null(t.column("error")))
    scores = np.asarray(ok.column("score").to_pylist(), dtype=np.float64)
    positive = np.asarray(ok.column("is_positive").to_pylist(), dtype=bool)
    return {"pairs": expanded["pairs"], "scored": int(len(scores)), "quarantined": n_bad,
            "scores_table": str(scores_dir), "quarantine": str(out_dir / "quarantine.parquet"),
            "judge": spec.model, "backend": spec.judge.backend, "prompt_version": spec.score_version(),
            "pairs_per_s": stats["rows_per_s"], "seconds": stats["seconds"],
            "visual_tokens": stats.get("visual_tokens"),
            "mean_score_positive": float(scores[positive].mean()) if positive.any() else None,
            "mean_score_candidates": float(scores[~positive].mean()) if (~positive).any() else None}
