"""The vLLM judge backend: engine/sampling arguments, token requests, output parsing (no vLLM needed),
and one GPU test that checks vLLM's scores against a transformers forward."""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pytest

from tests.conftest import make_png
from unime_ray.data.schema import Item
from unime_ray.models.budget import ImageBudget
from unime_ray.judge.config import VLLMConfig
from unime_ray.judge.prompt import JudgePrompt, answer_token_ids, judge_segments, judge_text
from unime_ray.judge.vllm_backend import (VLLM_MISSING, JudgeOutputError, VisionLimits, VLLMJudge, build_request,
                                          engine_kwargs, image_token_count, parse_yes_no, prompt_length,
                                          qwen_resized_size, sampling_params_kwargs, vision_limits)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def tok():
    from unime_ray.demo.tiny import train_tokenizer

    return train_tokenizer([], 512)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --- Stand-ins for vLLM's output classes --------------------------------------------------------------
# Recorded from https://docs.vllm.ai/en/latest/api/vllm/logprobs/ (vllm/logprobs.py):
#     @dataclass
#     class Logprob:
#         logprob: float                      # "The logprob of chosen token"
#         rank: Optional[int] = None          # "The vocab rank of chosen token (>=1)"
#         decoded_token: Optional[str] = None
#     SampleLogprobs = list[dict[int, Logprob]]   # one dict per generated token
# and RequestOutput.outputs: list[CompletionOutput], CompletionOutput.logprobs: SampleLogprobs | None.
# For one greedy token with logprobs=2, allowed_token_ids=[yes, no] and processed_logprobs, an output is
#     RequestOutput(outputs=[CompletionOutput(index=0, text="Yes", token_ids=[yes],
#         logprobs=[{yes: Logprob(logprob=-0.22, rank=1, decoded_token="Yes"),
#                    no: Logprob(logprob=-1.61, rank=2, decoded_token="No")}])])
# Only the attributes the backend reads are mirrored.

@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int = 0
    text: str = ""
    token_ids: list = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list | None = None


@dataclass
class RequestOutput:
    request_id: str = "0"
    prompt_token_ids: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


YES, NO = 312, 287


def _softmax_yes(logit_yes, logit_no):
    z = np.array([logit_yes, logit_no], dtype=np.float64)
    e = np.exp(z - z.max())
    return float(e[0] / e.sum())


# --- engine / sampling arguments ----------------------------------------------------------------------

