"""Reranker: prompts carry the texts, uniform answer position, answer-only loss, strict parsing, decoding,
two-stage retrieval, and a few training steps on 2 Ray workers with DeepSpeed ZeRO-2."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from unime_ray.data.schema import Item, item_from_row
from unime_ray.rerank import (ListwiseChoice, RerankPrompt, RerankStats, apply_listwise_choice, apply_pairwise_scores,
                              listwise_text, parse_listwise_answer, read_listwise_answer)
from unime_ray.rerank.encoding import IGNORE_INDEX, collate, encode_conversation
from unime_ray.rerank.examples import (Conversation, conversations, example_from_row, examples_from_rows,
                                      ranked_negatives)

from ..train.test_train_embedder import training_rows


@pytest.fixture(scope="module")
def rr_model(tiny_models):
    from unime_ray.models.auto_processor import load_processor
    from unime_ray.models.backbone import load_backbone

    path = tiny_models["qwen2_5_vl"]
    model = load_backbone(path, dtype="float32", device="cpu").eval()
    return model, load_processor(path, model.config.model_type)


def test_examples_carry_texts_hardest_negative_and_top_x():
    row = training_rows(1, 4)[0]
    row["neg_score"] = [0.1, 0.7, 0.3, 0.5]
    ex = example_from_row(row, list_negatives=2, seed=0)
    texts = row["neg_text"]
    assert ex.hardest_negative.text == texts[1]                    # the highest judge score, not the first stored
    listed = [c.text for c in ex.list_candidates]
    assert sorted(listed) == sorted([row["pos_text"], texts[1], texts[3]])   # positive + top-2 by score
    assert listed[ex.answer_index] == row["pos_text"]
    convs = conversations(ex)
    assert [c.kind for c in convs] == ["pair_pos", "pair_neg", "list"]
    assert [c.answer for c in convs] == ["Yes", "No", f"Ans: ({ex.answer_index + 1})"]
    for c in convs:   # the official code dropped every text; here the query instruction and texts are there
        assert row["query_instruction"] in c.prompt
    assert row["pos_text"] in convs[0].prompt and texts[1] in convs[1].prompt
    assert all(t in convs[2].prompt for t in listed)
    assert all(f"({i})" in convs[2].prompt for i in range(1, 4)) and "(4)" not in convs[2].prompt
    assert len(convs[2].images) == 1 and convs[2].prompt.count("<|image_pad|>") == 1    # the query's image
    # missing scores keep the stored order; a row without negatives is an error naming the row
    row["neg_score"] = None
    assert [n.text for n in ranked_negatives(row)] == texts
    row["neg_text"] = []
    with pytest.raises(ValueError, match="'q0' has no negatives"):
        example_from_row(row)


def test_answer_position_is_uniform_and_reproducible():
    """Chi-square goodness of fit over 5 slots (x = 4): the released code's skew would fail by far."""
    rows = training_rows(1, 4)
    counts = Counter()
    for i in range(3000):
        rows[0]["id"] = f"q{i}"
        counts[example_from_row(rows[0], list_negatives=4, seed=1).answer_index] += 1
    observed = np.array([counts[j] for j in range(5)])
    expected = 3000 / 5
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 18.47, (observed, chi2)   # 4 degrees of freedom, p = 0.001
    assert min(observed) > 0
    a = [e.answer_index for e in examples_from_rows(training_rows(8, 4), 4, seed=3, epoch=2)]
    b = [e.answer_index for e in examples_from_rows(training_rows(8, 4), 4, seed=3, epoch=2)]
    c = [e.answer_index for e in examples_from_rows(training_rows(8, 4), 4, seed=3, epoch=3)]
    assert a == b and a != c


