"""The MLLM embedder: last non-pad token of the last hidden layer, L2-normalised (method reference 3.1).

Queries and candidates go through the same network; the only asymmetry is the instruction text, which
comes with the data (``Item.instruction``), never from code.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.images import load_image
from ..data.schema import Item
from .auto_processor import load_processor
from .backbone import load_backbone, uses_mrope
from .formatting import INPUT_FORMATS, format_item
from .processor import ImageOptions, VLProcessor

logger = logging.getLogger(__name__)


def language_core(model):
    """The backbone without the LM head (``Qwen2VLModel``), through a peft wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last real token; works for left and right padding."""
    seq_len = attention_mask.shape[1]
    last = seq_len - 1 - attention_mask.flip(dims=[1]).int().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def image_key(item: Item) -> str | None:
    """What identifies an item's image (its path, or a hash of its bytes); None for a text-only item."""
    if item.image:
        return "sha1:" + hashlib.sha1(item.image).hexdigest()
    return "path:" + item.image_path if item.image_path else None


POSITION_MODES = ("auto", "mrope", "sequential")


@functools.lru_cache(maxsize=1)
def vision_probe() -> Item:
    """The smallest image input: a blank 28x28 PNG (the processor scales it into its pixel range)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (28, 28)).save(buf, format="PNG")
    return Item(image=buf.getvalue())


def sequential_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D positions over the real tokens, copied to M-RoPE's 3 axes: shape [3, batch, seq].

    This is what the released UniME-V2 embedders saw: without ``<|vision_start|>`` the transformers 4
    ``get_rope_index`` found no image and numbered every token sequentially (method reference 3.1).
    """
    pos = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    pos = pos.masked_fill(attention_mask == 0, 1)
    return pos.unsqueeze(0).expand(3, -1, -1)


