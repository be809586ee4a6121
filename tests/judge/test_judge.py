"""MLLM-as-a-Judge: prompt, Yes/No score, transformers backend paths, and the resumable stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unime_ray.data.io import read_table, write_rows
from unime_ray.data.schema import CANDIDATE_SCHEMA, Item
from unime_ray.judge.config import JudgeConfig
from unime_ray.judge.hf_backend import TransformersJudge
from unime_ray.judge.prompt import (PAIRWISE_INSTRUCTION, JudgePrompt, answer_token_ids, judge_segments,
                                    judge_text, yes_probability)
from unime_ray.judge.stage import JudgeSpec, expand_pairs, run_judge
from unime_ray.utils.pool import Pool

from ..conftest import make_png

QUERIES = [Item(text="<image> What is shown?", image=make_png(60, 40, seed=1)),
           Item(text="a small red circle", instruction="Find an image:")]
CANDS = [Item(text="a red car"), Item(instruction="Represent the given image", image=make_png(50, 50, seed=2)),
         Item(text="No"), Item(text="a much longer candidate text than all the other ones"),
         Item(image=make_png(30, 70, seed=3))]
PAIRS = [(q, c) for q in QUERIES for c in CANDS]


def test_prompt_layout():
    q, c = QUERIES[0], CANDS[1]
    text = judge_text(q, c)
    assert PAIRWISE_INSTRUCTION in text and "What is shown?" in text and "Represent the given image" in text
    assert text.count("<|image_pad|>") == 2
    assert text.index("What is shown?") < text.index("Candidate: ") < text.index("Represent the given image")
    assert text.endswith("<|im_start|>assistant\n")
    prefix, suffix = judge_segments(q, c)
    assert prefix + suffix == text and prefix.endswith("Candidate:") and suffix.startswith(" <|vision_start|>")
    assert judge_segments(q, CANDS[0])[0] == prefix  # the prefix depends on the query alone
    custom = JudgePrompt(instruction="Does the candidate match?", version="v2")
    assert judge_text(q, c, custom).count("Does the candidate match?") == 1


def test_yes_probability_is_the_two_way_softmax():
    for a, b in [(0.3, -1.2), (5.0, 5.0), (-800.0, 0.0), (900.0, -900.0)]:
        ref = np.exp(np.float64(a) - max(a, b)) / (np.exp(np.float64(a) - max(a, b)) + np.exp(np.float64(b) - max(a, b)))
        assert yes_probability(a, b) == pytest.approx(ref, abs=1e-12)


def test_answer_tokens(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["qwen2_5_vl"])
    yes, no = answer_token_ids(tok)
    assert tok.decode([yes]) == "Yes" and tok.decode([no]) == "No"
    with pytest.raises(ValueError, match="single|one"):
        answer_token_ids(tok, JudgePrompt(yes="Absolutely certainly"))


@pytest.fixture(scope="module")
def judge(tiny_models):
    return TransformersJudge(tiny_models["qwen2_5_vl"], dtype="float32", batch_size=3)


def independent_score(judge, q, c):
    """Plain forward on the same tokens; softmax over the two logits in numpy."""
    from unime_ray.data.images import load_image

    prefix, suffix = judge_segments(q, c)
    proc = judge.processor
    ids, pix, grids = [], [], []
    for text, item in ((prefix, q), (suffix, c)):
        img = load_image(item) if item.has_image else None
        enc = proc([text], [img], backend="manual")
        ids += enc["input_ids"][0].tolist()
        if img is not None:
            pix.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
    ids_t = torch.tensor([ids])
    kw = {"pixel_values": torch.cat(pix), "image_grid_thw": torch.cat(grids)} if pix else {}
    with torch.no_grad():
        logits = judge.model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                             mm_token_type_ids=(ids_t == proc.image_pad_id).long(), **kw).logits[0, -1].numpy()
    two = logits[[judge.yes_id, judge.no_id]].astype(np.float64)
    e = np.exp(two - two.max())
    return e[0] / e.sum()


def test_scores_equal_independent_softmax(judge):
    scores = judge.score(PAIRS)
    assert np.all((scores > 0) & (scores < 1))
    ref = np.array([independent_score(judge, q, c) for q, c in PAIRS])
    np.testing.assert_allclose(scores, ref, atol=1e-5)
    assert scores.std() > 1e-4  # not a constant


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_batched_and_prefix_reuse_equal_one_at_a_time(tiny_models, arch):
    j = TransformersJudge(tiny_models[arch], dtype="float32", batch_size=2)
    one = np.array([j.score_one(q, c) for q, c in PAIRS])
    j.prefix_reuse = False
    batched = j.score(PAIRS)
    j.prefix_reuse = True
    shuffled = [PAIRS[i] for i in [3, 7, 0, 9, 1, 5, 8, 2, 6, 4]]
    reused = j.score(shuffled)
    np.testing.assert_allclose(batched, one, atol=1e-5)
    np.testing.assert_allclose(reused, one[[3, 7, 0, 9, 1, 5, 8, 2, 6, 4]], atol=1e-5)


def test_bad_pairs_are_reported_not_scored(judge, tiny_models):
    bad_image = Item(image=b"definitely not an image")
    pairs = [PAIRS[0], (QUERIES[0], bad_image), PAIRS[1]]
    scores, errors = judge.score_or_errors(pairs)
    assert errors[0] is None and errors[2] is None and "cannot decode" in errors[1]
    assert np.isnan(scores[1]) and not np.isnan(scores[[0, 2]]).any()
    short = TransformersJudge(tiny_models["qwen2_5_vl"], dtype="float32", max_length=40)
    _, errs = short.score_or_errors([PAIRS[0]])
    assert "context" in errs[0]


# ----------------------------------------------------------------------------------------------- stage
@pytest.fixture(scope="module")
def retrieved(tiny_models, tmp_path_factory):
    from unime_ray.demo.data import make_demo_data
    from unime_ray.models.encode import EmbedderSpec
    from unime_ray.retrieval import RetrieveConfig, run_retrieval

    root = tmp_path_factory.mktemp("judge_data")
    make_demo_data(root / "data", source="synthetic", max_items=12, rows_per_shard=10, progress=False)
    pairs = root / "data" / "train" / "pairs"
    spec = EmbedderSpec(model=str(tiny_models["qwen2_vl"]), dtype="float32", image_root=str(root / "data"))
    run_retrieval(pairs, root / "data" / "train" / "candidates", root / "ret", spec,
                  RetrieveConfig(top_k=3, delta=None))
    # The judge reads a pool where one retrieved image candidate has become unreadable: it must quarantine it.
    retrieved_ids = {c for r in read_table(root / "ret" / "candidates").to_pylist() for c in r["cand_ids"]}
    pool = read_table(root / "data" / "train" / "candidates").to_pylist()
    victim = next(r for r in pool if r["image_path"] and r["id"] in retrieved_ids)
    victim["image_path"] = "images/missing.png"
    write_rows(pool, root / "pool", CANDIDATE_SCHEMA)
    return root


def _scores(path):
    return {(r["query_id"], r["cand_id"]): r for r in read_table(path).to_pylist()}


def test_judge_stage_resumes_and_accounts(tiny_models, retrieved, tmp_path):
    root = retrieved
    spec = JudgeSpec(model=str(tiny_models["qwen2_5_vl"]), judge=JudgeConfig(dtype="float32", batch_size=4),
                     image_root=str(root / "data"))
    args = (root / "ret" / "candidates", root / "data" / "train" / "pairs", root / "pool", tmp_path / "judge", spec)
    out = run_judge(*args, Pool.in_process(16))
    cands = read_table(root / "ret" / "candidates").to_pylist()
    assert out["pairs"] == sum(1 + len(r["cand_ids"]) for r in cands)
    assert out["scored"] + out["quarantined"] == out["pairs"] and out["quarantined"] >= 1
    scores_dir = out["scores_table"]
    first = _scores(scores_dir)
    assert len(first) == out["pairs"]  # exactly one row per (query, candidate)
    for r in cands:
        assert first[(r["query_id"], r["pos_id"])]["is_positive"]
    bad = [r for r in first.values() if r["error"]]
    assert all(np.isnan(r["score"]) and "not found" in r["error"] for r in bad)
    assert len(read_table(out["quarantine"])) == len(bad)
    good = [r["score"] for r in first.values() if not r["error"]]
    assert all(0 < s < 1 for s in good)

    # killed mid-way: one score shard missing -> the rerun scores only that shard; same values, no duplicates
    from pathlib import Path

    shards = sorted(Path(scores_dir).glob("part-*.parquet"))
    assert len(shards) >= 2
    shards[1].unlink()
    again = run_judge(*args, Pool.in_process(16))
    second = _scores(scores_dir)
    assert second.keys() == first.keys()
    for k, v in first.items():
        assert (np.isnan(v["score"]) and np.isnan(second[k]["score"])) or v["score"] == pytest.approx(
            second[k]["score"], abs=1e-9)
    assert again["scored"] == out["scored"]

    # another prompt version writes its own scores; nothing mixes
    other_prompt = spec.judge.model_copy(update={"prompt_version": JudgePrompt().version + "-other"})
    other = spec.model_copy(update={"judge": other_prompt})
    assert other.identity() != spec.identity()


def test_judge_stage_on_ray_equals_local(tiny_models, retrieved, ray_local, tmp_path):
    root = retrieved
    spec = JudgeSpec(model=str(tiny_models["qwen2_5_vl"]), judge=JudgeConfig(dtype="float32"),
                     image_root=str(root / "data"))
    args = (root / "ret" / "candidates", root / "data" / "train" / "pairs", root / "pool")
    local = run_judge(*args, tmp_path / "local", spec)
    on_ray = run_judge(*args, tmp_path / "ray", spec, Pool(min_actors=1, max_actors=1, batch_size=64))
    a, b = _scores(local["scores_table"]), _scores(on_ray["scores_table"])
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k]["error"] is None) == (b[k]["error"] is None)
        if a[k]["error"] is None:
            assert a[k]["score"] == pytest.approx(b[k]["score"], abs=1e-5)


def test_expand_pairs_rejects_unknown_candidates(retrieved, tmp_path):
    import pyarrow as pa

    from unime_ray.retrieval.stage import CANDIDATES_TABLE_SCHEMA

    t = read_table(retrieved / "ret" / "candidates").to_pylist()[:1]
    t[0]["cand_ids"] = ["no-such-candidate"]
    t[0]["cand_scores"] = [0.1]
    (tmp_path / "c").mkdir()
    name = sorted((retrieved / "data" / "train" / "pairs").glob("part-*.parquet"))[0].name
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(t, schema=CANDIDATES_TABLE_SCHEMA), tmp_path / "c" / name)
    with pytest.raises(KeyError, match="no-such-candidate"):
        expand_pairs(tmp_path / "c", retrieved / "data" / "train" / "pairs", retrieved / "pool", tmp_path / "o")


def test_prefix_groups_never_merge_different_query_images(judge):
    """Two query images that agree on their first pixels (white tops) must not share a prefix cache."""
    import io

    from PIL import Image

    def half_white(colour):
        im = Image.new("RGB", (56, 56), (255, 255, 255))
        im.paste(Image.new("RGB", (56, 28), colour), (0, 28))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    q1, q2 = Item(image=half_white((255, 0, 0))), Item(image=half_white((0, 0, 255)))
    pairs = [(q1, CANDS[0]), (q2, CANDS[0]), (q1, CANDS[2]), (q2, CANDS[2])]
    one = np.array([judge.score_one(q, c) for q, c in pairs])
    np.testing.assert_allclose(judge.score(pairs), one, atol=1e-5)


# ------------------------------------------------------------------------------- token-aligned prompt split
# Candidate texts starting with letters, digits, punctuation, quotes, contractions and non-ASCII characters,
# an image with no text, an image with text, and an instruction + text.
SPLIT_CANDS = [Item(text="parking lot"), Item(text="5 cars parked"), Item(text="2024"), Item(text="(a) red car"),
               Item(text="'s car"), Item(text='"quoted" car'), Item(text="...and more"), Item(text="-x"),
               Item(text="élan vital"), Item(text="日本の車"), Item(text="Ünïcödé"), Item(text="🚗 car"),
               Item(text="  spaced\n"), Item(image=make_png(30, 70, seed=3)),
               Item(text="<image> a photo of a car", image=make_png(50, 50, seed=2)),
               Item(text="a red car", instruction="Represent the given text:")]
SPLIT_QUERIES = [Item(text="a small red circle", instruction="Find an image:"),
                 Item(text="<image> What is shown?", image=make_png(60, 40, seed=1)),
                 Item(image=make_png(56, 56, seed=4)), Item(text="Where? (2)")]


def _chat_template_ids(tok, q, c, grids, merge):
    """The whole prompt through the tokenizer's own chat template, each image pad expanded to its tokens."""
    from unime_ray.judge.prompt import judge_parts
    from unime_ray.models.formatting import DEFAULT_SYSTEM_PROMPT

    content = [{"type": "image"} if kind == "image" else {"type": "text", "text": value}
               for kind, value in judge_parts(q, c)]
    text = tok.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                    {"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    assert text == judge_text(q, c)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    counts = iter([int(g.prod()) // merge for g in grids])
    out = []
    for t in tok(text, add_special_tokens=False)["input_ids"]:
        out += [pad] * next(counts) if t == pad else [t]
    return out


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_prefix_plus_suffix_ids_are_the_whole_prompt_ids(tiny_models, arch):
    """What each backend scores is the whole prompt string's tokenization (the chat template's), for any
    candidate start; the query prefix is one token sequence for all of a query's candidates."""
    from unime_ray.judge.prompt import collapse_image_pads
    from unime_ray.judge.vllm_backend import build_request

    j = TransformersJudge(tiny_models[arch], dtype="float32")
    tok, merge = j.processor.tokenizer, j.processor.image_processor.merge_size ** 2
    pairs = [(q, c) for q in SPLIT_QUERIES for c in SPLIT_CANDS]
    encoded = j.encode_all(pairs)
    for (q, c), e in zip(pairs, encoded):
        assert not isinstance(e, Exception), e
        assert e.prefix_ids + e.suffix_ids == _chat_template_ids(tok, q, c, e.grids, merge), (q, c)
        assert e.prefix_ids == j.encode(q, SPLIT_CANDS[0]).prefix_ids         # same prefix for the query
        assert j.encode(q, c).suffix_ids == e.suffix_ids                      # one pair = batched
        # the vLLM backend sends the same ids (images as their one unexpanded pad)
        assert build_request(tok, q, c)["prompt_token_ids"] == collapse_image_pads(
            e.prefix_ids + e.suffix_ids, j.processor.image_pad_id)
    # the v1 cut (after the space) gave ' ' + 'parking': not the prompt's tokens
    prefix, suffix = judge_segments(SPLIT_QUERIES[0], SPLIT_CANDS[0])
    assert suffix.startswith(" parking") and prefix.endswith("Candidate:")
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids(prefix + " ") + ids(suffix[1:]) != ids(prefix + suffix)


def test_prompt_version_is_bumped_for_the_token_aligned_split():
    assert JudgePrompt().version == "pairwise-v2"


def test_misaligned_split_is_an_error_not_a_score(judge, tiny_models):
    """A custom label that lets BPE merge across the cut fails per pair in both backends."""
    from unime_ray.judge.prompt import PromptSplitError, split_token_ids
    from unime_ray.judge.vllm_backend import build_request

    tok = judge.processor.tokenizer
    with pytest.raises(PromptSplitError, match="token boundary"):
        split_token_ids(tok, "I will provide you with a que", "ry and a candidate.")
    bad = JudgePrompt(candidate_label=", Candidate: que")
    q, c = Item(text="a red car"), Item(text="ry")
    j = TransformersJudge(tiny_models["qwen2_5_vl"], prompt=bad, dtype="float32")
    scores, errors = j.score_or_errors([(q, c), (q, Item(text="(query) a car"))])
    assert np.isnan(scores[0]) and "token boundary" in errors[0]
    assert errors[1] is None and 0 < scores[1] < 1
    with pytest.raises(ValueError, match="token boundary"):
        build_request(tok, q, c, bad)