def test_listwise_negatives_are_distinct_when_mining_cycled():
    """Mining cycles its survivors when fewer than 10 remain (stored A, P, A, A, A): the list shows each
    negative once, in judge-score order, and is shorter than x + 1 when fewer distinct negatives exist."""
    row = training_rows(1, 5)[0]
    row.update(neg_id=["A", "P", "A", "A", "A"], neg_text=["a red one", "a pink one"] + ["a red one"] * 3,
               neg_score=[0.3, 0.6, 0.3, 0.3, 0.3])
    assert [n.text for n in ranked_negatives(row)] == ["a pink one", "a red one"]   # P (0.6) first, A once
    positions = Counter()
    for i in range(600):
        row["id"] = f"q{i}"
        ex = example_from_row(row, list_negatives=4, seed=2)
        texts = [c.text for c in ex.list_candidates]
        assert len(texts) == 3 and len(set(texts)) == 3          # positive + the 2 distinct negatives
        assert sorted(texts) == sorted([row["pos_text"], "a pink one", "a red one"])
        assert texts[ex.answer_index] == row["pos_text"] and ex.hardest_negative.text == "a pink one"
        positions[ex.answer_index] += 1
        conv = conversations(ex)[2]
        assert "(3)" in conv.prompt and "(4)" not in conv.prompt and conv.answer == f"Ans: ({ex.answer_index + 1})"
        sampled = example_from_row(row, list_negatives=4, seed=2, pair_negative="sampled").hardest_negative.text
        assert sampled in ("a pink one", "a red one")
    assert sorted(positions) == [0, 1, 2] and min(positions.values()) > 150   # uniform over the 3 slots
    # Without ids (the official JSON import), repeats are recognised by content.
    row.update(neg_id=None, neg_text=["x", "y", "x", "y", "x"], neg_score=[0.2, 0.1, 0.2, 0.1, 0.2])
    assert [n.text for n in ranked_negatives(row)] == ["x", "y"]
    assert len(example_from_row(row, list_negatives=4).list_candidates) == 3
    # Distinct ids with identical content are still one candidate to the reranker; distinct content stays.
    row.update(neg_id=["a", "b", "c", "d", "e"])
    assert [n.text for n in ranked_negatives(row)] == ["x", "y"]
    row.update(neg_text=["x", "y", "z", "w", "v"])
    assert len(ranked_negatives(row)) == 5 and len(example_from_row(row, list_negatives=4).list_candidates) == 5


@pytest.mark.parametrize("text,n,expected,kind", [
    ("Ans: (3)", 5, 2, "exact"), ("(1)", 5, 0, "exact"), ("  Ans:(2) ", 5, 1, "exact"),
    ("Ans: (3)<|im_end|>", 5, 2, "exact"), ("Ans: (12)", 12, 11, "exact"),
    # the official parser's reading: the first (i) of the answer
    ("Ans: (3).", 5, 2, "first"), ("(3) is best", 5, 2, "first"), ("The answer is (3)", 5, 2, "first"),
    ("Ans: (3) (4)", 5, 2, "first"), ("Ans: ((3))", 5, 2, "first"),
    ("Ans: (6)", 5, None, "out_of_range"), ("Ans: (0)", 5, None, "out_of_range"),
    ("(7) or (2)", 5, None, "out_of_range"),
    ("Ans: 3", 5, None, "unparsable"), ("", 5, None, "unparsable"), ("Ans: (x)", 5, None, "unparsable"),
    ("Yes", 5, None, "unparsable"), (None, 5, None, "unparsable"),
])
def test_listwise_answers_are_read_as_the_official_parser_does_and_counted_by_kind(text, n, expected, kind):
    assert read_listwise_answer(text, n) == (expected, kind)
    assert parse_listwise_answer(text, n) == expected


