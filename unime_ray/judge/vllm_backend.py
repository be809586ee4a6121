"""The MLLM judge on vLLM: P(Yes) / (P(Yes) + P(No)) for (query, candidate) pairs at GPU throughput.

vLLM is imported lazily: it only exists on CUDA machines (the ``gpu`` extra). Everything that does not need
the engine (engine and sampling arguments, request building, output parsing) is plain Python and is tested
without it.

How the score is read (vLLM 0.33-era API):

* Sampling: ``SamplingParams(max_tokens=1, temperature=0, logprobs=2, allowed_token_ids=[yes, no])``.
  The sampler applies the allowed-token whitelist to the logits before it samples. With the engine argument
  ``logprobs_mode="processed_logprobs"`` the returned logprobs are computed *after* that step, so they are
  the log-softmax over the pair and both ids always come back. With the default ``raw_logprobs`` they are
  computed from the raw logits first, and "No" can be missing from the top-k
  (https://docs.vllm.ai/en/latest/api/vllm/v1/sample/sampler/, "steps in order": 1 raw logprobs,
  3 allowed token ids, 7 greedy sample + processed logprobs; also shared/reference/ray_vllm_patterns.md B.2).
* Output: ``RequestOutput.outputs[0].logprobs`` is ``SampleLogprobs = list[dict[int, Logprob]]`` (one
  dict per generated token) with ``Logprob(logprob, rank, decoded_token)``
  (https://docs.vllm.ai/en/latest/api/vllm/logprobs/; the ``FlatLogprobs`` variant is indexable the same
  way). The score is ``exp(lp_yes) / (exp(lp_yes) + exp(lp_no))``, which is right whether or not vLLM
  renormalised over the pair.
* Inputs: a token prompt ``{"prompt_token_ids": [...], "multi_modal_data": {"image": [PIL, ...]}}``
  (``TokensPrompt``, https://docs.vllm.ai/en/v0.8.3/api/offline_inference/llm_inputs.html). For token
  prompts with multimodal data vLLM runs the HF processor on the images only and then applies the model's
  prompt updates itself ("Tokenized Prompt Inputs" / "Automatic prompt updating",
  https://docs.vllm.ai/en/latest/design/mm_processing/). For Qwen2-VL / Qwen2.5-VL that update is a
  ``PromptReplacement`` whose target is ONE ``<|image_pad|>`` id, replaced by ``grid_t*grid_h*grid_w /
  merge_size**2`` copies (``Qwen2VLMultiModalProcessor._get_prompt_updates`` in
  ``vllm/model_executor/models/qwen2_vl.py``), matching the offline example that writes
  ``<|vision_start|><|image_pad|><|vision_end|>`` once per image
  (https://github.com/vllm-project/vllm/blob/main/examples/offline_inference/vision_language.py,
  ``run_qwen2_5_vl``). So our token prompts carry one unexpanded pad per image.
* Engine: ``enable_prefix_caching`` (a query's ~51 prompts share the prefix), ``limit_mm_per_prompt``,
  ``mm_processor_kwargs={"min_pixels", "max_pixels"}`` (as in the same example), ``load_format="dummy"``
  for weight-free throughput runs (random weights; scores are meaningless there).

Bad pairs cost only themselves (:meth:`VLLMJudge.score_or_errors`): vLLM validates a whole ``generate``
call up front, so one unreadable image or over-long prompt fails every request of the call. Each pair is
therefore checked before it is sent (images decoded; the prompt length after vLLM's image expansion,
computed with the Qwen-VL resize rule, against ``max_model_len``), and a call that still fails is split
in halves until the failing request is alone: one bad pair in n costs about 2 log2(n) extra calls, and
only that pair is marked failed, with its reason.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..data.images import load_image
from ..data.schema import Item
from ..models.budget import ImageBudget
from ..models.processor import IMAGE_PAD
from .config import VLLMConfig
from .prompt import JudgePrompt, answer_token_ids, judge_images, judge_segments, split_token_ids, yes_probability

VLLM_MISSING = ("vLLM is not installed; pip install 'unime-ray[gpu]' on a CUDA machine, "
                "or use the transformers backend")


class JudgeOutputError(ValueError):
    """A vLLM output that does not carry the Yes/No logprobs the score needs."""


def check_vllm_backbone(model: str) -> None:
    """This backend sends Qwen-VL token prompts (one ``<|image_pad|>`` per image); refuse other backbones
    before an engine is built (a config that cannot be read here is left to vLLM)."""
    from ..models.backbone import ModelNotFoundError, load_config

    try:
        model_type = load_config(model).model_type
    except (ModelNotFoundError, OSError, ValueError):
        return
    if model_type not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"judge model {model!r} is {model_type}: the vLLM judge backend builds Qwen-VL prompts; "
                         "run this judge with judge.backend: transformers")


def engine_kwargs(model: str, cfg: VLLMConfig = VLLMConfig(), budget: ImageBudget = ImageBudget()) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``; ``extra_engine_kwargs`` win, except the logprobs mode. The budget's
    pixel range goes to vLLM's image processor (its resize is applied before vLLM sees an image)."""
    kw: dict[str, Any] = dict(
        model=str(model),
        tensor_parallel_size=cfg.tensor_parallel_size,
        max_model_len=cfg.max_model_len,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        enable_prefix_caching=cfg.enable_prefix_caching,
        load_format=cfg.load_format,
        dtype=cfg.dtype,
        # logprobs after the allowed-token whitelist, so both Yes and No always come back (module docstring)
        logprobs_mode="processed_logprobs",
        max_logprobs=2,
        # the judge never sends video: a zero limit keeps vLLM from budgeting encoder memory for it
        limit_mm_per_prompt={"image": cfg.max_images_per_prompt, "video": 0},
    )
    mm = {k: v for k, v in (("min_pixels", budget.min_pixels), ("max_pixels", budget.max_pixels)) if v is not None}
    if mm:
        kw["mm_processor_kwargs"] = mm
    extra = dict(cfg.extra_engine_kwargs)
    if extra.get("logprobs_mode", "processed_logprobs") != "processed_logprobs":
        raise ValueError("the vLLM judge needs logprobs_mode='processed_logprobs': with other modes the logprobs "
                         "are taken before allowed_token_ids and the 'No' entry can be missing")
    if extra.get("max_logprobs", 2) < 2:
        raise ValueError("the vLLM judge needs max_logprobs >= 2 (it reads both Yes and No)")
    kw.update(extra)
    return kw


