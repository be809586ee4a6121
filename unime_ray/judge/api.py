"""The judge from Python: any backend behind one object that scores (query, candidate) pairs with P(Yes).

``s = e_yes / (e_yes + e_no)`` of the pairwise prompt for an MLLM judge (transformers on CPU or GPU, vLLM on
GPUs); the calibrated similarity for a fitted dual-encoder judge. The pipeline's judge stage builds the same
backends (:class:`~unime_ray.judge.stage.JudgeSpec`) and :func:`unime_ray.mine_hard_negatives` takes a
:class:`Judge` as it is.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from .config import JudgeConfig
from .stage import JudgeSpec, YesNoScorer


class Judge:
    """A judge backend with list-in, array-out scoring.

    >>> judge = Judge.from_pretrained(tiny_judge)     # a folder or a hub name, e.g. "Qwen/Qwen2-VL-7B-Instruct"
    >>> scores = judge.score(["a red circle", "a red circle"], ["red circle", "blue square"])
    >>> scores.shape, bool(((scores >= 0) & (scores <= 1)).all())
    ((2,), True)
    """

    def __init__(self, scorer: YesNoScorer, spec: JudgeSpec | None = None):
        self.scorer = scorer
        self.spec = spec            # how to rebuild it on Ray actors (None: a scorer built by the caller)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, backend: str = "auto",
                        config: JudgeConfig | Mapping[str, Any] | None = None,
                        image_root: str | os.PathLike | None = None, **overrides: Any) -> "Judge":
        """Load a judge: ``backend`` ``transformers`` (MLLM, any device), ``vllm`` (MLLM, GPUs), ``encoder`` (a
        fitted dual-encoder judge folder) or ``auto`` (encoder for such a folder, else transformers).
        ``config``/``overrides``: fields of :class:`~unime_ray.judge.config.JudgeConfig` (prompt, dtype, ...)."""
        spec = cls.spec_for(name_or_path, backend, config, image_root, **overrides)
        return cls(spec.build(), spec)

    @staticmethod
    def spec_for(name_or_path: str | os.PathLike, backend: str = "auto",
                 config: JudgeConfig | Mapping[str, Any] | None = None,
                 image_root: str | os.PathLike | None = None, **overrides: Any) -> JudgeSpec:
        """What :meth:`from_pretrained` loads, without loading it: how Ray actors build the same judge."""
        from ..utils.ray_utils import absolute_if_local
        from .encoder.backend import is_encoder_judge

        conf = config.model_dump() if isinstance(config, JudgeConfig) else dict(config or {})
        conf.update(overrides)
        if backend == "auto":
            backend = "encoder" if is_encoder_judge(name_or_path) else conf.get("backend", "transformers")
        conf["backend"] = backend
        if backend == "vllm":
            conf.setdefault("pool", {"num_gpus_per_actor": 1})
        return JudgeSpec(model=absolute_if_local(name_or_path), judge=JudgeConfig.model_validate(conf),
                         image_root=absolute_if_local(image_root))

    def score_or_errors(self, pairs: Sequence[tuple[Any, Any]]) -> tuple[np.ndarray, list[str | None]]:
        """Scores of (query, candidate) pairs (NaN where a pair cannot be scored) and each pair's error."""
        from ..data.inputs import to_item

        return self.scorer.score_or_errors([(to_item(q), to_item(c)) for q, c in pairs])

    def score(self, queries: Any, candidates: Any, *, raise_errors: bool = False) -> np.ndarray:
        """P(Yes) of each (query, candidate): two lists of equal length, or one query against many candidates.
        Items are strings, dicts (``text``/``image``/``instruction``), images or ``Item``s. A pair that cannot
        be scored (an unreadable image, a prompt past the context) is NaN, or an error with ``raise_errors``."""
        if not isinstance(queries, (list, tuple)):
            queries = [queries] * (len(candidates) if isinstance(candidates, (list, tuple)) else 1)
        if not isinstance(candidates, (list, tuple)):
            candidates = [candidates]
        if len(queries) != len(candidates):
            raise ValueError(f"{len(queries)} queries for {len(candidates)} candidates")
        scores, errors = self.score_or_errors(list(zip(queries, candidates)))
        bad = [(i, e) for i, e in enumerate(errors) if e]
        if bad and raise_errors:
            raise ValueError(f"{len(bad)} pair(s) could not be scored; first: pair {bad[0][0]}: {bad[0][1]}")
        return scores

    @property
    def name(self) -> str:
        return self.spec.model if self.spec is not None else type(self.scorer).__name__
