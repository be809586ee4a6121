"""How an :class:`~unime_ray.data.schema.Item` becomes the text a Qwen-VL backbone reads.

* ``official``: the format the released UniME-V2 embedders were trained with: the raw string with the
  image marker replaced by a bare ``<|image_pad|>`` (no ``<|vision_start|>``/``<|vision_end|>``, no chat
  template). An image item without a marker gets ``<|image_pad|>\\n`` in front, as MMEB writes it.
* ``chat``: the backbone's chat template (Qwen2-VL and Qwen2.5-VL share it): a system turn, a user turn
  with ``<|vision_start|><|image_pad|><|vision_end|>`` where the image goes, and the assistant header.
* LLaVA-OneVision (``model_type="llava_onevision"``): its own chat format for both, see
  :func:`~unime_ray.models.llava_onevision.format_llava_ov`.
"""

from __future__ import annotations

from ..data.schema import IMAGE_MARKER, Item
from .processor import IMAGE_PAD, VISION_END, VISION_START

INPUT_FORMATS = ("official", "chat")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def _split_at_marker(item: Item) -> tuple[str, str]:
    text = item.prompt_text()
    if IMAGE_MARKER in text:
        before, after = text.split(IMAGE_MARKER, 1)
        return before, after
    return "", text


def format_official(item: Item) -> str:
    text = item.prompt_text()
    if not item.has_image:
        return text.replace(IMAGE_MARKER, "")
    if IMAGE_MARKER in text:
        return text.replace(IMAGE_MARKER, IMAGE_PAD, 1)
    return f"{IMAGE_PAD}\n{text}"


def chat_prompt(user_parts: list[tuple[str, str]], system: str | None = DEFAULT_SYSTEM_PROMPT,
                add_generation_prompt: bool = True) -> str:
    """A Qwen chat prompt from ``[("image", ""), ("text", "...")]`` parts of a single user turn."""
    out = []
    if system is not None:
        out.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    out.append("<|im_start|>user\n")
    for kind, value in user_parts:
        out.append(f"{VISION_START}{IMAGE_PAD}{VISION_END}" if kind == "image" else value)
    out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def item_chat_parts(item: Item) -> list[tuple[str, str]]:
    before, after = _split_at_marker(item)
    parts: list[tuple[str, str]] = []
    if before:
        parts.append(("text", before))
    if item.has_image:
        parts.append(("image", ""))
    if after:
        parts.append(("text", after.lstrip("\n") if item.has_image and not before else after))
    return parts


def format_chat(item: Item, system: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    return chat_prompt(item_chat_parts(item), system)


def format_item(item: Item, input_format: str, model_type: str | None = None) -> str:
    """``item`` as the backbone reads it; ``model_type="llava_onevision"`` gives the LLaVA-OV chat format for
    either input format (UniME-V2 trained LLaVA-OV on its chat template; see models/llava_onevision.py)."""
    if model_type == "llava_onevision":
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"unknown input format {input_format!r}; choose one of {', '.join(INPUT_FORMATS)}")
        from .llava_onevision import format_llava_ov

        return format_llava_ov(item)
    if input_format == "official":
        return format_official(item)
    if input_format == "chat":
        return format_chat(item)
    raise ValueError(f"unknown input format {input_format!r}; choose one of {', '.join(INPUT_FORMATS)}")
