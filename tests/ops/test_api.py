"""The Python API: inputs as users hold them, encode / score / rerank on plain values, mining checked against
an independent brute-force implementation of the rule, the docstring examples, and examples/python_api.py."""

from __future__ import annotations

import doctest
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import unime_ray
from unime_ray.data.io import read_table
from unime_ray.data.schema import Item

from ..conftest import make_png

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ inputs
def _rows(png):
    return [{"query": "a red circle", "positive": "red circle", "task": "shapes"},
            {"query": "", "query_image": png, "positive": "green star", "id": "q2"},
            {"query_text": "blue square", "pos_text": "blue square", "pos_image_path": "missing.png"},
            {"query": "", "positive": "nothing to ask"},
            {"query": "a dog", "positive": "dog", "colour": "red"}]


def test_load_table_accepts_every_form_and_accounts_for_every_row(tmp_path):
    png = make_png(20, 20)
    rows = _rows(png)
    import pandas as pd

    frame = pd.DataFrame(rows)        # every row gets every column (NaN / None where it had none)
    forms = {"list": rows, "arrow": pa.Table.from_pandas(frame, preserve_index=False), "pandas": frame}
    datasets = pytest.importorskip("datasets")
    forms["datasets"] = datasets.Dataset.from_pandas(frame, preserve_index=False)
    for name, data in forms.items():
        out, account = unime_ray.load_table(data, tmp_path / name)
        assert (account.rows_in, account.rows_out, account.rows_quarantined) == (5, 2, 3), (name, account.summary())
        t = read_table(out).to_pylist()
        assert [r["id"] for r in t] == ["row-0", "q2"], name
        assert t[0]["task"] == "shapes" and t[1]["task"] == "default"
        assert t[1]["query_image"] == png and t[1]["pos_text"] == "green star"
        assert t[0]["pos_id"] == Item(text="red circle").content_key()
        bad = read_table(tmp_path / f"{name}.quarantine.parquet").to_pylist()
        reasons = {b["row"]: (b["field"], b["reason"]) for b in bad}
        assert reasons[2] == ("pos_image_path", reasons[2][1]) and "not found" in reasons[2][1]
        assert reasons[3][0] == "query_text" and "empty" in reasons[3][1]
        assert reasons[4][0] == "colour" and "unknown column" in reasons[4][1]


def test_load_table_maps_columns_and_reads_pil_and_hf_images(tmp_path):
    from PIL import Image

    pil = Image.new("RGB", (12, 9), (200, 10, 10))
    rows = [{"question": "what colour?", "answer": "red", "picture": pil},
            {"question": "and this?", "answer": "blue", "picture": {"bytes": make_png(8, 8), "path": None}}]
    out, account = unime_ray.load_table(rows, tmp_path / "t", columns={"question": "query", "answer": "positive",
                                                                         "picture": "query_image"})
    assert account.rows_out == 2
    t = read_table(out).to_pylist()
    assert Image.open(io.BytesIO(t[0]["query_image"])).size == (12, 9)
    # a finished table is reused as it is (the account too), so a rerun converts nothing twice
    again, acc2 = unime_ray.load_table([], tmp_path / "t")
    assert again == out and acc2.rows_out == 2


def test_to_items_broadcasts_and_rejects_mismatches():
    png = make_png(10, 10)
    items = unime_ray.to_items(["a", "b"], images=[None, png], instructions="Find:")
    assert items == [Item(text="a", instruction="Find:"), Item(text="b", instruction="Find:", image=png)]
    assert unime_ray.to_items(images=["x.png"]) == [Item(image_path="x.png")]
    with pytest.raises(ValueError, match="2 images for 1 inputs"):
        unime_ray.to_items(["a"], images=[None, None])
    with pytest.raises(TypeError, match="an image must be"):
        unime_ray.to_items(["a"], images=[3.5])


