"""The stage interface: one declaration per stage gives its name, command, config dependencies and report."""

from __future__ import annotations

import pytest

from unime_ray.cli import commands as commands_of_cli
from unime_ray.config import RunConfig, load_run_config
from unime_ray.pipeline import STAGES, run_pipeline, stages_through
from unime_ray.stage import Context, Manifest, Stage, StageResult


def test_every_stage_is_declared_once_with_a_command_and_known_config():
    names = [s.name for s in STAGES]
    assert len(names) == len(set(names))
    commands = [s.command_name for s in STAGES if s.command_name]
    assert len(commands) == len(set(commands))
    assert set(commands) <= set(commands_of_cli())
    sections = set(RunConfig.model_fields)
    for stage in STAGES:
        assert set(stage.sections) <= sections, stage.name
        for f in stage.fields:
            section, key = f.split(".")
            assert key in RunConfig.model_fields[section].annotation.model_fields, f


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
        assert isinstance(got, _Counted) and got.rows == 3 and got.get("path").endswith("first/x")
        return _Counted(rows=got.rows + 1)

    stages = [Stage("first", "", first, sections=("data",), result=_Counted),
              Stage("second", "", second, sections=("mine",), result=_Counted)]
    monkeypatch.setattr("unime_ray.pipeline.STAGES", stages)
    monkeypatch.setattr("unime_ray.pipeline.STAGE_NAMES", [s.name for s in stages])
    cfg = load_run_config(preset="synthetic", overrides=[f"run_dir={tmp_path}"])
    manifest = run_pipeline(cfg)
    assert manifest.outputs("second") == {"rows": 4} and calls == ["first", "second"]
    run_pipeline(cfg)                                   # nothing changed: nothing reruns
    assert calls == ["first", "second"]
    cfg.mine.beta = 0.5                                 # the second stage's section changed: it alone reruns
    run_pipeline(cfg)
    assert calls == ["first", "second", "second"]
    cfg.data.seed = 7                                   # upstream changed: both rerun
    run_pipeline(cfg)
    assert calls[-2:] == ["first", "second"]
    with pytest.raises(RuntimeError, match="has not completed"):
        Context(cfg, Manifest(tmp_path / "elsewhere"), "second").result("first", _Counted)