def test_engine_kwargs_defaults():
    kw = engine_kwargs("Qwen/Qwen2.5-VL-7B-Instruct")
    assert kw["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert kw["enable_prefix_caching"] is True
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert kw["max_logprobs"] >= 2
    assert kw["limit_mm_per_prompt"]["image"] == 2
    assert kw["load_format"] == "auto" and kw["dtype"] == "bfloat16"
    assert "mm_processor_kwargs" not in kw


def test_engine_kwargs_passthrough():
    cfg = VLLMConfig(load_format="dummy", tensor_parallel_size=2, max_images_per_prompt=1,
                     extra_engine_kwargs={"enforce_eager": True, "max_num_seqs": 64})
    kw = engine_kwargs("/ckpt/judge", cfg, ImageBudget(min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28))
    assert kw["load_format"] == "dummy"
    assert kw["tensor_parallel_size"] == 2
    assert kw["limit_mm_per_prompt"]["image"] == 1
    assert kw["mm_processor_kwargs"] == {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28}
    assert kw["enforce_eager"] is True and kw["max_num_seqs"] == 64
    assert kw["logprobs_mode"] == "processed_logprobs"


def test_engine_kwargs_refuses_raw_logprobs():
    with pytest.raises(ValueError, match="processed_logprobs"):
        engine_kwargs("m", VLLMConfig(extra_engine_kwargs={"logprobs_mode": "raw_logprobs"}))
    with pytest.raises(ValueError, match="max_logprobs"):
        engine_kwargs("m", VLLMConfig(extra_engine_kwargs={"max_logprobs": 1}))


def test_sampling_params_kwargs():
    kw = sampling_params_kwargs(YES, NO)
    assert kw == {"max_tokens": 1, "temperature": 0.0, "logprobs": 2, "allowed_token_ids": [YES, NO]}


# --- requests -----------------------------------------------------------------------------------------

def test_build_request_images_in_prompt_order(tok):
    q_png, c_png = make_png(40, 30, seed=1), make_png(20, 50, seed=2)
    query = Item(text="a red car", instruction="Find an image caption describing the given image.", image=q_png)
    cand = Item(text="a photo of a red car.", image=c_png)
    req = build_request(tok, query, cand)
    prefix, suffix = judge_segments(query, cand)
    assert req["prompt_token_ids"] == _ids(tok, prefix) + _ids(tok, suffix)
    assert tok.decode(req["prompt_token_ids"]) == prefix + suffix
    # one (unexpanded) pad per image: vLLM expands each into the image's feature tokens
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert req["prompt_token_ids"].count(pad) == 2
    assert req["prompt_token_ids"].count(tok.convert_tokens_to_ids("<|vision_start|>")) == 2
    images = req["multi_modal_data"]["image"]
    assert [im.size for im in images] == [(40, 30), (20, 50)]       # query image first, then candidate
    assert all(im.mode == "RGB" for im in images)
    assert set(req) == {"prompt_token_ids", "multi_modal_data"}


@pytest.mark.parametrize("text", ["parking lot", "5 cars", "(a) red", "'s car", "élan", "日本", "", "<image> a car"])
def test_build_request_ids_are_the_whole_prompt_ids(tok, text):
    """vLLM gets the ids of the whole prompt string, which start with the query prefix's own ids (the prefix
    vLLM caches is the same for every candidate of the query)."""
    query = Item(text="What is shown?", image=make_png(seed=1))
    cand = Item(text=text, image=make_png(seed=2) if not text or "<image>" in text else None)
    ids = build_request(tok, query, cand)["prompt_token_ids"]
    prefix, suffix = judge_segments(query, cand)
    assert ids == _ids(tok, judge_text(query, cand)) == _ids(tok, prefix) + _ids(tok, suffix)
    assert prefix.endswith("Candidate:") and ids[:len(_ids(tok, prefix))] == _ids(tok, prefix)


def test_build_request_text_only(tok):
    req = build_request(tok, Item(text="a red car"), Item(text="a blue circle"))
    assert "multi_modal_data" not in req
    assert tok.convert_tokens_to_ids("<|image_pad|>") not in req["prompt_token_ids"]


def test_build_request_candidate_image_only_and_image_root(tok, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "c.png").write_bytes(make_png(28, 28, seed=3))
    req = build_request(tok, Item(text="a red car"), Item(text="<image> a photo", image_path="imgs/c.png"),
                        image_root=tmp_path)
    assert [im.size for im in req["multi_modal_data"]["image"]] == [(28, 28)]
    assert req["prompt_token_ids"].count(tok.convert_tokens_to_ids("<|image_pad|>")) == 1


def test_build_request_shares_query_prefix(tok):
    query = Item(text="a red car", image=make_png(seed=4))
    a = build_request(tok, query, Item(text="first candidate"))["prompt_token_ids"]
    b = build_request(tok, query, Item(text="another one"))["prompt_token_ids"]
    n = len(_ids(tok, judge_segments(query, Item(text="x"))[0]))
    assert a[:n] == b[:n] and a != b


def test_build_request_rejects_literal_pad(tok):
    with pytest.raises(ValueError, match="image_pad"):
        build_request(tok, Item(text="look <|image_pad|> here"), Item(text="a blue circle"))


# --- parsing ------------------------------------------------------------------------------------------

def test_parse_renormalised_pair():
    p = 0.8
    out = RequestOutput(outputs=[CompletionOutput(text="Yes", token_ids=[YES], logprobs=[{
        YES: Logprob(math.log(p), 1, "Yes"), NO: Logprob(math.log(1 - p), 2, "No")}])])
    assert parse_yes_no(out.outputs[0].logprobs, YES, NO) == pytest.approx(p, abs=1e-12)


def test_parse_raw_logprobs_not_summing_to_one():
    # full-vocabulary logprobs: log_softmax over the vocabulary, so the pair does not sum to 1
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50)
    logits[3], logits[7] = 1.3, 0.4
    log_z = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
    lp = logits - log_z
    assert math.exp(lp[3]) + math.exp(lp[7]) < 0.9
    entry = {3: Logprob(float(lp[3]), 1, "Yes"), 7: Logprob(float(lp[7]), 4, "No"), 11: Logprob(float(lp[11]), 2)}
    assert parse_yes_no([entry], 3, 7) == pytest.approx(_softmax_yes(logits[3], logits[7]), abs=1e-12)


