"""LLaVA-OneVision (``llava_onevision``) as a backbone: input format, processor, tiny checkpoint.

LLaVA-OV is the paper's strongest embedder backbone (Table 1; method reference 3.1 and 3.3: 336x336 images in
training, lr 2e-5). It differs from Qwen-VL in three ways that matter here:

* **Input format.** UniME-V2 (``Llava_OV_process``) strips the image marker, puts the image first and applies the
  LLaVA-OV chat template with the generation prompt:
  ``<|im_start|>user <image>\\n{text}<|im_end|><|im_start|>assistant\\n``. The embedding is the hidden state of
  the final ``\\n``. Both input formats (``official`` and ``chat``) give this text: the released model was
  trained on the chat template.
* **Images.** "anyres": a base 384x384 view plus tiles of the best-fitting grid pinpoint, unpadded and, above
  9 tiles' worth of features, downscaled ("anyres_max_9"); one ``<image>`` becomes
  ``base + rows*cols + rows`` (image-newline) feature tokens. :func:`image_feature_count` computes that count
  independently of Hugging Face's processor; a test checks both agree, and the model itself checks the count
  against its features.
* **Positions.** Qwen2's plain 1-D RoPE, no M-RoPE: the embedder passes mask-based 1-D positions.

``AutoProcessor`` / ``LlavaOnevisionProcessor`` cannot be constructed without torchvision (its video
processor), so :class:`LlavaOVProcessor` builds it for images only (``hf`` backend) and has its own
``manual`` path (PIL image processor + tokenizer + ``<image>`` expansion), like ``VLProcessor`` for Qwen.

As the judge's and the reranker's backbone (transformers backend), prompts are the same ChatML prompts as for
Qwen with ``<image>`` in place of Qwen's vision slot (:meth:`LlavaOVProcessor.adapt_chat`); an image alone in
its prompt gets anyres tiles, the images of a multi-image prompt (an image-image pair, a listwise prompt) their
base view and a newline, as LLaVA-OV's processor and model treat multi-image inputs; positions are 1-D and the
image features are placed by :mod:`unime_ray.models.inputs`. The vLLM judge backend stays Qwen-VL only.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import Counter
from typing import Sequence

import torch
from PIL import Image

from ..data.schema import IMAGE_MARKER, Item
from .processor import ImageOptions, check_image_slots, choose_hf_processor, image_only_processor

logger = logging.getLogger(__name__)

MODEL_TYPE = "llava_onevision"
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"

# The LLaVA-OV chat template (llava-hf checkpoints), reduced to text and image parts: images first, then each
# text part after a newline; no system turn, no newline after <|im_end|>.
LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ '\n' + part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def format_llava_ov(item: Item) -> str:
    """The text UniME-V2 feeds LLaVA-OV for ``item`` (method reference 3.1, ``Llava_OV_process``)."""
    text = item.prompt_text().replace(IMAGE_MARKER, "").strip()
    image = IMAGE_TOKEN if item.has_image else ""
    return f"<|im_start|>user {image}\n{text}<|im_end|><|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------- token counts
def best_grid_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps most of the image's pixels, then wastes the fewest."""
    best, best_key = None, None
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        key = (kept, -(ph * pw - kept))
        if best_key is None or key > best_key:
            best, best_key = (int(ph), int(pw)), key
    if best is None:
        raise ValueError("no image grid pinpoints")
    return best


