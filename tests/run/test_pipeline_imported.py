"""Training tables imported with judge-scored negatives (the official score JSON): retrieve/judge/mine are recorded
as imported and the embedder and reranker train on the table as it is; ``mine.from_imported: remine`` recomputes
them. And S1's retriever: ``models.retriever`` with its own input format, or the trained baseline."""

from __future__ import annotations

import json
import math

import pytest

from unime_ray.run.config import load_run_config
from unime_ray.data.io import read_table, write_rows
from unime_ray.data.schema import PAIR_SCHEMA, empty_row

ANIMALS = ["cat", "dog", "horse", "sheep", "goat", "duck"]


def _official_records(n: int) -> list[dict]:
    """Text-only records in the official score JSON format: 4 hard negatives each, scores below the positive's."""
    recs = []
    for i in range(n):
        others = [a for a in ANIMALS if a != ANIMALS[i % len(ANIMALS)]]
        recs.append({
            "query_text": f"Represent the given sentence: a photo of a {ANIMALS[i % len(ANIMALS)]} number {i}\n",
            "query_image": "",
            "pos_text": f"the {ANIMALS[i % len(ANIMALS)]}",
            "pos_image": "",
            "query_pos_scores": 0.8,
            "hard_negatives": [[f"the {a}", ""] for a in others[:4]],
            "hard_negatives_scores": [0.4, 0.3, 0.2, 0.1],
        })
    return recs


def _cfg(tmp_path, tiny_models, src, *extra):
    return load_run_config(overrides=[
        f"run_dir={tmp_path / 'run'}", "data.source=official", f"data.train_path={src}", "data.rows_per_shard=4",
        "models.tiny.make=false", f"models.embedder={tiny_models['qwen2_vl']}",
        f"models.judge={tiny_models['qwen2_5_vl']}", "ray.include_dashboard=false",
        "stages=[data, models, prepare, retrieve, judge_fit, judge, mine, train, rerank, report]",
        "train={num_negatives: 4, max_steps: 1, micro_batch_size: 2, num_workers: 1, lora: false, "
        "zero_stage: 0, checkpoint_every: 1}",
        # no max_steps: one epoch of the 4-row table at global batch 4 = 1 step, cosine with 3% warm-up
        "reranker={enabled: true, list_negatives: 3, micro_batch_size: 2, grad_accum: 2, num_workers: 1, "
        "lora: false, zero_stage: 0, checkpoint_every: 1}",
        *extra])


def test_scored_negatives_tells_imported_tables(tmp_path):
    from unime_ray.mining.stage import scored_negatives

    def table(name, rows):
        write_rows([dict(empty_row(PAIR_SCHEMA), id=f"q{i}", task="t", **r) for i, r in enumerate(rows)],
                   tmp_path / name, PAIR_SCHEMA)
        return scored_negatives(tmp_path / name)

    scored = {"pos_score": 0.7, "neg_text": ["a", "b", "c"], "neg_score": [0.1, 0.2, 0.3]}
    assert table("all", [scored, {**scored, "neg_text": ["a", "b"], "neg_score": [0.1, 0.2]}]) == {
        "rows": 2, "scored_rows": 2, "negatives": 5, "min_negatives": 2, "max_negatives": 3}
    # MMEB-train rows: one negative, no judge score; eval pairs: no negatives at all
    assert table("mmeb", [{"neg_text": ["x"], "neg_score": [None]}, {}])["scored_rows"] == 0
    # a missing or NaN score anywhere, or no positive score, leaves the row unscored
    rows = [scored, {**scored, "neg_score": [0.1, None, 0.3]}, {**scored, "neg_score": [0.1, float("nan"), 0.3]},
            {**scored, "pos_score": None}]
    assert table("partial", rows)["scored_rows"] == 1


