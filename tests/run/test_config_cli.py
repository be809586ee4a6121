"""Configs (presets, overrides, clear errors) and the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from unime_ray.cli import build_parser, main
from unime_ray.run.config import ConfigError, RunConfig, apply_override, list_presets, load_run_config


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads(preset):
    cfg = load_run_config(preset=preset)
    assert isinstance(cfg, RunConfig) and cfg.name == preset


def test_presets_exist():
    assert {"demo", "synthetic", "paper-qwen2vl-2b"} <= set(list_presets())


def test_overrides_are_typed_and_nested():
    cfg = load_run_config(preset="demo", overrides=["embed.pool.batch_size=4", "models.images.eval.resize=[672, 672]",
                                                    "ray.address=null", "data.source=synthetic"])
    assert cfg.embed.pool.batch_size == 4 and cfg.models.images.eval.resize == (672, 672)
    assert cfg.ray.address is None and cfg.data.source == "synthetic"
    d: dict = {}
    apply_override(d, "a.b.c=1.5")
    assert d == {"a": {"b": {"c": 1.5}}}


@pytest.mark.parametrize("override,message", [
    ("embed.batch_sise=4", "embed.batch_sise: unknown key"),
    ("nonsense=1", "nonsense: unknown key"),
    ("embed.pool.batch_size=zero", "embed.pool.batch_size"),
    ("embed.pool.min_actors=5", "min_actors (5) > max_actors"),
    ("models.input_format=llava", "models.input_format"),
    ("data.source=official", "needs data.train_path"),
])
def test_bad_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as exc:
        load_run_config(preset="demo", overrides=[override])
    assert message in str(exc.value)


def test_unknown_preset_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: .*demo"):
        load_run_config(preset="nope")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_run_config(preset="demo", overrides=["embed.pool.batch_size"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(config_path=bad)


def test_config_file_round_trip(tmp_path):
    cfg = load_run_config(preset="synthetic", overrides=["seed=7"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_run_config(config_path=path) == cfg


def test_model_refs():
    cfg = load_run_config(preset="demo", overrides=["run_dir=/tmp/x"])
    assert cfg.model_ref("./models/tiny") == "/tmp/x/models/tiny"
    assert cfg.model_ref("Qwen/Qwen2-VL-2B-Instruct") == "Qwen/Qwen2-VL-2B-Instruct"
    assert cfg.model_ref("/abs/ckpt") == "/abs/ckpt"


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "unime_ray.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ("pipeline", "prepare", "export", "embed", "make-tiny-models", "make-demo-data", "config",
                "model-info"):
        assert cmd in out


def test_cli_config_show_and_errors(capsys):
    assert main(["config", "show", "--preset", "synthetic", "-o", "embed.pool.batch_size=3"]) == 0
    assert "batch_size: 3" in capsys.readouterr().out
    assert main(["config", "show", "--preset", "demo", "-o", "embed.bogus=1"]) == 2
    assert "embed.bogus: unknown key" in capsys.readouterr().err


def test_cli_make_tiny_models_and_model_info(tmp_path, capsys):
    assert main(["make-tiny-models", str(tmp_path), "--vocab-size", "400"]) == 0
    assert (tmp_path / "tiny-qwen2-vl" / "config.json").is_file()
    assert (tmp_path / "tiny-qwen2.5-vl" / "config.json").is_file()
    capsys.readouterr()
    assert main(["model-info", "Qwen/Qwen2-VL-2B-Instruct"]) == 0
    assert "2,208,985,600" in capsys.readouterr().out
    assert main(["model-info", str(tmp_path / "tiny-qwen2-vl"), "--dtype", "float32"]) == 0
    assert main(["model-info", str(tmp_path / "nothing-here")]) == 2


def test_cli_make_demo_data_synthetic(tmp_path, capsys):
    assert main(["make-demo-data", str(tmp_path / "d"), "--synthetic"]) == 0
    assert (tmp_path / "d" / "summary.json").is_file()


def test_parser_requires_a_command():
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_config_file_extends_a_preset(tmp_path):
    from unime_ray.run.config import ConfigError, load_run_config

    f = tmp_path / "job.yaml"
    f.write_text("extends: synthetic\nrun_dir: /tmp/x\ntrain:\n  max_steps: 3\n")
    cfg = load_run_config(config_path=f)
    base = load_run_config(preset="synthetic")
    assert cfg.run_dir == "/tmp/x" and cfg.train.max_steps == 3
    assert cfg.train.lr == base.train.lr and cfg.data.source == base.data.source
    f.write_text("extends: nope\n")
    with pytest.raises(ConfigError, match="extends: unknown preset 'nope'"):
        load_run_config(config_path=f)


@pytest.mark.parametrize("override", ["reranker.temperature=0.1", "reranker.objective=infonce",
                                      "reranker.num_negatives=2", "judge_fit.kl_form=floored",
                                      "reranker.image_cache_mb=0", "judge_fit.symmetric=true"])
def test_a_section_accepts_only_the_settings_its_training_reads(override):
    """The reranker and the stand-in judge share the training loop's settings, not the embedder's loss ones."""
    with pytest.raises(ConfigError, match="unknown key"):
        load_run_config(preset="demo", overrides=[override])


@pytest.mark.parametrize("preset", list_presets())
def test_config_show_is_commented_yaml_that_loads_back(preset, tmp_path):
    """`config show` writes every setting's description beside it; the text still loads to the same config."""
    cfg = load_run_config(preset=preset)
    text = cfg.to_yaml()
    assert "   # " in text
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert load_run_config(config_path=path) == cfg