def test_parse_plain_floats():
    assert parse_yes_no([{YES: -2.0, NO: -0.5}], YES, NO) == pytest.approx(_softmax_yes(-2.0, -0.5), abs=1e-12)


def test_parse_missing_no_raises():
    with pytest.raises(JudgeOutputError, match="No"):
        parse_yes_no([{YES: Logprob(-0.1, 1, "Yes"), 5: Logprob(-3.0, 2, "Maybe")}], YES, NO)
    with pytest.raises(ValueError):  # JudgeOutputError is a ValueError
        parse_yes_no([{NO: -0.1}], YES, NO)


def test_parse_empty_raises():
    for empty in (None, []):
        with pytest.raises(JudgeOutputError, match="no logprobs"):
            parse_yes_no(empty, YES, NO)


def test_parse_extreme_logprobs():
    # a naive exp(lp) / (exp(lp_yes) + exp(lp_no)) underflows to 0/0 here; math.exp(1000) would overflow
    assert 0.0 <= parse_yes_no([{YES: -1000.0, NO: 0.0}], YES, NO) < 1e-300
    assert parse_yes_no([{YES: 0.0, NO: -1000.0}], YES, NO) == 1.0
    assert parse_yes_no([{YES: Logprob(-1000.0), NO: Logprob(-1000.0 - math.log(3))}], YES, NO) == pytest.approx(0.75)
    assert parse_yes_no([{YES: 0.0, NO: -math.inf}], YES, NO) == 1.0
    with pytest.raises(JudgeOutputError):
        parse_yes_no([{YES: float("nan"), NO: 0.0}], YES, NO)


# --- the judge object ---------------------------------------------------------------------------------

@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_judge_without_vllm_raises_clear_error():
    with pytest.raises(RuntimeError) as info:
        VLLMJudge("Qwen/Qwen2.5-VL-7B-Instruct")
    assert str(info.value) == VLLM_MISSING
    assert "unime-ray[gpu]" in str(info.value) and "transformers backend" in str(info.value)


class _FakeLLM:
    """Answers P(Yes) = (k+1)/10 for the candidate text 'candidate number k', as renormalised logprobs."""

    def __init__(self, tok, yes, no):
        self.tok, self.yes, self.no, self.calls = tok, yes, no, []

    def generate(self, requests, sampling_params, use_tqdm=True):
        self.calls.append((requests, sampling_params, use_tqdm))
        outs = []
        for req in requests:
            k = int(re.search(r"candidate number (\d+)", self.tok.decode(req["prompt_token_ids"])).group(1))
            p = (k + 1) / 10
            outs.append(RequestOutput(outputs=[CompletionOutput(logprobs=[{
                self.yes: Logprob(math.log(p), 1), self.no: Logprob(math.log1p(-p), 2)}])]))
        return outs


def test_score_groups_queries_and_restores_order(tok):
    judge = VLLMJudge.__new__(VLLMJudge)  # no engine: the fake stands in for vllm.LLM
    judge.prompt, judge.image_root, judge.tokenizer = JudgePrompt(), None, tok
    judge.yes_id, judge.no_id = answer_token_ids(tok)
    judge.sampling_params = sampling_params_kwargs(judge.yes_id, judge.no_id)
    judge.llm = _FakeLLM(tok, judge.yes_id, judge.no_id)
    q0, q1 = Item(text="a red car"), Item(text="a blue circle", image=make_png(seed=5))
    pairs = [(q0, Item(text="candidate number 0")), (q1, Item(text="candidate number 1")),
             (q0, Item(text="candidate number 2")), (q1, Item(text="candidate number 3")),
             (q0, Item(text="candidate number 4"))]
    scores = judge.score(pairs)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, [0.1, 0.2, 0.3, 0.4, 0.5], atol=1e-12)
    (requests, sp, use_tqdm), = judge.llm.calls     # one generate call with every request
    assert use_tqdm is False and sp["allowed_token_ids"] == [judge.yes_id, judge.no_id]
    sent = [int(re.search(r"number (\d+)", tok.decode(r["prompt_token_ids"])).group(1)) for r in requests]
    assert sent == [0, 2, 4, 1, 3]                   # same-query requests adjacent
    assert judge.score([]).shape == (0,)