# -------------------------------------------------------------------------------------- models on values
@pytest.fixture(scope="module")
def embedder(tiny_models):
    return unime_ray.Embedder.from_pretrained(tiny_models["qwen2_vl"], device="cpu")


def test_encode_takes_plain_values_like_items(embedder, tmp_path):
    png = make_png(32, 24, seed=4)
    (tmp_path / "p.png").write_bytes(png)
    from PIL import Image

    ref = embedder.encode([Item(text="a cat", instruction="Find:"), Item(text="", image=png),
                           Item(text="a cat", image=png)])
    embedder.image_root = tmp_path
    got = embedder.encode(["a cat", "", "a cat"], images=[None, "p.png", Image.open(io.BytesIO(png))],
                          instructions=["Find:", "", ""])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    t = embedder.encode("a cat", instructions="Find:", convert_to="torch")
    assert tuple(t.shape) == (1, embedder.dim)
    np.testing.assert_allclose(t.numpy()[0], ref[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    sim = embedder.similarity(got, got)
    np.testing.assert_allclose(sim, got @ got.T, atol=1e-6)


def test_judge_and_reranker_score_plain_values(tiny_models):
    from unime_ray.judge.hf_backend import TransformersJudge

    judge = unime_ray.Judge.from_pretrained(tiny_models["qwen2_5_vl"])
    png = make_png(30, 30, seed=5)
    scores = judge.score("a red circle", ["red circle", {"image": png}, {"image": b"not an image"}])
    backend = TransformersJudge(str(tiny_models["qwen2_5_vl"]))
    ref, _ = backend.score_or_errors([(Item(text="a red circle"), Item(text="red circle")),
                                      (Item(text="a red circle"), Item(image=png))])
    np.testing.assert_allclose(scores[:2], ref, atol=1e-5)
    assert np.isnan(scores[2])
    with pytest.raises(ValueError, match="could not be scored"):
        judge.score(["q"], [{"image": b"not an image"}], raise_errors=True)
    reranker = unime_ray.Reranker.from_pretrained(tiny_models["qwen2_5_vl"])
    hits = reranker.rerank("a red circle", ["red circle", {"image": png}, "blue"], top_k=3)
    pair_scores = reranker.score_pairs([(Item(text="a red circle"), Item(text=t)) for t in ("red circle",)])
    by_index = {h["index"]: h["score"] for h in hits}
    assert sorted(by_index) == [0, 1, 2] and abs(by_index[0] - pair_scores[0]) < 1e-5
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    listwise = reranker.rerank("a red circle", ["red circle", "blue"], mode="listwise")
    assert sorted(h["index"] for h in listwise) == [0, 1]


# ------------------------------------------------------------------------------- mining: the exact rule
def _brute_force_mining(pairs, embedder, judge, top_k, k, beta, interval):
    """The rule written out from the method reference, with numpy and plain loops."""
    pool = {}
    for p in pairs:
        pool.setdefault(p["task"], {})[Item(text=p["positive"]).content_key()] = p["positive"]
    out = {}
    for i, p in enumerate(pairs):
        ids = list(pool[p["task"]])
        texts = [pool[p["task"]][c] for c in ids]
        q = embedder.encode([p["query"]])[0]
        c = embedder.encode(texts)
        sims = c @ q
        pos_id = Item(text=p["positive"]).content_key()
        pos_sim = sims[ids.index(pos_id)]
        order = [j for j in np.argsort(-sims, kind="stable") if ids[j] != pos_id][:top_k]
        kept = [j for j in order if sims[j] < pos_sim]
        if not kept:
            out[f"row-{i}"] = None
            continue
        s_pos = judge.score(p["query"], [p["positive"]])[0]
        s = judge.score(p["query"], [texts[j] for j in kept])
        survivors = [(texts[j], s[n]) for n, j in enumerate(kept) if not s[n] > s_pos - beta]
        if not survivors:
            out[f"row-{i}"] = ("fallback", s_pos)
            continue
        cyc = [x for start in range(interval) for x in range(start, len(survivors), interval)]
        out[f"row-{i}"] = ([survivors[cyc[n % len(survivors)]][0] for n in range(k)], s_pos)
    return out


def test_mine_hard_negatives_matches_a_brute_force_rule(tiny_models, embedder, tmp_path):
    embedder.image_root = None
    words = ["red", "blue", "green", "black", "white", "pink", "grey", "gold"]
    shapes = ["circle", "square", "star"]
    pairs = [{"query": f"a {w} {s}", "positive": f"{w} {s} shape", "task": s if i % 2 else "mixed"}
             for i, (w, s) in enumerate((w, s) for w in words for s in shapes)]
    judge = unime_ray.Judge.from_pretrained(tiny_models["qwen2_5_vl"])
    mined = unime_ray.mine_hard_negatives(pairs, retriever=embedder, judge=judge, top_k=8, num_negatives=3,
                                          beta=0.001, interval=2, out_dir=tmp_path / "mine")
    assert mined.account["rows_in"] == len(pairs) == mined.account["rows_out"] + mined.account["rows_quarantined"]
    expected = _brute_force_mining(pairs, embedder, judge, top_k=8, k=3, beta=0.001, interval=2)
    rows = {r["id"]: r for r in mined.table.to_pylist()}
    assert set(rows) == {i for i, e in expected.items() if e is not None}
    assert len(rows) >= 6, "too few mined rows for the check to mean anything"
    # the check covers the stride: some query keeps more survivors than the interval
    assert any(e and e[0] != "fallback" and len(set(e[0])) == 3 for e in expected.values())
    for rid, row in rows.items():
        kind, s_pos = expected[rid]
        assert abs(row["pos_score"] - s_pos) < 1e-5
        if kind == "fallback":
            assert row["neg_score"] == [1.0] * 3
        else:
            assert row["neg_text"] == kind, rid
            assert all(s <= s_pos - 0.001 + 1e-9 for s in row["neg_score"])
    # rerun in place: nothing is redone, the same table comes back
    again = unime_ray.mine_hard_negatives(pairs, retriever=embedder, judge=judge, top_k=8, num_negatives=3,
                                          beta=0.001, interval=2, out_dir=tmp_path / "mine")
    assert again.table.equals(mined.table)


# -------------------------------------------------------------------------- docstrings and the example
class _LastLinesChecker(doctest.OutputChecker):
    """Ray's workers and DeepSpeed print to this process's stdout while a call runs (asynchronously): an example
    that expects nothing accepts any output, and one that expects lines is compared with the last lines."""

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        if not want.strip():
            return True
        lines = [l for l in got.splitlines() if l.strip()]
        tail = "\n".join(lines[-len(want.strip().splitlines()):]) + "\n"
        return super().check_output(want, tail, optionflags)


DOCUMENTED = ["Embedder", "Embedder.encode", "Judge", "Reranker.rerank", "load_table", "to_items",
              "mine_hard_negatives", "train_embedder", "train_reranker", "evaluate"]


def test_docstring_examples_run(tiny_models, embedder, ray_local, tmp_path, monkeypatch):
    """Each public function's example, executed with the names it uses bound to tiny stand-ins."""
    monkeypatch.chdir(tmp_path)
    embedder.image_root = None
    pairs = [{"query": f"a {c} {s}", "positive": f"{c} {s}", "task": "shapes"}
             for c in ("red", "blue", "green", "pink") for s in ("circle", "square")]
    eval_pairs = [{**p, "neg_text": [f"{c} star", "white dot"]} for p, c in zip(pairs, ("red", "blue") * 4)]
    mined = unime_ray.mine_hard_negatives(pairs, retriever=embedder, judge=str(tiny_models["qwen2_5_vl"]),
                                          top_k=4, num_negatives=2, delta=None, out_dir=tmp_path / "m0")
    globs = {"unime_ray": unime_ray, "Path": Path, "np": np, "tmp": tmp_path, "embedder": embedder, "pairs": pairs,
             "eval_pairs": eval_pairs, "mined": mined, "tiny_embedder": str(tiny_models["qwen2_vl"]),
             "tiny_judge": str(tiny_models["qwen2_5_vl"]),
             "reranker": unime_ray.Reranker.from_pretrained(tiny_models["qwen2_5_vl"])}
    globs.update({name: getattr(unime_ray, name) for name in unime_ray.__all__})
    finder, runner = doctest.DocTestFinder(recurse=False), doctest.DocTestRunner(checker=_LastLinesChecker(),
                                                                 optionflags=doctest.ELLIPSIS)
    ran = []
    for dotted in DOCUMENTED:
        obj = unime_ray
        for part in dotted.split("."):
            obj = getattr(obj, part)
        tests = [t for t in finder.find(obj, dotted, globs=dict(globs)) if t.examples]
        assert tests, f"{dotted} has no example in its docstring"
        for t in tests:
            result = runner.run(t)
            assert result.failed == 0, f"{dotted}'s example failed (see the output above)"
            ran.append(t.name)
    assert len(ran) >= len(DOCUMENTED)


def test_public_names_are_documented():
    assert "Embedder" in dir(unime_ray)
    for name in unime_ray.__all__:
        assert getattr(unime_ray, name).__doc__, name


def test_example_script_runs(tmp_path):
    """examples/python_api.py as a user runs it: embed, judge, mine, train, evaluate, rerank."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "python_api.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "trained 3 steps" in proc.stdout and "after training:" in proc.stdout, proc.stdout[-3000:]
    card = (tmp_path / "embedder" / "model" / "README.md").read_text()
    assert "## Recipe" in card and "judge_alignment" in card and "## Evaluation" in card
    facts = json.loads((tmp_path / "embedder" / "model" / "unime_card.json").read_text())
    assert set(facts["evaluation"]["per_dataset"]) == {"shapes_i2t", "shapes_t2i", "shapes_cls"}


def test_save_pretrained_round_trips_with_a_card(embedder, tmp_path):
    from unime_ray.models.card import read_card

    embedder.image_root = None
    before = embedder.encode(["a red circle", "blue"])
    folder = embedder.save_pretrained(tmp_path / "m", card={"base_model": "Qwen/Qwen2-VL-2B-Instruct",
                                                             "recipe": {"task": "embedder", "objective": "infonce"}})
    again = unime_ray.Embedder.from_pretrained(folder, device="cpu")
    np.testing.assert_allclose(again.encode(["a red circle", "blue"]), before, atol=1e-5)
    card = (folder / "README.md").read_text()
    assert "base_model: Qwen/Qwen2-VL-2B-Instruct" in card and "| objective | infonce |" in card
    assert read_card(folder)["recipe"]["objective"] == "infonce"


def test_mining_on_a_ray_pool_equals_in_process(tiny_models, ray_local, tmp_path):
    pairs = [{"query": f"a {c} {s}", "positive": f"{c} {s}", "task": "shapes"}
             for c in ("red", "blue", "green") for s in ("circle", "square")]
    kwargs = dict(retriever=str(tiny_models["qwen2_vl"]), judge=str(tiny_models["qwen2_5_vl"]), top_k=3,
                  num_negatives=2, delta=None)
    local = unime_ray.mine_hard_negatives(pairs, out_dir=tmp_path / "local", **kwargs)
    on_ray = unime_ray.mine_hard_negatives(pairs, out_dir=tmp_path / "ray", pool=unime_ray.Pool(max_actors=1),
                                           **kwargs)
    assert len(local) == len(pairs)
    a, b = local.table.to_pylist(), on_ray.table.to_pylist()
    assert [r["neg_text"] for r in a] == [r["neg_text"] for r in b]
    np.testing.assert_allclose([s for r in a for s in r["neg_score"]], [s for r in b for s in r["neg_score"]],
                               atol=1e-5)
