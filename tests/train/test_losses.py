"""Training losses against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unime_ray.train.losses import hard_label_loss, infonce, judge_alignment_loss


def np_softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_sym_kl(sim, scores, t):
    p, q = np_softmax(sim / t), np_softmax(scores / t)
    kl_qp = (q * (np.log(q) - np.log(p))).sum(1)
    kl_pq = (p * (np.log(p) - np.log(q))).sum(1)
    return float(np.mean(0.5 * (kl_qp + kl_pq)))


@pytest.mark.parametrize("t", [0.02, 0.05, 1.0])
def test_judge_alignment_matches_numpy(t):
    rng = np.random.default_rng(0)
    sim = rng.uniform(-1, 1, (6, 9))
    scores = rng.uniform(0, 1, (6, 9))
    got = judge_alignment_loss(torch.tensor(sim, dtype=torch.bfloat16 if t == 1.0 else torch.float32),
                               torch.tensor(scores), t)
    ref = np_sym_kl(sim.astype(np.float32) if t != 1.0 else torch.tensor(sim, dtype=torch.bfloat16).float().numpy()
                    .astype(np.float64), scores, t)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_judge_alignment_zero_when_distributions_match_and_symmetric():
    s = torch.tensor([[0.9, 0.2, 0.1], [0.5, 0.5, 0.4]])
    assert float(judge_alignment_loss(s, s)) == pytest.approx(0.0, abs=1e-6)
    a, b = torch.rand(4, 5), torch.rand(4, 5)
    assert float(judge_alignment_loss(a, b)) == pytest.approx(float(judge_alignment_loss(b, a)), rel=1e-5)
    with pytest.raises(ValueError):
        judge_alignment_loss(torch.rand(2, 3), torch.rand(2, 4))


def test_judge_alignment_is_a_mean_of_per_query_losses():
    """No cross-query term: the batch loss equals the mean of micro-batch losses (accumulation is exact)."""
    a, b = torch.rand(8, 9), torch.rand(8, 9)
    full = judge_alignment_loss(a, b)
    parts = torch.stack([judge_alignment_loss(a[i:i + 2], b[i:i + 2]) for i in range(0, 8, 2)]).mean()
    assert float(full) == pytest.approx(float(parts), rel=1e-6)


def test_hard_label_matches_numpy():
    rng = np.random.default_rng(1)
    sim = rng.uniform(-1, 1, (5, 9))
    p = np_softmax(sim / 0.02)
    ref = float(np.mean(-np.log(p[:, 0])))
    assert float(hard_label_loss(torch.tensor(sim), 0.02)) == pytest.approx(ref, rel=1e-4)


def test_infonce_matches_numpy():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((4, 8))
    pos = rng.standard_normal((6, 8))  # 2 extra gathered positives from other ranks
    neg = rng.standard_normal((4, 3, 8))
    logits = np.concatenate([q @ pos.T, np.einsum("nd,nkd->nk", q, neg)], axis=1) / 0.05
    p = np_softmax(logits)
    ref = float(np.mean(-np.log(p[np.arange(4), np.arange(4)])))
    got = infonce(torch.tensor(q), torch.tensor(pos), torch.tensor(neg), 0.05)
    assert float(got) == pytest.approx(ref, rel=1e-4)
    no_neg = infonce(torch.tensor(q), torch.tensor(pos), None, 0.05)
    ref2 = float(np.mean(-np.log(np_softmax(q @ pos.T / 0.05)[np.arange(4), np.arange(4)])))
    assert float(no_neg) == pytest.approx(ref2, rel=1e-4)


def test_infonce_on_another_ranks_slice_uses_its_own_positives():
    """Rank r's queries are rows r*N.. of the gathered positives: its loss equals those rows of the
    full-batch loss (a target of arange(N) would point rank 1 at rank 0's positives)."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((6, 8))
    pos = rng.standard_normal((6, 8))
    p = np_softmax(q @ pos.T / 0.05)
    full_rows = -np.log(p[np.arange(6), np.arange(6)])
    rank1 = infonce(torch.tensor(q[3:]), torch.tensor(pos), None, 0.05, positive_offset=3)
    assert float(rank1) == pytest.approx(float(full_rows[3:].mean()), rel=1e-4)
    with pytest.raises(ValueError, match="exceeds"):
        infonce(torch.tensor(q[3:]), torch.tensor(pos), None, 0.05, positive_offset=4)


# --- the official code's floored KL (train.kl_form: floored) -------------------------------------------
def np_floored_sym_kl(sim, scores, t, eps=1e-8):
    """The official loss written out: F.kl_div(log(P + eps), Q) and F.kl_div(log(Q + eps), P), batchmean.
    kl_div(input, target) = sum target * (log target - input), with 0 * log 0 = 0."""
    p, q = np_softmax(sim / t), np_softmax(scores / t)

    def kl_div(inp, target):
        with np.errstate(divide="ignore", invalid="ignore"):
            t_log_t = np.where(target > 0, target * np.log(np.where(target > 0, target, 1.0)), 0.0)
        return (t_log_t - target * inp).sum(1)

    return float(np.mean(0.5 * (kl_div(np.log(p + eps), q) + kl_div(np.log(q + eps), p))))


@pytest.mark.parametrize("t", [0.02, 0.05])
def test_floored_kl_matches_numpy_and_differs_from_exact_on_confident_rows(t):
    rng = np.random.default_rng(4)
    sim = rng.uniform(-1, 1, (6, 9))
    scores = rng.uniform(0, 1, (6, 9))
    scores[0] = [0.999] + [0.001] * 8          # a confident judge row: Q of the negatives ~ e^-50 at t=0.02
    got = judge_alignment_loss(torch.tensor(sim), torch.tensor(scores), t, kl_form="floored")
    ref = np_floored_sym_kl(sim, scores, t)
    assert got.dtype == torch.float64                # float64 stays float64; lower precisions compute in float32
    assert judge_alignment_loss(torch.tensor(sim).bfloat16(), torch.tensor(scores), t, "floored").dtype == torch.float32
    assert float(got) == pytest.approx(ref, rel=1e-4, abs=1e-6)
    exact = float(judge_alignment_loss(torch.tensor(sim), torch.tensor(scores), t))
    assert exact == pytest.approx(np_sym_kl(sim, scores, t), rel=1e-4)   # the default is still the paper's
    assert exact != pytest.approx(ref, rel=1e-2)    # the floor changes the value here (log Q clipped at -18.4)


def test_floored_equals_exact_when_no_probability_is_tiny():
    """At t = 1 every probability is far above 1e-8: the two forms agree to ~1e-7."""
    rng = np.random.default_rng(5)
    sim, scores = torch.tensor(rng.uniform(-1, 1, (4, 5))), torch.tensor(rng.uniform(0, 1, (4, 5)))
    a = float(judge_alignment_loss(sim, scores, 1.0, kl_form="floored"))
    b = float(judge_alignment_loss(sim, scores, 1.0, kl_form="exact"))
    assert a == pytest.approx(b, abs=1e-6)
    with pytest.raises(ValueError, match="kl_form"):
        judge_alignment_loss(sim, scores, 1.0, kl_form="js")


def test_floored_gradient_is_finite_with_underflowing_probabilities():
    sim = torch.tensor([[1.0, -1.0, -1.0]], requires_grad=True)
    scores = torch.tensor([[1.0, 0.0, 0.0]])
    loss = judge_alignment_loss(sim, scores, 0.01, kl_form="floored")   # exp(-200): P and Q underflow to 0
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sim.grad).all()