def image_feature_count(height: int, width: int, *, tile: int, patch: int, pinpoints: Sequence[Sequence[int]],
                        aspect_ratio: str = "anyres_max_9", select_strategy: str = "full") -> int:
    """Feature tokens of one image of ``height`` x ``width`` pixels (one image per sequence, as the embedder)."""
    side = tile // patch                                   # features per tile side (27 for 384 / 14)
    grid_h, grid_w = best_grid_resolution(height, width, pinpoints)
    rows, cols = side * (grid_h // tile), side * (grid_w // tile)
    # the tiles hold the image letterboxed: drop the padded feature rows / columns
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - kept) // 2)
    else:
        kept = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - kept) // 2)
    max_tiles = int(aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(rows * cols / (max_tiles * side * side))
    if ratio > 1.1:                                        # too many features: bilinear downscale
        rows, cols = int(rows // ratio), int(cols // ratio)
    count = side * side + rows * cols + rows               # base view + tiles + one newline per row
    return count - 1 if select_strategy == "default" else count


# ---------------------------------------------------------------------------------------------- processor
def _hf_processor(tokenizer, image_processor, num_image_tokens: int, select_strategy: str, aspect_ratio: str):
    """Hugging Face's LlavaOnevisionProcessor, built for images only when the full one cannot be built."""
    from transformers import LlavaOnevisionProcessor as cls

    kwargs = dict(num_image_tokens=num_image_tokens, vision_feature_select_strategy=select_strategy,
                  vision_aspect_ratio=aspect_ratio)
    try:
        return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
    except Exception as exc:  # torchvision-only video processor: build the image-only processor
        logger.debug("full LlavaOnevisionProcessor unavailable (%s); using it for images only", exc)
    return image_only_processor(cls, tokenizer, image_processor, IMAGE_TOKEN, VIDEO_TOKEN, **kwargs)


def _size_field(size, key: str):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class LlavaOVProcessor:
    """(formatted text, optional image) batches -> LLaVA-OV model inputs, left-padded.

    The same interface as :class:`~unime_ray.models.processor.VLProcessor` (``tokenizer``, ``image_processor``,
    ``image_pad_id``, ``pad_id``, ``backend``, ``visual_tokens``, ``__call__(texts, images)``); the placeholder
    is ``<image>``. Image budgets: only ``resize`` applies (e.g. 336x336 as in UniME-V2's LLaVA-OV training);
    pixel ranges are a Qwen-VL processor setting and are refused.
    """

    model_type = MODEL_TYPE
    image_token = IMAGE_TOKEN
    multi_image_base_views = True    # images of a multi-image prompt are encoded differently (base views)

    def __init__(self, tokenizer, image_processor, *, tile: int, patch: int, pinpoints: Sequence[Sequence[int]],
                 select_strategy: str = "full", aspect_ratio: str = "anyres_max_9", backend: str = "auto",
                 image_options: ImageOptions | None = None):
        image_options = image_options or ImageOptions()
        if image_options.min_pixels is not None or image_options.max_pixels is not None:
            raise ValueError("min_pixels / max_pixels are Qwen-VL processor settings; LLaVA-OneVision takes only a "
                             "fixed resize (e.g. 336x336, the UniME-V2 training size) and tiles the image itself")
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.image_processor = image_processor
        self.image_options = image_options
        self.tile, self.patch = int(tile), int(patch)
        self.pinpoints = [list(map(int, p)) for p in pinpoints]
        self.select_strategy, self.aspect_ratio = select_strategy, aspect_ratio
        self.image_pad_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_pad_id is None or self.image_pad_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token: not a LLaVA-OneVision tokenizer")
        self.pad_id = tokenizer.pad_token_id
        self.visual_tokens: Counter = Counter()   # {tokens per image: images processed}, see models.budget
        self._hf = choose_hf_processor(backend, lambda: _hf_processor(
            tokenizer, image_processor, (self.tile // self.patch) ** 2, select_strategy, aspect_ratio))
        self.backend = "hf" if self._hf is not None else "manual"

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, backend: str = "auto",
                        image_options: ImageOptions | None = None, config=None) -> "LlavaOVProcessor":
        from transformers import AutoTokenizer
        from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

        from .backbone import load_config

        config = config or load_config(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        # The PIL image processor is the torchvision-free twin of LlavaOnevisionImageProcessor (same outputs).
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(str(path))
        vision = config.vision_config
        size = image_processor.size   # a dict or a SizeDict: {"height", "width"} or {"shortest_edge"}
        tile = next((v for v in (_size_field(size, "height"), _size_field(size, "shortest_edge")) if v), None)
        if tile != vision.image_size:
            raise ValueError(f"{path}: image processor tiles of {tile}px but the vision tower takes "
                             f"{vision.image_size}px")
        pinpoints = config.image_grid_pinpoints
        if [list(p) for p in image_processor.image_grid_pinpoints] != [list(p) for p in pinpoints]:
            raise ValueError(f"{path}: image processor and model config disagree on image_grid_pinpoints")
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if token_id != config.image_token_id:
            raise ValueError(f"{path}: the tokenizer's {IMAGE_TOKEN} is id {token_id} but the model expects "
                             f"{config.image_token_id}")
        return cls(tokenizer, image_processor, tile=tile, patch=vision.patch_size, pinpoints=pinpoints,
                   select_strategy=config.vision_feature_select_strategy, aspect_ratio=config.vision_aspect_ratio,
                   backend=backend, image_options=image_options)

    def feature_count(self, image: Image.Image) -> int:
        """``<image>`` tokens for ``image`` (after the image options)."""
        width, height = image.size
        return image_feature_count(height, width, tile=self.tile, patch=self.patch, pinpoints=self.pinpoints,
                                   aspect_ratio=self.aspect_ratio, select_strategy=self.select_strategy)

    def base_feature_count(self) -> int:
        """``<image>`` tokens of an image in a multi-image prompt: its base view and one newline."""
        return (self.tile // self.patch) ** 2 + 1 - (self.select_strategy == "default")

    def adapt_chat(self, text: str) -> str:
        """A Qwen-style chat prompt (:func:`~unime_ray.models.formatting.chat_prompt`) with LLaVA-OV's image
        placeholder; the rest of the format (ChatML turns) is the one LLaVA-OV's Qwen2 language model uses."""
        from .processor import IMAGE_PAD, VISION_END, VISION_START

        return text.replace(f"{VISION_START}{IMAGE_PAD}{VISION_END}", IMAGE_TOKEN)

    def per_image(self, enc: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tiles [n, 3, H, W], image size [2]) per image of a processor output; one tile = a base view."""
        sizes = enc.get("image_sizes")
        if sizes is None:
            return []
        return [(enc["pixel_values"][i][:self._tiles(enc, i)], sizes[i]) for i in range(len(sizes))]

    def _tiles(self, enc, i: int) -> int:
        if enc["pixel_values"].shape[1] == 1:   # base views (multi-image prompt)
            return 1
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        return image_size_to_num_patches(enc["image_sizes"][i], self.pinpoints, self.tile)

    def __call__(self, texts: Sequence[str], images: Sequence[Image.Image | None], backend: str | None = None,
                 multi_image: bool = False) -> dict[str, torch.Tensor]:
        """``texts[i]`` holds one ``<image>`` exactly when ``images[i]`` is not None. With ``multi_image`` the
        images belong to one multi-image prompt (the judge's query and candidate, a listwise prompt): each is
        its base view and a newline (LLaVA-OV's multi-image convention), not anyres tiles."""
        check_image_slots(texts, images, IMAGE_TOKEN)
        backend = backend or self.backend
        pil = [self.image_options.prepare(im) for im in images if im is not None]
        if multi_image:
            return self._base_views(list(texts), pil)
        counts = [self.feature_count(im) for im in pil]
        if backend == "hf":
            if self._hf is None:
                raise RuntimeError("the Hugging Face processor is not available here")
            out = dict(self._hf(images=pil or None, text=list(texts), return_tensors="pt", padding=True,
                                padding_side="left"))
        else:
            out = self._manual(list(texts), pil, counts)
        self.visual_tokens.update(counts)
        return out

    def _base_views(self, texts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Images of a multi-image prompt: each padded to a square and resized to one tile (the image
        processor's own multi-image path, asked for through a nested batch of at least two images)."""
        count = self.base_feature_count()
        expanded = [t.replace(IMAGE_TOKEN, IMAGE_TOKEN * count) for t in texts]
        enc = self.tokenizer(expanded, return_tensors="pt", padding=True, padding_side="left")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if images:
            vision = self.image_processor(images=[images if len(images) > 1 else images * 2], return_tensors="pt")
            out["pixel_values"] = vision["pixel_values"][:len(images), :1]
            out["image_sizes"] = vision["image_sizes"][:len(images)]
        self.visual_tokens.update([count] * len(images))
        return out

    def _manual(self, texts: list[str], images: list[Image.Image], counts: list[int]) -> dict[str, torch.Tensor]:
        vision: dict[str, torch.Tensor] = {}
        expanded = texts
        if images:
            vision = dict(self.image_processor(images=images, return_tensors="pt"))
            it = iter(counts)
            expanded = [t.replace(IMAGE_TOKEN, IMAGE_TOKEN * next(it)) if IMAGE_TOKEN in t else t for t in texts]
        enc = self.tokenizer(expanded, return_tensors="pt", padding=True, padding_side="left")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        out.update(vision)
        return out


# ---------------------------------------------------------------------------------------------- tiny model
TINY_TILE = 28                 # tiny vision tower: 28px tiles of 14px patches -> 2x2 features per tile
TINY_TILES_PER_SIDE = 4        # pinpoints up to 4x4 tiles (the real model: 6x6 tiles of 384px)


def tiny_pinpoints() -> list[list[int]]:
    sizes = [TINY_TILE * k for k in range(1, TINY_TILES_PER_SIDE + 1)]
    return [[h, w] for h in sizes for w in sizes]


def tiny_tokenizer(qwen_tokenizer):
    """The tiny Qwen tokenizer plus ``<image>`` / ``<video>`` (appended, as llava-hf adds them to Qwen2's)."""
    tok = copy.deepcopy(qwen_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]},
                           replace_extra_special_tokens=False)
    tok.chat_template = LLAVA_OV_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_image_processor():
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(size={"height": TINY_TILE, "width": TINY_TILE},
                                           image_grid_pinpoints=tiny_pinpoints(),
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def build_tiny_llava_onevision(tok, spec, seed: int = 0):
    """A randomly initialised tiny LLaVA-OV: Qwen2 text model + SigLIP vision tower, anyres_max_9 tiling."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    ids = tok.convert_tokens_to_ids
    text = dict(model_type="qwen2", vocab_size=len(tok), hidden_size=spec.hidden_size,
                intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
                num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
                max_position_embeddings=spec.max_position_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    vision = dict(model_type="siglip_vision_model", hidden_size=spec.vision_embed_dim,
                  intermediate_size=2 * spec.vision_embed_dim, num_hidden_layers=spec.vision_depth,
                  num_attention_heads=spec.vision_heads, patch_size=14, image_size=TINY_TILE, vision_use_head=False)
    cfg = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=ids(IMAGE_TOKEN),
                               video_token_index=ids(VIDEO_TOKEN), vision_feature_select_strategy="full",
                               vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
                               image_grid_pinpoints=tiny_pinpoints(), tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(cfg).eval()