def test_settings_help_lists_every_setting_with_its_description():
    """Every line of `--help`'s settings list is a real `-o` key (setting it to its listed default loads)."""
    import json

    from unime_ray.run.config import settings_help

    from unime_ray.utils.settings import settings_rows

    lines = settings_help().splitlines()[1:]
    keys = [line.split()[0] for line in lines]
    assert {"embed.pool.batch_size", "train.lr", "seed", "models.images.eval"} <= set(keys)
    assert len(keys) == len(set(keys)) > 250
    for key, value, _ in settings_rows(RunConfig())[::5]:   # each key is a real setting, its value its default
        assert load_run_config(overrides=[f"{key}={json.dumps(value)}"]) == load_run_config(), key
    assert "actors kept while the map runs" in next(x for x in lines if x.split()[0] == "embed.pool.min_actors")
    out = subprocess.run([sys.executable, "-m", "unime_ray", "pipeline", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "embed.pool.min_actors" in out and "actors kept while the map runs" in out


def test_every_setting_has_a_description():
    """Help is written once, as each field's description: every setting has one, with the optional sections (null
    by default) both unset and filled in, and an ablation's fields."""
    from unime_ray.models.budget import ROLES
    from unime_ray.train.config import AblationConfig
    from unime_ray.utils.settings import settings_rows

    filled = RunConfig(judge_fit={}, models={"retriever": "x", "images": {role: {} for role in ROLES}},
                       serve={d: {"autoscaling": {}} for d in ("ingress", "embedder", "index", "reranker")})
    rows = (settings_rows(RunConfig()) + settings_rows(filled)
            + settings_rows(AblationConfig(name="a", objective="infonce"), "compare.ablations[]."))
    assert {"judge_fit", "judge_fit.encoder.dim", "models.images.eval.resize", "serve.index.autoscaling.min_replicas",
            "compare.ablations[].seeds"} <= {key for key, _, _ in rows}
    assert [key for key, _, text in rows if not text.strip()] == []


def test_tool_flags_come_from_the_settings_model():
    """The tool commands' pool flags are the Pool model's fields: typed, described, validated by the model."""
    import argparse

    from unime_ray.utils.pool import Pool
    from unime_ray.utils.settings import FlagError, add_flags, from_flags

    p = argparse.ArgumentParser()
    add_flags(p, Pool, Pool.FLAGS)
    assert from_flags(Pool, p.parse_args([]), Pool.FLAGS) == Pool()
    got = from_flags(Pool, p.parse_args(["--no-ray", "--max-actors", "4", "--num-gpus-per-actor", "0.5"]),
                     Pool.FLAGS)
    assert (got.ray, got.max_actors, got.num_gpus_per_actor) == (False, 4, 0.5)
    with pytest.raises(FlagError, match="--batch-size: Input should be greater than or equal to 1"):
        from_flags(Pool, p.parse_args(["--batch-size", "0"]), Pool.FLAGS)
    with pytest.raises(FlagError, match="min_actors \\(3\\) > max_actors \\(2\\)"):
        from_flags(Pool, p.parse_args(["--min-actors", "3"]), Pool.FLAGS)
    assert "actors kept while the map runs" in p.format_help()