def sampling_params_kwargs(yes_id: int, no_id: int) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams``: one greedy token restricted to {Yes, No}, both logprobs."""
    return dict(max_tokens=1, temperature=0.0, logprobs=2, allowed_token_ids=[int(yes_id), int(no_id)])


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_request(tokenizer, query: Item, candidate: Item, prompt: JudgePrompt = JudgePrompt(),
                  image_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """One vLLM token prompt for a pair.

    The ids are those of the whole prompt string, which start with the query prefix's own ids (checked;
    :class:`~unime_ray.judge.prompt.PromptSplitError`, a ValueError, otherwise): the same ids the
    transformers backend scores, and an identical prefix for all candidates of a query (prefix caching).
    Each image appears as ONE ``<|image_pad|>``; vLLM expands it to the image's feature count itself (see
    the module docstring), so passing the already-expanded count would be wrong.
    """
    prefix, suffix = judge_segments(query, candidate, prompt)
    head, tail = split_token_ids(tokenizer, prefix, suffix)
    ids = head + tail
    images = [load_image(it, image_root) for it in judge_images(query, candidate)]
    pad = _token_ids(tokenizer, IMAGE_PAD)
    n_pads = ids.count(pad[0]) if len(pad) == 1 else 0
    if n_pads != len(images):
        # vLLM binds images to pads in prompt order, so a stray literal pad in a text would mis-bind silently
        raise ValueError(f"judge prompt has {n_pads} {IMAGE_PAD} tokens for {len(images)} images; item texts "
                         f"must not contain {IMAGE_PAD} (use the image marker of the data schema)")
    request: dict[str, Any] = {"prompt_token_ids": ids}
    if images:
        request["multi_modal_data"] = {"image": images}
    return request


def _logprob_value(entry: Any) -> float:
    return float(getattr(entry, "logprob", entry))


def parse_yes_no(completion_logprobs: Any, yes_id: int, no_id: int) -> float:
    """P(Yes) / (P(Yes) + P(No)) from a ``CompletionOutput.logprobs`` (first generated token).

    Entries may be vLLM ``Logprob`` objects or plain floats. The ratio only needs the difference of the two
    logprobs, so it is the same whether vLLM renormalised over the pair or returned full-vocabulary values.
    """
    if not completion_logprobs:
        raise JudgeOutputError("vLLM returned no logprobs for the judge's answer token; "
                               "was SamplingParams(logprobs=2) set?")
    first = completion_logprobs[0]
    if not isinstance(first, Mapping):
        raise JudgeOutputError(f"unexpected logprobs entry {type(first).__name__}; expected dict[token_id, Logprob]")
    missing = [name for name, tid in (("Yes", yes_id), ("No", no_id)) if tid not in first]
    if missing:
        raise JudgeOutputError(
            f"the judge's logprobs lack {' and '.join(missing)} (token ids {yes_id}/{no_id}; got ids "
            f"{sorted(first)}); the engine needs logprobs_mode='processed_logprobs' and the request "
            f"allowed_token_ids=[yes, no] with logprobs=2")
    lp_yes, lp_no = _logprob_value(first[yes_id]), _logprob_value(first[no_id])
    if math.isnan(lp_yes) or math.isnan(lp_no) or (lp_yes == lp_no == -math.inf):
        raise JudgeOutputError(f"the judge's Yes/No logprobs are not usable: yes={lp_yes}, no={lp_no}")
    if lp_yes == lp_no:  # also covers +inf == +inf
        return 0.5
    return yes_probability(lp_yes, lp_no)


@dataclass(frozen=True)
class VisionLimits:
    """How the Qwen-VL image processor sizes an image: the pixel range and the patch / merge sizes."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2


