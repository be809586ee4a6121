"""Stage S2, MLLM-as-a-Judge: the pairwise Yes/No prompt, transformers and vLLM backends, the Ray stage.
Names load lazily, so ``unime_ray.judge.config`` (pydantic only) stays cheap to import from the run config."""

from __future__ import annotations

from ..utils.lazy import lazy_exports

_EXPORTS = {"JudgeConfig": "config", "VLLMConfig": "config",
            "JudgePrompt": "prompt", "answer_token_ids": "prompt", "judge_segments": "prompt", "judge_text": "prompt",
            "yes_probability": "prompt", "JudgeSpec": "stage", "run_judge": "stage"}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