class Embedder:
    """Encode (text, image) items into float32, unit-norm vectors.

    ``positions``: ``mrope`` lets the backbone place image tokens on its 2-D grid (transformers 5
    default); ``sequential`` numbers all tokens 1-D as the released UniME-V2 models were trained;
    ``auto`` is ``sequential`` for the ``official`` format and ``mrope`` for ``chat``. Backbones with 1-D RoPE
    (LLaVA-OneVision) always get ``sequential`` positions (mask-based, so batches equal single items).

    >>> model = Embedder.from_pretrained(tiny_embedder)   # a folder, or a hub name: "Qwen/Qwen2-VL-2B-Instruct"
    >>> folder = model.save_pretrained(tmp / "copy")      # an ordinary Hugging Face folder
    >>> bool(np.allclose(Embedder.from_pretrained(folder).encode("hello"), model.encode("hello"), atol=1e-6))
    True
    """

    def __init__(self, model, processor: VLProcessor, input_format: str = "official",
                 image_root: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 positions: str = "auto"):
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"unknown input format {input_format!r}; choose one of {', '.join(INPUT_FORMATS)}")
        if positions not in POSITION_MODES:
            raise ValueError(f"unknown positions mode {positions!r}; choose one of {', '.join(POSITION_MODES)}")
        self.mrope = uses_mrope(model)
        if positions == "mrope" and not self.mrope:
            raise ValueError(f"positions mode 'mrope' needs a Qwen-VL backbone; {model.config.model_type} has 1-D "
                             "RoPE (use auto or sequential)")
        if positions == "auto":
            positions = "sequential" if input_format == "official" or not self.mrope else "mrope"
        self.positions = positions
        self.model = model
        self.processor = processor
        self.input_format = input_format
        self.image_root = image_root
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, input_format: str = "official",
                        adapter: str | os.PathLike | None = None, dtype: str = "auto",
                        device: str | None = None, image_options: ImageOptions | None = None,
                        image_root: str | os.PathLike | None = None, processor_backend: str = "auto",
                        positions: str = "auto") -> "Embedder":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_backbone(name_or_path, dtype=dtype, device=device, role="embedder")
        if adapter is not None:
            from .lora import load_adapter

            model = load_adapter(model, adapter)
        processor = load_processor(name_or_path, model.config.model_type, processor_backend,
                                                image_options)
        return cls(model.eval(), processor, input_format, image_root, device, positions)

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "text_config", cfg).hidden_size

    def cache_images(self, max_bytes: int) -> None:
        """Keep up to ``max_bytes`` of processed images in memory (a Qwen-VL processor; least recently used
        dropped first), so an image met again (a training table's next epoch) is neither decoded nor processed
        again. The inputs are the same tensors (a test checks it)."""
        from .processor import PixelCache

        self.pixel_cache = PixelCache(max_bytes) if max_bytes > 0 and hasattr(self.processor, "from_pixels") else None

    pixel_cache = None
    # data-parallel training: every forward runs the vision tower, even on a batch without images (see embed_items)
    vision_every_batch = False

    def prepare(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        texts = [format_item(it, self.input_format, self.processor.model_type) for it in items]
        if self.pixel_cache is None:
            return self.processor(texts, [load_image(it, self.image_root) for it in items])
        keys = [image_key(it) for it in items]
        by_key = {k: it for k, it in zip(keys, items) if k is not None}
        found = {k: self.pixel_cache.get(k) for k in by_key}
        missing = [k for k, v in found.items() if v is None]
        for k, v in zip(missing, self.processor.process_images([load_image(by_key[k], self.image_root)
                                                                for k in missing])):
            found[k] = v
            self.pixel_cache.put(k, v)
        return self.processor.from_pixels(texts, [found[k] if k is not None else None for k in keys])

    def embed_items(self, items: Sequence[Item]) -> torch.Tensor:
        """``embed_inputs(prepare(items))``. With :attr:`vision_every_batch`, a batch without an image also runs the
        vision tower, on one probe image appended as an extra row whose embedding is dropped and joined to the
        others with weight 0: every data-parallel rank then runs the same modules (ZeRO-3 gathers each one's
        partitioned weights collectively) and gives every parameter a gradient (ZeRO reduces them collectively),
        whatever the images in its micro-batch. Without it, a text-only rank beside an image rank hangs the step."""
        probe = self.vision_every_batch and not any(it.has_image for it in items)
        out = self.embed_inputs(self.prepare([*items, vision_probe()] if probe else items))
        return out[:len(items)] + 0.0 * out[len(items):].sum() if probe else out

    def embed_inputs(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Differentiable embeddings (float32, normalised) of prepared inputs: the training entry point."""
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        if self.positions == "sequential":
            pos = sequential_position_ids(inputs["attention_mask"])
            inputs["position_ids"] = pos if self.mrope else pos[0]
        out = language_core(self.model)(**inputs, use_cache=False, return_dict=True)
        pooled = last_token_pool(out.last_hidden_state, inputs["attention_mask"])
        return F.normalize(pooled if pooled.dtype == torch.float64 else pooled.float(), dim=-1)

    @torch.inference_mode()
    def encode(self, texts: Any = None, images: Any = None, instructions: Any = None, *, batch_size: int = 16,
               progress: bool = False, convert_to: str = "numpy") -> np.ndarray | torch.Tensor:
        """[N, dim] float32 unit vectors, in input order.

        ``texts``: strings (or dicts / :class:`~unime_ray.data.schema.Item` objects); ``images``: paths (under
        ``image_root``), encoded bytes, PIL images or None, one per input; ``instructions``: one string for all
        inputs or one per input (the task prompt, e.g. ``"Find an image that matches the given caption."``).
        Text-only, image-only and text+image inputs mix freely. ``convert_to``: ``numpy`` or ``torch``.

        >>> vectors = embedder.encode(["a red circle", "a blue square"], instructions="Represent the text:")
        >>> vectors.shape == (2, embedder.dim), bool(abs((vectors ** 2).sum(axis=1) - 1).max() < 1e-5)
        (True, True)
        """
        from ..data.inputs import to_items

        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if convert_to not in ("numpy", "torch"):
            raise ValueError(f"convert_to must be 'numpy' or 'torch', not {convert_to!r}")
        items = to_items(texts, images, instructions)
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        start = time.perf_counter()
        for i in range(0, len(items), batch_size):
            batch = items[i:i + batch_size]
            out[i:i + len(batch)] = self.embed_inputs(self.prepare(batch)).cpu().numpy()
            if progress:
                done = i + len(batch)
                logger.info("encoded %d/%d items (%.1f items/s)", done, len(items),
                            done / max(time.perf_counter() - start, 1e-9))
        return torch.from_numpy(out) if convert_to == "torch" else out

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity matrix [len(a), len(b)] of two batches of unit vectors (a dot product)."""
        return np.asarray(a, dtype=np.float32) @ np.asarray(b, dtype=np.float32).T

    def save_pretrained(self, path: str | os.PathLike, card: Mapping[str, Any] | None = None, *,
                        format: str = "hf", prompts: Mapping[str, str] | None = None) -> Path:
        """Save the model (adapter merged) with its tokenizer and image processor as an ordinary Hugging Face
        folder that :meth:`from_pretrained` (and ``transformers``) load; ``card``: what to write in its model
        card (``README.md``: base model, recipe, data, eval results; see :mod:`unime_ray.models.card`). The image
        processor is saved with the pixel range this embedder's processor uses (a trained model's: its training
        budget), so ``AutoProcessor.from_pretrained(path)`` sizes images as it was trained; a fixed ``resize``,
        which the Hugging Face Qwen-VL processor cannot express, is in the card only.

        ``format="sentence-transformers"`` adds what ``sentence_transformers.SentenceTransformer(path)`` needs to
        encode as :meth:`encode` does, with ``prompts`` (name -> instruction) for its ``prompt_name``; what it
        cannot carry is logged (see :mod:`unime_ray.models.st_export`)."""
        import copy

        from .lora import merged

        if format not in ("hf", "sentence-transformers"):
            raise ValueError(f"format must be 'hf' or 'sentence-transformers', not {format!r}")
        if format == "sentence-transformers" and self.processor.model_type not in ("qwen2_vl", "qwen2_5_vl"):
            raise ValueError(f"the sentence-transformers export covers Qwen2-VL and Qwen2.5-VL, not "
                             f"{self.processor.model_type}")
        path = Path(path)
        merged(self.model).save_pretrained(path)
        self.processor.tokenizer.save_pretrained(path)
        image_processor = self.processor.image_processor
        size = self.processor.image_options.size_kwargs(image_processor)
        if size:
            image_processor = copy.deepcopy(image_processor)
            image_processor.size = size["size"]
        image_processor.save_pretrained(path)
        if card is not None:
            from .card import write_model_card

            write_model_card(path, **card)
        if format == "sentence-transformers":
            from .st_export import unexpressed, write_sentence_transformers

            budget = self.processor.image_options
            for what in unexpressed(self.input_format, self.positions, budget):
                logger.warning("sentence-transformers export of %s: not carried: %s", path, what)
            write_sentence_transformers(path, dim=self.dim, input_format=self.input_format, budget=budget,
                                        image_processor=self.processor.image_processor, prompts=prompts)
        return path

    save = save_pretrained
