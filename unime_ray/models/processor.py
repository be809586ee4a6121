"""Turn formatted texts and images into Qwen2-VL / Qwen2.5-VL model inputs.

Two interchangeable backends produce identical tensors (a test checks it):

* ``hf``: the Hugging Face processor. ``AutoProcessor`` cannot be built without torchvision (its video
  processor is a torchvision-only class), so when the normal construction fails we build the same
  processor class for images only, which runs Hugging Face's own expansion code.
* ``manual``: our own expansion of each ``<|image_pad|>`` into ``t*h*w / merge**2`` copies, using only
  the tokenizer and the (PIL) image processor: the path that works on any install.

Images can be resized first (``ImageBudget.resize``, e.g. 672x672 as in UniME-V2 training) and bounded
by a pixel budget (``min_pixels``/``max_pixels``, e.g. 256*28*28 .. 1280*28*28); see :mod:`.budget`.
Every call records the visual tokens of each image it processed (``t*h*w / merge**2`` from the image grid)
in ``VLProcessor.visual_tokens``, a histogram the stages drain into their outputs.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, OrderedDict
from typing import Sequence

import torch
from PIL import Image

from .budget import ImageBudget

logger = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


# The image budget type (defined once, in .budget); ``ImageOptions`` is its historical name here.
ImageOptions = ImageBudget


def _hf_processor(tokenizer, image_processor, model_type: str):
    """The Hugging Face processor object, built for images only when the full one cannot be built."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    cls = Qwen2_5_VLProcessor if model_type == "qwen2_5_vl" else Qwen2VLProcessor
    try:
        return cls(image_processor=image_processor, tokenizer=tokenizer)
    except Exception as exc:  # torchvision-only video processor: build the image-only processor
        logger.debug("full %s unavailable (%s); using it for images only", cls.__name__, exc)
    return image_only_processor(cls, tokenizer, image_processor, IMAGE_PAD, VIDEO_PAD)


def image_only_processor(cls, tokenizer, image_processor, image_token: str, video_token: str, **attributes):
    """An instance of Hugging Face processor ``cls`` without its video processor (a torchvision-only class):
    Hugging Face's own text/image code runs on it; ``attributes`` are the class's other settings."""
    proc = cls.__new__(cls)
    proc.tokenizer, proc.image_processor = tokenizer, image_processor
    proc.chat_template = getattr(tokenizer, "chat_template", None)
    proc.image_token, proc.video_token = image_token, video_token
    proc.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    proc.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
    for name, value in attributes.items():
        setattr(proc, name, value)
    return proc


def check_image_slots(texts: Sequence[str], images: Sequence[Image.Image | None], placeholder: str) -> None:
    """Each text holds one image placeholder exactly when its image slot is filled (one image per item)."""
    if len(texts) != len(images):
        raise ValueError(f"{len(texts)} texts but {len(images)} image slots")
    for i, (t, im) in enumerate(zip(texts, images)):
        n = t.count(placeholder)
        if n != (im is not None):
            raise ValueError(f"batch item {i}: {n} image placeholders for {int(im is not None)} images")


def choose_hf_processor(backend: str, build):
    """Hugging Face's processor from ``build()`` for ``hf`` (errors raised) and ``auto`` (None when it cannot be
    built here: the manual path is used); None for ``manual``."""
    if backend not in ("auto", "hf", "manual"):
        raise ValueError(f"processor backend must be auto, hf or manual, got {backend!r}")
    if backend == "manual":
        return None
    try:
        return build()
    except Exception as exc:
        if backend == "hf":
            raise
        logger.info("Hugging Face processor unavailable (%s); using the manual processor", exc)
        return None