def test_kl_form_is_one_train_knob_that_reaches_the_loss():
    """train.kl_form (config) -> TrainJob -> EmbedderTask -> batch_loss -> judge_alignment_loss."""
    from unime_ray.train.config import TrainConfig
    from unime_ray.train.embedder import EmbedderTask, batch_loss
    from unime_ray.train.trainer import TrainJob

    assert TrainConfig().kl_form == "exact"
    job = TrainJob.from_dict(TrainJob(TrainConfig(kl_form="floored"), "m", "o").to_dict())   # as a worker gets it
    assert EmbedderTask(job).s.kl_form == "floored"
    with pytest.raises(ValueError, match="kl_form"):
        TrainConfig(kl_form="js")

    class FixedEmbedder:   # query [1, 0]; candidates at given angles: no model needed
        def embed_items(self, items):
            vec = {"q": [1.0, 0.0], "pos": [0.5, 0.75 ** 0.5], "n1": [-0.2, 0.96 ** 0.5], "n2": [0.0, 1.0]}
            return torch.tensor([vec[it] for it in items])

    # the judge puts ~7% on n2, whose P is e^-25 < 1e-8: the floor changes the loss by ~0.2
    examples = [("q", ["pos", "n1", "n2"], [0.9, 0.1, 0.85])]
    sim, scores = np.array([[0.5, -0.2, 0.0]]), np.array([[0.9, 0.1, 0.85]])
    assert np_sym_kl(sim, scores, 0.02) - np_floored_sym_kl(sim, scores, 0.02) > 0.1
    for form, ref in (("exact", np_sym_kl(sim, scores, 0.02)), ("floored", np_floored_sym_kl(sim, scores, 0.02))):
        loss, _ = batch_loss(FixedEmbedder(), examples, "judge_alignment", 0.02, kl_form=form)
        assert float(loss) == pytest.approx(ref, rel=1e-4)


