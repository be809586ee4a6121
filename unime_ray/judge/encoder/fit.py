"""Fitting the dual-encoder judge's heads and calibration on training pairs (see
:mod:`unime_ray.judge.encoder.backend` for the model and its folder format).

Each training example is a query, its positive and (optionally) hard negatives, e.g. the query's retrieved
candidates (:func:`unime_ray.judge.crossfit.build_fit_tables` writes such tables per fold). Groups of examples
(queries that share content, :func:`unime_ray.judge.crossfit.group_key`) are split into a fitting part and a
held-out part (``heldout_fraction``); the heads are fitted on the first, and the second picks the best step
(early stopping) and fits the Platt calibration, so the calibration never sees pairs the heads were fitted on.

Methods:

* ``contrastive`` (default): both linear heads trained with InfoNCE. Each query's logits are over its positive,
  its hard negatives and the other positives of the batch; other positives from another task, or with the same
  content as the query's own positive (many classification queries share one label), and hard negatives equal
  to the positive are masked out. Plus the symmetric candidate->query term over the batch.
* ``ridge``: the closed-form floor. The text tower's space is the shared space (text head = identity); the
  image head is a ridge regression of the (standardised) image features onto the text features of the paired
  text. Needs image<->text pairs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ...data.schema import Item, item_from_row, negatives_from_row
from .backend import Calibration, EncoderJudge, Featurizer, ProjectionHeads, is_encoder_judge
from .towers import FeatureStore, TowerSpec

logger = logging.getLogger(__name__)


@dataclass
class EncoderFitSettings:
    method: str = "contrastive"          # contrastive | ridge
    text_tower: dict[str, Any] = field(default_factory=lambda: {"kind": "hf-text"})
    image_tower: dict[str, Any] = field(default_factory=lambda: {"kind": "efficientnet-lite0", "pool": "multi"})
    text_input: str = "text"             # text | prompt (instruction + text)
    dim: int = 256                       # shared space (ridge: the text tower's width)
    steps: int = 600
    batch_queries: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-2
    temperature: float = 0.05            # initial; learned
    symmetric: bool = True
    hard_negatives: bool = True          # False: train on in-batch negatives only (they still score held-out)
    heldout_fraction: float = 0.15
    eval_every: int = 25
    patience: int = 8                    # evaluations without a better held-out AUC before stopping
    ridge_alpha: float = 1000.0
    seed: int = 0
    # torch threads while fitting the heads: the matrices are small, and on a shared CPU a second thread's
    # spin-waiting made the fit 5x slower (measured 4.5 s vs 25.6 s); the towers keep torch's own setting
    threads: int = 1


@dataclass
class FitExample:
    query: Item
    positive: Item
    negatives: list[Item] = field(default_factory=list)
    task: str = ""
    group: str = ""


def paired_auc(pos: np.ndarray, neg: np.ndarray, neg_mask: np.ndarray | None = None) -> float | None:
    """Per-query AUC of the positive against that query's candidates, pooled over queries: the fraction of
    (positive, candidate) pairs of the same query in which the positive scores higher (ties count half).
    ``pos`` [Q], ``neg`` [Q, K], ``neg_mask`` [Q, K] (True = a real candidate)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    mask = np.ones_like(neg, bool) if neg_mask is None else np.asarray(neg_mask, bool)
    d = pos[:, None] - neg
    wins = ((d > 0) + 0.5 * (d == 0))[mask]
    return float(wins.mean()) if wins.size else None


def examples_from_table(table: str | os.PathLike) -> list[FitExample]:
    """Examples from a canonical pairs table (query, positive, negatives = ``neg_*``), grouped as in cross-fitting."""
    from ...data.io import iter_rows
    from ..crossfit import group_key

    out = []
    for row in iter_rows(table):
        out.append(FitExample(item_from_row(row, "query_"), item_from_row(row, "pos_"),
                              [it for it, _, _ in negatives_from_row(row)], row.get("task") or "", group_key(row)))
    return out


def _split(examples: Sequence[FitExample], fraction: float, seed: int) -> np.ndarray:
    """True = held out; whole groups go one way."""
    def u(g: str) -> float:
        return int.from_bytes(hashlib.sha256(f"heldout:{seed}:{g}".encode()).digest()[:8], "little") / 2 ** 64
    held = np.array([u(e.group or e.query.content_key()) < fraction for e in examples], bool)
    if fraction > 0 and (held.all() or not held.any()) and len(examples) > 1:
        held[:] = False
        held[:: max(2, int(round(1 / fraction)))] = True
    return held