def test_only_answer_tokens_carry_loss(rr_model):
    """Per-conversation loss with ``all_tokens`` (the token mean the reranker trained on before ``decision``) =
    Hugging Face's own causal-LM loss with every non-answer label masked."""
    from unime_ray.rerank.model import answer_token_losses

    model, proc = rr_model
    ex = example_from_row(training_rows(1, 4)[0], 3)
    convs = conversations(ex)
    encs = [encode_conversation(proc, c.prompt, c.images, c.answer, decision=c.decision) for c in convs]
    for enc, conv in zip(encs, convs):
        labels = collate([enc], proc.pad_id)["labels"][0]
        supervised = labels[labels != IGNORE_INDEX].tolist()
        assert proc.tokenizer.decode(supervised) == conv.answer + "<|im_end|>"
        assert "assistant" not in proc.tokenizer.decode(supervised)
    ours = answer_token_losses(model, proc, encs, answer_loss="all_tokens")     # one right-padded batch
    for enc, value in zip(encs, ours):
        b = collate([enc], proc.pad_id)
        kw = {}
        if enc.pixel_values:
            kw = {"pixel_values": torch.cat(enc.pixel_values), "image_grid_thw": torch.stack(enc.grids)}
        ids = b["input_ids"]
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=b["attention_mask"], labels=b["labels"],
                        mm_token_type_ids=(ids == proc.image_pad_id).long(), **kw).loss
        assert float(value.detach()) == pytest.approx(float(ref), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("answer_loss", ["decision", "all_tokens"])
def test_answer_loss_equals_log_softmax_of_a_plain_forward(rr_model, answer_loss):
    """Per conversation, in float64: decision = -sum log p(decision tokens) + mean(-log p(the other answer
    tokens)); all_tokens = mean(-log p) over every answer token. The reference runs the HF model on each
    conversation alone (full logits, log-softmax in torch) and finds the decision tokens by decoding: the tokens
    whose characters fall inside ``Yes``/``No`` or the digits of ``(i)``; one-digit and two-digit indices."""
    import copy
    import re

    from unime_ray.rerank.model import answer_token_losses
    from unime_ray.rerank.prompt import listwise_answer, listwise_decision

    model, proc = rr_model
    model = copy.deepcopy(model).double()
    convs = [c for ex in examples_from_rows(training_rows(2, 4), 3, seed=1) for c in conversations(ex)]
    query, cands = example_from_row(training_rows(1, 4)[0]).query, [Item(text=f"option {j}") for j in range(12)]
    convs.append(Conversation("list", listwise_text(query, cands), [query], listwise_answer(10), listwise_decision(10)))
    assert convs[-1].answer == "Ans: (11)"
    encs = [encode_conversation(proc, c.prompt, c.images, c.answer, decision=c.decision) for c in convs]
    with torch.no_grad():
        ours = answer_token_losses(model, proc, encs, answer_loss=answer_loss).tolist()   # one right-padded batch
    tok = proc.tokenizer
    for enc, conv, value in zip(encs, convs, ours):
        ids = torch.tensor([enc.ids])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.cat(enc.pixel_values),
                           image_grid_thw=torch.stack(enc.grids), mm_token_type_ids=(ids == proc.image_pad_id).long()).logits
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        answer = enc.ids[enc.answer_start:]
        nll = [-float(logp[enc.answer_start + j - 1, t]) for j, t in enumerate(answer)]
        ends = [len(tok.decode(answer[:j + 1])) for j in range(len(answer))]
        m = re.fullmatch(r"Ans: \((\d+)\)", conv.answer)
        lo, hi = m.span(1) if m else (0, len(conv.answer))
        decision = [lo <= start < end <= hi for start, end in zip([0] + ends[:-1], ends)]
        assert sum(decision) == (hi - lo if m else 1)              # one token per digit; Yes / No one token each
        fixed = [x for x, d in zip(nll, decision) if not d]
        expected = (sum(x for x, d in zip(nll, decision) if d) + sum(fixed) / len(fixed)
                    if answer_loss == "decision" else sum(nll) / len(nll))
        assert value == pytest.approx(expected, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match=r"conversations \[0\] were encoded without one"):
        answer_token_losses(model, proc, [encode_conversation(proc, convs[0].prompt, convs[0].images, "Yes")])


def test_batched_greedy_decoding_equals_naive_decoding(rr_model):
    """KV-cached, left-padded batch decoding = one prompt at a time, recomputing everything each step."""
    from unime_ray.rerank.model import greedy_generate

    model, proc = rr_model
    rows = training_rows(3, 4)
    encs = []
    for j, row in enumerate(rows):
        ex = example_from_row(row, 1 + j)          # lists of 2, 3, 4 candidates: different lengths
        text = listwise_text(ex.query, ex.list_candidates)
        encs.append(encode_conversation(proc, text, [i for i in (ex.query, *ex.list_candidates) if i.has_image]))
    got = greedy_generate(model, proc, encs, max_new_tokens=5)
    for enc, tokens in zip(encs, got):
        ids = list(enc.ids)
        naive = []
        for _ in range(5):
            t = torch.tensor([ids])
            kw = {"pixel_values": torch.cat(enc.pixel_values), "image_grid_thw": torch.stack(enc.grids)}
            with torch.no_grad():
                logits = model(input_ids=t, attention_mask=torch.ones_like(t),
                               mm_token_type_ids=(t == proc.image_pad_id).long(), **kw).logits
            naive.append(int(logits[0, -1].argmax()))
            ids.append(naive[-1])
        assert tokens == naive


