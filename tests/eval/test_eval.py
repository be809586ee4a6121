"""The evaluation harness: metrics against hand computations, the MMEB/retrieval/compositional runners,
reranking wiring, Ray = single process, bad input, outputs, config and CLI."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from unime_ray.data.io import ShardWriter
from unime_ray.data.schema import PAIR_SCHEMA, Item, empty_row, item_to_columns, negatives_to_columns
from unime_ray.data.validate import DataError
from unime_ray.eval import (EvalConfig, apply_listwise_choice, bidirectional_recall, caption_to_image, compare_runs,
                            evaluate_compositional, evaluate_pairs_table, evaluate_retrieval_sets,
                            gt_rank, load_compositional, load_retrieval_set, pair_accuracy, precision_at_1,
                            rank_order, recall_at_k, register, summarize, summarize_compositional)
from unime_ray.eval.mmeb import CLASSIFICATION, GROUNDING, IND, MMEB_DATASETS, OOD, RETRIEVAL, VQA, prepare_mmeb_dir
from unime_ray.eval.retrieval import IMAGE_PROMPT
from unime_ray.models.encode import EmbedderSpec
from unime_ray.utils.pool import Pool

from ..conftest import make_png


# ============================================================================ pure metrics
def test_precision_at_1_by_hand_with_ties():
    rows = [[0.9, 0.1, 0.2],        # GT best: hit
            [0.5, 0.7, 0.1],        # a distractor above: miss
            [0.3, 0.3, 0.1],        # tie with the GT: miss (the documented rule)
            [1.0]]                  # GT alone: hit
    assert [gt_rank(r) for r in rows] == [0, 1, 1, 0]
    assert precision_at_1(rows) == pytest.approx(50.0)
    assert precision_at_1(np.array([[0.2, 0.1], [0.1, 0.2]])) == pytest.approx(50.0)
    # The ranking used for top-K dumps agrees with the tie rule: the tied distractor ranks first.
    assert rank_order([0.3, 0.3, 0.1]).tolist() == [1, 0, 2]
    assert rank_order([0.5, 0.2, 0.5, 0.9]).tolist() == [3, 2, 0, 1]
    # Ties among distractors: lower index first.
    assert rank_order([0.9, 0.4, 0.4]).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="no candidates"):
        gt_rank([])
    with pytest.raises(ValueError):
        precision_at_1([])


def test_recall_one_to_one_by_hand():
    sim_t2i = np.array([[0.9, 0.1, 0.0],    # caption 0 -> image 0: rank 0
                        [0.8, 0.5, 0.2],    # caption 1 -> image 1: image 0 above, rank 1
                        [0.4, 0.4, 0.4]])   # caption 2 -> image 2: ties with both others, rank 2
    c2i = caption_to_image(3, 3, 1)
    assert c2i.tolist() == [0, 1, 2]
    t2i = recall_at_k(sim_t2i, c2i, ks=(1, 2, 3))
    assert t2i == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 100.0})
    both = bidirectional_recall(sim_t2i, c2i, ks=(1, 2, 3))
    assert both["t2i"] == pytest.approx(t2i)
    # Image queries (columns): image 0 -> caption 0 (0.9 best), image 1 -> caption 1 (0.5 > 0.4, 0.1),
    # image 2 -> caption 2 (0.4 > 0.2, 0.0): every image finds its caption first.
    assert both["i2t"] == pytest.approx({"R@1": 100.0, "R@2": 100.0, "R@3": 100.0})


def test_recall_several_captions_per_image_by_hand():
    c2i = caption_to_image(4, 2, 2)
    assert c2i.tolist() == [0, 0, 1, 1]
    sim_t2i = np.array([[0.9, 0.1],   # c0 -> i0 hit
                        [0.2, 0.3],   # c1 -> i0 miss
                        [0.5, 0.6],   # c2 -> i1 hit
                        [0.7, 0.7]])  # c3 -> i1 tie: miss
    out = bidirectional_recall(sim_t2i, c2i, ks=(1, 2))
    assert out["t2i"] == pytest.approx({"R@1": 50.0, "R@2": 100.0})
    # i0's captions c0 (0.9), c1 (0.2); best GT 0.9, nothing above -> hit. i1: c2 0.6, c3 0.7; best 0.7 and the
    # other captions 0.1, 0.3 are below -> hit. A GT above another GT never costs a rank.
    assert out["i2t"] == pytest.approx({"R@1": 100.0, "R@2": 100.0})
    # Same numbers through the general form (lists of GT indices, boolean mask).
    assert recall_at_k(sim_t2i.T, [[0, 1], [2, 3]], ks=(1, 2)) == pytest.approx(out["i2t"])
    mask = np.array([[True, True, False, False], [False, False, True, True]])
    assert recall_at_k(sim_t2i.T, mask, ks=(1,)) == pytest.approx({"R@1": 100.0})
    # 5 captions per image (Flickr30K/COCO) vs 1:1 (ShareGPT4V/Urban1K).
    assert caption_to_image(10, 2, 5).tolist() == [0] * 5 + [1] * 5
    with pytest.raises(ValueError, match="10 captions for 3 images"):
        caption_to_image(10, 3, 5)
    with pytest.raises(ValueError, match="query 1 has no ground-truth"):
        recall_at_k(np.zeros((2, 2)), [[0], []])


def test_summarize_by_hand():
    per = {"ImageNet-1K": 60.0, "VOC2007": 80.0, "place365": 20.0,   # classification: 2 IND + 1 OOD (any spelling)
           "OK-VQA": 40.0, "MSCOCO": 90.0, "my_custom_set": 10.0}
    s = summarize(per)
    assert list(s) == ["Classification", "VQA", "Retrieval", "Grounding", "IND", "OOD", "Overall", "Other"]
    assert s["Classification"] == {"mean": pytest.approx(160 / 3), "count": 3}
    assert s["VQA"] == {"mean": 40.0, "count": 1}
    assert s["Retrieval"] == {"mean": None, "count": 0}           # missing group
    assert s["Grounding"] == {"mean": 90.0, "count": 1}
    assert s["IND"] == {"mean": pytest.approx(67.5), "count": 4}  # ImageNet-1K, VOC2007, OK-VQA, MSCOCO
    assert s["OOD"] == {"mean": 20.0, "count": 1}
    assert s["Overall"] == {"mean": pytest.approx(58.0), "count": 5}  # the 36 only: the custom set is not here
    assert s["Other"] == {"mean": 10.0, "count": 1, "datasets": ["my_custom_set"]}   # ...but here
    assert summarize({})["Overall"] == {"mean": None, "count": 0}
    assert summarize({})["Other"] == {"mean": None, "count": 0, "datasets": []}
    with pytest.raises(ValueError, match="both name"):
        summarize({"ImageNet-1K": 1.0, "imagenet_1k": 2.0})
    # The built-in lists: 10/10/12/4 datasets, 20 IND + 16 OOD, 36 distinct.
    assert (len(CLASSIFICATION), len(VQA), len(RETRIEVAL), len(GROUNDING)) == (10, 10, 12, 4)
    assert len(set(MMEB_DATASETS)) == 36 and len(IND) == 20 and len(OOD) == 16 and not set(IND) & set(OOD)
    assert {"Place365", "ImageNet-A", "ScienceQA", "FashionIQ", "RefCOCO", "Visual7W-Pointing"} <= set(OOD)


def test_compositional_metrics_by_hand():
    assert pair_accuracy([0.9, 0.2, 0.5, 0.4], [0.1, 0.3, 0.5, 0.3]) == pytest.approx(50.0)  # tie = miss
    s = summarize_compositional({"replace_obj": 90.0, "replace_att": 60.0, "swap_obj": 40.0, "other": 10.0})
    assert s["Replace"] == {"mean": 75.0, "count": 2}
    assert s["Swap"] == {"mean": 40.0, "count": 1}
    assert s["Add"] == {"mean": None, "count": 0}
    assert s["R_Compos"] == {"mean": pytest.approx(57.5), "count": 2}
    assert s["Overall"] == {"mean": pytest.approx(50.0), "count": 4}


def test_apply_listwise_choice():
    order = [3, 1, 4, 0, 2]
    assert apply_listwise_choice(order, 3) == ([0, 3, 1, 4, 2], False)
    assert apply_listwise_choice(order, 0) == (order, False)
    for bad in (None, 5, -1, True, "2"):
        assert apply_listwise_choice(order, bad) == (order, True)


# ============================================================================ test doubles
class FakeEmbedder:
    """Vectors looked up by an item's text (or image path): hand-made geometry, no model."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.encoded: list[int] = []
        self.image_root = None

    def encode(self, items, batch_size=16):
        self.encoded.append(len(items))
        return np.array([self.table[it.text or it.image_path] for it in items], dtype=np.float32)


