"""Small real (or synthetic) image-text datasets, built offline, for demos and end-to-end tests.

Why: every stage (training, mining, judging, evaluation) needs a dataset it can run on without
network access. ``source="emoji"`` renders Noto Color Emoji with their Unicode CLDR names (a real
image-text set: names differ by colour, gender, count, which makes good hard negatives);
``source="synthetic"`` draws coloured shapes with Pillow and needs no system packages.

Both give the same three tasks (``<prefix>_i2t`` image -> name, ``<prefix>_t2i`` name -> image,
``<prefix>_cls`` image -> subgroup label), written in the canonical tables:

* ``out_dir/images/*.png``
* ``out_dir/train/{pairs,candidates}/``: training pairs (no negatives) and their target pools;
* ``out_dir/eval/{pairs,candidates}/``: MMEB-eval style rows (ground truth + every other candidate of
  the task's eval pool as distractors) and the eval pools;
* ``out_dir/items.parquet`` (item metadata and split) and ``out_dir/summary.json``.

Instructions are data: they are written into the rows here, so formatters never invent them.
Same seed -> same item set, split, ids, byte-identical Parquet shards and PNGs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from ..data.io import rows_to_table, write_rows, write_table_atomic
from ..data.schema import CANDIDATE_SCHEMA, PAIR_SCHEMA, Item, item_to_columns, negatives_to_columns

logger = logging.getLogger(__name__)

# System files of the Debian packages fonts-noto-color-emoji and unicode-data (module constants so
# tests and other distributions can point them elsewhere).
FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST_PATH = "/usr/share/unicode/emoji/emoji-test.txt"
FONT_SIZE = 109  # NotoColorEmoji is a CBDT bitmap font: Pillow only loads it at its strike size, 109
INSTALL_COMMAND = "apt-get install -y fonts-noto-color-emoji unicode-data"

SOURCES = ("emoji", "synthetic")
TASK_PREFIX = {"emoji": "emoji", "synthetic": "shapes"}
TASK_KINDS = ("i2t", "t2i", "cls")

# (query instruction, target instruction) per source and task; the query of i2t/cls is an image, of
# t2i a name; the target of i2t is a name, of t2i an image, of cls a subgroup label.
INSTRUCTIONS: dict[str, dict[str, tuple[str, str]]] = {
    "emoji": {
        "i2t": ("Represent the given emoji image for finding its name:", "Represent the emoji name:"),
        "t2i": ("Find an emoji image that matches the name:", "Represent the given emoji image:"),
        "cls": ("Classify the emoji image into its subgroup:", "Represent the emoji subgroup:"),
    },
    "synthetic": {
        "i2t": ("Represent the given shape image for finding its description:",
                "Represent the shape description:"),
        "t2i": ("Find a shape image that matches the description:", "Represent the given shape image:"),
        "cls": ("Classify the shape image into its shape:", "Represent the shape name:"),
    },
}

# Subgroup labels whose hyphen-to-space form would not read as words.
_LABEL_OVERRIDES = {"av-symbol": "audio video symbol", "alphanum": "alphanumeric"}

ITEMS_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("group", pa.string()),
    pa.field("subgroup", pa.string()),
    pa.field("label", pa.string()),
    pa.field("split", pa.string()),
    pa.field("image_path", pa.string()),
    pa.field("codepoints", pa.string()),
    pa.field("emoji", pa.string()),
    pa.field("emoji_version", pa.string()),
])


class MissingSystemPackages(RuntimeError):
    """The emoji dataset needs system files that are not installed."""


@dataclass(frozen=True)
class DemoItem:
    """One dataset item: an image with a unique name, a coarse group and a subgroup (the class)."""

    key: str  # file stem and id part: hex codepoints ("1F468-200D-1F469") or a slug ("small-red-circle")
    name: str
    group: str
    subgroup: str
    codepoints: str | None = None  # "1F600 FE0F" for emoji
    emoji: str | None = None
    emoji_version: str | None = None
    split: str | None = None

    @property
    def label(self) -> str:
        return subgroup_label(self.subgroup)

    @property
    def image_path(self) -> str:
        return f"images/{self.key}.png"


def subgroup_label(subgroup: str) -> str:
    """The human-readable class label of a subgroup ("face-smiling" -> "face smiling")."""
    return _LABEL_OVERRIDES.get(subgroup, subgroup.replace("-", " "))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# --------------------------------------------------------------------------------------------- emoji

_EMOJI_LINE = re.compile(r"^([0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E([\d.]+)\s+(.+)$")


def check_emoji_packages() -> None:
    """Raise :class:`MissingSystemPackages` (with the install command) if the emoji files are missing."""
    missing = [p for p in (FONT_PATH, EMOJI_TEST_PATH) if not Path(p).is_file()]
    if missing:
        raise MissingSystemPackages(
            f"the emoji demo dataset needs {', '.join(missing)}, which is not installed. Install it with:\n"
            f"    sudo {INSTALL_COMMAND}\n"
            f"(as root: `{INSTALL_COMMAND}`), or build the synthetic shapes dataset instead "
            f"(`--synthetic`, i.e. source=\"synthetic\"), which needs no system packages.")


def parse_emoji_test(path: str | Path | None = None) -> list[DemoItem]:
    """All fully-qualified emoji of ``emoji-test.txt`` in CLDR order, with name, group and subgroup."""
    path = Path(path or EMOJI_TEST_PATH)
    items: list[DemoItem] = []
    group = subgroup = ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif line.startswith("# subgroup:"):
                subgroup = line.split(":", 1)[1].strip()
            elif (m := _EMOJI_LINE.match(line)) is not None:
                cps = m[1].split()
                items.append(DemoItem(key="-".join(cps), name=m[3].strip(), group=group, subgroup=subgroup,
                                      codepoints=" ".join(cps), emoji="".join(chr(int(c, 16)) for c in cps),
                                      emoji_version=m[2]))
    return items


def filter_emoji(items: Iterable[DemoItem]) -> tuple[list[DemoItem], dict[str, int]]:
    """Drop skin-tone variants (near-copies of their base emoji) and repeated names; first one wins."""
    kept, seen, counts = [], set(), {"dropped_skin_tone": 0, "dropped_duplicate_name": 0}
    for it in items:
        if "skin tone" in it.name:
            counts["dropped_skin_tone"] += 1
        elif it.name in seen:
            counts["dropped_duplicate_name"] += 1
        else:
            seen.add(it.name)
            kept.append(it)
    return kept, counts


def _check_raqm() -> None:
    from PIL import features

    if not features.check("raqm"):
        logger.warning("Pillow was built without raqm: ZWJ emoji sequences (families, professions, flags) "
                       "render as several glyphs instead of one; install libraqm and reinstall Pillow")


class _EmojiRenderer:
    """Renders one emoji: glyph on transparent canvas -> crop to its bbox -> white, square, resized."""

    def __init__(self, image_size: int):
        from PIL import ImageFont

        self.font = ImageFont.truetype(FONT_PATH, FONT_SIZE)
        self.image_size = image_size

    def glyph(self, text: str):
        """The cropped RGBA glyph, or None if it renders blank (a glyph the font lacks)."""
        from PIL import Image, ImageDraw

        probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
        left, top, right, bottom = probe.textbbox((0, 0), text, font=self.font, embedded_color=True)
        w, h = max(1, right - min(0, left)), max(1, bottom - min(0, top))
        im = Image.new("RGBA", (w, h), (255, 255, 255, 0))
        ImageDraw.Draw(im).text((-min(0, left), -min(0, top)), text, font=self.font, embedded_color=True)
        bbox = im.getchannel("A").getbbox()
        return None if bbox is None else im.crop(bbox)

    def finish(self, glyph):
        """Glyph -> white RGB square (padded, so wide flags are not stretched) -> image_size, LANCZOS."""
        from PIL import Image

        side = max(glyph.size)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2), mask=glyph.getchannel("A"))
        return canvas.resize((self.image_size, self.image_size), Image.Resampling.LANCZOS)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, unit="item", leave=False)
        except ImportError:  # tqdm is a dependency, but the log line below is enough without it
            pass
    return iterable


def _emoji_items(image_size: int, progress: bool) -> tuple[list[DemoItem], dict, dict[str, Any]]:
    """Parsed, filtered and rendered emoji; drops blank renders and exact image duplicates (e.g. the
    Norway / Svalbard / Bouvet Island flags) so each image has one name."""
    check_emoji_packages()
    _check_raqm()
    parsed = parse_emoji_test()
    items, stats = filter_emoji(parsed)
    stats = {"parsed_fully_qualified": len(parsed), **stats, "dropped_blank": 0, "dropped_duplicate_image": 0}
    renderer = _EmojiRenderer(image_size)
    kept, images, seen = [], {}, {}
    t0 = time.perf_counter()
    for it in _progress(items, len(items), "rendering emoji", progress):
        glyph = renderer.glyph(it.emoji)
        if glyph is None:
            stats["dropped_blank"] += 1
            logger.warning("emoji %s (%s) renders blank; dropped", it.codepoints, it.name)
            continue
        digest = hashlib.sha1(repr(glyph.size).encode() + glyph.tobytes()).digest()
        if digest in seen:
            stats["dropped_duplicate_image"] += 1
            logger.debug("emoji %r renders like %r; dropped", it.name, seen[digest])
            continue
        seen[digest] = it.name
        kept.append(it)
        images[it.key] = renderer.finish(glyph)
    dt = time.perf_counter() - t0
    logger.info("rendered %d emoji in %.1f s (%.0f items/s); kept %d", len(items), dt,
                len(items) / max(dt, 1e-9), len(kept))
    stats["kept"] = len(kept)
    return kept, images, stats


# ----------------------------------------------------------------------------------------- synthetic

SHAPES = ("circle", "oval", "triangle", "square", "diamond", "pentagon", "hexagon", "star")
SHAPE_GROUPS = {"circle": "round", "oval": "round", "square": "four-sided", "diamond": "four-sided",
                "triangle": "pointed", "star": "pointed", "pentagon": "many-sided", "hexagon": "many-sided"}
COLOURS = {"red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 210, 20), "green": (30, 160, 60),
           "blue": (30, 80, 220), "purple": (130, 50, 180), "pink": (240, 120, 190), "brown": (130, 80, 40),
           "gray": (128, 128, 128), "black": (20, 20, 20)}
SIZES = {"small": 0.22, "large": 0.42}  # radius as a fraction of the image side


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """The outline of ``shape`` as a polygon, rotated by ``angle`` radians about its centre."""
    def regular(n, start, rx=1.0, ry=1.0, radii=(1.0,)):
        return [(rx * radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / n),
                 ry * radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / n)) for i in range(n)]

    up = -math.pi / 2
    unit = {
        "circle": lambda: regular(96, 0.0),
        "oval": lambda: regular(96, 0.0, 1.0, 0.6),
        "triangle": lambda: regular(3, up),
        "square": lambda: regular(4, math.pi / 4),
        "diamond": lambda: regular(4, up, 0.7, 1.0),
        "pentagon": lambda: regular(5, up),
        "hexagon": lambda: regular(6, 0.0),
        "star": lambda: regular(10, up, radii=(1.0, 0.45)),
    }[shape]()
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in unit]


def _synthetic_items(image_size: int, seed: int, progress: bool) -> tuple[list[DemoItem], dict, dict[str, Any]]:
    """8 shapes x 10 colours x 2 sizes, drawn 4x oversized and downsampled (anti-aliased).

    Position and rotation jitter come from a per-item RNG seeded by (seed, key), so an item's image does
    not depend on which other items are built.
    """
    from PIL import Image, ImageDraw

    items, images = [], {}
    specs = [(size, colour, shape) for shape in SHAPES for colour in COLOURS for size in SIZES]
    t0 = time.perf_counter()
    big = image_size * 4
    for size, colour, shape in _progress(specs, len(specs), "drawing shapes", progress):
        name = f"{size} {colour} {shape}"
        key = _slug(name)
        rng = random.Random(f"{seed}:{key}")
        r = SIZES[size] * big
        slack = big / 2 - r * 1.05
        cx, cy = big / 2 + rng.uniform(-slack, slack), big / 2 + rng.uniform(-slack, slack)
        angle = 0.0 if shape == "circle" else math.radians(rng.uniform(-15, 15))
        im = Image.new("RGB", (big, big), (255, 255, 255))
        ImageDraw.Draw(im).polygon(_shape_points(shape, cx, cy, r, angle), fill=COLOURS[colour])
        images[key] = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
        items.append(DemoItem(key=key, name=name, group=SHAPE_GROUPS[shape], subgroup=shape))
    dt = time.perf_counter() - t0
    logger.info("drew %d shapes in %.2f s (%.0f items/s)", len(items), dt, len(items) / max(dt, 1e-9))
    return items, images, {"kept": len(items)}


# ---------------------------------------------------------------------------------- split and tables

def split_items(items: list[DemoItem], seed: int, eval_fraction: float,
                max_items: int | None) -> list[DemoItem]:
    """A seeded subset (``max_items``) split into train/eval; canonical item order is kept."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    rng = random.Random(seed)
    idx = list(range(len(items)))
    if max_items is not None:
        if max_items <= 0:
            raise ValueError(f"max_items must be positive, got {max_items}")
        if max_items < len(idx):
            idx = sorted(rng.sample(idx, max_items))
    n = len(idx)
    n_eval = round(eval_fraction * n)
    if eval_fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)  # a tiny build still gets an eval split...
    if eval_fraction < 1 and n >= 2:
        n_eval = min(n - 1, n_eval)  # ...and a training split
    eval_idx = set(rng.sample(idx, n_eval))
    return [replace(items[i], split="eval" if i in eval_idx else "train") for i in idx]