def test_two_stage_orders_and_fallbacks():
    assert apply_listwise_choice([7, 3, 9, 1], ListwiseChoice(2, "Ans: (3)")) == [9, 7, 3, 1]
    assert apply_listwise_choice([7, 3, 9, 1], ListwiseChoice(None, "banana")) == [7, 3, 9, 1]
    assert apply_listwise_choice([7, 3], ListwiseChoice(5, "?")) == [7, 3]
    assert apply_pairwise_scores([4, 5, 6], [0.2, 0.9, float("nan")]) == [5, 4, 6]
    assert apply_pairwise_scores([4, 5, 6], [0.5, 0.5, 0.5]) == [4, 5, 6]
    stats = RerankStats()
    for ch in (ListwiseChoice(0, "Ans: (1)"), ListwiseChoice(None, "x"), ListwiseChoice(None, "e", error="bad image")):
        stats.add(ch)
    assert (stats.queries, stats.fallbacks) == (3, 2) and sum(stats.reasons.values()) == 2


def test_reranker_inference_on_tiny_model(tiny_models, tmp_path):
    from unime_ray.judge.hf_backend import TransformersJudge
    from unime_ray.rerank import Reranker, rerank_topk

    rr = Reranker.from_pretrained(tiny_models["qwen2_5_vl"], dtype="float32")
    rows = training_rows(4, 4)
    queries = [item_from_row(r, "query_") for r in rows]
    cands = [item_from_row(r, "pos_") for r in rows] + [Item(text=t) for t in rows[0]["neg_text"]]
    pairs = [(q, c) for q in queries for c in cands[:3]]
    judge = TransformersJudge(tiny_models["qwen2_5_vl"], dtype="float32", prefix_reuse=False)
    assert np.allclose(rr.score_pairs(pairs), judge.score(pairs), atol=1e-6)
    topk = np.array([[0, 4, 5, -1], [1, 0, 6, 7], [2, 3, 4, 5], [3, 2, 1, 0]])
    stats = RerankStats()
    orders = rerank_topk(rr, queries, cands, topk, "listwise", stats)
    choices = rr.choose_many(queries, [[cands[c] for c in row if c >= 0] for row in topk])
    assert orders == [apply_listwise_choice([c for c in row if c >= 0], ch) for row, ch in zip(topk, choices)]
    assert stats.queries == 4 and stats.fallbacks == sum(ch.index is None for ch in choices)
    bad = Item(text="x", image=b"not an image")
    ch = rr.choose(queries[0], [cands[0], bad])
    assert ch.index is None and ch.error and "image" in ch.error.lower()
    porders = rerank_topk(rr, queries, cands, topk, "pairwise")
    assert sorted(porders[0]) == [0, 4, 5]


@pytest.mark.timeout(300)
def test_reranker_trains_on_ray_with_zero3_and_mixed_batches(tiny_models, ray_local, tmp_path):
    """LoRA on every LLM linear layer and the vision tower, ZeRO-3 on 2 workers, steps where one rank's
    conversations have no image and the other's have: the joint loss falls, and the exported folder loads as a
    reranker. Before reranker_loss's probe row (a text-only rank runs the vision tower anyway, weight 0) the ranks'
    collectives diverged and the workers died."""
    from unime_ray.data.io import write_rows
    from unime_ray.data.schema import PAIR_SCHEMA
    from unime_ray.rerank import Reranker
    from unime_ray.train.config import RerankerTrainConfig
    from unime_ray.train.trainer import BatchPlan, TrainJob, fit

    from ..train.test_train_embedder import mixed_rows, one_rank_text_only

    table, rows = tmp_path / "table", mixed_rows(16, 4)
    write_rows(rows, table, PAIR_SCHEMA)
    s = TrainJob(RerankerTrainConfig(list_negatives=3, lr=1e-2, max_steps=12, micro_batch_size=4, num_workers=2,
                                     zero_stage=3, lora_r=16, lora_alpha=32, lora_dropout=0.0, use_dora=False,
                                     freeze_vision=False, checkpoint_every=12, warmup_ratio=0.0,
                                     lr_schedule="linear"),
                 model=str(tiny_models["qwen2_5_vl"]), output_dir=str(tmp_path / "out"))
    assert one_rank_text_only(rows, BatchPlan(16, 4, 1, 2, s.seed), 12)
    out = fit(table, s)
    metrics = [json.loads(l) for l in open(out["metrics"])]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    first, last = np.mean([m["loss"] for m in metrics[:2]]), np.mean([m["loss"] for m in metrics[-2:]])
    assert last < 0.9 * first, (first, last)   # LoRA on a random tiny model moves slowly (full FT: 0.7x)
    assert {"loss_pair", "loss_list", "answer_p_list"} <= set(metrics[-1])
    rr = Reranker.from_pretrained(out["model"], dtype="float32")
    row = training_rows(1, 4)[0]
    assert rr.score_pairs([(item_from_row(row, "query_"), item_from_row(row, "pos_"))]).shape == (1,)