@dataclass
class Choice:
    index: int | None
    raw: str


class OracleReranker:
    """Picks the candidate whose text is the query's ground truth; None when it is not in the list."""

    def __init__(self, gt_of: dict[str, str]):
        self.gt_of = gt_of
        self.calls = 0

    def choose_many(self, queries, candidate_lists):
        self.calls += 1
        out = []
        for q, cands in zip(queries, candidate_lists):
            texts = [c.text or c.image_path for c in cands]
            gt = self.gt_of[q.text or q.image_path]
            out.append(Choice(texts.index(gt), f"Ans: ({texts.index(gt) + 1})") if gt in texts else Choice(None, "?"))
        return out

    def score_pairs(self, pairs):
        return np.array([0.9 if "good" in c.text else (0.5 if "tie" in c.text else 0.1) for _, c in pairs])


class ConstantReranker:
    """Always answers ``index`` (None = unparsable): every row must fall back when that is unusable."""

    def __init__(self, index):
        self.index = index

    def choose_many(self, queries, candidate_lists):
        return [Choice(self.index, "gibberish") for _ in queries]


def _pair_row(row_id, task, query: Item, pos: Item, negs: list[Item], pos_id=None, neg_ids=None):
    row = empty_row(PAIR_SCHEMA)
    row.update(id=row_id, task=task, pos_id=pos_id)
    row.update(item_to_columns(query, "query_"))
    row.update(item_to_columns(pos, "pos_"))
    ids = neg_ids or [None] * len(negs)
    row.update(negatives_to_columns([(n, None, i) for n, i in zip(negs, ids)]))
    return row


def _write_pairs(path: Path, rows, rows_per_shard=100) -> Path:
    with ShardWriter(path, PAIR_SCHEMA, rows_per_shard=rows_per_shard) as w:
        w.write_many(rows)
    return path


T = Item  # short alias for text items


@pytest.fixture
def hand_table(tmp_path):
    """Task A (no ids): hit, miss (GT rank 2), tie (GT rank 1). Task B (ids): a distractor equal to the GT."""
    rows = [
        _pair_row("A:0", "A", T("q0"), T("a"), [T("b"), T("c")]),
        _pair_row("A:1", "A", T("q1"), T("a"), [T("b"), T("c")]),
        _pair_row("A:2", "A", T("q2"), T("d"), [T("e")]),
        _pair_row("B:0", "B", T("q0"), T("a"), [T("a"), T("b")], pos_id="x", neg_ids=["x", "y"]),
    ]
    vecs = {"q0": [1, 0], "q1": [0, 1], "q2": [1, 0], "a": [1, 0], "b": [0, 1], "c": [0.6, 0.8], "d": [1, 0],
            "e": [1, 0]}
    return _write_pairs(tmp_path / "pairs", rows), vecs