def test_infonce_leaves_shared_positives_out_of_the_softmax():
    """positive_keys: query i's softmax runs over its own positive, every positive with another key and its
    mined negatives; rows whose positive equals its own (same key) are dropped. Checked against plain loops,
    also on another rank's slice of gathered positives."""
    rng = np.random.default_rng(3)
    q, pos, neg = rng.normal(size=(4, 8)), rng.normal(size=(6, 8)), rng.normal(size=(4, 2, 8))
    keys = np.array([7, 7, 3, 7, 3, 5])           # rows 0, 1, 3 share one label; 2 and 4 another
    t, offset = 0.05, 1                          # queries 0..3 own positives 1..4

    def reference(i):
        own = offset + i
        logits = [q[i] @ pos[own]] + [q[i] @ pos[j] for j in range(6) if j != own and keys[j] != keys[own]]
        logits += [q[i] @ n for n in neg[i]]
        z = np.array(logits) / t
        return -(z[0] - np.log(np.exp(z - z.max()).sum()) - z.max())

    want = np.mean([reference(i) for i in range(4)])
    got = infonce(torch.tensor(q), torch.tensor(pos), torch.tensor(neg), t, positive_offset=offset,
                  positive_keys=torch.tensor(keys))
    assert got.item() == pytest.approx(want, rel=1e-6)
    unmasked = infonce(torch.tensor(q), torch.tensor(pos), torch.tensor(neg), t, positive_offset=offset)
    assert unmasked.item() != pytest.approx(want, rel=1e-3)      # the mask changes the loss here
    distinct = infonce(torch.tensor(q), torch.tensor(pos), None, t, positive_keys=torch.arange(6))
    assert distinct.item() == pytest.approx(infonce(torch.tensor(q), torch.tensor(pos), None, t).item(), rel=1e-6)
    with pytest.raises(ValueError, match="positive_keys"):
        infonce(torch.tensor(q), torch.tensor(pos), None, t, positive_keys=torch.arange(5))


def test_content_ids_are_equal_exactly_for_equal_items():
    from unime_ray.data.schema import Item
    from unime_ray.train.embedder import content_ids

    ids = content_ids([Item(text="cat"), Item(text="cat"), Item(text="cat", instruction="Label:"),
                       Item(text="dog"), Item(image=b"\x89PNG-a"), Item(image=b"\x89PNG-a")]).tolist()
    assert ids[0] == ids[1] and ids[4] == ids[5] and len({ids[0], ids[2], ids[3], ids[4]}) == 4


def test_symmetric_infonce_adds_the_reverse_direction():
    """all_queries: the mean of the query->positive loss and each own positive against every query, with the same
    shared-positive mask; checked against plain loops on another rank's slice."""
    rng = np.random.default_rng(4)
    q_all, pos = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    keys = np.array([7, 7, 3, 7, 3, 5])
    t, offset, n = 0.05, 2, 3                                       # this rank: queries 2..4, positives 2..4

    def ce(z, target):
        z = np.array(z) / t
        return -(z[target] - np.log(np.exp(z - z.max()).sum()) - z.max())

    def forward(i):
        own = offset + i
        js = [own] + [j for j in range(6) if j != own and keys[j] != keys[own]]
        return ce([q_all[own] @ pos[j] for j in js], 0)

    def reverse(i):
        own = offset + i
        js = [own] + [j for j in range(6) if j != own and keys[j] != keys[own]]
        return ce([pos[own] @ q_all[j] for j in js], 0)

    want = 0.5 * (np.mean([forward(i) for i in range(n)]) + np.mean([reverse(i) for i in range(n)]))
    got = infonce(torch.tensor(q_all[offset:offset + n]), torch.tensor(pos), None, t, positive_offset=offset,
                  positive_keys=torch.tensor(keys), all_queries=torch.tensor(q_all))
    assert got.item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="all_queries"):
        infonce(torch.tensor(q_all[:3]), torch.tensor(pos), None, t, all_queries=torch.tensor(q_all[:5]))
