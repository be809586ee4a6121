"""Converters, validation, quarantine and sharded IO of the canonical data tables.

Every expectation here is written by hand from the formats (official UniME-V2 JSON, MMEB-train rows,
MMEB-eval rows) rather than re-derived from the converters under test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unime_ray.data.convert import export_pairs, import_pairs
from unime_ray.data.convert.records import from_canonical_text, to_canonical_text
from unime_ray.data.io import ShardWriter, count_rows, iter_rows, read_table, write_rows
from unime_ray.data.schema import CANDIDATE_SCHEMA, IMAGE_MARKER, PAIR_SCHEMA, empty_row
from unime_ray.data.validate import DataError, validate_row

OFFICIAL_KEYS = ["query_text", "query_image", "pos_text", "pos_image", "query_pos_scores", "hard_negatives",
                 "hard_negatives_scores"]


def _write_images(root: Path, make_png, paths: list[str]) -> None:
    """Real images at the given relative paths; ``.jpg`` files are JPEG-encoded, the rest PNG."""
    for seed, rel in enumerate(paths):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        fmt = "JPEG" if rel.endswith(".jpg") else "PNG"
        p.write_bytes(make_png(24 + seed, 16 + seed, seed, fmt))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, lines: list) -> Path:
    """Each entry is a record (dumped as JSON) or a raw ``str`` line written as is."""
    with path.open("w", encoding="utf-8") as f:
        for entry in lines:
            f.write((entry if isinstance(entry, str) else json.dumps(entry)) + "\n")
    return path


def _no_hidden_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------ official JSON
AOKVQA_Q = "<|image_1|>\nRepresent the given image with the following question: What is prohibited in the shade?\n"
T2I_Q = "Find me an everyday image that matches the given caption: A man riding a bike down a dirt road.\n"
IMG_CAND = "<|image_1|>\nRepresent the given image.\n"
CROP_CAND = "<|image_1|>\nRepresent the given cropped image of the object"

OFFICIAL_IMAGES = [
    "images/A-OKVQA/Train/000000262227.jpg",
    "images/MSCOCO_t2i/Train/pos_bike.jpg",
    "images/MSCOCO_t2i/Train/neg_A.jpg",
    "images/MSCOCO_t2i/Train/neg_B.jpg",
    "images/RefCOCO/Train/COCO_train2014_000000581857.jpg",
    "images/RefCOCO/Train/crop_dog.jpg",
    "images/RefCOCO/Train/crop_cat.png",
    "images/RefCOCO/Train/crop_bird.png",
]

OFFICIAL_RECORDS = [
    {   # image + question query, text answer, 10 text negatives A,B,A,B,...
        "query_text": AOKVQA_Q,
        "query_image": "images/A-OKVQA/Train/000000262227.jpg",
        "pos_text": "Sitting in the sun",
        "pos_image": "",
        "query_pos_scores": 0.44073,
        "hard_negatives": [["Swimming", ""], ["Parking", ""]] * 5,
        "hard_negatives_scores": [0.12345, 0.0, 0.98765, 0.33333, 0.5, 0.25, 0.125, 0.0625, 0.9, 0.1],
    },
    {   # text-only query, image candidates (positive and negatives), repeats A,B,A,B,...
        "query_text": T2I_Q,
        "query_image": "",
        "pos_text": IMG_CAND,
        "pos_image": "images/MSCOCO_t2i/Train/pos_bike.jpg",
        "query_pos_scores": 0.87231,
        "hard_negatives": [[IMG_CAND, "images/MSCOCO_t2i/Train/neg_A.jpg"],
                           [IMG_CAND, "images/MSCOCO_t2i/Train/neg_B.jpg"]] * 5,
        "hard_negatives_scores": [0.61, 0.07, 0.61, 0.07, 0.44073, 0.3, 0.2, 0.11, 0.05, 0.01],
    },
    {   # image query, image positive, judge fell back to 1.0
        "query_text": "<|image_1|>\nSelect the portion of the image that isolates the object labeled as \"dog\"\n",
        "query_image": "images/RefCOCO/Train/COCO_train2014_000000581857.jpg",
        "pos_text": CROP_CAND,
        "pos_image": "images/RefCOCO/Train/crop_dog.jpg",
        "query_pos_scores": 1.0,
        "hard_negatives": [[CROP_CAND, "images/RefCOCO/Train/crop_cat.png"],
                           [CROP_CAND, "images/RefCOCO/Train/crop_bird.png"]] * 5,
        "hard_negatives_scores": [1.0] * 10,
    },
    {   # text-only on both sides: no image path to name the task
        "query_text": "Represent the given Wikipedia passage: The Eiffel Tower is in Paris.\n",
        "query_image": "",
        "pos_text": "Which city is the Eiffel Tower in?",
        "pos_image": "",
        "query_pos_scores": 0.7,
        "hard_negatives": [["Which city is Big Ben in?", ""], ["How tall is Mount Everest?", ""]] * 5,
        "hard_negatives_scores": [0.2, 0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1],
    },
]


@pytest.fixture
def official_setup(tmp_path, png_bytes):
    root = tmp_path / "mmeb_train"
    _write_images(root, png_bytes, OFFICIAL_IMAGES)
    src = tmp_path / "unime_v2_scores.json"
    src.write_text(json.dumps(OFFICIAL_RECORDS, indent=2), encoding="utf-8")
    return src, root


def test_official_json_round_trip_is_exact(official_setup, tmp_path):
    src, root = official_setup
    out_dir, qpath, out_json = tmp_path / "pairs", tmp_path / "q.parquet", tmp_path / "export" / "out.json"
    account = import_pairs(src, "official", out_dir, quarantine_path=qpath, image_root=root)
    assert (account.rows_in, account.rows_out, account.rows_quarantined) == (4, 4, 0)
    assert pq.read_table(qpath).num_rows == 0  # an empty quarantine is still written

    assert export_pairs(out_dir, "official", out_json) == 4
    exported = json.loads(out_json.read_text(encoding="utf-8"))
    assert exported == OFFICIAL_RECORDS
    for got, want in zip(exported, OFFICIAL_RECORDS):
        assert list(got) == OFFICIAL_KEYS
        # floats bit-exact (== on floats), including the repeated and fallback ones
        assert got["query_pos_scores"] == want["query_pos_scores"]
        assert all(type(s) is float for s in got["hard_negatives_scores"])
        assert got["hard_negatives_scores"] == want["hard_negatives_scores"]
    assert _no_hidden_files(out_json.parent) == []


def test_official_json_canonical_rows(official_setup, tmp_path):
    src, root = official_setup
    out_dir = tmp_path / "pairs"
    import_pairs(src, "official", out_dir, quarantine_path=tmp_path / "q.parquet", image_root=root)
    table = read_table(out_dir)
    assert table.schema.names == PAIR_SCHEMA.names
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["official:00000000", "official:00000001", "official:00000002",
                                       "official:00000003"]
    assert [r["task"] for r in rows] == ["A-OKVQA", "MSCOCO_t2i", "RefCOCO", "unknown"]

    r0 = rows[0]
    assert r0["query_text"] == ("<image>\nRepresent the given image with the following question: "
                                "What is prohibited in the shade?\n")
    assert "<|image_1|>" not in r0["query_text"]
    assert r0["query_image_path"] == "images/A-OKVQA/Train/000000262227.jpg"
    assert r0["query_image"] is None
    assert r0["pos_text"] == "Sitting in the sun"
    assert not r0["pos_image_path"]
    assert r0["pos_score"] == 0.44073
    for col in ("neg_text", "neg_image_path", "neg_score", "neg_id", "neg_instruction", "neg_image"):
        assert len(r0[col]) == 10, col
    assert r0["neg_text"] == ["Swimming", "Parking"] * 5
    assert r0["neg_score"] == [0.12345, 0.0, 0.98765, 0.33333, 0.5, 0.25, 0.125, 0.0625, 0.9, 0.1]
    assert not any(r0["neg_image_path"])

    r1 = rows[1]
    assert r1["query_text"] == T2I_Q and not r1["query_image_path"]
    assert r1["pos_text"] == "<image>\nRepresent the given image.\n"
    assert r1["pos_image_path"] == "images/MSCOCO_t2i/Train/pos_bike.jpg"
    assert r1["neg_text"] == ["<image>\nRepresent the given image.\n"] * 10
    assert r1["neg_image_path"] == ["images/MSCOCO_t2i/Train/neg_A.jpg", "images/MSCOCO_t2i/Train/neg_B.jpg"] * 5

    r2 = rows[2]
    assert r2["pos_score"] == 1.0 and r2["neg_score"] == [1.0] * 10
    assert r2["pos_text"] == "<image>\nRepresent the given cropped image of the object"

    for r in rows:
        for col in ("query_text", "pos_text"):
            assert r[col].count(IMAGE_MARKER) <= 1
            assert "<|image_" not in r[col]


def test_official_import_task_default_and_export_needs_scores(tmp_path, png_bytes):
    # A text-only record gets the caller's task; an MMEB-train table (no judge scores) cannot go to official.
    src = tmp_path / "t.json"
    src.write_text(json.dumps([OFFICIAL_RECORDS[3]]), encoding="utf-8")
    import_pairs(src, "official", tmp_path / "p", quarantine_path=tmp_path / "q.parquet", task="WebQA")
    assert [r["task"] for r in iter_rows(tmp_path / "p")] == ["WebQA"]

    mm = _write_jsonl(tmp_path / "m.jsonl", [{"qry": "a question", "qry_image_path": "", "pos_text": "an answer",
                                              "pos_image_path": ""}])
    import_pairs(mm, "mmeb-train", tmp_path / "p2", quarantine_path=tmp_path / "q2.parquet", task="X")
    with pytest.raises(DataError) as ei:
        export_pairs(tmp_path / "p2", "official", tmp_path / "o.json")
    assert ei.value.field == "pos_score"
    assert not (tmp_path / "o.json").exists()


# ------------------------------------------------------------------------------------------ MMEB-train
MMEB_TRAIN_IMAGES = ["images/VQAv2/Train/bus.jpg", "images/MSCOCO_t2i/Train/dogs.jpg",
                     "images/MSCOCO_t2i/Train/cats.jpg", "images/ImageNet_1K/Train/dog.jpg",
                     "images/VisDial/Train/room.jpg", "images/VisDial/Train/kitchen.jpg"]

MMEB_TRAIN_JSONL = [
    {"qry": "<|image_1|>\nRepresent the given image with the following question: What color is the bus?\n",
     "qry_image_path": "images/VQAv2/Train/bus.jpg", "pos_text": "Red", "pos_image_path": ""},
    {"qry": "Find me an everyday image that matches the given caption: Two dogs on the grass.\n",
     "qry_image_path": "", "pos_text": "<|image_1|>\nRepresent the given image.\n",
     "pos_image_path": "images/MSCOCO_t2i/Train/dogs.jpg",
     "neg_text": "<|image_1|>\nRepresent the given image.\n", "neg_image_path": "images/MSCOCO_t2i/Train/cats.jpg"},
    {"qry": "<|image_1|>\nRepresent the given image for classification\n",
     "qry_image_path": "images/ImageNet_1K/Train/dog.jpg", "pos_text": "golden retriever", "pos_image_path": "",
     "neg_text": "tabby cat", "neg_image_path": ""},
]

MMEB_TRAIN_PARQUET = [
    {"qry": "Represent the given dialogue about an image, which is used for image retrieval: Q: is it a room? A: yes\n",
     "qry_image_path": "", "pos_text": "<|image_1|>\nRepresent the given image.\n",
     "pos_image_path": "images/VisDial/Train/room.jpg",
     "neg_text": "<|image_1|>\nRepresent the given image.\n", "neg_image_path": "images/VisDial/Train/kitchen.jpg"},
    {"qry": "Represent the given dialogue about an image, which is used for image retrieval: Q: any people? A: no\n",
     "qry_image_path": "", "pos_text": "<|image_1|>\nRepresent the given image.\n",
     "pos_image_path": "images/VisDial/Train/kitchen.jpg",
     "neg_text": "<|image_1|>\nRepresent the given image.\n", "neg_image_path": "images/VisDial/Train/room.jpg"},
]


def test_mmeb_train_jsonl_import_and_export(tmp_path, png_bytes):
    root = tmp_path / "root"
    _write_images(root, png_bytes, MMEB_TRAIN_IMAGES)
    src = _write_jsonl(tmp_path / "mixed.jsonl", MMEB_TRAIN_JSONL)
    out_dir = tmp_path / "pairs"
    account = import_pairs(src, "mmeb-train", out_dir, quarantine_path=tmp_path / "q.parquet", image_root=root,
                           task="MMEB_mix")
    assert (account.rows_in, account.rows_out, account.rows_quarantined) == (3, 3, 0)
    rows = read_table(out_dir).to_pylist()
    assert [r["id"] for r in rows] == ["MMEB_mix:00000000", "MMEB_mix:00000001", "MMEB_mix:00000002"]
    assert {r["task"] for r in rows} == {"MMEB_mix"}

    assert rows[0]["query_text"] == ("<image>\nRepresent the given image with the following question: "
                                     "What color is the bus?\n")
    assert rows[0]["query_image_path"] == "images/VQAv2/Train/bus.jpg"
    assert rows[0]["pos_text"] == "Red" and not rows[0]["pos_image_path"]
    assert rows[0]["pos_score"] is None
    assert not rows[0]["neg_text"]  # no negative given

    assert not rows[1]["query_image_path"]
    assert rows[1]["pos_image_path"] == "images/MSCOCO_t2i/Train/dogs.jpg"
    assert rows[1]["neg_text"] == ["<image>\nRepresent the given image.\n"]
    assert rows[1]["neg_image_path"] == ["images/MSCOCO_t2i/Train/cats.jpg"]
    assert rows[1]["neg_score"] == [None]

    assert rows[2]["neg_text"] == ["tabby cat"] and not rows[2]["neg_image_path"][0]

    out = tmp_path / "exp" / "train.jsonl"
    assert export_pairs(out_dir, "mmeb-train", out) == 3
    assert _read_jsonl(out) == MMEB_TRAIN_JSONL
    assert _no_hidden_files(out.parent) == []


def test_mmeb_train_parquet_import_and_export(tmp_path, png_bytes):
    root = tmp_path / "root"
    _write_images(root, png_bytes, MMEB_TRAIN_IMAGES)
    src = tmp_path / "VisDial.parquet"
    pq.write_table(pa.Table.from_pylist(MMEB_TRAIN_PARQUET), src)
    out_dir = tmp_path / "pairs"
    account = import_pairs(src, "mmeb-train", out_dir, quarantine_path=tmp_path / "q.parquet", image_root=root)
    assert (account.rows_in, account.rows_out, account.rows_quarantined) == (2, 2, 0)
    rows = read_table(out_dir).to_pylist()
    # without a task argument the file name is the task
    assert [(r["id"], r["task"]) for r in rows] == [("VisDial:00000000", "VisDial"), ("VisDial:00000001", "VisDial")]
    assert rows[0]["query_text"] == MMEB_TRAIN_PARQUET[0]["qry"]
    assert rows[0]["pos_text"] == "<image>\nRepresent the given image.\n"
    assert rows[0]["pos_image_path"] == "images/VisDial/Train/room.jpg"
    assert rows[0]["neg_image_path"] == ["images/VisDial/Train/kitchen.jpg"]
    assert rows[1]["neg_image_path"] == ["images/VisDial/Train/room.jpg"]

    out = tmp_path / "visdial.jsonl"
    assert export_pairs(out_dir, "mmeb-train", out) == 2
    assert _read_jsonl(out) == MMEB_TRAIN_PARQUET


# ------------------------------------------------------------------------------------------ MMEB-eval
MMEB_EVAL_IMAGES = ["eval_images/ImageNet-1K/val_1.jpg", "eval_images/MSCOCO_t2i/c0.jpg",
                    "eval_images/MSCOCO_t2i/c1.jpg", "eval_images/MSCOCO_t2i/c2.jpg"]

MMEB_EVAL = [
    {"qry_text": "<|image_1|> Represent the given image for classification\n",
     "qry_img_path": "eval_images/ImageNet-1K/val_1.jpg",
     "tgt_text": ["golden retriever", "tabby cat", "goldfish", "tabby cat"], "tgt_img_path": ["", "", "", ""]},
    {"qry_text": "Find me an everyday image that matches the given caption: A red bus.",
     "qry_img_path": "",
     "tgt_text": ["<|image_1|>\nRepresent the given image.", "<|image_1|>\nRepresent the given image.",
                  "<|image_1|>\nRepresent the given image."],
     "tgt_img_path": ["eval_images/MSCOCO_t2i/c2.jpg", "eval_images/MSCOCO_t2i/c0.jpg",
                      "eval_images/MSCOCO_t2i/c1.jpg"]},
]


def test_mmeb_eval_import_and_export(tmp_path, png_bytes):
    root = tmp_path / "root"
    _write_images(root, png_bytes, MMEB_EVAL_IMAGES)
    src = _write_jsonl(tmp_path / "ImageNet-1K.jsonl", MMEB_EVAL)
    out_dir = tmp_path / "pairs"
    account = import_pairs(src, "mmeb-eval", out_dir, quarantine_path=tmp_path / "q.parquet", image_root=root)
    assert (account.rows_in, account.rows_out, account.rows_quarantined) == (2, 2, 0)
    rows = read_table(out_dir).to_pylist()
    assert [(r["id"], r["task"]) for r in rows] == [("ImageNet-1K:00000000", "ImageNet-1K"),
                                                    ("ImageNet-1K:00000001", "ImageNet-1K")]
    r0, r1 = rows
    assert r0["query_text"] == "<image> Represent the given image for classification\n"
    assert r0["query_image_path"] == "eval_images/ImageNet-1K/val_1.jpg"
    assert r0["pos_text"] == "golden retriever" and not r0["pos_image_path"]  # ground truth first
    assert r0["neg_text"] == ["tabby cat", "goldfish", "tabby cat"]  # the rest, in order, repeats kept
    assert r0["pos_score"] is None and r0["neg_score"] == [None, None, None]
    assert all(isinstance(i, str) and i for i in r0["neg_id"])
    assert r0["neg_id"][0] == r0["neg_id"][2] != r0["neg_id"][1]  # same candidate, same id
    assert r0["pos_id"] not in r0["neg_id"]

    assert r1["pos_text"] == "<image>\nRepresent the given image."
    assert r1["pos_image_path"] == "eval_images/MSCOCO_t2i/c2.jpg"
    assert r1["neg_image_path"] == ["eval_images/MSCOCO_t2i/c0.jpg", "eval_images/MSCOCO_t2i/c1.jpg"]
    assert len(set(r1["neg_id"] + [r1["pos_id"]])) == 3  # same text, different images -> different ids

    out = tmp_path / "eval_out.jsonl"
    assert export_pairs(out_dir, "mmeb-eval", out) == 2
    assert _read_jsonl(out) == MMEB_EVAL


# ------------------------------------------------------------------------------------------ quarantine
GOOD = {"query_text": AOKVQA_Q, "query_image": "images/A-OKVQA/Train/good.jpg", "pos_text": "shade",
        "pos_image": "", "query_pos_scores": 0.5, "hard_negatives": [["sun", ""], ["rain", ""]],
        "hard_negatives_scores": [0.25, 0.75]}


def _rec(**changes):
    r = dict(GOOD)
    r.update(changes)
    return r


# (record or raw line, expected quarantine field, a word the reason must contain); None marks a good row
BAD_ROWS = [
    (GOOD, None, None),                                                                           # 0
    (_rec(query_image="images/Bad/Train/corrupt.jpg"), "query_image_path", "cannot decode"),     # 1
    (_rec(pos_image="images/Bad/Train/missing.jpg", pos_text=IMG_CAND), "pos_image_path", "not found"),  # 2
    (_rec(query_image="images/Bad/Train/truncated.png"), "query_image_path", "cannot decode"),   # 3
    (_rec(query_text="", query_image=""), "query_text", "empty"),                                  # 4
    (_rec(query_text=5), "query_text", "expected"),                                                # 5
    (_rec(hard_negatives_scores="x"), "hard_negatives_scores", "expected"),                        # 6
    (["not", "an", "object"], "<row>", "expected an object"),                                      # 7
    (_rec(hard_negatives_scores=[0.25]), "hard_negatives_scores", "1 scores for 2"),               # 8
    (_rec(hard_negatives_scores=[0.25, 1.5]), "neg_score[1]", "outside"),                          # 9
    (_rec(query_pos_scores=float("nan")), "pos_score", "outside"),                                 # 10
    (_rec(query_text="<|image_1|>\nRepresent the given image\n", query_image=""), "query_text", "marker"),  # 11
    ('{"query_text": "unterminated', "<row>", "line 13"),                                          # 12
    (_rec(hard_negatives=[["<|image_1|>\nRepresent the given image.\n", "images/Bad/Train/gone.jpg"],
                          ["rain", ""]]), "neg_0.image_path", "not found"),                        # 13
    (_rec(pos_text="sunshine"), None, None),                                                      # 14
]


@pytest.fixture
def bad_setup(tmp_path, png_bytes):
    root = tmp_path / "root"
    _write_images(root, png_bytes, ["images/A-OKVQA/Train/good.jpg"])
    bad = root / "images/Bad/Train"
    bad.mkdir(parents=True)
    (bad / "corrupt.jpg").write_bytes(os.urandom(2048))
    full = png_bytes(64, 48, 7, "PNG")
    (bad / "truncated.png").write_bytes(full[: len(full) // 2])
    src = _write_jsonl(tmp_path / "scores.jsonl", [entry for entry, _, _ in BAD_ROWS])
    return src, root


def _import_bad(tmp_path, src, root):
    out_dir, qpath = tmp_path / "pairs", tmp_path / "quarantine.parquet"
    account = import_pairs(src, "official", out_dir, quarantine_path=qpath, image_root=root)
    return account, out_dir, pq.read_table(qpath).to_pylist()


def test_bad_rows_are_quarantined_with_reasons(tmp_path, bad_setup):
    src, root = bad_setup
    account, out_dir, entries = _import_bad(tmp_path, src, root)
    n_bad = sum(1 for _, f, _ in BAD_ROWS if f is not None)
    assert account.rows_in == len(BAD_ROWS) == account.rows_out + account.rows_quarantined
    assert (account.rows_out, account.rows_quarantined) == (2, n_bad)
    assert sum(account.reasons.values()) == n_bad

    # the good rows all come out, untouched
    rows = read_table(out_dir).to_pylist()
    assert [r["id"] for r in rows] == ["official:00000000", "official:00000014"]
    assert [r["pos_text"] for r in rows] == ["shade", "sunshine"]

    assert len(entries) == n_bad
    assert {e["source"] for e in entries} == {str(src)}
    got = sorted((e["field"], e["reason"]) for e in entries)
    want = sorted((f, w) for _, f, w in BAD_ROWS if f is not None)
    assert [g[0] for g in got] == [w[0] for w in want]
    for (field, reason), (_, word) in zip(got, want):
        assert word in reason, (field, reason, word)
    by_field = {}
    for e in entries:
        by_field.setdefault(e["field"], []).append(e)
    assert "image file not found" in by_field["pos_image_path"][0]["reason"]
    assert "missing.jpg" in by_field["pos_image_path"][0]["reason"]
    assert "gone.jpg" in by_field["neg_0.image_path"][0]["reason"]
    # every entry keeps the offending record as JSON
    for e in entries:
        json.loads(e["record"])
    row_entries = {e["reason"].split(":")[0]: e for e in by_field["<row>"]}
    assert json.loads(row_entries["expected an object, got list"]["record"]) == ["not", "an", "object"]
    assert "__invalid_json__" in json.loads(row_entries["line 13"]["record"])
    assert row_entries["line 13"]["row"] == 12 and row_entries["line 13"]["id"] is None
    # rows the converter could read carry their id, and that id names the input record
    assert by_field["pos_score"][0]["id"] == "official:00000010"
    assert by_field["neg_score[1]"][0]["id"] == "official:00000009"


def test_quarantine_row_numbers_name_the_input_record(tmp_path, bad_setup):
    src, root = bad_setup
    _, _, entries = _import_bad(tmp_path, src, root)
    assert sorted(e["row"] for e in entries) == [i for i, (_, f, _) in enumerate(BAD_ROWS) if f is not None]
    for e in entries:
        if e["id"]:
            assert e["id"] == f"official:{e['row']:08d}"


def test_duplicate_id_in_canonical_input(tmp_path, png_bytes):
    def row(rid, text):
        r = empty_row(PAIR_SCHEMA)
        r.update(id=rid, task="dup", query_text=text, pos_text="answer")
        return r

    src = tmp_path / "canonical_in"
    write_rows([row("c:0", "first"), row("c:1", "second"), row("c:0", "third")], src, PAIR_SCHEMA)
    out_dir, qpath = tmp_path / "pairs", tmp_path / "q.parquet"
    account = import_pairs(src, "canonical", out_dir, quarantine_path=qpath)
    assert (account.rows_in, account.rows_out, account.rows_quarantined) == (3, 2, 1)
    assert [(r["id"], r["query_text"]) for r in iter_rows(out_dir)] == [("c:0", "first"), ("c:1", "second")]
    (entry,) = pq.read_table(qpath).to_pylist()
    assert (entry["row"], entry["id"], entry["field"], entry["reason"]) == (2, "c:0", "id", "duplicate id")
    assert entry["source"] == str(src)
    assert json.loads(entry["record"])["query_text"] == "third"


def test_data_error_message_names_file_row_and_field(tmp_path):
    e = DataError("data/train.jsonl", 7, "query_image_path", "image file not found: x.jpg", "official:00000007")
    assert str(e) == ("data/train.jsonl, row 7 (id='official:00000007'), field 'query_image_path': "
                      "image file not found: x.jpg")
    assert str(DataError("a.json", None, "<file>", "not valid JSON")) == "a.json, field '<file>': not valid JSON"

    row = empty_row(PAIR_SCHEMA)
    row.update(id="r1", task="t", query_text="<image> what?", query_image_path="nope/missing.jpg", pos_text="a")
    with pytest.raises(DataError) as ei:
        validate_row(row, "pairs", source="in.parquet", index=3, image_root=tmp_path)
    msg = str(ei.value)
    assert msg.startswith("in.parquet, row 3 (id='r1'), field 'query_image_path': ")
    assert "missing.jpg" in msg
    assert (ei.value.source, ei.value.row, ei.value.field, ei.value.row_id) == ("in.parquet", 3,
                                                                                 "query_image_path", "r1")


def test_whole_file_errors(tmp_path):
    not_list = tmp_path / "obj.json"
    not_list.write_text('{"query_text": "x"}', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON list"):
        import_pairs(not_list, "official", tmp_path / "p", quarantine_path=tmp_path / "q.parquet")
    broken = tmp_path / "broken.json"
    broken.write_text("[{", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        import_pairs(broken, "official", tmp_path / "p2", quarantine_path=tmp_path / "q2.parquet")
    missing = tmp_path / "nothing_here.json"
    with pytest.raises(FileNotFoundError, match="nothing_here.json"):
        import_pairs(missing, "official", tmp_path / "p3", quarantine_path=tmp_path / "q3.parquet")
    with pytest.raises(ValueError, match="unknown input format"):
        import_pairs(not_list, "csv", tmp_path / "p4", quarantine_path=tmp_path / "q4.parquet")


# ------------------------------------------------------------------------------------------ markers
@pytest.mark.parametrize("text, canonical", [
    ("<|image_1|>\nRepresent the given image.", "<image>\nRepresent the given image."),
    ("<|image_2|> and <|image_1|>", "<image> and <image>"),
    ("<|image_12|>x", "<image>x"),
    ("no marker here", "no marker here"),
    ("<|image|> <|image_a|> <image_1>", "<|image|> <|image_a|> <image_1>"),
    ("", ""),
])
def test_to_canonical_text(text, canonical):
    assert to_canonical_text(text) == canonical


def test_from_canonical_text():
    assert from_canonical_text("<image>\nRepresent the given image.") == "<|image_1|>\nRepresent the given image."
    assert from_canonical_text("<image> q", marker="<|image_2|>") == "<|image_2|> q"
    assert from_canonical_text("plain") == "plain"
    s = "<|image_1|>\nRepresent the given image with the following question: What is prohibited in the shade?\n"
    assert from_canonical_text(to_canonical_text(s)) == s


# ------------------------------------------------------------------------------------------ io
def _cand(i: int) -> dict:
    return {"id": f"c{i}", "task": "t", "instruction": "", "text": f"item {i}", "image": None, "image_path": None}


def test_shard_writer_splits_rows_and_readers_agree(tmp_path):
    out = tmp_path / "cands"
    with ShardWriter(out, CANDIDATE_SCHEMA, rows_per_shard=3) as writer:
        for i in range(7):
            writer.write(_cand(i))
    assert writer.rows_written == 7
    names = sorted(p.name for p in out.iterdir())
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # no temporaries
    assert [p.name for p in writer.paths] == names
    assert [pq.ParquetFile(out / n).metadata.num_rows for n in names] == [3, 3, 1]

    ids = [f"c{i}" for i in range(7)]
    table = read_table(out)
    assert table.num_rows == 7 and table.column("id").to_pylist() == ids
    assert table.schema.names == CANDIDATE_SCHEMA.names
    assert [r["id"] for r in iter_rows(out)] == ids
    assert [r["id"] for r in iter_rows(out, batch_size=2)] == ids
    assert list(iter_rows(out, columns=["text"])) == [{"text": f"item {i}"} for i in range(7)]
    assert count_rows(out) == 7
    assert count_rows(out / "part-00001.parquet") == 3
    assert [r["id"] for r in iter_rows(out / "part-00002.parquet")] == ["c6"]

    assert write_rows([_cand(i) for i in range(4)], tmp_path / "w", CANDIDATE_SCHEMA, rows_per_shard=2) == 4
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    with pytest.raises(ValueError):
        ShardWriter(tmp_path / "z", CANDIDATE_SCHEMA, rows_per_shard=0)


def test_reading_a_missing_table_names_the_path(tmp_path):
    missing = tmp_path / "no_such_table"
    for reader in (read_table, count_rows, lambda p: list(iter_rows(p))):
        with pytest.raises(FileNotFoundError) as ei:
            reader(missing)
        assert str(missing) in str(ei.value)


# ------------------------------------------------------------------------------------------ validate_row
def test_validate_row_inline_image_bytes_and_candidates(tmp_path, png_bytes):
    img = png_bytes(20, 10, 3)
    row = empty_row(PAIR_SCHEMA)
    row.update(id="inline:0", task="demo", query_text="<image>\nWhat is shown?", query_image=img,
               pos_text="random noise", pos_score=0.9,
               neg_id=[None], neg_instruction=[""], neg_text=["<image>"], neg_image=[png_bytes(8, 8, 4, "JPEG")],
               neg_image_path=[None], neg_score=[0.1])
    validate_row(row, "pairs", source="mem", index=0)  # no image root needed
    validate_row(row, "pairs", source="mem", index=0, image_root=tmp_path / "does_not_exist")

    # survives a Parquet round trip unchanged and still validates
    write_rows([row], tmp_path / "t", PAIR_SCHEMA)
    (back,) = list(iter_rows(tmp_path / "t"))
    assert back["query_image"] == img
    validate_row(back, "pairs", source="t", index=0)

    bad = dict(row, query_image=b"definitely not an image")
    with pytest.raises(DataError) as ei:
        validate_row(bad, "pairs", source="mem", index=0)
    assert ei.value.field == "query_image" and "cannot decode" in ei.value.reason

    cand = {"id": "cand:0", "task": "demo", "instruction": "Represent the given image.", "text": "<image>",
            "image": img, "image_path": None}
    validate_row(cand, "candidates", source="pool", index=0)
    validate_row(_cand(0), "candidates", source="pool", index=1)
    with pytest.raises(DataError) as ei:
        validate_row(dict(_cand(0), text=""), "candidates", source="pool", index=2)
    assert ei.value.field == "text"
    with pytest.raises(DataError) as ei:
        validate_row(dict(_cand(0), text="<image> caption"), "candidates", source="pool", index=3)
    assert ei.value.field == "text" and "marker" in ei.value.reason


# ------------------------------------------------------------------------------------------ MMEB-train folders
def _mmeb_row(q: str, pos: str = "<|image_1|>\nRepresent the given image.\n",
              pos_img: str = "images/VisDial/Train/room.jpg") -> dict:
    return {"qry": q, "qry_image_path": "", "pos_text": pos, "pos_image_path": pos_img}


def _mmeb_train_folder(root: Path, png_bytes) -> Path:
    """The published layout: <Subset>/<split>-NNNNN-of-NNNNN.parquet, plus the images folder beside them."""
    _write_images(root, png_bytes, ["images/VisDial/Train/room.jpg", "images/NIGHTS/Train/a.png"])
    data = root / "MMEB-train"
    nights = data / "NIGHTS"
    nights.mkdir(parents=True)
    for split in ("train", "original", "diverse_instruction"):   # train == original; one is read, not both
        pq.write_table(pa.Table.from_pylist([_mmeb_row(f"{split} q{i}", "<|image_1|>\nRepresent the image.\n",
                                                       "images/NIGHTS/Train/a.png") for i in range(2)]),
                       nights / f"{split}-00000-of-00001.parquet")
    visdial = data / "VisDial"
    visdial.mkdir()
    pq.write_table(pa.Table.from_pylist([_mmeb_row("v0"), _mmeb_row("v1")]), visdial / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist([_mmeb_row("v2"), {**_mmeb_row("v3"), "qry": None},   # bad row: no query
                                         _mmeb_row("v4", pos_img="images/VisDial/Train/missing.jpg")]),  # no image
                   visdial / "train-00001-of-00002.parquet")
    (data / "README.md").write_text("not data")
    return data


def test_mmeb_train_folder_imports_every_subset_named_after_its_folder(tmp_path, png_bytes):
    data = _mmeb_train_folder(tmp_path, png_bytes)
    (data / "images").mkdir()                       # an image folder among the subsets is not a subset
    (data / "images" / "x.jpg").write_bytes(png_bytes(8, 8, 1, "JPEG"))
    out, q = tmp_path / "pairs", tmp_path / "q.parquet"
    account = import_pairs(data, "mmeb-train", out, quarantine_path=q, image_root=tmp_path)
    assert (account.rows_in, account.rows_out, account.rows_quarantined) == (7, 5, 2)   # in = out + quarantined
    rows = read_table(out).to_pylist()
    assert [(r["task"], r["id"], r["query_text"]) for r in rows] == [
        ("NIGHTS", "NIGHTS:00000000", "train q0"), ("NIGHTS", "NIGHTS:00000001", "train q1"),   # the train split
        ("VisDial", "VisDial:00000000", "v0"), ("VisDial", "VisDial:00000001", "v1"),
        ("VisDial", "VisDial:00000002", "v2")]             # ids run on across the subset's two files
    bad = pq.read_table(q).to_pylist()
    assert [(Path(b["source"]).name, b["row"], b["field"]) for b in bad] == [
        ("train-00001-of-00002.parquet", 1, "qry"), ("train-00001-of-00002.parquet", 2, "pos_image_path")]
    assert "not found" in bad[1]["reason"] and bad[1]["id"] == "VisDial:00000004"

    # another split, chosen by name; a split a subset lacks is an error naming it
    account = import_pairs(data / "NIGHTS", "mmeb-train", tmp_path / "div", quarantine_path=q, image_root=tmp_path,
                           mmeb_split="diverse_instruction")
    assert account.rows_out == 2
    assert {r["query_text"] for r in read_table(tmp_path / "div").to_pylist()} == {"diverse_instruction q0",
                                                                                  "diverse_instruction q1"}
    with pytest.raises(FileNotFoundError, match="no files of split 'diverse_instruction'.*splits: train"):
        import_pairs(data, "mmeb-train", tmp_path / "x", quarantine_path=q, mmeb_split="diverse_instruction")
    with pytest.raises(ValueError, match="each named after its folder"):
        import_pairs(data, "mmeb-train", tmp_path / "x", quarantine_path=q, task="Mixed")
    # one published file: the task is its subset folder, not the file stem "train-00000-of-00001"
    import_pairs(data / "NIGHTS" / "train-00000-of-00001.parquet", "mmeb-train", tmp_path / "one",
                 quarantine_path=q, image_root=tmp_path)
    assert {r["task"] for r in read_table(tmp_path / "one").to_pylist()} == {"NIGHTS"}


def test_prepare_cli_mmeb_train_folder_and_max_records(tmp_path, png_bytes, capsys):
    from unime_ray.cli import build_parser

    data = _mmeb_train_folder(tmp_path, png_bytes)
    args = build_parser().parse_args(["prepare", "--input", str(data), "--format", "mmeb-train", "--out",
                                      str(tmp_path / "pairs"), "--image-root", str(tmp_path)])
    assert args.func(args) == 0
    assert "in=7 out=5 quarantined=2" in capsys.readouterr().out
    assert {r["task"] for r in read_table(tmp_path / "pairs").to_pylist()} == {"NIGHTS", "VisDial"}
    args = build_parser().parse_args(["prepare", "--input", str(data), "--format", "mmeb-train", "--out",
                                      str(tmp_path / "first3"), "--image-root", str(tmp_path), "--max-records", "3"])
    assert args.func(args) == 0
    assert [r["id"] for r in read_table(tmp_path / "first3").to_pylist()] == [
        "NIGHTS:00000000", "NIGHTS:00000001", "VisDial:00000000"]


# ------------------------------------------------------------------------------------------ retrieval sets
def test_official_flickr_coco_test_parquet_is_retrieval_data(tmp_path, png_bytes):
    """royokong/flickr30k_test and coco_test: ``image`` (HF Image struct) + ``text`` (list of 5 captions)."""
    from unime_ray.data.convert.retrieval import RETRIEVAL_SCHEMA
    from unime_ray.eval.retrieval import load_retrieval_set

    caps = lambda i: [f"caption {j} of image {i}" for j in range(5)]   # noqa: E731
    good = [{"image": {"bytes": png_bytes(30, 20, i, "JPEG"), "path": f"{i}.jpg"}, "text": caps(i)} for i in range(3)]
    records = good + [{"image": {"bytes": b"not a jpeg", "path": "bad.jpg"}, "text": caps(3)},   # undecodable
                      {"image": {"bytes": png_bytes(30, 20, 4), "path": "4.jpg"}, "text": []},   # no captions
                      {"image": None, "text": caps(5)},                                         # no image
                      {"image": {"bytes": png_bytes(30, 20, 6), "path": "6.jpg"}, "text": ["ok", " "]}]  # empty one
    src = tmp_path / "flickr30k_test" / "data" / "test-00000-of-00001.parquet"
    src.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(records), src)
    out, q = tmp_path / "flickr30k", tmp_path / "q.parquet"
    account = import_pairs(src, "retrieval", out, quarantine_path=q, task="flickr30k")
    assert (account.rows_in, account.rows_out, account.rows_quarantined) == (7, 3, 4)
    assert read_table(out).schema.equals(RETRIEVAL_SCHEMA)
    rows = read_table(out).to_pylist()
    assert [r["id"] for r in rows] == ["flickr30k:00000000", "flickr30k:00000001", "flickr30k:00000002"]
    assert rows[1]["image"] == good[1]["image"]["bytes"] and rows[1]["image_path"] is None
    assert rows[2]["captions"] == caps(2)
    bad = pq.read_table(q).to_pylist()
    assert [(b["row"], b["field"]) for b in bad] == [(3, "image"), (4, "text"), (5, "image"), (6, "text[1]")]
    assert "cannot decode" in bad[0]["reason"] and "empty caption" in bad[3]["reason"]
    # the converted table and the raw official file (its good rows) are both retrieval eval data, 5 per image
    for path in (out, _official_good_only(tmp_path, good)):
        rset = load_retrieval_set(path, captions_per_image=5)
        assert len(rset.images) == 3 and len(rset.captions) == 15
        assert rset.caption_image.tolist() == [i // 5 for i in range(15)]
        assert rset.captions[7].text == "caption 2 of image 1" and rset.images[2].image == good[2]["image"]["bytes"]


def _official_good_only(tmp_path: Path, good: list[dict]) -> Path:
    path = tmp_path / "coco_test.parquet"
    pq.write_table(pa.Table.from_pylist(good), path)
    return path


SHAREGPT4V = [
    {"id": "000000000009", "image": "coco/train2017/000000000009.jpg",
     "conversations": [{"from": "human", "value": "<image>\nWhat is this photo about? Please answer in great detail."},
                       {"from": "gpt", "value": "The image shows a lunch box.\n\nIt holds broccoli,\nbread and fruit."}]},
    {"id": "sa_1", "image": "sam/images/sa_1.jpg",
     "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A street at night."}]},
    {"id": "sa_2", "image": "sam/images/missing.jpg",                                    # image file missing
     "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A dog."}]},
    {"id": "sa_3", "image": "sam/images/sa_1.jpg", "conversations": [{"from": "human", "value": "<image>"}]},  # no answer
    {"id": "sa_4", "image": "sam/images/sa_1.jpg",
     "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "beyond the first 4"}]},
]


def test_sharegpt4v_json_and_caption_records(tmp_path, png_bytes):
    from unime_ray.eval.retrieval import load_retrieval_set

    root = tmp_path / "data"
    _write_images(root, png_bytes, ["coco/train2017/000000000009.jpg", "sam/images/sa_1.jpg"])
    src = tmp_path / "share-captioner_coco_lcs_sam_1246k_1107.json"
    src.write_text(json.dumps(SHAREGPT4V))
    out, q = tmp_path / "sharegpt4v", tmp_path / "q.parquet"
    account = import_pairs(src, "sharegpt4v", out, quarantine_path=q, image_root=root, task="sharegpt4v",
                           max_records=4)   # the protocol's "first 1000", here the first 4
    assert (account.rows_in, account.rows_out, account.rows_quarantined) == (4, 2, 2)
    rows = read_table(out).to_pylist()
    assert [(r["id"], r["image_path"]) for r in rows] == [
        ("sharegpt4v:000000000009", "coco/train2017/000000000009.jpg"), ("sharegpt4v:sa_1", "sam/images/sa_1.jpg")]
    assert rows[0]["captions"] == ["The image shows a lunch box. It holds broccoli, bread and fruit."]
    bad = pq.read_table(q).to_pylist()
    assert [(b["row"], b["field"]) for b in bad] == [(2, "image_path"), (3, "conversations")]
    rset = load_retrieval_set(out, image_root=root, captions_per_image=1)
    assert len(rset.images) == len(rset.captions) == 2 and rset.caption_image.tolist() == [0, 1]

    # the fallback layouts: JSONL {image, caption} records, and a Parquet with image + caption columns
    plain = [{"image": "sam/images/sa_1.jpg", "caption": "A street\nat night."},
             {"image": "coco/train2017/000000000009.jpg", "caption": ""}]
    _write_jsonl(tmp_path / "plain.jsonl", plain)
    pq.write_table(pa.Table.from_pylist(plain), tmp_path / "plain.parquet")
    for name, fmt in (("plain.jsonl", "sharegpt4v"), ("plain.parquet", "sharegpt4v"), ("plain.parquet", "retrieval")):
        account = import_pairs(tmp_path / name, fmt, tmp_path / "p", quarantine_path=q, image_root=root)
        assert (account.rows_in, account.rows_out, account.rows_quarantined) == (2, 1, 1), (name, fmt)
        (row,) = read_table(tmp_path / "p").to_pylist()
        assert row["id"] == "plain:00000000" and row["image_path"] == "sam/images/sa_1.jpg"
        assert row["captions"] == (["A street at night."] if fmt == "sharegpt4v" else ["A street\nat night."])


def test_urban1k_folder(tmp_path, png_bytes):
    from unime_ray.eval.retrieval import load_retrieval_set

    u = tmp_path / "unzipped" / "Urban1k"
    _write_images(u, png_bytes, ["image/1.jpg", "image/2.jpg", "image/3.jpg"])
    (u / "caption").mkdir()
    (u / "caption" / "1.txt").write_text("A busy street with red buses.\nsecond line is ignored\n")
    (u / "caption" / "2.txt").write_text("Tall glass towers at dusk.")
    (u / "caption" / "3.txt").write_text("\nthe first line is empty")       # empty caption
    (u / "caption" / "4.txt").write_text("A caption without its image.")   # image missing
    q = tmp_path / "q.parquet"
    account = import_pairs(tmp_path / "unzipped", "urban1k", tmp_path / "urban1k", quarantine_path=q,
                           image_root=tmp_path / "unzipped")     # the zip's folder, found inside
    assert (account.rows_in, account.rows_out, account.rows_quarantined) == (4, 2, 2)
    rows = read_table(tmp_path / "urban1k").to_pylist()
    assert [(r["id"], r["image_path"], r["captions"]) for r in rows] == [
        ("unzipped:1", "Urban1k/image/1.jpg", ["A busy street with red buses."]),
        ("unzipped:2", "Urban1k/image/2.jpg", ["Tall glass towers at dusk."])]
    bad = pq.read_table(q).to_pylist()
    assert [(b["row"], b["field"], b["id"]) for b in bad] == [(2, "caption[0]", "unzipped:3"),
                                                             (3, "image_path", "unzipped:4")]
    rset = load_retrieval_set(tmp_path / "urban1k", image_root=tmp_path / "unzipped", captions_per_image=1)
    assert len(rset.images) == 2 and rset.captions[1].text == "Tall glass towers at dusk."
    # without an image root the paths are absolute, so the table works from anywhere
    import_pairs(u, "urban1k", tmp_path / "abs", quarantine_path=q, task="urban1k")
    first = read_table(tmp_path / "abs").to_pylist()[0]
    assert first["id"] == "urban1k:1" and Path(first["image_path"]).is_absolute()
    with pytest.raises(DataError, match="not an Urban1K folder"):
        import_pairs(tmp_path, "urban1k", tmp_path / "x", quarantine_path=q)
    from unime_ray.data.convert import import_table

    with pytest.raises(ValueError, match="retrieval table"):
        import_table(u, "urban1k", tmp_path / "x", quarantine_path=q, kind="candidates")


def test_mmeb_eval_folder_imports_every_subset_named_after_its_folder(tmp_path, png_bytes):
    """The published MMEB-eval layout, <Subset>/test-NNNNN-of-NNNNN.parquet, gave 0 rows before (exit 0)."""
    from unime_ray.cli import build_parser

    root = tmp_path / "root"
    _write_images(root, png_bytes, MMEB_EVAL_IMAGES)
    data = tmp_path / "MMEB-eval"
    for subset, rec in (("ImageNet-1K", MMEB_EVAL[0]), ("MSCOCO_t2i", MMEB_EVAL[1])):
        (data / subset).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([rec]), data / subset / "test-00000-of-00001.parquet")
    args = build_parser().parse_args(["prepare", "--input", str(data), "--format", "mmeb-eval", "--out",
                                      str(tmp_path / "pairs"), "--image-root", str(root)])
    assert args.func(args) == 0
    assert [(r["task"], r["id"]) for r in read_table(tmp_path / "pairs").to_pylist()] == [
        ("ImageNet-1K", "ImageNet-1K:00000000"), ("MSCOCO_t2i", "MSCOCO_t2i:00000000")]


@pytest.mark.parametrize("fmt", ["official", "mmeb-train", "mmeb-eval", "canonical", "retrieval", "sharegpt4v",
                                 "urban1k"])
@pytest.mark.parametrize("given", ["empty folder", "empty file", "other files"])
def test_an_input_without_records_fails_loudly(tmp_path, fmt, given, capsys):
    """Every importer: an input that yields no records is an error (exit code 2, one line naming the input), not
    an empty table a run would train or evaluate on."""
    from unime_ray.cli import main

    src = tmp_path / "in"
    src.mkdir()
    if given == "empty file":
        src = src / ("data.json" if fmt in ("official", "sharegpt4v") else "data.jsonl")
        src.write_text("[]" if src.suffix == ".json" else "")
    elif given == "other files":
        (src / "README.md").write_text("no data here")
        (src / "images").mkdir()
    code = main(["prepare", "--input", str(src), "--format", fmt, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and str(src.name) in err, err
    assert not list((tmp_path / "out").glob("*.parquet"))          # no table to mistake for data