# ============================================================================ MMEB-form runner
def test_pairs_eval_by_hand_dedup_dump_and_outputs(hand_table, tmp_path):
    table, vecs = hand_table
    emb = FakeEmbedder(vecs)
    r = evaluate_pairs_table(emb, table, tmp_path / "run", top_k_dump=2)
    # A: hit, miss, tie-miss -> 33.33; chance = mean(1/3, 1/3, 1/2). B: duplicate GT dropped -> [a, b]: hit.
    assert r["per_dataset"] == {"A": pytest.approx(100 / 3, abs=1e-3), "B": 100.0}
    assert r["chance"]["A"] == pytest.approx(100 * (1 / 3 + 1 / 3 + 1 / 2) / 3, abs=1e-3)
    assert r["datasets"]["B"]["gt_duplicates_dropped"] == 1 and r["datasets"]["B"]["mean_candidates"] == 2
    assert r["summary"]["Other"] == {"mean": pytest.approx((100 / 3 + 100) / 2, abs=1e-3), "count": 2,
                                     "datasets": ["A", "B"]}
    assert r["summary"]["Overall"]["count"] == 0 and r["summary"]["IND"]["count"] == 0
    assert r["outside_mmeb"] == ["A", "B"]
    # One encode call for everything; each distinct item once: queries q0,q1,q2 + a,b,c,d,e (A) + x,y (B, by id).
    assert emb.encoded == [10] and r["sizes"]["distinct_items_encoded"] == 10
    dump = pq.read_table(tmp_path / "run" / "topk.parquet").to_pylist()
    assert [d["gt_rank"] for d in dump] == [0, 2, 1, 0]
    assert dump[1]["topk_index"] == [1, 2] and dump[1]["topk_score"] == pytest.approx([1.0, 0.8])
    assert dump[2]["topk_index"] == [1, 0]  # the tie: distractor first, consistent with the miss
    assert dump[3]["topk_id"] == ["x", "y"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["per_dataset"] == r["per_dataset"] and saved["rerank"] is None
    assert (tmp_path / "run" / "results.png").stat().st_size > 1000
    md = (tmp_path / "run" / "results.md").read_text()
    assert "| A |" in md and "tie is a miss" in md and "reported under Other" in md


def test_listwise_rerank_wiring(hand_table, tmp_path):
    table, vecs = hand_table
    gt_of = {"q0": "a", "q1": "a", "q2": "d"}
    # K=3: the oracle finds every GT -> all hits, no fallback.
    r = evaluate_pairs_table(FakeEmbedder(vecs), table, None, reranker=OracleReranker(gt_of), rerank_top_k=3,
                             datasets=["A"])
    assert r["per_dataset"]["A"] == pytest.approx(100 / 3, abs=1e-3)
    assert r["rerank"]["per_dataset"]["A"] == 100.0 and r["rerank"]["fallbacks"] == 0
    assert r["rerank"]["choice_ranks"]["A"] == {"1": 1, "2": 1, "3": 1}   # the oracle picks each GT's rank
    # K=2: row A:1's GT (rank 2) is outside the list -> the oracle answers None -> counted fallback, still a miss.
    r = evaluate_pairs_table(FakeEmbedder(vecs), table, tmp_path / "k2", reranker=OracleReranker(gt_of),
                             rerank_top_k=2, datasets=["A"])
    assert r["rerank"]["per_dataset"]["A"] == pytest.approx(200 / 3, abs=1e-3)
    assert r["rerank"]["fallbacks"] == 1 and r["datasets"]["A"]["gt_in_top_k"] == pytest.approx(200 / 3, abs=1e-3)
    assert r["rerank"]["choice_ranks"]["A"] == {"1": 1, "2": 1}           # the fallback is no pick
    assert r["rerank"]["modes"]["listwise"]["answers"]["A"] == {"exact": 2, "unparsable": 1}   # read how
    dump = pq.read_table(tmp_path / "k2" / "topk.parquet").to_pylist()
    assert [d["rerank_fallback"] for d in dump] == [False, True, False]
    assert [d["rerank_top1"] for d in dump] == [0, 1, 0]   # A:1 keeps the embedder's top-1 (candidate 1)
    assert "fallback to the embedder's top-1): 1" in (tmp_path / "k2" / "results.md").read_text()
    # Unparsable or out-of-range answers: every row falls back, reranked == embedder.
    for bad in (None, 7):
        r = evaluate_pairs_table(FakeEmbedder(vecs), table, None, reranker=ConstantReranker(bad), datasets=["A"])
        assert r["rerank"]["fallbacks"] == 3
        assert r["rerank"]["per_dataset"]["A"] == r["per_dataset"]["A"]


def test_pairs_eval_bad_input(tmp_path):
    vecs = {"q": [1, 0], "a": [1, 0], "b": [0, 1]}
    no_gt = _write_pairs(tmp_path / "no_gt", [_pair_row("r0", "A", T("q"), T("a"), []),
                                              _pair_row("r1", "A", T("q"), T(""), [T("b")])])
    with pytest.raises(DataError, match=r"row 1 \(id='r1'\), field 'pos_text': no candidates"):
        evaluate_pairs_table(FakeEmbedder(vecs), no_gt, None)
    missing = _write_pairs(tmp_path / "missing", [_pair_row("r0", "A", T("q"), T("a"),
                                                            [T("b"), Item(image_path="nope.png")])])
    with pytest.raises(DataError, match=r"id='r0'\), field 'neg_image_path\[1\]': image file not found: .*nope.png"):
        evaluate_pairs_table(FakeEmbedder(vecs), missing, None, image_root=tmp_path)
    clash = _write_pairs(tmp_path / "clash", [_pair_row("r0", "A", T("q"), T("a"), [T("b")], "x", ["y"]),
                                              _pair_row("r1", "A", T("q"), T("a"), [T("a")], "x", ["y"])])
    with pytest.raises(DataError, match=r"id='r1'\), field 'neg_id\[0\]': candidate id 'y' has different content"):
        evaluate_pairs_table(FakeEmbedder(vecs), clash, None)
    with pytest.raises(DataError, match=r"no rows for dataset\(s\) \['Z'\]; datasets present: \['A'\]"):
        evaluate_pairs_table(FakeEmbedder(vecs), clash, None, datasets=["Z"])
    with pytest.raises(FileNotFoundError):
        evaluate_pairs_table(FakeEmbedder(vecs), tmp_path / "nothing", None)
    with pytest.raises(ValueError, match="a Ray pool needs an EmbedderSpec"):
        evaluate_pairs_table(FakeEmbedder(vecs), no_gt, None, pool=Pool())


# ============================================================================ MMEB-eval folder layout
def _mmeb_dir(root: Path) -> tuple[Path, Path]:
    """Raw MMEB-eval layout: <subset>/test.jsonl rows (qry_text, qry_img_path, tgt_text[], tgt_img_path[])."""
    images = root / "images"
    (images / "pics").mkdir(parents=True)
    for i in range(4):
        (images / "pics" / f"{i}.png").write_bytes(make_png(28 + 4 * i, 28, seed=i))
    data = root / "MMEB-eval"
    labels = ["cat", "dog", "car", "tree"]
    subsets = {
        "ImageNet-1K": [{"qry_text": "<|image_1|> Represent the given image for classification",
                         "qry_img_path": f"pics/{i}.png",
                         "tgt_text": [labels[i]] + [x for x in labels if x != labels[i]],
                         "tgt_img_path": [""] * 4} for i in range(3)],
        "MSCOCO_t2i": [{"qry_text": f"Find me an everyday image that matches the given caption: a {labels[i]}",
                        "qry_img_path": "", "tgt_text": ["<|image_1|> Represent the given image."] * 3,
                        "tgt_img_path": [f"pics/{(i + j) % 4}.png" for j in range(3)]} for i in range(3)],
        "MyOwnSet": [{"qry_text": "a cat", "qry_img_path": "", "tgt_text": ["cat", "dog"], "tgt_img_path": ["", ""]}],
    }
    for name, rows in subsets.items():
        (data / name).mkdir(parents=True)
        (data / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, images


def test_mmeb_dir_bad_input(tmp_path):
    data, images = _mmeb_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"unknown MMEB-eval subset 'NoSuchSet'.*found: ImageNet-1K, MS"):
        prepare_mmeb_dir(data, tmp_path / "t", image_root=images, subsets=["NoSuchSet"])
    with pytest.raises(FileNotFoundError, match="did you mean 'ImageNet-1K'"):
        prepare_mmeb_dir(data, tmp_path / "t", image_root=images, subsets=["imagenet_1k"])
    (data / "Broken").mkdir()
    (data / "Broken" / "test.jsonl").write_text(
        json.dumps({"qry_text": "q", "qry_img_path": "", "tgt_text": ["a"], "tgt_img_path": [""]}) + "\n"
        + json.dumps({"qry_text": "q", "qry_img_path": "", "tgt_text": [], "tgt_img_path": []}) + "\n")
    with pytest.raises(DataError, match=r"row 1, field 'tgt_text': no candidates .*1 of 2 rows of subset 'Broken'"):
        prepare_mmeb_dir(data, tmp_path / "t", image_root=images, subsets=["Broken"])
    (data / "Missing").mkdir()
    (data / "Missing" / "test.jsonl").write_text(json.dumps(
        {"qry_text": "<|image_1|> q", "qry_img_path": "pics/404.png", "tgt_text": ["a"], "tgt_img_path": [""]}) + "\n")
    with pytest.raises(DataError, match=r"field 'query_image_path'"):
        prepare_mmeb_dir(data, tmp_path / "t", image_root=images, subsets=["Missing"])


def test_published_mmeb_folder_overall_is_the_36_and_cifar_is_other(tmp_path):
    """The published MMEB-eval folder holds 37 subsets (the 36 + CIFAR-100): Overall/IND/OOD and the
    meta-tasks average exactly the 36; CIFAR-100 is evaluated and reported under Other only."""
    from unime_ray.eval.mmeb import evaluate_mmeb_dir, headline

    data = tmp_path / "MMEB-eval"
    vecs: dict[str, list[float]] = {}
    for k, name in enumerate(list(MMEB_DATASETS) + ["CIFAR-100"]):
        (data / name).mkdir(parents=True)
        (data / name / "test-00000-of-00001.jsonl").write_text(json.dumps(
            {"qry_text": f"q{k}", "qry_img_path": "", "tgt_text": [f"good{k}", f"bad{k}"], "tgt_img_path": ["", ""]}))
        hit = name != "CIFAR-100"   # every MMEB set scores 100, CIFAR-100 scores 0
        vecs.update({f"q{k}": [1, 0], f"good{k}": [1, 0] if hit else [0, 1], f"bad{k}": [0, 1] if hit else [1, 0]})
    r = evaluate_mmeb_dir(FakeEmbedder(vecs), data, tmp_path / "run")
    assert len(r["per_dataset"]) == 37 and r["per_dataset"]["CIFAR-100"] == 0.0
    s = r["summary"]
    assert s["Overall"] == {"mean": 100.0, "count": 36}           # 97.3 if CIFAR-100 counted
    assert (s["IND"]["count"], s["OOD"]["count"]) == (20, 16)
    assert [s[g]["count"] for g in ("Classification", "VQA", "Retrieval", "Grounding")] == [10, 10, 12, 4]
    assert s["Other"] == {"mean": 0.0, "count": 1, "datasets": ["CIFAR-100"]}
    assert r["outside_mmeb"] == ["CIFAR-100"] and r["chance_summary"]["Overall"]["count"] == 36
    assert r["metrics"]["mean Overall"] == 100.0 and r["metrics"]["mean Other"] == 0.0
    assert headline(s) == ("Overall", 100.0)
    md = (tmp_path / "run" / "results.md").read_text()
    assert "| Other | 1 |" in md and "reported under Other" in md and "CIFAR-100" in md
    # A run of custom sets only (the demo) has no Overall: its headline is the mean of its sets.
    assert headline(summarize({"emoji_i2t": 40.0, "emoji_t2i": 60.0})) == ("Other", 50.0)

# ============================================================================ retrieval / compositional runners
def _retrieval_file(tmp_path: Path, per_image: int, prefix: str = "") -> Path:
    """3 images in tmp_path/img, each with ``per_image`` captions plus one extra; paths ``prefix + i.png``."""
    (tmp_path / "img").mkdir(exist_ok=True)
    recs = []
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(make_png(30, 30, seed=10 + i))
        recs.append({"image_path": f"{prefix}{i}.png",
                     "captions": [f"cap{i}-{j}" for j in range(per_image)] + ["extra"]})
    path = tmp_path / f"ret{per_image}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_retrieval_runner_prompts_mapping_and_rerank(tmp_path):
    from unime_ray.models.formatting import format_official

    rset = load_retrieval_set(_retrieval_file(tmp_path, 2), image_root=tmp_path / "img", captions_per_image=2)
    assert len(rset.images) == 3 and len(rset.captions) == 6 and rset.caption_image.tolist() == [0, 0, 1, 1, 2, 2]
    assert format_official(rset.images[0]) == "<|image_pad|> Find an image caption describing the given image."
    assert rset.captions[0] == Item(text="cap0-0") and IMAGE_PROMPT.endswith("describing the given image.")
    # Hand geometry (exact arithmetic): images on axes; caption cap{i}-0 equals image i, cap{i}-1 equals image i+1.
    axes = {"0.png": [1, 0], "1.png": [0, 1], "2.png": [-1, 0]}
    vecs = dict(axes)
    for i in range(3):
        vecs[f"cap{i}-0"] = axes[f"{i}.png"]
        vecs[f"cap{i}-1"] = axes[f"{(i + 1) % 3}.png"]
    r = evaluate_retrieval_sets(FakeEmbedder(vecs), [rset], tmp_path / "ret", ks=(1, 2))
    s = r["sets"][rset.name]
    # t2i: cap{i}-0 hit; cap{i}-1 scores image i+1 = 1 above its own image. GT scores: cap0-1 -> i0: 0 (tie with
    # i2: 0, rank 2); cap1-1 -> i1: 0 (i2 1, i0 -1: rank 1); cap2-1 -> i2: -1 (rank 2). R@1 3/6, R@2 4/6.
    assert s["t2i"] == pytest.approx({"R@1": 50.0, "R@2": 400 / 6}, abs=1e-3)
    # i2t: image i's own caption cap{i}-0 ties with cap{i-1}-1 (the same vector): a tie is a miss at R@1.
    assert s["i2t"] == pytest.approx({"R@1": 0.0, "R@2": 100.0})
    assert json.loads((tmp_path / "ret" / "results.json").read_text())["sets"][rset.name]["images"] == 3

    # Reranking: 1:1 set; a reranker that always takes rank 2, a neighbouring caption. The official code's
    # 5-caption window would count some of those as hits; here only the image's own caption counts.
    one = load_retrieval_set(_retrieval_file(tmp_path, 1), image_root=tmp_path / "img", captions_per_image=1)
    vecs1 = {f"{i}.png": [1.0, 0.1 * i, 0.0] for i in range(3)}
    vecs1.update({f"cap{i}-0": [1.0, 0.1 * i + 0.04, 0.0] for i in range(3)})
    r = evaluate_retrieval_sets(FakeEmbedder(vecs1), [one], None, reranker=ConstantReranker(1), rerank_top_k=2,
                                ks=(1,))
    rr = r["sets"][one.name]["rerank"]
    assert r["sets"][one.name]["i2t"]["R@1"] == 100.0
    assert rr["i2t_R@1"] == 0.0 and rr["fallbacks"] == 0
    flat = tmp_path / "flat.jsonl"   # one caption per record; records of one image need not be adjacent
    flat.write_text("".join(json.dumps({"image_path": p, "caption": c}) + "\n"
                            for p, c in (("0.png", "x"), ("1.png", "y"), ("0.png", "z"))))
    fl = load_retrieval_set(flat, image_root=tmp_path / "img")
    assert [c.text for c in fl.captions] == ["x", "z", "y"] and fl.caption_image.tolist() == [0, 0, 1]
    with pytest.raises(DataError, match="has 3 caption"):
        load_retrieval_set(_retrieval_file(tmp_path, 2), image_root=tmp_path / "img", captions_per_image=5)
    with pytest.raises(DataError, match=r"row 0, field 'image_path': image file not found"):
        load_retrieval_set(_retrieval_file(tmp_path, 2), image_root=tmp_path / "elsewhere")


def test_compositional_runner(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "0.png").write_bytes(make_png(30, 30, seed=3))
    folder = tmp_path / "sugarcrepe"
    folder.mkdir()
    sets = {"replace_obj": [("good a", "bad a"), ("good b", "tie b"), ("tie c", "tie d")],
            "swap_att": [("good e", "bad e")]}
    for name, pairs in sets.items():
        (folder / f"{name}.json").write_text(json.dumps(
            {str(i): {"filename": "0.png", "caption": p, "negative_caption": n} for i, (p, n) in enumerate(pairs)}))
    data = load_compositional(folder, image_root=tmp_path / "coco")
    assert {k: len(v) for k, v in data.items()} == {"replace_obj": 3, "swap_att": 1}
    vecs = {"0.png": [1, 0], "good a": [1, 0], "bad a": [0, 1], "good b": [0, 1], "tie b": [0.6, 0.8],
            "tie c": [0.6, 0.8], "tie d": [0.6, 0.8], "good e": [0.8, 0.6], "bad e": [0.6, 0.8]}
    r = evaluate_compositional(FakeEmbedder(vecs), data, tmp_path / "comp", reranker=OracleReranker({}))
    # Embedder: a hit, b miss (0 < 0.6), c tie -> miss; e hit.
    assert r["per_subset"] == {"replace_obj": pytest.approx(100 / 3, abs=1e-3), "swap_att": 100.0}
    # Reranker P(Yes): good 0.9, tie 0.5, bad 0.1 -> a hit, b hit, c tie -> miss; e hit.
    assert r["rerank"]["per_subset"] == {"replace_obj": pytest.approx(200 / 3, abs=1e-3), "swap_att": 100.0}
    assert r["summary"]["R_Compos"]["count"] == 2 and r["sizes"]["distinct_items_encoded"] == 9
    assert (tmp_path / "comp" / "results.md").is_file()
    with pytest.raises(FileNotFoundError, match="unknown compositional subset"):
        load_compositional(folder, image_root=tmp_path / "coco", subsets=["add_obj"])


def test_compare_runs(tmp_path):
    from unime_ray.eval.outputs import write_outputs

    base = {"kind": "compositional", "model": "m", "subsets": {"replace_obj": {"pairs": 2, "accuracy": 50.0}},
            "summary": summarize_compositional({"replace_obj": 50.0}), "rerank": None}
    write_outputs(tmp_path / "a", dict(base, metrics={"acc replace_obj": 50.0, "only_a": 1.0}))
    write_outputs(tmp_path / "b", dict(base, model="n", metrics={"acc replace_obj": 62.5, "only_b": 2.0}))
    text = compare_runs(tmp_path / "a", tmp_path / "b")
    assert "| compositional: acc replace_obj | 50.00 | 62.50 | +12.50 |" in text
    assert "| compositional: only_a | 1.00 |  |  |" in text and "| compositional: only_b |  | 2.00 |  |" in text
    with pytest.raises(FileNotFoundError):
        compare_runs(tmp_path / "a", tmp_path / "nothing")


# ============================================================================ config
def test_eval_config():
    cfg = EvalConfig()
    assert cfg.top_k_dump == 10 and cfg.rerank.enabled is False and cfg.rerank.top_k == 5
    assert cfg.rerank.mode == "listwise"
    with pytest.raises(ValueError, match="extra"):
        EvalConfig(unknown_key=1)
    # no model: in a pipeline run, the reranker that run trained (the pipeline errors if it trained none)
    assert EvalConfig(rerank={"enabled": True}).rerank.model is None
    with pytest.raises(ValueError, match="min_actors"):
        EvalConfig(pool={"min_actors": 3, "max_actors": 2})
    with pytest.raises(ValueError, match="mmeb_dir"):
        EvalConfig(sets=["mmeb"])
    assert EvalConfig(sets=["mmeb"], mmeb_dir="/x", rerank={"enabled": True, "model": "m"}).rerank.model == "m"


# ============================================================================ real tiny models
@pytest.fixture(scope="module")
def small_table(tmp_path_factory):
    """Two datasets, 4 rows each, 4 candidates (images and texts mixed), inline images."""
    root = tmp_path_factory.mktemp("small")
    imgs = [make_png(28 + 2 * i, 28, seed=20 + i) for i in range(6)]
    rows = []
    for r in range(4):
        rows.append(_pair_row(f"i2t:{r}", "i2t", Item(instruction="Represent the image:", image=imgs[r]),
                              T(f"label {r}"), [T(f"label {(r + j) % 6}") for j in (1, 2, 3)],
                              pos_id=f"l{r}", neg_ids=[f"l{(r + j) % 6}" for j in (1, 2, 3)]))
        rows.append(_pair_row(f"t2i:{r}", "t2i", T(f"find picture {r}"), Item(image=imgs[r]),
                              [Item(image=imgs[(r + j) % 6]) for j in (1, 2, 3)]))
    return _write_pairs(root / "pairs", rows, rows_per_shard=3)


def test_tiny_model_local_equals_ray(tiny_models, ray_local, small_table, tmp_path):
    spec = EmbedderSpec(model=str(tiny_models["qwen2_vl"]), dtype="float32")
    local = evaluate_pairs_table(spec, small_table, tmp_path / "local", pool=Pool.in_process(4), top_k_dump=4)
    # One actor keeps the test cheap on 2 cores; the 20 items still travel as 4 shards and are reassembled.
    ray = evaluate_pairs_table(spec, small_table, tmp_path / "ray", top_k_dump=4,
                               pool=Pool(min_actors=1, max_actors=1, batch_size=4))
    assert local["sizes"]["distinct_items_encoded"] == 4 + 6 + 4 + 6 and ray["timing"]["use_ray"] is True
    assert ray["per_dataset"] == local["per_dataset"] and ray["chance"] == local["chance"]
    a = pq.read_table(tmp_path / "local" / "topk.parquet").to_pylist()
    b = pq.read_table(tmp_path / "ray" / "topk.parquet").to_pylist()
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert x["row_id"] == y["row_id"] and x["gt_rank"] == y["gt_rank"]
        np.testing.assert_allclose(x["topk_score"], y["topk_score"], atol=1e-4)
    assert local["chance"] == {"i2t": 25.0, "t2i": 25.0}
    assert not list(tmp_path.glob("ray/.eval-encode-*"))  # the temporary encode tables are removed


def test_cli_eval_mmeb_dir_retrieval_compositional_and_compare(tiny_models, tmp_path, capsys):
    data, images = _mmeb_dir(tmp_path)
    ret = _retrieval_file(images, 2, prefix="img/")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    comp = tmp_path / "comp.jsonl"
    comp.write_text(json.dumps({"image_path": "pics/0.png", "caption": "a cat", "negative_caption": "a dog",
                                "subset": "replace_obj"}) + "\n")
    args = parser.parse_args(["eval", "--model", str(tiny_models["qwen2_vl"]), "--dtype", "float32",
                              "--mmeb-dir", str(data), "--image-root", str(images), "--out", str(tmp_path / "run"),
                              "--no-ray", "--batch-size", "4", "--retrieval", str(ret), "--captions-per-image", "2",
                              "--compositional", str(comp), "--label", "tiny"])
    assert args.func(args) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["kind"] == "mmeb" and set(res["per_dataset"]) == {"ImageNet-1K", "MSCOCO_t2i", "MyOwnSet"}
    assert res["summary"]["Classification"]["count"] == 1 and res["summary"]["Retrieval"]["count"] == 1
    assert res["summary"]["IND"]["count"] == 2 and res["summary"]["Overall"]["count"] == 2
    assert res["summary"]["Other"]["count"] == 1 and res["summary"]["Other"]["datasets"] == ["MyOwnSet"]
    assert res["chance"] == {"ImageNet-1K": 25.0, "MSCOCO_t2i": pytest.approx(100 / 3, abs=1e-3), "MyOwnSet": 50.0}
    assert res["outside_mmeb"] == ["MyOwnSet"] and res["model"] == "tiny"
    for sub in ("retrieval", "compositional"):
        assert (tmp_path / "run" / sub / "results.json").is_file()
    out = capsys.readouterr().out
    assert "ImageNet-1K" in out and "i2t R@1" in out
    # Conversion is cached: a second model run over the same folder reuses the converted tables.
    done = tmp_path / "run" / "mmeb_tables" / "ImageNet-1K" / "_done.json"
    assert done.is_file()
    args = parser.parse_args(["compare", str(tmp_path / "run"), str(tmp_path / "run")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| P@1 ImageNet-1K |" in out and "+0.00" in out and "retrieval: " in out and "compositional: " in out


def test_real_reranker_wiring(tiny_models, small_table, tmp_path):
    rerank = pytest.importorskip("unime_ray.rerank")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "0.png").write_bytes(make_png(30, 30, seed=1))
    reranker = rerank.Reranker.from_pretrained(tiny_models["qwen2_5_vl"], dtype="float32",
                                               image_root=tmp_path / "img", batch_size=4)
    spec = EmbedderSpec(model=str(tiny_models["qwen2_vl"]), dtype="float32")
    r = evaluate_pairs_table(spec, small_table, tmp_path / "rr", reranker=reranker, rerank_top_k=3,
                             pool=Pool.in_process(4))
    rr = r["rerank"]
    assert rr["top_k"] == 3 and 0 <= rr["fallbacks"] <= 8
    dump = pq.read_table(tmp_path / "rr" / "topk.parquet").to_pylist()
    assert sum(d["rerank_fallback"] for d in dump) == rr["fallbacks"]
    for name, d in r["datasets"].items():
        assert 0.0 <= d["reranked_p_at_1"] <= d["gt_in_top_k"]
    # Pairwise (compositional) with the same reranker: probabilities, accuracy in [0, 100].
    comp = tmp_path / "c.jsonl"
    comp.write_text(json.dumps({"image_path": "0.png", "caption": "a red square", "negative_caption": "a blue square",
                                "subset": "replace_att"}) + "\n")
    data = load_compositional(comp, image_root=tmp_path / "img")
    c = evaluate_compositional(spec, data, None, image_root=tmp_path / "img", reranker=reranker,
                               pool=Pool.in_process(4))
    assert c["rerank"]["per_subset"]["replace_att"] in (0.0, 100.0)


@pytest.mark.slow
def test_demo_eval_table_if_present(tmp_path):
    """The demo's prepared eval table (runs/demo, built by `unime-ray pipeline`), a few rows per task."""
    demo = Path(__file__).resolve().parents[2] / "runs" / "demo"
    if not (demo / "prepare" / "eval_pairs").is_dir():
        pytest.skip("no demo run at runs/demo")
    spec = EmbedderSpec(model=str(demo / "models" / "tiny-qwen2-vl"), dtype="float32")
    r = evaluate_pairs_table(spec, demo / "prepare" / "eval_pairs", tmp_path, image_root=demo / "data",
                             max_rows_per_dataset=3, pool=Pool.in_process(32))
    assert set(r["per_dataset"]) == {"emoji_i2t", "emoji_t2i", "emoji_cls"}
    assert r["sizes"]["rows"] == 9 and r["datasets"]["emoji_i2t"]["mean_candidates"] > 100


def test_eval_step_adds_the_dual_encoder_judge_as_a_reference(tmp_path):
    """eval_models: a run that fitted a dual-encoder stand-in judge also ranks the eval sets with its fold-0
    judge (a seedless reference row); an MLLM stand-in or eval.judge_reference: false adds nothing."""
    from types import SimpleNamespace

    from unime_ray.run.config import load_run_config
    from unime_ray.run.stages.eval import eval_models
    from unime_ray.run.results import JudgeFitResult

    def ctx(kind, reference=True):
        cfg = load_run_config(preset="synthetic", overrides=[f"run_dir={tmp_path}", "baseline.enabled=false",
                                                             f"eval.judge_reference={str(reference).lower()}"])
        fit = JudgeFitResult(enabled=True, kind=kind, num_folds=2, folds={"0": {"model": "/j/fold0"},
                                                                          "1": {"model": "/j/fold1"}})
        results = {"judge_fit": fit}
        return SimpleNamespace(cfg=cfg, result_if_run=lambda name, cls: results.get(name),
                               completed=lambda name: False)

    models = eval_models(ctx("dual_encoder"))
    judge = [m for m in models if m["variant"] == "judge"]
    assert judge == [{"label": "judge-fold0", "variant": "judge", "seed": None, "model": "/j/fold0",
                      "rerank": False}]
    assert models[0]["variant"] == "initial-embedder"
    assert not [m for m in eval_models(ctx("mllm")) if m["variant"] == "judge"]
    assert not [m for m in eval_models(ctx("dual_encoder", reference=False)) if m["variant"] == "judge"]


class GroundTruthReranker:
    """Knows every row's ground truth: P(Yes) 0.9 for it and 0.1 for the rest; names it listwise."""

    def __init__(self, gts: set[str], slot: int | None = None):
        self.gts, self.slot = gts, slot

    def score_pairs(self, pairs):
        return np.array([0.9 if c.text in self.gts else 0.1 for _, c in pairs])

    def choose_many(self, queries, lists):
        if self.slot is not None:                     # a position bias: always the same slot
            return [Choice(self.slot, f"({self.slot + 1})") for _ in lists]
        return [Choice(next((i for i, c in enumerate(cands) if c.text in self.gts), None), "x") for cands in lists]


@pytest.fixture
def dev_rows(tmp_path):
    """60 dev rows: the embedder ranks the ground truth first in even rows and second (behind n{i}_0) in odd
    ones; 4 candidates each."""
    vecs, rows = {}, []
    angle = lambda a: [float(np.cos(a)), float(np.sin(a))]
    for i in range(60):
        vecs[f"q{i}"] = [1.0, 0.0]
        vecs[f"g{i}"] = angle(0.2 if i % 2 == 0 else 0.5)
        for j, a in enumerate((0.3, 0.9, 1.2)):
            vecs[f"n{i}_{j}"] = angle(a)
        negs = [T(text=f"n{i}_{j}") for j in range(3)]
        rows.append(_pair_row(f"r{i}", "dev", T(text=f"q{i}"), T(text=f"g{i}"), negs))
    return _write_pairs(tmp_path / "dev", rows), vecs, {f"g{i}" for i in range(60)}


@pytest.mark.parametrize("mode", ["listwise", "pairwise", "fused"])
def test_reranker_guard_uses_a_reranker_that_helps(dev_rows, tmp_path, mode):
    from unime_ray.eval.guard import validate_reranker

    table, vecs, gts = dev_rows
    v = validate_reranker(FakeEmbedder(vecs), GroundTruthReranker(gts), table, tmp_path / "v", mode=mode, top_k=2)
    assert v.rows + v.tuning_rows == 60 and v.rows > 15
    assert v.embedder_p1 == pytest.approx(100.0 * sum(1 for i in range(60) if i % 2 == 0 and not _tuning(i)) / v.rows)
    assert v.p1["listwise"] == v.p1["pairwise"] == 100.0 and v.used and v.lo > 0 and not v.one_slot
    assert v.weight == min(float(w) for w, p in v.weights_tried.items() if p == max(v.weights_tried.values()))
    assert "is used" in v.sentence()


def _tuning(i: int) -> bool:
    import hashlib

    return hashlib.sha1(f"r{i}".encode()).digest()[0] % 2 == 0


def test_reranker_guard_refuses_a_position_bias_and_a_reranker_that_hurts(dev_rows, tmp_path):
    from unime_ray.eval.guard import validate_reranker

    table, vecs, gts = dev_rows
    slot = validate_reranker(FakeEmbedder(vecs), GroundTruthReranker(gts, slot=0), table, tmp_path / "a", top_k=2)
    assert slot.one_slot and not slot.used and slot.gain == 0 and "position bias" in slot.sentence()
    wrong = GroundTruthReranker({f"n{i}_0" for i in range(60)})   # prefers the distractor
    hurt = validate_reranker(FakeEmbedder(vecs), wrong, table, tmp_path / "b", mode="pairwise", top_k=2)
    assert not hurt.used and hurt.hi < 0 and "not used" in hurt.sentence()
