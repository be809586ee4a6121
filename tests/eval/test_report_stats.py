"""The comparison statistics of the report (means, sample std, paired differences with bootstrap intervals, the
paper's order, the reranker's effect, multiples of chance) against independent computations."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from unime_ray.eval.stats import (MEAN_KEY, PAPER_ORDER, metric_values, one_slot, order_verdict, paired_interval,
                                  per_seed, query_ranks, rerank_verdict, seed_spread, seeds_by_variant)

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


def test_per_seed_matches_an_independent_computation():
    scores = per_seed(_models())
    assert "external" not in scores                              # no seed: not part of the paired comparison
    for variant, seeds in RESULTS.items():
        for seed in seeds:
            assert scores[variant][MEAN_KEY][seed] == pytest.approx(_mean(variant, seed))
            for s in SETS:
                assert scores[variant][s][seed] == RESULTS[variant][seed][s]


def test_rank_metrics_and_query_ranks_from_the_topk_file(tmp_path):
    ranks = np.array([0, 3, 4, 9, 12, 0])
    assert list(metric_values(ranks, "R@1")) == [100, 0, 0, 0, 0, 100]
    assert list(metric_values(ranks, "R@5")) == [100, 100, 100, 0, 0, 100]
    assert list(metric_values(ranks, "R@10")) == [100, 100, 100, 100, 0, 100]
    assert metric_values(ranks, "MRR") == pytest.approx([100 / (r + 1) for r in ranks])
    with pytest.raises(ValueError, match="unknown metric"):
        metric_values(ranks, "R@x")
    _write_topk(tmp_path, {"i2t": [("b", 2, 0), ("a", 0, 1), ("c", 5, 3)]})
    got = query_ranks(tmp_path / "results.json")
    assert list(got["plain"]["i2t"]) == [0, 2, 5]                 # sorted by row id
    assert list(got["reranked"]["i2t"]) == [1, 0, 5]              # a: picked slot 1 (a miss), b: the GT, c: a miss
    assert query_ranks(tmp_path / "nothing" / "results.json") is None


def _write_topk(folder, sets):
    """topk.parquet of one model: {eval set: [(row id, embedder GT rank, reranker's pick), ...]}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(d, rid, rank, pick) for d, rs in sets.items() for rid, rank, pick in rs]
    folder.mkdir(parents=True, exist_ok=True)
    cols = {"dataset": [r[0] for r in rows], "row_id": [r[1] for r in rows],
            "gt_rank": pa.array([r[2] for r in rows], pa.int32())}
    if any(r[3] is not None for r in rows):                    # a reranked model's file has the picks
        cols["rerank_top1"] = pa.array([r[3] for r in rows], pa.int32())
    pq.write_table(pa.table(cols), folder / "topk.parquet")


def _ranks(rng, p_hit, n):
    """Per-query ground-truth ranks: rank 0 with probability p_hit, else 1..20."""
    return np.where(rng.random(n) < p_hit, 0, rng.integers(1, 21, n))


def test_paired_interval_mean_and_width_match_independent_computations():
    rng = np.random.default_rng(0)
    a = {s: {"x": _ranks(rng, 0.5, 800), "y": _ranks(rng, 0.3, 400)} for s in range(3)}
    b = {s: {"x": _ranks(rng, 0.4, 800), "y": _ranks(rng, 0.3, 400)} for s in range(3)}
    p = paired_interval(a, b, "R@1", MEAN_KEY)
    want = np.mean([np.mean([(metric_values(a[s][d], "R@1") - metric_values(b[s][d], "R@1")).mean() for s in a])
                    for d in ("x", "y")])
    assert p.mean == pytest.approx(want) and p.lo < p.mean < p.hi and p.seeds == 3 and p.queries == 1200
    # one seed: the interval is the queries' bootstrap, close to the normal-theory interval of a paired mean
    one = paired_interval({0: a[0]}, {0: b[0]}, "R@5", "x")
    d = metric_values(a[0]["x"], "R@5") - metric_values(b[0]["x"], "R@5")
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert one.mean == pytest.approx(d.mean()) and (one.hi - one.lo) / 2 == pytest.approx(half, rel=0.12)
    same = paired_interval(a, a, "MRR", MEAN_KEY)
    assert (same.mean, same.lo, same.hi, same.resolved) == (0.0, 0.0, 0.0, False)
    assert paired_interval(a, {7: b[0]}, "R@1") is None           # no common seed
    with pytest.raises(ValueError, match="different numbers of queries"):
        paired_interval({0: {"x": a[0]["x"][:10]}}, {0: {"x": b[0]["x"][:9]}})


def test_paired_interval_covers_a_zero_difference_at_least_95_percent_of_the_time():
    """Two variants that differ only by per-(seed, query) noise: the interval covers 0 in at least ~95 % of
    replications, and is not much wider than 1.96 true standard errors (the spread of the estimate itself over the
    replications): the two-way bootstrap counts the seed-by-query noise in both margins, so it errs wide."""
    rng = np.random.default_rng(1)
    covered, means, halves = 0, [], []
    for rep in range(200):
        base = rng.random(300) < 0.4                              # per-query difficulty, shared by both variants
        flip = lambda: np.where(base ^ (rng.random(300) < 0.2), 0, 5)
        p = paired_interval({s: {"x": flip()} for s in range(3)}, {s: {"x": flip()} for s in range(3)}, "R@1", "x",
                            n_boot=400, rng_seed=rep)
        covered += p.lo <= 0 <= p.hi
        means.append(p.mean)
        halves.append((p.hi - p.lo) / 2)
    assert covered / 200 >= 0.92
    assert 0.9 <= np.mean(halves) / (1.96 * np.std(means)) <= 1.6


def _grid(rng, p_hits, n=400, seeds=3):
    return {v: {s: {"i2t": _ranks(rng, p, n), "t2i": _ranks(rng, p, n)} for s in range(seeds)}
            for v, p in p_hits.items()}


def test_the_papers_order_verdict():
    rng = np.random.default_rng(2)
    clear = order_verdict(_grid(rng, {"infonce-inbatch": 0.2, "hard-labels": 0.4, "unime-v2": 0.6}))
    assert clear.holds and not clear.contradicted
    assert "holds: every step's 95 % interval lies above 0" in clear.sentence()
    assert [(p.better, p.worse) for p in clear.steps] == [("hard-labels", "infonce-inbatch"),
                                                         ("unime-v2", "hard-labels")]
    flipped = order_verdict(_grid(rng, {"infonce-inbatch": 0.6, "hard-labels": 0.4, "unime-v2": 0.2}))
    assert flipped.contradicted and "unime-v2 is below hard-labels" in flipped.sentence()
    close = order_verdict(_grid(rng, {"infonce-inbatch": 0.4, "hard-labels": 0.4, "unime-v2": 0.41}, n=100))
    assert not close.holds and "not resolvable at this n" in close.sentence() and "sd" not in close.sentence()
    assert "understate the seed spread" in close.sentence()
    missing = order_verdict({"unime-v2": {}})
    assert not missing.holds and "cannot be checked" in missing.sentence()
    assert PAPER_ORDER == ("infonce-inbatch", "hard-labels", "unime-v2")


def test_a_reranker_with_a_position_bias_is_never_reported_as_helping():
    rng = np.random.default_rng(3)
    plain = _grid(rng, {"unime-v2": 0.2})
    better = _grid(rng, {"unime-v2": 0.5})
    p, sentence = rerank_verdict(plain, better, "unime-v2")
    assert p.resolved and p.mean > 0 and "reranking helps" in sentence
    _, biased = rerank_verdict(plain, better, "unime-v2", position_bias=True)
    assert "position bias" in biased and "helps" not in biased
    assert "reranking hurts" in rerank_verdict(better, plain, "unime-v2")[1]
    assert one_slot({"a": {"3": 95}, "b": {"1": 4}}) and not one_slot({"a": {"3": 80}, "b": {"1": 20}})
    assert not one_slot({"a": {"3": 10}})                          # too few picks to call it


def _shuffle_some(rng, ranks, n=30):
    out, idx = ranks.copy(), rng.choice(len(ranks), n, replace=False)
    out[idx] = ranks[rng.permutation(idx)]
    return out


def _report_models(tmp_path):
    """Eval results of 3 variants x 3 seeds with topk files: hard labels and UniME-V2 clearly apart."""
    rng = np.random.default_rng(4)
    base = {(seed, d): _ranks(rng, 0.3, 300) for seed in range(3) for d in SETS}
    ranks = {"infonce-inbatch": lambda seed, d: base[seed, d],
             "hard-labels": lambda seed, d: _shuffle_some(rng, base[seed, d]),   # the same hits, other queries
             "unime-v2": lambda seed, d: _ranks(rng, 0.6, 300)}
    models = {}
    for variant, draw in ranks.items():
        for seed in range(3):
            folder = tmp_path / f"{variant}-{seed}"
            sets = {d: [(f"r{i:03d}", int(r), int(rng.integers(0, 5)) if variant == "unime-v2" else None)
                        for i, r in enumerate(draw(seed, d))] for d in SETS}
            _write_topk(folder, sets)
            per = {d: 100.0 * np.mean([r == 0 for _, r, _ in rows]) for d, rows in sets.items()}
            m = {"variant": variant, "seed": seed, "per_dataset": per, "summary": _summary(per), "chance": CHANCE,
                 "sizes": {"rows_per_dataset": {s: 300 for s in SETS}}, "results": str(folder / "results.json")}
            if variant == "unime-v2":
                rr = {d: 100.0 * np.mean([pick == 0 for _, _, pick in rows]) for d, rows in sets.items()}
                m["rerank"] = {"per_dataset": rr, "summary": _summary(rr), "fallbacks": 0,
                               "gt_in_top_k": {s: 50.0 for s in SETS}, "choice_ranks": {"i2t": {"1": 3, "2": 1}}}
            models[f"{variant}-seed{seed}"] = m
    models["external"] = {"variant": "external", "seed": None, "per_dataset": {"i2t": 99.0},
                          "summary": _summary({"i2t": 99.0})}
    return models


def test_report_section_prints_these_numbers(tmp_path):
    from unime_ray.eval.report import _choice_text, comparison_section

    models = _report_models(tmp_path)
    text = "\n".join(comparison_section({"models": models}, tmp_path))
    ranks = seeds_by_variant(models)
    vals = [np.mean([metric_values(ranks["unime-v2"][s][d], "R@5").mean() for d in SETS]) for s in range(3)]
    assert f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}" in text            # R@5 of the metrics table
    gap = paired_interval(ranks["unime-v2"], ranks["hard-labels"], "R@1", MEAN_KEY)
    assert f"**{gap.text()}**" in text                                            # resolved: bold
    tie = paired_interval(ranks["hard-labels"], ranks["infonce-inbatch"], "R@1", MEAN_KEY)
    assert not tie.resolved and f"| {tie.text()} |" in text
    assert "The paper's order (infonce-inbatch < hard-labels < unime-v2) is not resolvable at this n" in text
    assert "hard-labels - infonce-inbatch has an interval that includes 0" in text
    assert "reranking hurts" in text and "infonce-inbatch + reranker" not in text   # random picks of 5: worse
    assert "picks by embedder rank: 1 75%, 2 25%" in text and "position bias" not in text   # too few picks to call it
    assert "position bias" in _choice_text({"a": {"4": 95}, "b": {"1": 5}})
    assert "position bias" not in _choice_text({"a": {"4": 85}, "b": {"1": 15}})
    # multiples of chance: mean over seeds / chance
    i2t = np.mean([models[f"unime-v2-seed{s}"]["per_dataset"]["i2t"] for s in range(3)]) / CHANCE["i2t"]
    assert f"{i2t:.1f}x" in text
    # a seedless reference (the judge as a retriever, eval.models) gets its one run's multiple, unpaired
    ref_row = [line for line in text.splitlines() if line.startswith("| external |")][-1]   # the ratio table
    assert f"{99.0 / CHANCE['i2t']:.1f}x" in ref_row and "external - " not in text