def _targets(kind: str, items: list[DemoItem], task: str, instruction: str) -> list[tuple[str, Item]]:
    """The (candidate id, item) pool of a task's targets; cls labels appear once each."""
    if kind == "i2t":
        return [(f"{task}:name:{it.key}", Item(text=it.name, instruction=instruction)) for it in items]
    if kind == "t2i":
        return [(f"{task}:image:{it.key}", Item(instruction=instruction, image_path=it.image_path))
                for it in items]
    pool: dict[str, Item] = {}
    for it in items:
        cid = f"{task}:label:{_slug(it.subgroup)}"
        pool.setdefault(cid, Item(text=it.label, instruction=instruction))
    return list(pool.items())


def _target_id(kind: str, task: str, it: DemoItem) -> str:
    kind_name = {"i2t": "name", "t2i": "image", "cls": "label"}[kind]
    return f"{task}:{kind_name}:{_slug(it.subgroup) if kind == 'cls' else it.key}"


def _query(kind: str, it: DemoItem, instruction: str) -> Item:
    if kind == "t2i":
        return Item(text=it.name, instruction=instruction)
    return Item(instruction=instruction, image_path=it.image_path)


def _candidate_rows(task: str, pool: list[tuple[str, Item]]) -> list[dict[str, Any]]:
    return [{"id": cid, "task": task, **item_to_columns(item)} for cid, item in pool]