# --- failure isolation: a bad pair costs only itself ---------------------------------------------------

class _PoisonableLLM(_FakeLLM):
    """Like vLLM: a call holding one request it cannot process (here: text with 'poison') fails whole."""

    def generate(self, requests, sampling_params, use_tqdm=True):
        for req in requests:
            if "poison" in self.tok.decode(req["prompt_token_ids"]):
                self.calls.append((requests, sampling_params, use_tqdm))
                raise ValueError("The decoder prompt could not be processed")
        return super().generate(requests, sampling_params, use_tqdm)


def _fake_judge(tok, llm_cls=_PoisonableLLM, max_model_len=None, vision=None):
    judge = VLLMJudge.__new__(VLLMJudge)  # no engine: the fake stands in for vllm.LLM
    judge.prompt, judge.image_root, judge.tokenizer = JudgePrompt(), None, tok
    judge.yes_id, judge.no_id = answer_token_ids(tok)
    judge.sampling_params = sampling_params_kwargs(judge.yes_id, judge.no_id)
    judge.llm = llm_cls(tok, judge.yes_id, judge.no_id)
    judge.max_model_len, judge.vision = max_model_len, vision
    return judge


def _sent_numbers(tok, calls):
    return [int(re.search(r"number (\d+)", tok.decode(r["prompt_token_ids"])).group(1))
            for requests, _, _ in calls for r in requests]


@pytest.mark.parametrize("bad", [0, 37, 63])
def test_one_poisoned_request_costs_log_n_calls_and_only_itself(tok, bad):
    judge = _fake_judge(tok)
    queries = [Item(text=f"query {j}") for j in range(4)]
    pairs = [(queries[i % 4], Item(text=f"candidate number {i % 9}" + (" poison" if i == bad else "")))
             for i in range(64)]
    scores, errors = judge.score_or_errors(pairs)
    expected = np.array([(i % 9 + 1) / 10 for i in range(64)])
    ok = np.arange(64) != bad
    np.testing.assert_allclose(scores[ok], expected[ok], atol=1e-12)     # every other pair scored
    assert np.isnan(scores[bad]) and errors[bad].startswith("vLLM generate failed: ValueError: The decoder prompt")
    assert [i for i, e in enumerate(errors) if e] == [bad]
    n_calls = len(judge.llm.calls)
    assert 2 <= n_calls <= 1 + 2 * 6, n_calls              # bisection: O(log2 64), not 64 one-pair calls
    assert judge.generate_calls == n_calls
    with pytest.raises(ValueError, match=f"pair {bad}: vLLM generate failed"):
        judge.score(pairs)


def test_two_poisoned_requests_and_all_good_batch(tok):
    judge = _fake_judge(tok)
    pairs = [(Item(text="q"), Item(text=f"candidate number {i % 9}" + (" poison" if i in (5, 40) else "")))
             for i in range(48)]
    scores, errors = judge.score_or_errors(pairs)
    assert [i for i, e in enumerate(errors) if e] == [5, 40] and np.isfinite(np.delete(scores, [5, 40])).all()
    assert len(judge.llm.calls) <= 1 + 2 * 2 * 6
    judge = _fake_judge(tok)
    scores, errors = judge.score_or_errors(pairs[:5])
    assert errors == [None] * 5 and len(judge.llm.calls) == 1            # the happy path stays one call


