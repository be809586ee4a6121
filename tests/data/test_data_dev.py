"""The development split: whole image groups held out of the training pairs, dev rows in MMEB-eval form, and the
prepare stage's accounting (in = out + quarantined + held out)."""

from __future__ import annotations


from unime_ray.data.dev import dev_pairs, group_key, in_dev, split_dev
from unime_ray.data.schema import PAIR_SCHEMA, empty_row, item_from_row, negatives_from_row

from ..conftest import make_png


def _rows(n=60):
    """Per image: an image -> name row, its name -> image twin, and an image -> label row (10 labels)."""
    rows = []
    for i in range(n):
        img = make_png(20, 20, seed=i)
        for task, fields in (("i2t", dict(query_image=img, pos_text=f"name {i}")),
                             ("t2i", dict(query_text=f"name {i}", pos_image=img)),
                             ("cls", dict(query_image=img, pos_text=f"label {i % 10}", pos_id=f"label-{i % 10}"))):
            row = empty_row(PAIR_SCHEMA)
            row.update(id=f"{task}-{i}", task=task, **fields)
            rows.append(row)
    return rows


def test_split_keeps_whole_image_groups_together():
    rows = _rows()
    train, dev = split_dev(rows, 0.2, seed=0)
    assert len(train) + len(dev) == len(rows) and 0 < len(dev) < len(rows) / 2
    dev_groups = {group_key(r) for r in dev}
    assert not dev_groups & {group_key(r) for r in train}                # no image on both sides
    assert all(len([r for r in dev if group_key(r) == g]) == 3 for g in dev_groups)   # its three rows together
    assert split_dev(rows, 0.2, seed=0)[1] == dev and split_dev(rows, 0.2, seed=1)[1] != dev
    assert not any(in_dev(f"k{i}", 0.0, 0) for i in range(100))
    assert group_key({"query_text": "only text"}) == "text:only text"


def test_dev_rows_are_eval_rows_with_distinct_candidates_of_their_task():
    _, dev = split_dev(_rows(), 0.3, seed=0)
    out = dev_pairs(dev, candidates=5, seed=0)
    assert len(out) == len(dev)
    for row in out:
        gt = item_from_row(row, "pos_")
        negs = [item for item, _, _ in negatives_from_row(row)]
        same_task = [item_from_row(r, "pos_").content_key() for r in dev if r["task"] == row["task"]]
        assert len(negs) == min(4, len(set(same_task)) - 1)
        keys = [n.content_key() for n in negs]
        assert gt.content_key() not in keys and len(set(keys)) == len(keys) and set(keys) <= set(same_task)
    # one id per content: every cls row whose label is "label 3" names it by the same id, as a positive or not
    ids = {}
    for row in out:
        for item, _, nid in [(item_from_row(row, "pos_"), None, row["pos_id"])] + negatives_from_row(row):
            ids.setdefault(item.content_key(), set()).add(nid)
    assert all(len(v) == 1 for v in ids.values())


def test_prepare_holds_out_dev_pairs_and_accounts_for_every_row(tmp_path):
    from unime_ray.run.config import load_run_config
    from unime_ray.run.runner import run_pipeline

    cfg = load_run_config(preset="synthetic", overrides=[f"run_dir={tmp_path / 'run'}", "data.max_items=40",
                                                         "data.dev_fraction=0.25", "data.dev_candidates=6"])
    run_pipeline(cfg, only=["data", "prepare"])
    import json

    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    tables = stages["prepare"]["outputs"]["tables"]
    train, dev = tables["train_pairs"], tables["dev_pairs"]
    assert train["rows_in"] == train["rows_out"] + train["rows_quarantined"] + train["rows_held_out"]
    assert dev["rows_out"] == train["rows_held_out"] > 0
    from unime_ray.data.io import count_rows, iter_rows

    assert count_rows(train["path"]) == train["rows_out"] and count_rows(dev["path"]) == dev["rows_out"]
    dev_groups = {group_key(r) for r in iter_rows(dev["path"])}
    assert not dev_groups & {group_key(r) for r in iter_rows(train["path"])}