def test_imported_official_table_trains_directly(tiny_models, ray_local, tmp_path, monkeypatch):
    from unime_ray.run import runner as pipeline

    src = tmp_path / "train_data_scores.json"
    src.write_text(json.dumps(_official_records(4)))
    cfg = _cfg(tmp_path, tiny_models, src)
    manifest = pipeline.run_pipeline(cfg)
    stages = manifest.data["stages"]
    assert all(stages[s]["status"] == "complete" for s in cfg.stages)
    prepared = stages["prepare"]["outputs"]["tables"]["train_pairs"]["path"]
    for name in ("retrieve", "judge", "mine"):
        out = stages[name]["outputs"]
        assert out["imported"] is True and out["imported_from"] == str(src) and out["format"] == "official"
        assert (out["rows"], out["scored_rows"], out["min_negatives"], out["max_negatives"]) == (4, 4, 4, 4)
        assert "not run" in out["note"]
    assert stages["judge_fit"]["outputs"]["enabled"] is False
    run = tmp_path / "run"
    assert not (run / "retrieve").exists() and not (run / "judge").exists()  # nothing recomputed
    mine = stages["mine"]["outputs"]
    assert mine["training_table"] == prepared and mine["official_json"] == str(src)
    assert mine["mean_positive_score"] == pytest.approx(0.8) and mine["mean_negative_score"] == pytest.approx(0.25)
    assert [r["neg_score"] for r in read_table(prepared).to_pylist()] == [[0.4, 0.3, 0.2, 0.1]] * 4

    train, rerank = stages["train"]["outputs"], stages["rerank"]["outputs"]
    assert train["steps"] == 1 and train["lr_schedule"] == "linear"
    # the reranker's steps come from the table: 1 epoch x 4 rows // global batch 4; warm-up ceil(0.03 x 1)
    assert (rerank["max_steps"], rerank["steps"], rerank["global_batch"]) == (1, 1, 4)
    assert rerank["lr_schedule"] == "cosine" and rerank["warmup_steps"] == math.ceil(0.03 * 1)
    assert "Hard negatives (imported)" in (run / "report.md").read_text()

    # asked for, the same file is re-mined: retrieval runs again (stopped here: the test is about the switch)
    import unime_ray.retrieval.stage as rstage

    class Ran(Exception):
        pass

    def fake_retrieval(*args, **kwargs):
        raise Ran

    monkeypatch.setattr(rstage, "run_retrieval", fake_retrieval)
    with pytest.raises(Ran):
        pipeline.run_pipeline(_cfg(tmp_path, tiny_models, src, "mine.from_imported=remine"))
    # ... and a table where some rows lack scores is refused rather than half-imported
    bad = _official_records(4)
    bad[1]["hard_negatives"], bad[1]["hard_negatives_scores"] = [], []  # (a NaN score would be quarantined)
    (tmp_path / "partly_scored.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="3 of 4 rows carry judge-scored negatives"):
        pipeline.run_pipeline(_cfg(tmp_path, tiny_models, tmp_path / "partly_scored.json"))


# --------------------------------------------------------------------------------------------- S1's retriever
def _retrieve_with(tmp_path, monkeypatch, *overrides, baseline_model=None):
    """The EmbedderSpec the retrieve stage hands to run_retrieval (stubbed) for a config."""
    from unime_ray.run import runner as pipeline
    from unime_ray.run.stages.retrieval import RETRIEVE
    from unime_ray.run.stage import Context
    import unime_ray.retrieval.stage as rstage

    pairs = tmp_path / "pairs"
    if not pairs.exists():
        write_rows([dict(empty_row(PAIR_SCHEMA), id="q0", task="t", query_text="q", pos_text="p")], pairs, PAIR_SCHEMA)
    cfg = load_run_config(preset="synthetic", overrides=[f"run_dir={tmp_path / 'run'}", *overrides])
    manifest = pipeline.Manifest(tmp_path / "run")
    manifest.update("data", status="complete", outputs={"format": "canonical", "inputs": {}})
    manifest.update("prepare", status="complete", outputs={"tables": {"train_pairs": {"path": str(pairs)}},
                                                           "image_root": None})
    if baseline_model:
        manifest.update("baseline", status="complete", outputs={"enabled": True, "model": baseline_model})
    seen = {}

    def fake_retrieval(pairs, candidates, out_dir, spec, settings, **kw):
        seen["spec"] = spec
        return {"queries": 1, "mean_candidates": 0.0, "queries_without_candidates": 1}

    monkeypatch.setattr(rstage, "run_retrieval", fake_retrieval)
    monkeypatch.setattr(Context, "init_ray", lambda self: None)
    out = RETRIEVE.execute(Context(cfg, manifest, "retrieve")).as_dict()
    assert out["embedder"] == seen["spec"].model
    return seen["spec"], cfg


def test_retrieve_uses_models_retriever(tmp_path, monkeypatch):
    spec, cfg = _retrieve_with(tmp_path, monkeypatch, "models.input_format=official", "models.positions=auto",
                               "models.retriever={model: org/vlm2vec, adapter: ./lora, input_format: chat, "
                               "positions: mrope}")
    assert (spec.model, spec.input_format, spec.positions) == ("org/vlm2vec", "chat", "mrope")
    assert spec.adapter == str(cfg.path("./lora"))
    # the short form names the model only; its input format is its own default, not the embedder's
    spec, _ = _retrieve_with(tmp_path, monkeypatch, "models.input_format=chat", "models.retriever=org/vlm2vec")
    assert (spec.model, spec.input_format, spec.positions, spec.adapter) == ("org/vlm2vec", "official", "auto", None)
    # null: the embedder's init with the embedder's format (as before models.retriever existed)
    spec, cfg = _retrieve_with(tmp_path, monkeypatch, "models.input_format=chat")
    assert (spec.model, spec.input_format) == (cfg.model_ref(cfg.models.embedder), "chat")
    # baseline.enabled: the trained baseline retrieves, whatever models.retriever says
    spec, _ = _retrieve_with(tmp_path, monkeypatch, "baseline.enabled=true", "models.retriever=org/vlm2vec",
                             baseline_model="/runs/x/baseline/model")
    assert (spec.model, spec.input_format) == ("/runs/x/baseline/model", "official")


def test_models_stage_checks_the_retriever(tiny_models, tmp_path):
    from unime_ray.run import runner as pipeline
    from unime_ray.run.stages.models import run_models
    from unime_ray.run.stage import Context

    def stage_models(cfg, manifest):
        return run_models(Context(cfg, manifest, "models"))

    base = [f"run_dir={tmp_path / 'run'}", "models.tiny.make=false", f"models.embedder={tiny_models['qwen2_vl']}",
            f"models.judge={tiny_models['qwen2_5_vl']}"]
    cfg = load_run_config(preset="synthetic", overrides=[*base, f"models.retriever={tiny_models['qwen2_vl']}"])
    out = stage_models(cfg, pipeline.Manifest(tmp_path / "run"))
    assert out["retriever"] == {"ref": str(tiny_models["qwen2_vl"]), "architecture": "qwen2_vl"}
    cfg = load_run_config(preset="synthetic", overrides=[*base, f"models.retriever={tmp_path / 'missing'}"])
    with pytest.raises(Exception, match="missing"):
        stage_models(cfg, pipeline.Manifest(tmp_path / "run"))
    # an imported official file never runs S1, so its retriever need not be present
    src = tmp_path / "scores.json"
    src.write_text("[]")
    cfg = load_run_config(overrides=[*base, f"models.retriever={tmp_path / 'missing'}", "data.source=official",
                                     f"data.train_path={src}"])
    assert "retriever" not in stage_models(cfg, pipeline.Manifest(tmp_path / "run"))


def test_mmeb_train_data_with_mmeb_eval_rows(tmp_path):
    """data.eval_source: training pairs in MMEB-train form, eval rows in MMEB-eval form (candidate lists, ground
    truth first) are each imported with their own converter; a wrong combination is a clear config error."""
    import json

    from unime_ray.run import runner as pipeline
    from unime_ray.data.io import read_table
    from unime_ray.data.schema import negatives_from_row

    labels = ["cat", "dog", "bird"]
    train, evals = tmp_path / "pets.jsonl", tmp_path / "eval" / "pets.jsonl"
    evals.parent.mkdir()
    train.write_text("".join(json.dumps({"qry": f"Which pet is meant: a {lab} number {i}?", "qry_image_path": "",
                                         "pos_text": lab, "pos_image_path": ""}) + "\n"
                             for i, lab in enumerate(labels * 2)))
    evals.write_text("".join(json.dumps({"qry_text": f"a {lab}", "qry_img_path": "",
                                         "tgt_text": [lab] + [o for o in labels if o != lab],
                                         "tgt_img_path": ["", "", ""]}) + "\n" for lab in labels)
                     + "{\"qry_text\": \"no candidates\", \"qry_img_path\": \"\", \"tgt_text\": []}\n")
    cfg = load_run_config(overrides=[
        f"run_dir={tmp_path / 'run'}", "data.source=mmeb-train", f"data.train_path={train}",
        f"data.eval_path={evals}", "data.eval_source=mmeb-eval", "stages=[data, prepare]",
        "ray.include_dashboard=false"])
    pipeline.run_pipeline(cfg)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    tables = manifest["stages"]["prepare"]["outputs"]["tables"]
    assert (tables["train_pairs"]["rows_in"], tables["train_pairs"]["rows_out"]) == (6, 6)
    ev = tables["eval_pairs"]
    assert (ev["rows_in"], ev["rows_out"], ev["rows_quarantined"]) == (4, 3, 1)     # in = out + quarantined
    rows = read_table(ev["path"]).to_pylist()
    assert {r["task"] for r in rows} == {"pets"}
    assert all(len(negatives_from_row(r)) == 2 for r in rows) and rows[0]["pos_text"] == "cat"
    with pytest.raises(ValueError, match="eval_source is the format of data.eval_path"):
        load_run_config(overrides=["data.source=mmeb-train", f"data.train_path={train}",
                                   "data.eval_source=mmeb-eval"])
