"""The demo datasets: valid canonical rows, consistent pools and splits, deterministic builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from unime_ray.cli import main as cli_main
from unime_ray.demo import data as demo
from unime_ray.data.io import read_table, shard_paths
from unime_ray.data.schema import IMAGE_MARKER
from unime_ray.data.validate import validate_row

TABLES = [("train", "pairs"), ("train", "candidates"), ("eval", "pairs"), ("eval", "candidates")]
ITEM_COLS = ("instruction", "text", "image", "image_path")


def _emoji_available() -> bool:
    return Path(demo.FONT_PATH).is_file() and Path(demo.EMOJI_TEST_PATH).is_file()


needs_emoji = pytest.mark.skipif(not _emoji_available(),
                                 reason="needs apt packages fonts-noto-color-emoji and unicode-data")


def _rows(out: Path, split: str, kind: str) -> list[dict]:
    return read_table(out / split / kind).to_pylist()


def _item(row: dict, prefix: str = "") -> tuple:
    return tuple(row[f"{prefix}{c}"] for c in ITEM_COLS)


def _files(out: Path) -> dict[str, bytes]:
    """Every Parquet shard and PNG of a build, by relative path (summary.json is compared separately)."""
    paths = [p for split, kind in TABLES for p in shard_paths(out / split / kind)]
    paths += [out / "items.parquet", *sorted((out / "images").glob("*.png"))]
    return {str(p.relative_to(out)): p.read_bytes() for p in paths}


def check_build(out: Path, summary: dict, prefix: str, n_items: int) -> None:
    tasks = [f"{prefix}_{k}" for k in ("i2t", "t2i", "cls")]
    assert summary["tasks"] == tasks
    assert json.loads((out / "summary.json").read_text(encoding="utf-8")) == summary

    items = read_table(out / "items.parquet").to_pylist()
    assert len(items) == n_items == summary["items"]["total"]
    train = {it["key"] for it in items if it["split"] == "train"}
    evals = {it["key"] for it in items if it["split"] == "eval"}
    assert train and evals and not train & evals and len(train) + len(evals) == n_items
    assert summary["items"]["train"] == len(train) and summary["items"]["eval"] == len(evals)
    assert len({it["name"] for it in items}) == n_items  # names are unique
    for it in items:
        assert (out / it["image_path"]).is_file()
    labels = {it["label"] for it in items}

    tables = {(s, k): _rows(out, s, k) for s, k in TABLES}
    for (split, kind), rows in tables.items():
        source = f"{split}/{kind}"
        for i, row in enumerate(rows):
            validate_row(row, kind, source=source, index=i, image_root=out)
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)), f"duplicate ids in {source}"
        assert {r["task"] for r in rows} == set(tasks)
        for r in rows:  # formatters add image markers; the data never carries them
            texts = [v for k, v in r.items() if k.endswith("text") or k.endswith("instruction")]
            flat = [t for v in texts for t in (v if isinstance(v, list) else [v]) if t]
            assert not any(IMAGE_MARKER in t for t in flat)
            if kind == "candidates":
                assert r["image"] is None
            else:
                assert r["query_image"] is None and r["pos_image"] is None

    expected_items = {"train": len(train), "eval": len(evals)}
    for split in ("train", "eval"):
        pairs, cands = tables[(split, "pairs")], tables[(split, "candidates")]
        pool = {c["id"]: c for c in cands}
        for task in tasks:
            n_pairs = sum(r["task"] == task for r in pairs)
            assert n_pairs == expected_items[split] == summary["pairs"][split][task]
            assert sum(c["task"] == task for c in cands) == summary["candidates"][split][task]
        for r in pairs:
            assert r["id"].startswith(f"{r['task']}:{split}:")
            cand = pool[r["pos_id"]]
            assert cand["task"] == r["task"] and _item(cand) == _item(r, "pos_")
            assert r["pos_score"] is None
            kind = r["task"].rsplit("_", 1)[1]
            if kind == "t2i":
                assert r["query_text"] and r["query_image_path"] is None and r["pos_image_path"]
            else:
                assert r["query_text"] == "" and r["query_image_path"].startswith("images/")
                assert r["pos_text"] and r["pos_image_path"] is None
            if kind == "cls":
                assert r["pos_text"] in labels
            if split == "train":
                assert all(r[f"neg_{c}"] is None for c in ("id", "instruction", "text", "image", "image_path",
                                                           "score"))
                continue
            # eval: the positive is the ground truth; every other candidate of the pool is a distractor
            task_pool = [c["id"] for c in cands if c["task"] == r["task"]]
            assert r["pos_id"] not in r["neg_id"]
            assert r["neg_id"] == [cid for cid in task_pool if cid != r["pos_id"]]
            assert r["neg_score"] is None
            for j, nid in enumerate(r["neg_id"]):
                assert _item(pool[nid]) == tuple(r[f"neg_{c}"][j] for c in ITEM_COLS)
    # the cls eval pool holds every label of the dataset; the train pool the training items' labels
    eval_labels = {c["text"] for c in tables[("eval", "candidates")] if c["task"] == tasks[2]}
    assert eval_labels == labels
    train_labels = {c["text"] for c in tables[("train", "candidates")] if c["task"] == tasks[2]}
    assert train_labels == {it["label"] for it in items if it["split"] == "train"}


# ------------------------------------------------------------------------------------------ synthetic

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return out, demo.make_demo_data(out, source="synthetic", seed=0, rows_per_shard=50, progress=False)


def test_synthetic_build(synthetic):
    out, summary = synthetic
    check_build(out, summary, "shapes", 160)
    assert summary["items"] == {"total": 160, "train": 128, "eval": 32}
    assert summary["labels"] == len(demo.SHAPES)
    assert len(shard_paths(out / "train" / "pairs")) == 8  # 384 rows, 50 a shard
    items = read_table(out / "items.parquet").to_pylist()
    assert "small red circle" in {it["name"] for it in items}
    assert {it["subgroup"] for it in items} == set(demo.SHAPES)


def test_synthetic_deterministic(synthetic, tmp_path):
    out, summary = synthetic
    again = demo.make_demo_data(tmp_path / "a", source="synthetic", seed=0, rows_per_shard=50, progress=False)
    assert again == summary
    assert _files(tmp_path / "a") == _files(out)
    other = demo.make_demo_data(tmp_path / "b", source="synthetic", seed=1, rows_per_shard=50, progress=False)
    assert other["items"] == summary["items"]
    split = lambda o: [(r["key"], r["split"]) for r in read_table(o / "items.parquet").to_pylist()]  # noqa: E731
    assert split(tmp_path / "b") != split(out)
    assert _rows(tmp_path / "b", "eval", "pairs") != _rows(out, "eval", "pairs")


def test_synthetic_subset_and_rebuild(tmp_path):
    out = tmp_path / "d"
    demo.make_demo_data(out, source="synthetic", seed=3, progress=False)
    summary = demo.make_demo_data(out, source="synthetic", seed=3, max_items=20, progress=False)
    check_build(out, summary, "shapes", 20)  # rebuilding in place leaves no stale shards or images
    assert summary["items"] == {"total": 20, "train": 16, "eval": 4}
    assert len(list((out / "images").glob("*.png"))) == 20


def test_synthetic_without_eval(tmp_path):
    summary = demo.make_demo_data(tmp_path, source="synthetic", eval_fraction=0.0, max_items=10, progress=False)
    assert summary["items"] == {"total": 10, "train": 10, "eval": 0}
    assert read_table(tmp_path / "eval" / "pairs").num_rows == 0  # empty tables are still readable


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="source"):
        demo.make_demo_data(tmp_path, source="mnist")
    with pytest.raises(ValueError, match="eval_fraction"):
        demo.make_demo_data(tmp_path, source="synthetic", eval_fraction=1.5, progress=False)


# ---------------------------------------------------------------------------------------------- emoji

def test_missing_packages_message(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "FONT_PATH", str(tmp_path / "no-such-font.ttf"))
    with pytest.raises(demo.MissingSystemPackages) as info:
        demo.make_demo_data(tmp_path / "out", source="emoji", progress=False)
    msg = str(info.value)
    assert "apt-get install -y fonts-noto-color-emoji unicode-data" in msg
    assert "--synthetic" in msg and "no-such-font.ttf" in msg
    assert isinstance(info.value, RuntimeError)
    assert not (tmp_path / "out").exists()
    assert cli_main(["make-demo-data", str(tmp_path / "out")]) == 2    # the command says so, without a traceback


@needs_emoji
def test_emoji_parse():
    parsed = demo.parse_emoji_test()
    assert len(parsed) > 3000
    assert parsed[0].name == "grinning face" and parsed[0].key == "1F600"
    assert parsed[0].subgroup == "face-smiling" and parsed[0].group == "Smileys & Emotion"
    assert parsed[0].label == "face smiling"
    kept, stats = demo.filter_emoji(parsed)
    names = [it.name for it in kept]
    assert len(names) == len(set(names))
    assert not any("skin tone" in n for n in names)
    assert stats["dropped_skin_tone"] > 1000
    for name in ("grinning face", "red heart", "dog face", "flag: Japan", "woman astronaut"):
        assert name in names
    zwj = next(it for it in kept if it.name == "woman astronaut")
    assert zwj.key == "1F469-200D-1F680" and zwj.emoji == "\U0001F469\u200d\U0001F680"


@pytest.fixture(scope="module")
def emoji_build(tmp_path_factory):
    if not _emoji_available():
        pytest.skip("needs apt packages fonts-noto-color-emoji and unicode-data")
    out = tmp_path_factory.mktemp("emoji")
    return out, demo.make_demo_data(out, source="emoji", seed=0, max_items=200, progress=False)


def test_emoji_build(emoji_build):
    out, summary = emoji_build
    check_build(out, summary, "emoji", 200)
    assert summary["items"] == {"total": 200, "train": 160, "eval": 40}
    stats = summary["filtering"]
    assert stats["dropped_duplicate_image"] >= 1  # e.g. flag: Norway / Svalbard & Jan Mayen
    assert stats["kept"] == (stats["parsed_fully_qualified"] - stats["dropped_skin_tone"]
                             - stats["dropped_duplicate_name"] - stats["dropped_blank"]
                             - stats["dropped_duplicate_image"])
    items = read_table(out / "items.parquet").to_pylist()
    assert not any("skin tone" in it["name"] for it in items)
    for it in items:
        assert it["image_path"] == f"images/{it['codepoints'].replace(' ', '-')}.png"
    for it in items[::20]:
        with Image.open(out / it["image_path"]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
            px = list(im.getdata())
        non_white = sum(p != (255, 255, 255) for p in px)
        assert non_white > 0.1 * len(px), f"{it['name']} looks blank"
        assert len(set(px)) > 8


def test_emoji_deterministic(emoji_build, tmp_path):
    out, summary = emoji_build
    again = demo.make_demo_data(tmp_path / "a", source="emoji", seed=0, max_items=200, progress=False)
    assert again == summary
    assert _files(tmp_path / "a") == _files(out)
    demo.make_demo_data(tmp_path / "b", source="emoji", seed=1, max_items=200, progress=False)
    names = lambda o: {r["name"] for r in read_table(o / "items.parquet").to_pylist()}  # noqa: E731
    assert names(tmp_path / "b") != names(out)
