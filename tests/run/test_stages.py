"""The stage interface: one declaration per stage gives its name, command, the settings it reads (its key) and
its report."""

from __future__ import annotations

import pytest

from unime_ray.cli import commands as commands_of_cli
from unime_ray.run.config import RunConfig, load_run_config
from unime_ray.models.budget import ROLES
from unime_ray.run.runner import STAGES, _stage_key, run_pipeline, stages_through
from unime_ray.run.results import JudgeFitResult, MineResult, RetrieveResult
from unime_ray.run.stage import ConfigView, Context, Manifest, Section, Stage, StageResult, UndeclaredRead
from unime_ray.run.stages.mining import report_mine
from unime_ray.run.stages.retrieval import report_retrieve


def test_every_stage_is_declared_once_with_a_command_and_known_config():
    names = [s.name for s in STAGES]
    assert len(names) == len(set(names))
    commands = [s.command_name for s in STAGES if s.command_name]
    assert len(commands) == len(set(commands))
    assert set(commands) <= set(commands_of_cli())
    cfg = RunConfig()
    for stage in STAGES:
        for path in stage.reads:   # every read names a setting or a role's image budget
            if path.startswith("images."):
                assert path.split(".", 1)[1] in ROLES, (stage.name, path)
                continue
            node = cfg
            for part in path.split("."):
                assert part in type(node).model_fields, (stage.name, path)
                node = getattr(node, part)


def test_a_stage_command_runs_what_the_stage_needs():
    assert stages_through("mine")[-1] == "mine" and "embed" not in stages_through("mine")
    with pytest.raises(ValueError, match="unknown stage"):
        stages_through("nope")


class _Counted(StageResult):
    rows: int


def test_results_are_typed_and_reruns_skip_completed_stages(tmp_path, monkeypatch):
    calls = []

    def first(ctx: Context):
        calls.append("first")
        ctx.dir.mkdir(parents=True, exist_ok=True)
        return {"rows": 3, "path": ctx.dir / "x"}   # extra fields ride along, paths stored as strings

    def second(ctx: Context):
        calls.append("second")
        got = ctx.result("first", _Counted)
        assert isinstance(got, _Counted) and got.rows == 3 and got.model_extra["path"].endswith("first/x")
        return _Counted(rows=got.rows + 1)

    stages = [Stage("first", "", first, reads=("data",), result=_Counted),
              Stage("second", "", second, reads=("mine.beta",), result=_Counted)]
    monkeypatch.setattr("unime_ray.run.runner.STAGES", stages)
    monkeypatch.setattr("unime_ray.run.runner.STAGE_NAMES", [s.name for s in stages])
    cfg = load_run_config(preset="synthetic", overrides=[f"run_dir={tmp_path}"])
    manifest = run_pipeline(cfg)
    assert manifest.outputs("second") == {"rows": 4} and calls == ["first", "second"]
    run_pipeline(cfg)                                   # nothing changed: nothing reruns
    assert calls == ["first", "second"]
    cfg.mine.beta = 0.5                                 # a setting the second stage reads: it alone reruns
    run_pipeline(cfg)
    assert calls == ["first", "second", "second"]
    cfg.mine.num_negatives = 9                          # a setting of the same section it does not read: nothing
    cfg.seed = 3
    run_pipeline(cfg)
    assert calls == ["first", "second", "second"]
    cfg.data.seed = 7                                   # upstream changed: both rerun
    run_pipeline(cfg)
    assert calls[-2:] == ["first", "second"]
    with pytest.raises(RuntimeError, match="has not completed"):
        Context(cfg, Manifest(tmp_path / "elsewhere"), "second").result("first", _Counted)


def test_reports_read_declared_fields_and_older_results_still_load(tmp_path):
    """A report section reads its result's declared fields; a result recorded before a field was declared loads with
    the field's default, and extra fields (kept for people) still load."""
    mined = {"training_table": "t", "queries": 7, "mined": 6, "quarantined": 1, "false_negatives": 3, "fallbacks": 2,
             "repeated_fill": 1, "mean_positive_score": 0.75, "mean_negative_score": 0.25, "no_candidates": 0,
             "settings": {"num_negatives": 4, "beta": 0.01, "interval": 5}}
    text = "\n".join(report_mine(Section(MineResult.model_validate(mined), {}, tmp_path)))
    assert "| 7 | 6 | 1 | 3 | 2 | 1 | 0.75 | 0.25 |" in text and "num_negatives 4, beta 0.01, interval 5" in text
    retrieved = {"queries": 5, "mean_candidates": 2.5, "queries_without_candidates": 1, "mean_dropped_by_delta": 0.5,
                 "pools": 2, "search": {"rows_per_s": 100.0}}
    text = "\n".join(report_retrieve(Section(RetrieveResult.model_validate(retrieved), {}, tmp_path)))
    assert "| 5 | 2.50 | 1 | 0.50 | 2 | 100.00 |" in text
    older = JudgeFitResult.model_validate({"enabled": True, "folds": {}, "num_folds": 2, "note": "kept"})
    assert older.text_tower == {} and older.feature_items is None and older.model_extra == {"note": "kept"}
    assert MineResult.model_validate({"training_table": "t"}).queries is None