def test_known_bad_pairs_never_enter_the_batch(tok):
    """Undecodable image, image the processor refuses, over-long prompt: rejected before generate, with
    their reasons; the rest go in one call."""
    judge = _fake_judge(tok, llm_cls=_FakeLLM, max_model_len=400, vision=VisionLimits(3136, 28 * 28 * 64))
    q = Item(text="a red car")
    pairs = [(q, Item(text="candidate number 0")),
             (q, Item(text="candidate number 1", image=b"\x89PNG not really")),                  # undecodable
             (q, Item(text="candidate number 2", image=make_png(2, 600, seed=1))),                # 300:1
             (q, Item(text="candidate number 3 " + "very long words " * 200)),                   # > 400 tokens
             (q, Item(text="candidate number 4", image=make_png(28 * 30, 28 * 30, seed=2))),     # 64 image tokens
             (Item(text="candidate number 5", image=make_png(56, 56, seed=3)), Item(text="x"))]
    scores, errors = judge.score_or_errors(pairs)
    assert errors[0] is None and errors[4] is None and errors[5] is None
    assert errors[1].startswith("ImageError: cannot decode image")
    assert "aspect ratio above 200" in errors[2]
    assert "exceeds the judge's max_model_len of 400" in errors[3]
    (requests, _, _), = judge.llm.calls
    assert len(requests) == 3 and sorted(_sent_numbers(tok, judge.llm.calls)) == [0, 4, 5]
    np.testing.assert_allclose(scores[[0, 4, 5]], [0.1, 0.5, 0.6], atol=1e-12)
    # The length check counts expanded image tokens: the big image alone pushes a pair over a tight limit.
    req = build_request(tok, q, Item(text="candidate number 4", image=make_png(28 * 30, 28 * 30, seed=2)))
    assert prompt_length(req, VisionLimits(3136, 28 * 28 * 64)) == len(req["prompt_token_ids"]) - 1 + 64
    assert prompt_length(req, None) == len(req["prompt_token_ids"])
    tight = _fake_judge(tok, llm_cls=_FakeLLM, max_model_len=len(req["prompt_token_ids"]) + 10,
                        vision=VisionLimits(3136, 28 * 28 * 64))
    assert "max_model_len" in tight.score_or_errors([pairs[4]])[1][0] and not tight.llm.calls
    # without a length limit or known image sizing, refused image shapes are still kept out
    loose = _fake_judge(tok, llm_cls=_FakeLLM)
    assert "aspect ratio" in loose.score_or_errors([pairs[2]])[1][0] and not loose.llm.calls


def test_dead_engine_is_not_bisected(tok):
    class EngineDeadError(RuntimeError):
        pass

    class DeadLLM(_FakeLLM):
        def generate(self, requests, sampling_params, use_tqdm=True):
            self.calls.append(requests)
            raise EngineDeadError("EngineCore encountered an issue")

    judge = _fake_judge(tok, llm_cls=DeadLLM)
    with pytest.raises(EngineDeadError):
        judge.score_or_errors([(Item(text="q"), Item(text=f"candidate number {i}")) for i in range(8)])
    assert len(judge.llm.calls) == 1


@pytest.mark.parametrize("h,w", [(56, 56), (30, 40), (1000, 3000), (4000, 4000), (28, 5000), (10, 10), (333, 777)])
def test_qwen_resize_rule_matches_transformers(h, w):
    """Our copy of the resize rule (used to count image tokens) against transformers' own function."""
    ref_mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    for lo, hi in ((3136, 1003520), (3136, 12845056), (256 * 28 * 28, 1280 * 28 * 28)):
        limits = VisionLimits(lo, hi)
        assert qwen_resized_size(h, w, limits) == tuple(ref_mod.smart_resize(h, w, 28, lo, hi))
        rh, rw = ref_mod.smart_resize(h, w, 28, lo, hi)
        assert image_token_count(h, w, limits) == (rh // 28) * (rw // 28)
    with pytest.raises(ValueError, match="aspect ratio"):
        qwen_resized_size(2, 600, VisionLimits())


def test_vision_limits_from_the_checkpoint_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        '{"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056, '
        '"patch_size": 14, "merge_size": 2}')
    assert vision_limits(str(tmp_path)) == VisionLimits(3136, 12845056, 14, 2)
    assert vision_limits(str(tmp_path), ImageBudget(max_pixels=28 * 28 * 300)).max_pixels == 235200
    (tmp_path / "preprocessor_config.json").write_text(
        '{"image_processor_type": "Qwen2VLImageProcessor", "size": {"shortest_edge": 100, "longest_edge": 200000}}')
    assert vision_limits(str(tmp_path)) == VisionLimits(100, 200000, 14, 2)
    assert vision_limits(str(tmp_path / "nowhere")) is None


# --- GPU: vLLM against an independent transformers forward ------------------------------------------

def _reference_pairs() -> list[tuple[Item, Item]]:
    """Text pairs, an instruction, an image marker inside a text, and images on both sides."""
    return [(Item(text="a red car"), Item(text="a photo of a red car.")),
            (Item(text="a red car"), Item(text="a small blue circle.")),
            (Item(text="Find an emoji image that matches the name:", instruction="smile"),
             Item(text="a yellow triangle.")),
            (Item(text="<image> Represent the given image.", image=make_png(56, 56, seed=6)),
             Item(text="a large green square.", image=make_png(84, 56, seed=7))),
            (Item(text="which one? <image> the second", image=make_png(56, 84, seed=8)), Item(text="a cat"))]