def _pair_row(row_id: str, task: str, query: Item, pos_id: str, pos: Item,
              negatives: list[tuple[str, Item]] | None = None) -> dict[str, Any]:
    row = {"id": row_id, "task": task, **item_to_columns(query, "query_"), "pos_id": pos_id,
           **item_to_columns(pos, "pos_"), "pos_score": None}
    row.update(negatives_to_columns([(item, None, nid) for nid, item in negatives or []]))
    if negatives:
        row["neg_score"] = None  # distractors, not judged negatives
    return row


def build_tables(items: list[DemoItem], source: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Rows of the four tables: ``{"train"|"eval": {"pairs"|"candidates": rows}}``."""
    prefix = TASK_PREFIX[source]
    splits = {s: [it for it in items if it.split == s] for s in ("train", "eval")}
    out: dict[str, dict[str, list]] = {s: {"pairs": [], "candidates": []} for s in splits}
    for kind in TASK_KINDS:
        task = f"{prefix}_{kind}"
        q_instr, t_instr = INSTRUCTIONS[source][kind]
        for split, split_items_ in splits.items():
            # the eval cls pool holds every label of the dataset, so eval queries see all classes
            pool_items = items if (split == "eval" and kind == "cls") else split_items_
            pool = _targets(kind, pool_items, task, t_instr)
            pool_map = dict(pool)
            out[split]["candidates"].extend(_candidate_rows(task, pool))
            for k, it in enumerate(split_items_):
                pos_id = _target_id(kind, task, it)
                negatives = [(cid, item) for cid, item in pool if cid != pos_id] if split == "eval" else None
                out[split]["pairs"].append(_pair_row(f"{task}:{split}:{k:06d}", task, _query(kind, it, q_instr),
                                                     pos_id, pool_map[pos_id], negatives))
    return out


def _write_table(rows: list[dict[str, Any]], out_dir: Path, schema: pa.Schema, rows_per_shard: int) -> int:
    """Replace the table at ``out_dir``; an empty table still gets one (empty) shard so readers work."""
    if out_dir.is_dir():
        for old in out_dir.glob("part-*.parquet"):
            old.unlink()
    if not rows:
        write_table_atomic(rows_to_table([], schema), out_dir / "part-00000.parquet")
        return 0
    return write_rows(rows, out_dir, schema, rows_per_shard=rows_per_shard)


def _save_images(items: list[DemoItem], images: dict, out_dir: Path, progress: bool) -> None:
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    wanted = {Path(it.image_path).name for it in items}
    for old in img_dir.glob("*.png"):  # a previous, larger build's images would be orphans
        if old.name not in wanted:
            old.unlink()
    for it in _progress(items, len(items), "saving images", progress):
        images[it.key].save(out_dir / it.image_path, format="PNG")


def make_demo_data(out_dir, source: str = "emoji", seed: int = 0, eval_fraction: float = 0.2,
                   max_items: int | None = None, image_size: int = 64, rows_per_shard: int = 2000,
                   progress: bool = True) -> dict:
    """Build the demo dataset under ``out_dir`` and return its summary (also written to summary.json).

    ``source="emoji"`` needs the Debian packages fonts-noto-color-emoji and unicode-data (raises
    :class:`MissingSystemPackages` otherwise); ``source="synthetic"`` needs nothing.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    if source == "emoji":
        all_items, images, stats = _emoji_items(image_size, progress)
    else:
        all_items, images, stats = _synthetic_items(image_size, seed, progress)
    items = split_items(all_items, seed, eval_fraction, max_items)
    out.mkdir(parents=True, exist_ok=True)
    _save_images(items, images, out, progress)

    tables = build_tables(items, source)
    schemas = {"pairs": PAIR_SCHEMA, "candidates": CANDIDATE_SCHEMA}
    for split, by_kind in tables.items():
        for kind, rows in by_kind.items():
            _write_table(rows, out / split / kind, schemas[kind], rows_per_shard)
    write_table_atomic(pa.Table.from_pylist(
        [{f: (getattr(it, f)) for f in ITEMS_SCHEMA.names} for it in items], schema=ITEMS_SCHEMA),
        out / "items.parquet")

    def per_task(rows):
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["task"]] = counts.get(r["task"], 0) + 1
        return counts

    prefix = TASK_PREFIX[source]
    summary = {
        "source": source,
        "seed": seed,
        "eval_fraction": eval_fraction,
        "max_items": max_items,
        "image_size": image_size,
        "tasks": [f"{prefix}_{k}" for k in TASK_KINDS],
        "instructions": {f"{prefix}_{k}": {"query": q, "target": t} for k, (q, t) in INSTRUCTIONS[source].items()},
        "items": {"total": len(items), "train": sum(it.split == "train" for it in items),
                  "eval": sum(it.split == "eval" for it in items)},
        "labels": len({it.subgroup for it in items}),
        "filtering": stats,
        "pairs": {s: per_task(t["pairs"]) for s, t in tables.items()},
        "candidates": {s: per_task(t["candidates"]) for s, t in tables.items()},
        "tables": {f"{s}_{k}": f"{s}/{k}" for s in tables for k in ("pairs", "candidates")},
        "images": "images",
        "items_table": "items.parquet",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("demo dataset (%s, seed %d) at %s: %d items (%d train, %d eval) in %.1f s", source, seed, out,
                summary["items"]["total"], summary["items"]["train"], summary["items"]["eval"],
                time.perf_counter() - t0)
    return summary