class _Data:
    """Unique items' features as tensors, examples as index arrays."""

    def __init__(self, examples: Sequence[FitExample], featurizer: Featurizer, chunk: int = 512):
        index: dict[str, int] = {}
        items: list[Item] = []

        def idx(it: Item) -> int:
            k = it.content_key()
            if k not in index:
                index[k] = len(items)
                items.append(it)
            return index[k]

        q = [idx(e.query) for e in examples]
        p = [idx(e.positive) for e in examples]
        negs = [[idx(n) for n in e.negatives] for e in examples]
        feats = [featurizer.features(items[j:j + chunk]) for j in range(0, len(items), chunk)]
        featurizer.store.flush()
        self.img = np.concatenate([f.img for f in feats]) if feats else np.zeros((0, featurizer.dim("image")))
        self.txt = np.concatenate([f.txt for f in feats]) if feats else np.zeros((0, featurizer.dim("text")))
        self.has_img = np.concatenate([f.has_img for f in feats]) if feats else np.zeros(0, bool)
        self.has_txt = np.concatenate([f.has_txt for f in feats]) if feats else np.zeros(0, bool)
        bad = np.array([e is not None for f in feats for e in f.errors], bool)
        self.errors = [e for f in feats for e in f.errors]
        keep = np.array([not bad[q[i]] and not bad[p[i]] for i in range(len(examples))], bool)
        self.dropped = int((~keep).sum())
        k = max([len(n) for n in negs] + [1])
        self.q, self.p = np.array(q, np.int64), np.array(p, np.int64)
        self.n = np.full((len(examples), k), -1, np.int64)
        for i, ns in enumerate(negs):
            ns = [j for j in ns if not bad[j] and j != p[i]]   # a candidate equal to the positive is no negative
            self.n[i, :len(ns)] = ns
        tasks = sorted({e.task for e in examples})
        self.task = np.array([tasks.index(e.task) for e in examples], np.int64)
        self.keep = keep
        self.items = items
        self.t_img, self.t_txt = torch.from_numpy(self.img.astype(np.float32)), torch.from_numpy(self.txt.astype(np.float32))
        self.t_hi, self.t_ht = torch.from_numpy(self.has_img), torch.from_numpy(self.has_txt)

    def embed(self, heads: ProjectionHeads, idx: torch.Tensor) -> torch.Tensor:
        return heads(self.t_img[idx], self.t_hi[idx], self.t_txt[idx], self.t_ht[idx])