class VLProcessor:
    """(formatted text, optional image) batches -> model inputs, left-padded."""

    multi_image_base_views = False   # an image is encoded the same alone or beside another (LLaVA-OV: not)

    def __init__(self, tokenizer, image_processor, model_type: str = "qwen2_vl", backend: str = "auto",
                 image_options: ImageOptions | None = None):
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # so position -1 is each row's last real token
        self.image_processor = image_processor
        self.model_type = model_type
        self.image_options = image_options or ImageOptions()
        self.visual_tokens: Counter = Counter()   # {tokens per image: images processed}, see models.budget
        self.image_pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.pad_id = tokenizer.pad_token_id
        self._hf = choose_hf_processor(backend, lambda: _hf_processor(tokenizer, image_processor, model_type))
        self.backend = "hf" if self._hf is not None else "manual"

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, model_type: str | None = None, backend: str = "auto",
                        image_options: ImageOptions | None = None) -> "VLProcessor":
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

        if model_type is None:
            from .backbone import load_config

            model_type = load_config(path).model_type
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        # The PIL image processor is the torchvision-free twin of Qwen2VLImageProcessor (same outputs).
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
        return cls(tokenizer, image_processor, model_type, backend, image_options)

    def _images(self, images: Sequence[Image.Image | None]) -> list[Image.Image]:
        return [self.image_options.prepare(im) for im in images if im is not None]

    def adapt_chat(self, text: str) -> str:
        """A chat prompt of :func:`~unime_ray.models.formatting.chat_prompt` in this backbone's own image
        placeholders (Qwen-VL's are the canonical ones)."""
        return text

    def per_image(self, enc: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(pixels, grid) of each image of a processor output, in order: what the judge and the reranker keep
        per image (see :func:`~unime_ray.models.inputs.forward_kwargs`)."""
        grids = enc.get("image_grid_thw")
        if grids is None:
            return []
        out, start = [], 0
        for g in grids:
            n = int(g.prod())
            out.append((enc["pixel_values"][start:start + n], g))
            start += n
        return out

    def __call__(self, texts: Sequence[str], images: Sequence[Image.Image | None], backend: str | None = None,
                 multi_image: bool = False) -> dict[str, torch.Tensor]:
        """``texts[i]`` holds one ``<|image_pad|>`` exactly when ``images[i]`` is not None. ``multi_image``
        (the images are one multi-image prompt's) changes nothing for Qwen-VL."""
        check_image_slots(texts, images, IMAGE_PAD)
        backend = backend or self.backend
        pil = self._images(images)
        if backend == "hf":
            if self._hf is None:
                raise RuntimeError("the Hugging Face processor is not available here")
            out = dict(self._hf(images=pil or None, text=list(texts), return_tensors="pt", padding=True,
                                padding_side="left", return_mm_token_type_ids=True,
                                **self.image_options.size_kwargs(self.image_processor)))
        else:
            out = self._manual(list(texts), pil)
        grid = out.get("image_grid_thw")
        if grid is not None and len(grid):
            merge = self.image_processor.merge_size ** 2
            self.visual_tokens.update((grid.prod(dim=1) // merge).tolist())
        return out

    def process_images(self, images: Sequence[Image.Image]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(pixel rows, grid) of each image, processed alone: what :meth:`from_pixels` takes. Qwen-VL processes
        every image independently, so a batch's pixel values are these concatenated."""
        pil = self._images(images)
        if not pil:
            return []
        return self.per_image(dict(self.image_processor(images=pil, return_tensors="pt",
                                                        **self.image_options.size_kwargs(self.image_processor))))

    def from_pixels(self, texts: Sequence[str], pixels: Sequence[tuple[torch.Tensor, torch.Tensor] | None]
                    ) -> dict[str, torch.Tensor]:
        """Model inputs from texts and images already processed by :meth:`process_images` (``pixels[i]`` for
        ``texts[i]``, None for a text-only item): the tensors ``__call__`` gives for the images themselves."""
        check_image_slots(texts, pixels, IMAGE_PAD)
        present = [p for p in pixels if p is not None]
        out = self._assemble(list(texts), present)
        merge = self.image_processor.merge_size ** 2
        self.visual_tokens.update(int(g.prod()) // merge for _, g in present)
        return out

    def _manual(self, texts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        return self._assemble(texts, self.process_images(images))

    def _assemble(self, texts: list[str], per_image: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Expand each text's ``<|image_pad|>`` to its image's tokens (``t*h*w / merge**2``), tokenize, and add
        the images' pixel rows and grids in order."""
        merge = self.image_processor.merge_size ** 2
        counts = iter(int(g.prod()) // merge for _, g in per_image)
        expanded = [t.replace(IMAGE_PAD, IMAGE_PAD * next(counts)) if IMAGE_PAD in t else t for t in texts]
        enc = self.tokenizer(expanded, return_tensors="pt", padding=True, padding_side="left")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
               # transformers 5 needs the token types (0 text, 1 image) to place M-RoPE positions.
               "mm_token_type_ids": (enc["input_ids"] == self.image_pad_id).long()}
        if per_image:
            out["pixel_values"] = torch.cat([p for p, _ in per_image])
            out["image_grid_thw"] = torch.stack([g for _, g in per_image])
        return out


class PixelCache:
    """Processed images by key, the least recently used dropped first beyond ``max_bytes``: training on a small
    table reads every image again each epoch, and decoding and processing them is a quarter of a tiny model's
    step on a CPU."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: str, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        size = value[0].numel() * value[0].element_size()
        if key in self.entries or size > self.max_bytes:
            return
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (old, _) = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
