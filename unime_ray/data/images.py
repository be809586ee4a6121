"""Image loading shared by every stage: inline bytes or a path under an image root."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .schema import Item

# Decompression-bomb guard: real MMEB images are far below this.
Image.MAX_IMAGE_PIXELS = 200_000_000


class ImageError(ValueError):
    """An image that is missing or cannot be decoded."""


def resolve_image_path(image_path: str, image_root: str | os.PathLike | None) -> Path:
    p = Path(image_path)
    if not p.is_absolute() and image_root is not None:
        p = Path(image_root) / p
    return p


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes fully (so truncated files fail here, not in a model) as RGB."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return _to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot decode image bytes ({len(data)} bytes): {exc}") from exc


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("RGBA", "LA", "P"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))  # transparent pixels become white, not black
        bg.paste(rgba, mask=rgba.split()[-1])
        return bg
    return im.convert("RGB")


def read_image_bytes(image_path: str, image_root: str | os.PathLike | None) -> bytes:
    p = resolve_image_path(image_path, image_root)
    if not p.is_file():
        raise ImageError(f"image file not found: {p}")
    return p.read_bytes()


def load_image(item: Item, image_root: str | os.PathLike | None = None) -> Image.Image | None:
    """The item's image as an RGB PIL image, or None for a text-only item."""
    if item.image:
        return decode_image(item.image)
    if item.image_path:
        return decode_image(read_image_bytes(item.image_path, image_root))
    return None