def _documented_parts(item: Item) -> list[dict]:
    """An item as chat content parts, written from the judge prompt's documentation: the image where the item's
    ``<image>`` marker is (else first), then its text (instruction, a space, text)."""
    text = f"{item.instruction} {item.text}".strip() if item.instruction else item.text
    before, _, after = text.partition("<image>") if "<image>" in text else ("", "", text)
    parts = [{"type": "text", "text": before.strip() + " "}] if before.strip() else []
    parts += [{"type": "image"}] if item.has_image else []
    return parts + ([{"type": "text", "text": after.strip()}] if after.strip() else [])


def test_vllm_request_ids_are_the_documented_prompt_through_the_chat_template(tiny_models):
    """build_request's ids = the documented judge prompt (system prompt, one user turn "<instruction> Query:
    <query>, Candidate: <candidate>.", the assistant header) rendered by the tokenizer's own chat template and
    tokenized whole, one <|image_pad|> per image; and = the transformers backend's ids with each image's pads
    collapsed to one (what vLLM expands again)."""
    from transformers import AutoTokenizer

    from unime_ray.judge.hf_backend import TransformersJudge
    from unime_ray.judge.prompt import PAIRWISE_INSTRUCTION, collapse_image_pads

    folder = tiny_models["qwen2_5_vl"]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    hf = TransformersJudge(folder, dtype="float32", device="cpu")
    for query, cand in _reference_pairs():
        content = ([{"type": "text", "text": f"{PAIRWISE_INSTRUCTION} Query: "}] + _documented_parts(query)
                   + [{"type": "text", "text": ", Candidate: "}] + _documented_parts(cand)
                   + [{"type": "text", "text": "."}])
        messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        request = build_request(tokenizer, query, cand)
        assert request["prompt_token_ids"] == expected, text
        assert len(request.get("multi_modal_data", {}).get("image", [])) == query.has_image + cand.has_image
        enc = hf.encode(query, cand)
        assert collapse_image_pads(enc.prefix_ids + enc.suffix_ids, hf.processor.image_pad_id) == expected


@pytest.mark.gpu
def test_vllm_judge_matches_transformers(tmp_path, monkeypatch):
    """vLLM's P(Yes) against the transformers backend's (its own prompt building, image processing and forward)
    on the same checkpoint, text and image pairs."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from unime_ray.demo.tiny import make_tiny_models
    from unime_ray.judge.hf_backend import TransformersJudge
    from unime_ray.models import TinyModelConfig

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: simpler under pytest
    # head_dim 64 for text and vision: vLLM's attention kernels do not take the default tiny head_dim 16 / 8
    spec = TinyModelConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                           vision_embed_dim=128, vision_heads=2)
    folder = make_tiny_models(tmp_path, spec=spec, archs=("qwen2_5_vl",))["qwen2_5_vl"]
    judge = VLLMJudge(str(folder), VLLMConfig(dtype="float32", max_model_len=2048, gpu_memory_utilization=0.3,
                                              extra_engine_kwargs={"enforce_eager": True}))
    pairs = _reference_pairs()
    scores = judge.score(pairs)
    assert scores.shape == (len(pairs),) and np.all((scores > 0) & (scores < 1))
    reference = TransformersJudge(folder, dtype="float32", device="cuda", prefix_reuse=False).score(pairs)
    np.testing.assert_allclose(scores, reference, atol=1e-3)
    assert np.ptp(reference) > 1e-4      # the pairs score differently: a constant could not pass


def test_vllm_backend_refuses_non_qwen_backbones(tmp_path):
    """LLaVA-OV judges run on the transformers backend; the vLLM backend's Qwen-VL token prompts would mis-bind."""
    from unime_ray.judge.vllm_backend import check_vllm_backbone
    from unime_ray.demo.tiny import make_tiny_models

    models = make_tiny_models(tmp_path, seed=0, archs=["qwen2_5_vl", "llava_onevision"])
    check_vllm_backbone(str(models["qwen2_5_vl"]))
    check_vllm_backbone("not/a-cached-model")            # unreadable here: left to vLLM
    with pytest.raises(ValueError, match="llava_onevision.*judge.backend: transformers"):
        check_vllm_backbone(str(models["llava_onevision"]))