def test_a_stage_reads_only_what_it_declares(tmp_path):
    """The key covers every setting a stage can read: reading one it does not list fails, naming both."""
    cfg = load_run_config(preset="synthetic", overrides=[f"run_dir={tmp_path}"])
    view = ConfigView(cfg, ("mine.beta", "judge", "images.judge"), "mine")
    assert view.mine.beta == cfg.mine.beta and view.judge is cfg.judge
    assert view.image_budget("judge") == cfg.image_budget("judge") and view.ray is cfg.ray
    assert view.path("x") == cfg.path("x")
    for read in (lambda: view.seed, lambda: view.mine.num_negatives, lambda: view.models,
                 lambda: view.image_budget("eval")):
        with pytest.raises(UndeclaredRead, match="stage 'mine' read the"):
            read()
    with pytest.raises(AttributeError):
        view.mine.beta = 1.0

    def reads_the_seed(ctx: Context):
        return {"seed": ctx.cfg.seed}

    with pytest.raises(UndeclaredRead, match="'seed'"):
        Stage("s", "", reads_the_seed).execute(Context(ConfigView(cfg, (), "s"), Manifest(tmp_path), "s"))
    assert Stage("s", "", reads_the_seed).execute(
        Context(ConfigView(cfg, ("seed",), "s"), Manifest(tmp_path), "s")).model_extra["seed"] == cfg.seed


def _keys(cfg: RunConfig) -> dict[str, str]:
    return {s.name: _stage_key(ConfigView(cfg, s.reads, s.name), s, "") for s in STAGES}


def test_the_seed_reruns_the_stages_that_read_it():
    """The run's seed draws the fit folds, the judge's folds, the mining samples, training's data order and the
    comparison's labels: changing it reruns those stages, not the data, the models or the data preparation."""
    cfg = load_run_config(preset="demo")
    before = _keys(cfg)
    cfg.seed = 1
    changed = {n for n, k in _keys(cfg).items() if k != before[n]}
    assert changed == {"baseline", "retrieve", "judge_fit", "judge", "mine", "train", "ablations", "rerank", "eval"}
    after = _keys(cfg)
    cfg.serve.port = 9001                     # read by no stage
    assert _keys(cfg) == after


@pytest.mark.parametrize("setting, value, stages", [
    ("models.judge", "./other-judge", {"models", "judge_fit", "judge", "rerank"}),
    ("models.images.judge", {"max_pixels": 50176}, {"judge_fit", "judge"}),
    ("models.images.eval", {"max_pixels": 50176}, {"eval"}),
    ("train.lr", 0.5, {"train", "ablations"}),
    ("data.dev_fraction", 0.2, {"prepare"}),
])
def test_a_setting_reruns_exactly_the_stages_that_read_it(setting, value, stages):
    cfg = load_run_config(preset="demo")
    before = _keys(cfg)
    section, _, key = setting.rpartition(".")
    node = cfg
    for part in section.split("."):
        node = getattr(node, part)
    setattr(node, key, value)
    assert {n for n, k in _keys(cfg).items() if k != before[n]} == stages


def test_a_run_directory_keyed_the_old_way_stops_with_what_to_do(tmp_path, monkeypatch):
    import json

    calls = []
    stages = [Stage("first", "", lambda ctx: calls.append(1) or {"rows": 1}, reads=("data",), result=_Counted)]
    monkeypatch.setattr("unime_ray.run.runner.STAGES", stages)
    monkeypatch.setattr("unime_ray.run.runner.STAGE_NAMES", ["first"])
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {"first": {"status": "complete", "key": "0" * 16,
                                                                             "outputs": {"rows": 1}}}}))
    cfg = load_run_config(preset="synthetic", overrides=[f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="earlier unime-ray.*--force"):
        run_pipeline(cfg)
    assert calls == []
    run_pipeline(cfg, force=True)
    run_pipeline(cfg)                      # keyed the current way now: nothing reruns
    assert calls == [1]