def test_prompt_versions_differ_from_judge():
    p = RerankPrompt()
    assert p.version != p.pairwise.version


def test_pairwise_training_encoding_is_what_pairwise_inference_scores(tiny_models, rr_model):
    """A pairwise training conversation encodes to the whole string's ids (prompt + answer + end of turn),
    and its ids up to the answer are exactly the ids the reranker's pairwise inference (the judge's
    backend, prefix + suffix) scores, with the same images; the answer's first token is the Yes/No the
    inference reads."""
    from unime_ray.judge.hf_backend import TransformersJudge
    from unime_ray.rerank import pairwise_text
    from unime_ray.rerank.prompt import END_OF_TURN

    from ..conftest import make_png

    _, proc = rr_model
    judge = TransformersJudge(tiny_models["qwen2_5_vl"], dtype="float32")
    ex = example_from_row(training_rows(1, 4)[0], 3)
    extra = [Item(text="parking lot"), Item(text="5 cars"), Item(text="(a) red"), Item(text="élan"),
             Item(image=make_png(30, 70, seed=3)), Item(text="<image> 'quoted'", image=make_png(28, 56, seed=5))]
    pos, neg = conversations(ex)[:2]
    convs = [(ex.query, ex.positive, pos), (ex.query, ex.hardest_negative, neg)]
    for query in (ex.query, Item(text="Where? (2)")):
        for cand in extra:
            images = [i for i in (query, cand) if i.has_image]
            convs.append((query, cand, Conversation("pair_pos", pairwise_text(query, cand), images, "Yes", (0, 3))))
    tok, pad, merge = proc.tokenizer, proc.image_pad_id, proc.image_processor.merge_size ** 2
    for query, cand, conv in convs:
        enc = encode_conversation(proc, conv.prompt, conv.images, conv.answer)
        whole = []
        counts = iter([int(g.prod()) // merge for g in enc.grids])
        for t in tok(conv.prompt + conv.answer + END_OF_TURN, add_special_tokens=False)["input_ids"]:
            whole += [pad] * next(counts) if t == pad else [t]
        assert enc.ids == whole                                        # training = the whole string
        scored = judge.encode(query, cand)
        assert scored.prefix_ids + scored.suffix_ids == enc.ids[:enc.answer_start]   # = what inference scores
        assert all(torch.equal(a, b) for a, b in zip(scored.pixel_values, enc.pixel_values))
        assert len(scored.pixel_values) == len(enc.pixel_values)
        assert enc.ids[enc.answer_start] == (judge.yes_id if conv.answer == "Yes" else judge.no_id)


def test_reorder_modes_against_independent_rules():
    """reorder: listwise moves the named entry first; pairwise sorts by P(Yes), unscored after scored, ties in
    embedder order; fused sorts by (1 - w) cosine + w P(Yes). The eval and the server both call it."""
    from unime_ray.rerank.inference import reorder

    order = [7, 3, 9, 4]
    assert reorder("listwise", order, choice=2) == ([9, 7, 3, 4], False)
    assert reorder("listwise", order, choice=4) == (order, True) and reorder("listwise", order, choice=None)[1]
    p = [0.2, 0.9, float("nan"), 0.9]
    assert reorder("pairwise", order, p_yes=p) == ([3, 4, 7, 9], False)
    assert reorder("pairwise", order, p_yes=[float("nan")] * 4) == (order, True)
    sims, w = [0.9, 0.5, 0.45, 0.1], 0.3
    fused = [(1 - w) * s + w * q for s, q in zip(sims, [0.1, 0.6, 0.8, 0.99])]
    want = [order[i] for i in sorted(range(4), key=lambda i: (-fused[i], i))]
    assert reorder("fused", order, p_yes=[0.1, 0.6, 0.8, 0.99], similarities=sims, weight=w)[0] == want
    assert reorder("fused", order, p_yes=[0.1] * 4, similarities=sims, weight=0.0)[0] == order   # w 0: the embedder
    with pytest.raises(ValueError, match="unknown rerank mode"):
        reorder("cascade", order)
    with pytest.raises(ValueError, match="cosine"):
        reorder("fused", order, p_yes=p)
    with pytest.raises(ValueError, match="weight"):
        reorder("fused", order, p_yes=p, similarities=sims, weight=1.5)


class _FixedReranker:
    """P(Yes) from a table by candidate text; listwise: the index of the highest P(Yes)."""

    def __init__(self, p):
        self.p = p
        self.pair_calls = self.list_calls = 0

    def score_pairs(self, pairs):
        self.pair_calls += 1
        return np.array([self.p[c.text] for _, c in pairs])

    def choose_many(self, queries, lists):
        from types import SimpleNamespace

        self.list_calls += 1
        return [SimpleNamespace(index=int(np.argmax([self.p[c.text] for c in cands])), raw="x") for cands in lists]


def test_rerank_modes_measures_every_mode_with_one_scoring_pass():
    from unime_ray.eval.rerank import rerank_modes

    p = {"a": 0.1, "b": 0.7, "c": 0.6, "d": 0.2}
    rr = _FixedReranker(p)
    cands = [[Item(text=t) for t in "abcd"], [Item(text=t) for t in "dcba"]]
    orders = [[0, 1, 2, 3], [3, 2, 1, 0]]                  # the embedder's ranking, best first
    sims = [[0.9, 0.8, 0.7, 0.1], [0.5, 0.6, 0.7, 0.8]]
    out = rerank_modes(rr, [Item(text="q0"), Item(text="q1")], cands, orders, 3, ["listwise", "pairwise", "fused"],
                       similarities=sims, weight=0.5)
    assert rr.pair_calls == 1 and rr.list_calls == 1
    assert out["listwise"].orders == [[1, 0, 2], [2, 3, 1]]          # b named first in both
    assert out["pairwise"].orders == [[1, 2, 0], [2, 1, 3]]
    f0 = {i: 0.5 * sims[0][i] + 0.5 * p["abcd"[i]] for i in (0, 1, 2)}
    assert out["fused"].orders[0] == sorted(f0, key=lambda i: -f0[i])
    assert out["pairwise"].p_yes[0] == pytest.approx([0.1, 0.7, 0.6])



@pytest.mark.parametrize("answer_loss", ["decision", "all_tokens"])
def test_reranker_loss_weighs_pair_and_list_as_configured(rr_model, answer_loss):
    """L = pair_weight * L_pair + list_weight * L_list, each the sum over its conversations of their answer loss
    (``answer_loss``), divided by the rows; recomputed one conversation at a time."""
    from unime_ray.rerank.model import answer_token_losses
    from unime_ray.rerank.prompt import RerankPrompt
    from unime_ray.train.config import RerankerTrainConfig
    from unime_ray.train.reranker import reranker_loss
    from unime_ray.train.trainer import TrainJob

    model, proc = rr_model
    rows = training_rows(2, 4)
    job = TrainJob(RerankerTrainConfig(list_negatives=3, pair_weight=0.3, list_weight=2.0, answer_loss=answer_loss),
                   model="unused", output_dir="unused")
    with torch.no_grad():
        loss, info = reranker_loss(model, proc, rows, job)
        examples = examples_from_rows(rows, 3, job.seed, 0, "hardest")
        convs = [c for ex in examples for c in conversations(ex, RerankPrompt())]
        alone = {c.kind + str(i): float(answer_token_losses(
                     model, proc, [encode_conversation(proc, c.prompt, c.images, c.answer, decision=c.decision)],
                     answer_loss=answer_loss)[0])
                 for i, c in enumerate(convs)}
    pair = sum(v for k, v in alone.items() if not k.startswith("list")) / len(rows)
    listwise = sum(v for k, v in alone.items() if k.startswith("list")) / len(rows)
    assert info["loss_pair"] == pytest.approx(pair, rel=1e-4) and info["loss_list"] == pytest.approx(listwise, rel=1e-4)
    assert float(loss) == pytest.approx(0.3 * pair + 2.0 * listwise, rel=1e-4)