MAX_ASPECT_RATIO = 200   # the Qwen-VL processors refuse more elongated images


def qwen_resized_size(height: int, width: int, limits: VisionLimits) -> tuple[int, int]:
    """(height, width) the Qwen-VL image processor resizes an image to: each side rounded to a multiple of
    patch * merge, then scaled (keeping the aspect ratio) into [min_pixels, max_pixels]. Raises ValueError
    for the images the processor refuses (aspect ratio above 200)."""
    factor = limits.patch_size * limits.merge_size
    if min(height, width) <= 0:
        raise ValueError(f"image of size {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {width}x{height} pixels: aspect ratio above {MAX_ASPECT_RATIO}, which the "
                         f"Qwen-VL processor refuses")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > limits.max_pixels:
        scale = math.sqrt(height * width / limits.max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < limits.min_pixels:
        scale = math.sqrt(limits.min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def image_token_count(height: int, width: int, limits: VisionLimits) -> int:
    """How many ``<|image_pad|>`` tokens vLLM expands one image into (grid cells / merge_size**2)."""
    h, w = qwen_resized_size(height, width, limits)
    return (h // (limits.patch_size * limits.merge_size)) * (w // (limits.patch_size * limits.merge_size))


def vision_limits(model: str, budget: ImageBudget = ImageBudget()) -> VisionLimits | None:
    """The image sizing vLLM will apply: the checkpoint's image-processor config, with the budget's
    ``min_pixels`` / ``max_pixels`` (passed to vLLM as ``mm_processor_kwargs``) on top. None when the
    image-processor config cannot be read (then only text length is checked before sending)."""
    try:
        from transformers.image_processing_utils import ImageProcessingMixin

        d, _ = ImageProcessingMixin.get_image_processor_dict(str(model))
    except Exception:  # noqa: BLE001 - a missing config only weakens the up-front check
        return None
    size = d.get("size") or {}
    lo = budget.min_pixels or d.get("min_pixels") or size.get("shortest_edge")
    hi = budget.max_pixels or d.get("max_pixels") or size.get("longest_edge")
    if not lo or not hi:
        return None
    return VisionLimits(int(lo), int(hi), int(d.get("patch_size", 14)), int(d.get("merge_size", 2)))


def prompt_length(request: Mapping[str, Any], limits: VisionLimits | None) -> int:
    """Tokens of a request once vLLM has expanded each ``<|image_pad|>`` to its image's tokens (without
    ``limits``, each image counts as its one pad: a lower bound)."""
    ids = request["prompt_token_ids"]
    images = (request.get("multi_modal_data") or {}).get("image") or []
    if limits is None:
        return len(ids)
    return len(ids) - len(images) + sum(image_token_count(im.height, im.width, limits) for im in images)


def _query_grouped_order(pairs: Sequence[tuple[Item, Item]]) -> list[int]:
    """Pair indices with pairs of the same query adjacent (first-seen query order), for prefix-cache hits."""
    first_seen: dict[str, int] = {}
    keys = []
    for i, (query, _) in enumerate(pairs):
        key = query.content_key()
        first_seen.setdefault(key, i)
        keys.append(first_seen[key])
    return sorted(range(len(pairs)), key=lambda i: (keys[i], i))


class VLLMJudge:
    """Scores (query, candidate) pairs with a vLLM engine; the GPU twin of the transformers judge."""

    name = "vllm"
    max_model_len: int | None = None          # None: no length check before sending
    vision: VisionLimits | None = None        # None: images count as one token in that check
    budget: ImageBudget = ImageBudget()       # images are resized to its resize before vLLM sees them

    def __init__(self, model: str, cfg: VLLMConfig = VLLMConfig(), prompt: JudgePrompt = JudgePrompt(),
                 image_root: str | os.PathLike | None = None, budget: ImageBudget = ImageBudget()):
        try:
            import vllm
        except ImportError as exc:
            raise RuntimeError(VLLM_MISSING) from exc
        check_vllm_backbone(model)
        self.budget = budget
        self.prompt = prompt
        self.image_root = image_root
        self.llm = vllm.LLM(**engine_kwargs(model, cfg, budget))
        self.tokenizer = self.llm.get_tokenizer()
        self.yes_id, self.no_id = answer_token_ids(self.tokenizer, prompt)
        self.sampling_params = vllm.SamplingParams(**sampling_params_kwargs(self.yes_id, self.no_id))
        self.max_model_len = cfg.max_model_len
        self.vision = vision_limits(model, budget)
        self.generate_calls = 0
        self.visual_tokens: Counter = Counter()   # {tokens per image: images sent}, see models.budget

    def score(self, pairs: Sequence[tuple[Item, Item]]) -> np.ndarray:
        """float64 scores in pair order (one ``generate`` call when every pair is good); raises ValueError
        naming the first bad pair (use :meth:`score_or_errors` to keep the others)."""
        scores, errors = self.score_or_errors(pairs)
        bad = next((i for i, e in enumerate(errors) if e), None)
        if bad is not None:
            raise ValueError(f"pair {bad}: {errors[bad]}")
        return scores

    def check_request(self, query: Item, candidate: Item) -> dict[str, Any]:
        """The request of a pair, or ValueError / ImageError with the reason vLLM would fail the whole call:
        an image that does not decode or that the processor refuses, or a prompt (after image expansion)
        that leaves no room for the answer token within ``max_model_len``."""
        request = build_request(self.tokenizer, query, candidate, self.prompt, self.image_root)
        if mm := request.get("multi_modal_data"):
            mm["image"] = [self.budget.prepare(im) for im in mm["image"]]
        for im in (request.get("multi_modal_data") or {}).get("image") or []:
            qwen_resized_size(im.height, im.width, self.vision or VisionLimits())   # refused shapes raise
        if self.max_model_len is not None:
            n = prompt_length(request, self.vision)
            if n + 1 > self.max_model_len:
                raise ValueError(f"prompt is {n} tokens (images expanded); with the answer token that exceeds "
                                 f"the judge's max_model_len of {self.max_model_len} (lower max_pixels?)")
        return request

    def score_or_errors(self, pairs: Sequence[tuple[Item, Item]]) -> tuple[np.ndarray, list[str | None]]:
        """(scores with NaN for bad pairs, error message or None per pair); a bad pair costs only itself."""
        pairs = list(pairs)
        scores = np.full(len(pairs), np.nan, dtype=np.float64)
        errors: list[str | None] = [None] * len(pairs)
        batch: list[tuple[int, dict[str, Any]]] = []
        for i in _query_grouped_order(pairs):
            try:
                batch.append((i, self.check_request(*pairs[i])))
            except ValueError as exc:   # ImageError is one
                errors[i] = f"{type(exc).__name__}: {exc}"
        if not hasattr(self, "visual_tokens"):
            self.visual_tokens = Counter()
        limits = self.vision or VisionLimits()   # what vLLM expands each image to (the stage's token tally)
        for _, request in batch:
            self.visual_tokens.update(image_token_count(im.height, im.width, limits)
                                      for im in (request.get("multi_modal_data") or {}).get("image") or [])
        if batch:
            self._generate_isolating(batch, scores, errors)
        return scores, errors

    def _generate_isolating(self, batch: list[tuple[int, dict[str, Any]]], scores: np.ndarray,
                            errors: list[str | None]) -> None:
        """Score ``batch`` with one ``generate`` call; if the call fails, split it in halves (recursively)
        so a request that fails on its own is marked failed and every other request is scored."""
        try:
            self.generate_calls = getattr(self, "generate_calls", 0) + 1
            outputs = self.llm.generate([r for _, r in batch], self.sampling_params, use_tqdm=False)
            if len(outputs) != len(batch):
                raise JudgeOutputError(f"vLLM returned {len(outputs)} outputs for {len(batch)} requests")
        except Exception as exc:  # noqa: BLE001 - narrowed below; each failure is recorded with its reason
            if type(exc).__name__ == "EngineDeadError":   # the engine is gone: no request can succeed
                raise
            if len(batch) == 1:
                errors[batch[0][0]] = f"vLLM generate failed: {type(exc).__name__}: {exc}"
                return
            mid = len(batch) // 2
            self._generate_isolating(batch[:mid], scores, errors)
            self._generate_isolating(batch[mid:], scores, errors)
            return
        for (i, _), out in zip(batch, outputs):
            try:
                scores[i] = parse_yes_no(out.outputs[0].logprobs, self.yes_id, self.no_id)
            except JudgeOutputError as exc:
                errors[i] = f"JudgeOutputError: {exc}"