def _cosines(heads: ProjectionHeads, data: _Data, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positive cosine [R], candidate cosines [R, K], candidate mask [R, K]) of example rows."""
    with torch.no_grad():
        used = np.unique(np.concatenate([data.q[rows], data.p[rows], data.n[rows].ravel()]))
        used = used[used >= 0]
        z = data.embed(heads, torch.from_numpy(used)).numpy()
        pos_of = {int(u): i for i, u in enumerate(used)}
        zq = z[[pos_of[int(i)] for i in data.q[rows]]]
        zp = z[[pos_of[int(i)] for i in data.p[rows]]]
        n = data.n[rows]
        mask = n >= 0
        zn = np.zeros(n.shape + (z.shape[1],), np.float32)
        zn[mask] = z[[pos_of[int(i)] for i in n[mask]]]
        return (zq * zp).sum(-1), np.einsum("rd,rkd->rk", zq, zn), mask


def _fit_ridge(heads: ProjectionHeads, data: _Data, rows: np.ndarray, alpha: float) -> None:
    pairs = set()
    for r in rows:
        for a, b in ((data.q[r], data.p[r]), (data.p[r], data.q[r])):
            if data.has_img[a] and not data.has_txt[a] and data.has_txt[b] and not data.has_img[b]:
                pairs.add((int(a), int(b)))
    if not pairs:
        raise ValueError("ridge fitting needs image<->text pairs (an image-only item paired with a text-only one)")
    ia, ib = np.array(sorted(pairs)).T
    x = (data.img[ia] - heads.img_mean.numpy()) / heads.img_scale.numpy()
    y = data.txt[ib]
    w = np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y)        # [Di, Dt]
    with torch.no_grad():
        heads.img_proj.weight.copy_(torch.from_numpy(w.T.astype(np.float32)))
        heads.txt_proj.weight.copy_(torch.eye(heads.text_dim))
        heads.txt_mean.zero_()
        heads.txt_scale.fill_(1.0)


def _fit_contrastive(heads: ProjectionHeads, data: _Data, train: np.ndarray, held: np.ndarray,
                     s: EncoderFitSettings) -> dict[str, Any]:
    g = torch.Generator().manual_seed(s.seed)
    for proj in (heads.img_proj, heads.txt_proj):
        if proj is not None:
            torch.nn.init.orthogonal_(proj.weight, generator=g)
    log_scale = torch.nn.Parameter(torch.tensor(float(np.log(1.0 / s.temperature))))
    opt = torch.optim.AdamW([p for p in heads.parameters() if p.requires_grad] + [log_scale], lr=s.lr,
                            weight_decay=s.weight_decay)
    rng = np.random.default_rng(s.seed)
    best = {"auc": -1.0, "step": 0, "state": {k: v.clone() for k, v in heads.state_dict().items()}}
    history, since_best = [], 0
    for step in range(1, s.steps + 1):
        heads.train()
        b = rng.choice(train, size=min(s.batch_queries, len(train)), replace=False)
        q, p, n, task = (torch.from_numpy(a) for a in (data.q[b], data.p[b], data.n[b], data.task[b]))
        used, inv = torch.unique(torch.cat([q, p, n.clamp(min=0).ravel()]), return_inverse=True)
        z = data.embed(heads, used)
        B = len(b)
        zq, zp = z[inv[:B]], z[inv[B:2 * B]]
        zn = z[inv[2 * B:]].view(B, n.shape[1], -1)
        eye = torch.eye(B, dtype=torch.bool)
        mask_ib = (task[:, None] != task[None, :]) | ((p[:, None] == p[None, :]) & ~eye)
        scale = log_scale.clamp(max=float(np.log(100.0))).exp()
        # scale first, then mask (masking first would make the scale's gradient -inf * 0 = NaN)
        ib = ((zq @ zp.T) * scale).masked_fill(mask_ib, float("-inf"))
        hn = (torch.einsum("bd,bkd->bk", zq, zn) * scale).masked_fill(n < 0, float("-inf"))
        target = torch.arange(B)
        loss = torch.nn.functional.cross_entropy(torch.cat([ib, hn], 1) if s.hard_negatives else ib, target)
        if s.symmetric:
            mask_t = (task[:, None] != task[None, :]) | ((q[:, None] == q[None, :]) & ~eye)
            ibt = ((zp @ zq.T) * scale).masked_fill(mask_t, float("-inf"))
            loss = 0.5 * (loss + torch.nn.functional.cross_entropy(ibt, target))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % s.eval_every == 0 or step == s.steps:
            heads.eval()
            rows = held if len(held) else train
            auc = paired_auc(*_cosines(heads, data, rows))
            history.append({"step": step, "loss": round(float(loss.detach()), 4), "heldout_auc": auc})
            if auc is not None and auc > best["auc"]:
                best = {"auc": auc, "step": step, "state": {k: v.clone() for k, v in heads.state_dict().items()}}
                since_best = 0
            else:
                since_best += 1
                if since_best >= s.patience:
                    break
    heads.load_state_dict(best["state"])
    return {"best_step": best["step"], "steps_run": step, "history": history,
            "temperature": float(1.0 / log_scale.detach().exp())}


def fit_encoder_judge(examples: Sequence[FitExample], settings: EncoderFitSettings | None = None, *,
                      image_root: str | os.PathLike | None = None, store: FeatureStore | None = None,
                      featurizer: Featurizer | None = None, name: str = "encoder-judge") -> EncoderJudge:
    """Fit heads + calibration on ``examples``; the returned judge can :meth:`~EncoderJudge.save` itself."""
    s = settings or EncoderFitSettings()
    if s.method not in ("contrastive", "ridge"):
        raise ValueError(f"method must be contrastive or ridge, not {s.method!r}")
    t0 = time.perf_counter()
    text_spec, image_spec = TowerSpec.of(s.text_tower, "hf-text"), TowerSpec.of(s.image_tower, "efficientnet-lite0")
    featurizer = featurizer or Featurizer(text_spec, image_spec, image_root, store or FeatureStore(), s.text_input)
    data = _Data(examples, featurizer)
    t_feat = time.perf_counter() - t0
    held_mask = _split(examples, s.heldout_fraction, s.seed)
    train = np.flatnonzero(data.keep & ~held_mask)
    held = np.flatnonzero(data.keep & held_mask)
    if len(train) == 0:
        raise ValueError("no usable training examples (every query or positive is a bad item)")
    dim = featurizer.dim("text") if s.method == "ridge" else s.dim
    heads = ProjectionHeads(featurizer.dim("image"), featurizer.dim("text"), dim)
    used = np.unique(np.concatenate([data.q[train], data.p[train], data.n[train].ravel()]))
    used = used[used >= 0]
    heads.set_stats(data.img[used][data.has_img[used]] if heads.image_dim else None,
                    data.txt[used][data.has_txt[used]] if heads.text_dim else None)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, s.threads)))
    try:
        if s.method == "ridge":
            _fit_ridge(heads, data, train, s.ridge_alpha)
            info: dict[str, Any] = {}
        else:
            info = _fit_contrastive(heads, data, train, held, s)
    finally:
        torch.set_num_threads(threads)
    heads.eval()
    # calibration on the held-out pairs (the fitting pairs when nothing is held out)
    rows = held if len(held) else train
    pos, neg, mask = _cosines(heads, data, rows)
    judge_cfg = {"name": name, "text_tower": text_spec.to_dict(), "image_tower": image_spec.to_dict(),
                 "text_input": s.text_input, "text_dim": featurizer.dim("text"),
                 "image_dim": featurizer.dim("image"), "dim": dim}
    probe = EncoderJudge(judge_cfg, heads, Calibration(), store=featurizer.store)
    probe.featurizer = featurizer
    pairings_pos = [probe.pairing(data.items[data.q[r]], data.items[data.p[r]]) for r in rows]
    pairings_neg = [probe.pairing(data.items[data.q[r]], data.items[j]) for r, row_mask in zip(rows, mask)
                    for j in data.n[r][row_mask]]
    cos = np.concatenate([pos, neg[mask]])
    labels = np.concatenate([np.ones(len(pos), bool), np.zeros(int(mask.sum()), bool)])
    calibration = Calibration.fit(cos, labels, pairings_pos + pairings_neg)
    fit = {"settings": asdict(s), "examples": len(examples), "train_examples": int(len(train)),
           "heldout_examples": int(len(held)), "dropped_examples": data.dropped, "items": len(data.items),
           "heldout_auc": paired_auc(pos, neg, mask), "feature_seconds": round(t_feat, 2),
           "seconds": round(time.perf_counter() - t0, 2),
           **{k: v for k, v in info.items() if k != "history"}, "history": info.get("history", [])[-5:]}
    judge = EncoderJudge({**judge_cfg, "fit": fit}, heads, calibration, image_root=image_root,
                         store=featurizer.store)
    judge.featurizer = featurizer
    logger.info("encoder judge fitted: %d examples (%d held out), held-out AUC %.3f, %.1f s", len(examples),
                len(held), fit["heldout_auc"] or float("nan"), fit["seconds"])
    return judge


def fit_folds(fold_tables: Mapping[int, str], out_dir: str | os.PathLike, settings: EncoderFitSettings, *,
              image_root: str | os.PathLike | None = None, feature_cache: str | os.PathLike | None = None
              ) -> dict[str, dict[str, Any]]:
    """One judge per fold table, saved under ``out_dir/fold{f}``; a fold whose folder is complete is skipped."""
    out_dir = Path(out_dir)
    store = FeatureStore(feature_cache)
    folds: dict[str, dict[str, Any]] = {}
    for f, table in sorted(fold_tables.items()):
        folder = out_dir / f"fold{f}"
        if not is_encoder_judge(folder):
            judge = fit_encoder_judge(examples_from_table(table), settings, image_root=image_root, store=store,
                                      name=f"encoder-judge-fold{f}")
            judge.save(folder)
        else:
            logger.info("encoder judge fold %d: already fitted (%s)", f, folder)
        import json

        fit = json.loads((folder / "encoder_judge.json").read_text()).get("fit", {})
        folds[str(f)] = {"model": str(folder), "heldout_auc": fit.get("heldout_auc"), "examples": fit.get("examples"),
                         "seconds": fit.get("seconds")}
    return folds


def warm_features(items: Sequence[Item], settings: EncoderFitSettings, *, image_root: str | os.PathLike | None,
                  feature_cache: str | os.PathLike, chunk: int = 512) -> dict[str, int]:
    """Encode (once) every distinct image and text of ``items`` into the persisted feature cache."""
    featurizer = Featurizer(TowerSpec.of(settings.text_tower, "hf-text"),
                            TowerSpec.of(settings.image_tower, "efficientnet-lite0"), image_root,
                            FeatureStore(feature_cache), settings.text_input)
    seen: dict[str, Item] = {}
    for it in items:
        seen.setdefault(it.content_key(), it)
    uniq = list(seen.values())
    bad = 0
    t0 = time.perf_counter()
    for j in range(0, len(uniq), chunk):
        bad += sum(e is not None for e in featurizer.features(uniq[j:j + chunk]).errors)
        featurizer.store.flush()
        logger.info("encoder judge: tower features of %d/%d distinct items (%.0f s)", min(j + chunk, len(uniq)),
                    len(uniq), time.perf_counter() - t0)
    return {"items": len(uniq), "bad": bad}
