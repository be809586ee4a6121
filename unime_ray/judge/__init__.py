"""Stage S2, MLLM-as-a-Judge: the pairwise Yes/No prompt, transformers and vLLM backends, the Ray stage."""

from .prompt import JudgePrompt, answer_token_ids, judge_segments, judge_text, yes_probability
from .stage import JudgeSpec, run_judge

__all__ = ["JudgePrompt", "JudgeSpec", "answer_token_ids", "judge_segments", "judge_text", "run_judge",
           "yes_probability"]
