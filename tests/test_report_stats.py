"""The comparison statistics of the report (means, sample std, paired differences, the paper's order, the
reranker's effect, multiples of chance) against an independent computation from the recorded per-seed results."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from unime_ray.eval.stats import (MEAN_KEY, PAPER_ORDER, order_verdict, paired_difference, per_seed, rerank_effect,
                                  seed_spread)

SETS = ("i2t", "t2i")
CHANCE = {"i2t": 0.5, "t2i": 1.25}
# variant -> seed -> per-set P@1 (%)
RESULTS = {
    "baseline": {0: {"i2t": 10.0, "t2i": 12.0}},
    "infonce-inbatch": {0: {"i2t": 10.0, "t2i": 14.0}, 1: {"i2t": 12.0, "t2i": 13.0}, 2: {"i2t": 11.0, "t2i": 15.0}},
    "hard-labels": {0: {"i2t": 12.5, "t2i": 15.0}, 1: {"i2t": 13.0, "t2i": 13.5}, 2: {"i2t": 14.0, "t2i": 16.5}},
    "unime-v2": {0: {"i2t": 15.0, "t2i": 16.0}, 1: {"i2t": 14.0, "t2i": 17.0}, 2: {"i2t": 16.5, "t2i": 18.0}},
}
RERANKED = {0: {"i2t": 16.0, "t2i": 16.5}, 1: {"i2t": 15.0, "t2i": 18.0}, 2: {"i2t": 16.0, "t2i": 19.5}}


def _summary(per_dataset):
    return {"Overall": {"count": 0, "mean": None}, "Other": {"count": len(per_dataset),
                                                             "mean": float(np.mean(list(per_dataset.values())))}}


def _models(results=RESULTS, reranked=RERANKED):
    models = {}
    for variant, seeds in results.items():
        for seed, pd in seeds.items():
            m = {"variant": variant, "seed": seed, "per_dataset": dict(pd), "summary": _summary(pd),
                 "chance": CHANCE, "sizes": {"rows_per_dataset": {s: 200 for s in SETS}}}
            if variant == "unime-v2":
                rr = reranked[seed]
                m["rerank"] = {"per_dataset": dict(rr), "summary": _summary(rr), "fallbacks": 0,
                               "gt_in_top_k": {s: 50.0 for s in SETS},
                               "choice_ranks": {"i2t": {"1": 3, "2": 1}, "t2i": {"1": 4}}}
            models[f"{variant}-seed{seed}"] = m
    models["external"] = {"variant": "external", "seed": None, "per_dataset": {"i2t": 99.0}, "summary":
                          _summary({"i2t": 99.0})}
    return models


def _mean(variant, seed, results=RESULTS):
    return float(np.mean([results[variant][seed][s] for s in SETS]))


def test_seed_spread_is_mean_and_sample_std():
    vals = [10.0, 12.0, 11.5]
    sp = seed_spread(vals)
    assert sp.mean == pytest.approx(statistics.mean(vals)) and sp.std == pytest.approx(statistics.stdev(vals))
    assert sp.std == pytest.approx(np.std(vals, ddof=1))
    assert seed_spread([3.0]).std is None and seed_spread([3.0]).text() == "3.00"
    assert seed_spread([None]) is None
    assert sp.text() == f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def test_per_seed_and_paired_differences_match_an_independent_computation():
    scores = per_seed(_models())
    assert "external" not in scores                              # no seed: not part of the paired comparison
    for variant, seeds in RESULTS.items():
        for seed in seeds:
            assert scores[variant][MEAN_KEY][seed] == pytest.approx(_mean(variant, seed))
            for s in SETS:
                assert scores[variant][s][seed] == RESULTS[variant][seed][s]
    p = paired_difference(scores["unime-v2"][MEAN_KEY], scores["hard-labels"][MEAN_KEY], "unime-v2", "hard-labels")
    diffs = [_mean("unime-v2", s) - _mean("hard-labels", s) for s in (0, 1, 2)]
    assert p.seeds == (0, 1, 2) and list(p.differences) == pytest.approx(diffs)
    assert p.mean == pytest.approx(np.mean(diffs)) and p.std == pytest.approx(np.std(diffs, ddof=1))
    assert p.in_stds == pytest.approx(np.mean(diffs) / np.std(diffs, ddof=1))
    # only common seeds pair up
    q = paired_difference({0: 1.0, 1: 2.0, 5: 9.0}, {1: 1.5, 0: 0.5, 7: 0.0})
    assert q.seeds == (0, 1) and list(q.differences) == [0.5, 0.5] and q.in_stds == math.inf
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_the_papers_order_verdict():
    v = order_verdict(per_seed(_models()))
    steps = {(p.better, p.worse): p for p in v.steps}
    assert list(steps) == [("hard-labels", "infonce-inbatch"), ("unime-v2", "hard-labels")]
    for (better, worse), p in steps.items():
        diffs = [_mean(better, s) - _mean(worse, s) for s in (0, 1, 2)]
        assert p.mean == pytest.approx(np.mean(diffs))
    assert v.holds                                                # every paired mean difference is positive
    expect_beyond = all(np.mean(d) / np.std(d, ddof=1) >= 1 for d in (
        [_mean("hard-labels", s) - _mean("infonce-inbatch", s) for s in (0, 1, 2)],
        [_mean("unime-v2", s) - _mean("hard-labels", s) for s in (0, 1, 2)]))
    assert v.beyond_spread == expect_beyond
    assert "holds" in v.sentence() and "does not hold" not in v.sentence()

    flipped = {**RESULTS, "unime-v2": RESULTS["infonce-inbatch"], "infonce-inbatch": RESULTS["unime-v2"]}
    w = order_verdict(per_seed(_models(flipped)))
    assert not w.holds and "does not hold" in w.sentence() and "unime-v2 is not above hard-labels" in w.sentence()
    missing = order_verdict(per_seed(_models({k: v for k, v in RESULTS.items() if k != "hard-labels"})))
    assert not missing.holds and "cannot be checked" in missing.sentence()
    assert PAPER_ORDER == ("infonce-inbatch", "hard-labels", "unime-v2")


def test_rerank_effect_is_paired_over_the_same_seeds():
    models = _models()
    p, sentence = rerank_effect(per_seed(models), per_seed(models, reranked=True))
    diffs = [np.mean(list(RERANKED[s].values())) - _mean("unime-v2", s) for s in (0, 1, 2)]
    assert p.mean == pytest.approx(np.mean(diffs)) and p.std == pytest.approx(np.std(diffs, ddof=1))
    seed_sd = np.std([_mean("unime-v2", s) for s in (0, 1, 2)], ddof=1)
    beyond = abs(np.mean(diffs)) >= np.std(diffs, ddof=1)
    assert ("beyond the seed spread" in sentence) == beyond and ("within the seed spread" in sentence) == (not beyond)
    assert f"{seed_sd:.2f}" in sentence and "helps" in sentence


def test_report_section_prints_these_numbers(tmp_path):
    from unime_ray.eval.report import comparison_section

    models = _models()
    text = "\n".join(comparison_section({"models": models}, tmp_path))
    vals = [_mean("unime-v2", s) for s in (0, 1, 2)]
    assert f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}" in text          # the comparison table
    diffs = [_mean("unime-v2", s) - _mean("hard-labels", s) for s in (0, 1, 2)]
    assert f"{np.mean(diffs):+.2f} ± {np.std(diffs, ddof=1):.2f}" in text        # the paired differences
    assert "The paper's order (infonce-inbatch < hard-labels < unime-v2) holds" in text
    assert "Reranking helps" in text
    assert "picks by embedder rank: 1 88%, 2 12%" in text                    # 7 of 8 picks at rank 1
    assert "position bias" not in text                                      # too few picks to call it
    from unime_ray.eval.report import _choice_text

    assert "position bias" in _choice_text({"a": {"4": 95}, "b": {"1": 5}})
    assert "position bias" not in _choice_text({"a": {"4": 85}, "b": {"1": 15}})
    # multiples of chance: mean over seeds / chance
    i2t = np.mean([RESULTS["unime-v2"][s]["i2t"] for s in (0, 1, 2)]) / CHANCE["i2t"]
    assert f"{i2t:.1f}x" in text and f"{RESULTS['baseline'][0]['t2i'] / CHANCE['t2i']:.1f}x" in text
    # a seedless reference (the judge as a retriever, eval.models) gets its one run's multiple, unpaired
    ref_row = [line for line in text.splitlines() if line.startswith("| external |")][-1]   # the ratio table
    assert f"{99.0 / CHANCE['i2t']:.1f}x" in ref_row and "external - " not in text
