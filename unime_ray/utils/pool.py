"""Where a shard-to-shard map runs: in this process, or over an autoscaling Ray Data actor pool.

One setting (:class:`Pool`) is both the config section shape (``embed.pool``, ``judge.pool``, ``eval.pool``)
and the argument the library functions take, so no stage threads actor counts, CPUs, GPUs and batch sizes
through its signatures one by one. ``Pool()`` is the default Ray pool; ``Pool.in_process()`` (or ``None``
where a function takes ``pool: Pool | None``) runs in the caller's process without Ray.
"""

from __future__ import annotations

import os
from typing import Any, Callable, ClassVar

from pydantic import Field, model_validator

from .settings import Section


class Pool(Section):
    """Actors (min..max, autoscaling), resources per actor, and rows handed to an actor at a time."""

    ray: bool = Field(default=True, description="on Ray actors; false: in this process, e.g. debugging or small data")
    min_actors: int = Field(default=1, ge=1, description="actors kept while the map runs")
    max_actors: int = Field(default=2, ge=1, description="actors the pool may grow to while work is queued")
    num_cpus_per_actor: float = Field(default=1.0, gt=0, description="CPUs each actor reserves")
    num_gpus_per_actor: float = Field(default=0.0, ge=0, description="GPUs each actor reserves (fractions share one)")
    batch_size: int = Field(default=16, ge=1, description="rows per call of an actor")

    @model_validator(mode="after")
    def _sizes(self):
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")
        return self

    # the settings the tool commands (embed, eval, index) take as flags
    FLAGS: ClassVar[tuple[str, ...]] = ("ray", "min_actors", "max_actors", "num_gpus_per_actor", "batch_size")

    @classmethod
    def in_process(cls, batch_size: int = 16) -> "Pool":
        return cls(ray=False, batch_size=batch_size)

    def map_shards(self, actor_cls: Callable[..., Callable[[dict[str, list]], dict[str, Any]]],
                   actor_kwargs: dict[str, Any], table: str | os.PathLike, out_dir: str | os.PathLike,
                   build_table, columns: list[str] | None = None, what: str = "rows",
                   actor: Callable[[dict[str, list]], dict[str, Any]] | None = None) -> dict[str, Any]:
        """Map every pending input shard of ``table`` to an output shard (see :mod:`unime_ray.utils.shards`).

        ``actor_cls(**actor_kwargs)`` is built once per actor (once here when in-process, unless ``actor``, an
        already built one, is given: a model loaded by the caller is reused)."""
        from .shards import map_shards_local, map_shards_ray

        if not self.ray:
            fn = actor if actor is not None else actor_cls(**actor_kwargs)
            return map_shards_local(fn, table, out_dir, build_table, columns, self.batch_size, what=what)
        return map_shards_ray(actor_cls, actor_kwargs, table, out_dir, build_table, columns, self.batch_size,
                              self.min_actors, self.max_actors, self.num_cpus_per_actor, self.num_gpus_per_actor,
                              what=what)
