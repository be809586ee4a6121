"""The dual-encoder judge backend: a calibrated match probability from frozen pretrained towers.

A pretrained MLLM judge knows things the embedder being trained does not. Where no such judge is available
(the offline demo; any CPU box), this backend brings outside knowledge from two small frozen pretrained
encoders instead, a text tower and an image tower (:mod:`unime_ray.judge.encoder.towers`), and learns only
light projection heads on the training pairs.

**How items map into the shared space.** An item's *text part* is its ``text`` with the image marker removed
(``text_input: prompt`` also prepends the instruction; by default the instruction is left out: it names the
task, which is the same for a query's positive and candidates, and would only add a constant); its *image
part* is its image. Each part's frozen features are standardised (mean/scale from the fitting data), projected
by that modality's linear head into a ``dim``-d space and L2-normalised; an image+text item is the normalised
sum of its two parts, a text-only or image-only item is its one part. Queries and candidates share the heads,
so every query/candidate modality pairing (image->text, text->image, image+text->text, text->text, ...) is
scored in one space.

**Score.** ``p = sigmoid(a * cos(query, candidate) + b)``: a Platt calibration of the cosine, fitted on held-out
pairs of the fitting data (one per query->candidate modality pairing with enough held-out pairs, else a
global one), so the score is an estimate of the probability that the candidate is the query's match. The
calibration is increasing in the cosine (``a > 0`` is enforced), so it never reorders a query's candidates.

**Folder format** (``judge.model`` may be such a folder; ``judge.backend: encoder`` builds it):
``encoder_judge.json`` (format, towers, text input, dims, calibration, fit summary) and ``heads.safetensors``
(standardisation statistics and projection weights). Fitting: :mod:`unime_ray.judge.encoder.fit`.

Bad pairs (an unreadable image, an empty item, a modality the judge has no tower for) score NaN with a
reason, never 0.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ...data.images import ImageError, decode_image, read_image_bytes
from ...data.schema import IMAGE_MARKER, Item
from .towers import FeatureStore, TowerSpec, build_tower

FORMAT = "unime-encoder-judge"
FORMAT_VERSION = 1
CONFIG_NAME = "encoder_judge.json"
WEIGHTS_NAME = "heads.safetensors"


def is_encoder_judge(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


# --------------------------------------------------------------------------------------------- heads
class ProjectionHeads(torch.nn.Module):
    """Per-modality standardisation + linear projection into the shared space; an item = the normalised sum
    of its parts' normalised projections."""

    def __init__(self, image_dim: int, text_dim: int, dim: int):
        super().__init__()
        self.image_dim, self.text_dim, self.dim = image_dim, text_dim, dim
        self.register_buffer("img_mean", torch.zeros(image_dim))
        self.register_buffer("img_scale", torch.ones(image_dim))
        self.register_buffer("txt_mean", torch.zeros(text_dim))
        self.register_buffer("txt_scale", torch.ones(text_dim))
        self.img_proj = torch.nn.Linear(image_dim, dim, bias=False) if image_dim else None
        self.txt_proj = torch.nn.Linear(text_dim, dim, bias=False) if text_dim else None

    def set_stats(self, img: np.ndarray | None, txt: np.ndarray | None, shrink: float = 0.1) -> None:
        """Standardise with the fitting data's feature means and scales; each dimension's variance is shrunk
        towards the mean variance, so a (nearly) constant dimension is not blown up."""
        for feats, mean, scale in ((img, self.img_mean, self.img_scale), (txt, self.txt_mean, self.txt_scale)):
            if feats is not None and len(feats) > 1:
                var = feats.astype(np.float64).var(0)
                mean.copy_(torch.from_numpy(feats.mean(0).astype(np.float32)))
                scale.copy_(torch.from_numpy(np.sqrt(var + shrink * var.mean() + 1e-12).astype(np.float32)))

    def forward(self, img: torch.Tensor, has_img: torch.Tensor, txt: torch.Tensor,
                has_txt: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(len(has_img), self.dim, dtype=torch.float32, device=has_img.device)
        if self.img_proj is not None and bool(has_img.any()):
            zi = torch.nn.functional.normalize(self.img_proj((img - self.img_mean) / self.img_scale), dim=-1)
            z = z + zi * has_img.unsqueeze(-1).float()
        if self.txt_proj is not None and bool(has_txt.any()):
            zt = torch.nn.functional.normalize(self.txt_proj((txt - self.txt_mean) / self.txt_scale), dim=-1)
            z = z + zt * has_txt.unsqueeze(-1).float()
        return torch.nn.functional.normalize(z, dim=-1)


# --------------------------------------------------------------------------------------------- calibration
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def fit_platt(cos: np.ndarray, labels: np.ndarray, l2: float = 1e-3, iters: int = 100) -> tuple[float, float]:
    """Logistic regression of ``labels`` on ``cos`` (Newton steps, a little L2 on the slope); slope kept > 0."""
    x, y = np.asarray(cos, np.float64), np.asarray(labels, np.float64)
    # prior-corrected targets (Platt 1999) so a perfectly separated set still gives finite parameters
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    t = np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    a, b = 1.0, float(np.log((n_pos + 1) / (n_neg + 1)))
    for _ in range(iters):
        p = _sigmoid(a * x + b)
        g = np.array([((p - t) * x).sum() + l2 * a, (p - t).sum()])
        w = p * (1 - p)
        h = np.array([[(w * x * x).sum() + l2, (w * x).sum()], [(w * x).sum(), w.sum() + 1e-9]])
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-9:
            break
    if not a > 1e-3:   # a judge score must not decrease as the match gets better
        a = 1e-3
        b = float(np.log((t.mean()) / (1 - t.mean())) - a * x.mean())
    return float(a), float(b)


@dataclass
class Calibration:
    """``p = sigmoid(a * cos + b)``, per query->candidate modality pairing, with a global fallback."""

    global_ab: tuple[float, float] = (10.0, -5.0)
    by_pairing: dict[str, tuple[float, float]] = field(default_factory=dict)
    fitted_on: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(cls, cos: np.ndarray, labels: np.ndarray, pairings: Sequence[str], min_each: int = 20) -> "Calibration":
        cos, labels, pairings = np.asarray(cos), np.asarray(labels, bool), np.asarray(pairings)
        cal = cls(global_ab=fit_platt(cos, labels))
        counts = {}
        for key in sorted(set(pairings.tolist())):
            m = pairings == key
            n_pos, n_neg = int(labels[m].sum()), int((~labels[m]).sum())
            counts[key] = {"positives": n_pos, "candidates": n_neg}
            if n_pos >= min_each and n_neg >= min_each:
                cal.by_pairing[key] = fit_platt(cos[m], labels[m])
        cal.fitted_on = {"pairs": int(len(cos)), "by_pairing": counts}
        return cal

    def __call__(self, cos: np.ndarray, pairings: Sequence[str]) -> np.ndarray:
        cos = np.asarray(cos, np.float64)
        ab = np.array([self.by_pairing.get(k, self.global_ab) for k in pairings], np.float64).reshape(-1, 2)
        return _sigmoid(ab[:, 0] * cos + ab[:, 1])

    def to_dict(self) -> dict[str, Any]:
        return {"global": list(self.global_ab), "by_pairing": {k: list(v) for k, v in self.by_pairing.items()},
                "fitted_on": self.fitted_on}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        return cls(tuple(d["global"]), {k: tuple(v) for k, v in d.get("by_pairing", {}).items()},
                   d.get("fitted_on", {}))


# --------------------------------------------------------------------------------------------- featurizer
def item_text(item: Item, text_input: str = "text") -> str:
    """The item's text part: its text (``text_input: prompt``: instruction + text), image marker removed."""
    text = item.prompt_text() if text_input == "prompt" else (item.text or "")
    return " ".join(text.replace(IMAGE_MARKER, " ").split())


def modality(item: Item, text_input: str = "text") -> str:
    parts = (["image"] if item.has_image else []) + (["text"] if item_text(item, text_input) else [])
    return "+".join(parts) or "empty"


@dataclass
class Features:
    img: np.ndarray        # [n, image_dim] (zeros where no image)
    has_img: np.ndarray    # [n] bool
    txt: np.ndarray        # [n, text_dim]
    has_txt: np.ndarray    # [n] bool
    errors: list[str | None]


class Featurizer:
    """Frozen tower features of items: content-keyed, looked up in a :class:`FeatureStore` first, towers built
    only when something is missing, each distinct image/text encoded once."""

    def __init__(self, text: TowerSpec, image: TowerSpec, image_root: str | os.PathLike | None = None,
                 store: FeatureStore | None = None, text_input: str = "text", device: str = "cpu",
                 text_dim: int | None = None, image_dim: int | None = None):
        if text_input not in ("text", "prompt"):
            raise ValueError(f"text_input must be text or prompt, not {text_input!r}")
        self.text_spec, self.image_spec = text, image
        self.text_id, self.image_id = f"text-{text.identity()}", f"image-{image.identity()}"
        self.image_root, self.text_input, self.device = image_root, text_input, device
        self.store = store if store is not None else FeatureStore()
        self._towers: dict[str, Any] = {}
        self._dims = {"text": text_dim, "image": image_dim}
        self._path_keys: dict[str, str] = {}
        if text.kind == "none":
            self._dims["text"] = 0
        if image.kind == "none":
            self._dims["image"] = 0

    def tower(self, which: str):
        if which not in self._towers:
            spec = self.text_spec if which == "text" else self.image_spec
            self._towers[which] = build_tower(spec, which, self.device)
            self._dims[which] = self._towers[which].dim if self._towers[which] is not None else 0
        return self._towers[which]

    def dim(self, which: str) -> int:
        if self._dims[which] is None:
            self._dims[which] = self.store.width(self.text_id if which == "text" else self.image_id)
        if self._dims[which] is None:
            self.tower(which)
        return int(self._dims[which])

    @staticmethod
    def text_key(text: str) -> str:
        """The cache key of a text part (see :func:`item_text`)."""
        return "t:" + hashlib.sha1(text.encode("utf-8")).hexdigest()

    def image_key(self, item: Item) -> str:
        """The cache key of an item's image: a hash of its encoded bytes (inline or read from its path)."""
        return self._image_key(item)

    def _image_key(self, item: Item) -> str:
        if item.image:
            return "b:" + hashlib.sha1(item.image).hexdigest()
        path = item.image_path or ""
        if path not in self._path_keys:   # content hash: the same picture under two names is encoded once
            self._path_keys[path] = "b:" + hashlib.sha1(read_image_bytes(path, self.image_root)).hexdigest()
        return self._path_keys[path]

    def _image(self, item: Item):
        data = item.image if item.image else read_image_bytes(item.image_path, self.image_root)
        return decode_image(data)

    def features(self, items: Sequence[Item]) -> Features:
        n = len(items)
        errors: list[str | None] = [None] * n
        texts: dict[int, str] = {}
        image_keys: dict[int, str] = {}
        for i, it in enumerate(items):
            t = item_text(it, self.text_input)
            try:
                if it.has_image:
                    if self.image_spec.kind == "none":
                        raise ValueError("the judge has no image tower, and the item has an image")
                    image_keys[i] = self._image_key(it)
                if t:
                    if self.text_spec.kind == "none":
                        raise ValueError("the judge has no text tower, and the item has text")
                    texts[i] = t
                if not t and not it.has_image:
                    raise ValueError("empty item: no text and no image")
            except (ImageError, OSError, ValueError) as exc:
                errors[i] = f"{type(exc).__name__}: {exc}"
                texts.pop(i, None)
                image_keys.pop(i, None)
        # texts
        t_keys = {i: self.text_key(t) for i, t in texts.items()}
        t_vecs = self.store.get(self.text_id, set(t_keys.values()))
        missing = {}
        for i, k in t_keys.items():
            if k not in t_vecs:
                missing.setdefault(k, texts[i])
        if missing:
            keys = list(missing)
            vecs = self.tower("text").encode([missing[k] for k in keys])
            self.store.put(self.text_id, keys, vecs)
            t_vecs.update(zip(keys, vecs))
        # images
        i_vecs = self.store.get(self.image_id, set(image_keys.values()))
        for which, vecs in (("text", t_vecs), ("image", i_vecs)):   # cached features tell the width
            if self._dims[which] is None and vecs:
                self._dims[which] = len(next(iter(vecs.values())))
        todo: dict[str, int] = {}
        for i, k in image_keys.items():
            if k not in i_vecs and k not in todo:
                todo[k] = i
        if todo:
            pics, keys = [], []
            for k, i in todo.items():
                try:
                    pics.append(self._image(items[i]))
                    keys.append(k)
                except (ImageError, OSError) as exc:
                    bad = f"{type(exc).__name__}: {exc}"
                    for j, kj in list(image_keys.items()):
                        if kj == k:
                            errors[j] = bad
                            image_keys.pop(j)
                            texts.pop(j, None)
            if pics:
                vecs = self.tower("image").encode(pics)
                self.store.put(self.image_id, keys, vecs)
                i_vecs.update(zip(keys, vecs))
        img = np.zeros((n, self.dim("image")), np.float32)
        txt = np.zeros((n, self.dim("text")), np.float32)
        has_img, has_txt = np.zeros(n, bool), np.zeros(n, bool)
        for i, k in image_keys.items():
            if errors[i] is None:
                img[i], has_img[i] = i_vecs[k], True
        for i, k in t_keys.items():
            if errors[i] is None:
                txt[i], has_txt[i] = t_vecs[k], True
        return Features(img, has_img, txt, has_txt, errors)


# --------------------------------------------------------------------------------------------- the judge
class EncoderJudge:
    """Scores (query, candidate) pairs: calibrated cosine of the items in the fitted shared space."""

    name = "encoder"

    def __init__(self, config: dict[str, Any], heads: ProjectionHeads, calibration: Calibration,
                 image_root: str | os.PathLike | None = None, feature_cache: str | os.PathLike | None = None,
                 store: FeatureStore | None = None, device: str = "cpu", batch_size: int = 256):
        self.config = config
        self.heads = heads.eval()
        self.calibration = calibration
        self.batch_size = batch_size
        self.featurizer = Featurizer(TowerSpec.of(config["text_tower"], "hf-text"),
                                     TowerSpec.of(config["image_tower"], "efficientnet-lite0"), image_root,
                                     store if store is not None else FeatureStore(feature_cache),
                                     config.get("text_input", "text"), device,
                                     text_dim=config["text_dim"], image_dim=config["image_dim"])
        self.model_name = config.get("name", "encoder-judge")
        self._vectors: dict[str, tuple[np.ndarray | None, str | None]] = {}
        self.max_cached_vectors = 200_000

    # ---------------------------------------------------------------- folder
    def save(self, folder: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {**self.config, "format": FORMAT, "format_version": FORMAT_VERSION,
               "calibration": self.calibration.to_dict()}
        tmp = folder / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
        save_file({k: v.detach().contiguous() for k, v in self.heads.state_dict().items()}, str(tmp))
        os.replace(tmp, folder / WEIGHTS_NAME)
        (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=1, default=str))   # last: marks a complete folder
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, **kwargs) -> "EncoderJudge":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not is_encoder_judge(folder):
            raise FileNotFoundError(f"{folder} is not a fitted encoder judge (no {CONFIG_NAME}); fit one with "
                                    "unime_ray.judge.encoder.fit.fit_encoder_judge or judge_fit.kind: dual_encoder")
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{folder / CONFIG_NAME} is not a {FORMAT} config")
        heads = ProjectionHeads(cfg["image_dim"], cfg["text_dim"], cfg["dim"])
        heads.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        return cls(cfg, heads, Calibration.from_dict(cfg["calibration"]), **kwargs)

    # ---------------------------------------------------------------- scoring
    @torch.inference_mode()
    def embed_features(self, f: Features) -> np.ndarray:
        z = self.heads(torch.from_numpy(f.img), torch.from_numpy(f.has_img), torch.from_numpy(f.txt),
                       torch.from_numpy(f.has_txt))
        return z.numpy()

    def embed(self, items: Sequence[Item]) -> tuple[np.ndarray, list[str | None]]:
        f = self.featurizer.features(items)
        return self.embed_features(f), f.errors

    @property
    def dim(self) -> int:
        return int(self.heads.dim)

    def encode(self, items: Sequence[Item], batch_size: int | None = None) -> np.ndarray:
        """[len(items), dim] unit vectors in the judge's shared space: the embedder interface, so the judge can
        be evaluated as a retriever beside the embedders it teaches. An unreadable item raises."""
        items = list(items)
        vectors, errors = self._embed_cached(items)
        bad = [(i, e) for i, e in enumerate(errors) if e]
        if bad:
            raise ValueError(f"item {bad[0][0]}: {bad[0][1]}")
        self.featurizer.store.flush()
        if not vectors:
            return np.zeros((0, self.dim), dtype=np.float32)
        z = np.stack(vectors).astype(np.float32)
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

    def _embed_cached(self, items: Sequence[Item]) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Shared-space vectors of items, each distinct item embedded once (a query recurs for each of its
        candidates, a candidate across queries); recent vectors are kept (bounded) across calls."""
        keys = [it.content_key() for it in items]
        todo: dict[str, Item] = {}
        for k, it in zip(keys, items):
            if k not in self._vectors and k not in todo:
                todo[k] = it
        if todo:
            if len(self._vectors) + len(todo) > self.max_cached_vectors:
                self._vectors.clear()
            z, errs = self.embed(list(todo.values()))
            for r, k in enumerate(todo):
                self._vectors[k] = (None, errs[r]) if errs[r] else (z[r], None)
        got = [self._vectors[k] for k in keys]
        return [v for v, _ in got], [e for _, e in got]

    def cosine_or_errors(self, pairs: Sequence[tuple[Item, Item]]) -> tuple[np.ndarray, list[str | None]]:
        cos = np.full(len(pairs), np.nan)
        errors: list[str | None] = [None] * len(pairs)
        for j in range(0, len(pairs), self.batch_size):
            chunk = pairs[j:j + self.batch_size]
            zq, eq = self._embed_cached([q for q, _ in chunk])
            zc, ec = self._embed_cached([c for _, c in chunk])
            for r in range(len(chunk)):
                if eq[r] or ec[r]:
                    errors[j + r] = f"query: {eq[r]}" if eq[r] else f"candidate: {ec[r]}"
                else:
                    cos[j + r] = float(np.dot(zq[r], zc[r]))
        self.featurizer.store.flush()
        return cos, errors

    def pairing(self, query: Item, candidate: Item) -> str:
        ti = self.featurizer.text_input
        return f"{modality(query, ti)}->{modality(candidate, ti)}"

    def score_or_errors(self, pairs: Sequence[tuple[Item, Item]]) -> tuple[np.ndarray, list[str | None]]:
        """(probabilities with NaN for bad pairs, error message or None per pair)."""
        pairs = list(pairs)
        cos, errors = self.cosine_or_errors(pairs)
        ok = ~np.isnan(cos)
        scores = np.full(len(pairs), np.nan)
        if ok.any():
            keys = [self.pairing(q, c) for (q, c), good in zip(pairs, ok) if good]
            scores[ok] = self.calibration(cos[ok], keys)
        return scores, errors

    def score(self, pairs: Sequence[tuple[Item, Item]]) -> np.ndarray:
        scores, errors = self.score_or_errors(pairs)
        bad = [e for e in errors if e]
        if bad:
            raise ValueError(bad[0])
        return scores
