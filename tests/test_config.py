"""Experiment config validation and --set overrides."""
from __future__ import annotations

import pytest

from chaintune.config import ExperimentConfig, load_config, validate_config
from chaintune.overrides import apply_overrides
from chaintune.errors import ChaintuneError, ConfigError

BASE = {"chains": [{"name": "a", "stages": [{"task": "toxigenqa"}, {"task": "arc_easy", "lr": 1e-4}]}]}


def test_stage_overrides_merge_with_defaults():
    cfg = validate_config(BASE | {"training": {"lr": 1e-5, "batch_size": 8}})
    first, second = (s.training(cfg.training) for s in cfg.chains[0].stages)
    assert (first.lr, first.batch_size, second.lr, second.batch_size) == (1e-5, 8, 1e-4, 8)
    assert cfg.evaluation_tasks() == ["toxigenqa", "arc_easy"]


@pytest.mark.parametrize("data, fragment", [
    (BASE | {"colour": 1}, "colour: unknown key"),
    ({"chains": [{"name": "a", "stages": [{"task": "toxigenqa", "lrr": 1}]}]}, "unknown stage key(s) ['lrr']"),
    ({"chains": [{"name": "a", "stages": [{"task": "toxigenqa", "lr": -1}]}]}, "greater than or equal to 0"),
    (BASE | {"training": {"method": "qlora"}}, "training.method"),
    (BASE | {"training": {"batch_size": 0}}, "training.batch_size"),
    (BASE | {"seeds": [1, 1]}, "seeds must be unique"),
    ({"chains": BASE["chains"] * 2}, "duplicate chain name"),
    ({"chains": [{"name": "../escape", "stages": [{"task": "toxigenqa"}]}]}, "chains.0.name"),
    ({"chains": []}, "chains"),
    (BASE | {"tasks": {"toxigenqa": {"train_limit": 0}}}, "train_limit"),
])
def test_invalid_configs_name_the_key(data, fragment):
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_unknown_task_lists_known_tasks():
    with pytest.raises(ChaintuneError, match="unknown task 'nope'.*toxigenqa"):
        validate_config({"chains": [{"name": "a", "stages": [{"task": "nope"}]}]})


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("chains:\n  - name: a\n    stages: [{task: toxigenqa}, {task: arc_easy}]\n")
    cfg = load_config(path, ["training.lr=3e-4", "seeds=[0,1,2]", "chains.0.stages.1.lr=0", "output_dir=/tmp/x"])
    assert cfg.training.lr == 3e-4 and cfg.seeds == [0, 1, 2] and cfg.output_dir == "/tmp/x"
    assert cfg.chains[0].stages[1].training(cfg.training).lr == 0
    with pytest.raises(ConfigError, match="has no '='"):
        apply_overrides({}, ["training.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        apply_overrides({"chains": []}, ["chains.3.lr=1"])


def test_yaml_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("chains: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_shipped_configs_validate():
    from pathlib import Path

    from chaintune.plan import load_sweep

    paths = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(paths) >= 6
    for path in paths:
        assert load_sweep(path)  # every sweep point validates


def test_multiple_comparisons_correction():
    assert validate_config(BASE).multiple_comparisons == "holm"
    assert validate_config(BASE | {"multiple_comparisons": "bh"}).multiple_comparisons == "bh"
    with pytest.raises(ConfigError, match="multiple_comparisons"):
        validate_config(BASE | {"multiple_comparisons": "bonferroni"})


def test_compile_is_refused_for_jobs_of_several_ranks():
    base = {"name": "x", "chains": [{"name": "c", "stages": [{"task": "bbq"}]}]}
    ExperimentConfig.model_validate({**base, "compile": True})
    with pytest.raises(ValueError, match="compile: true trains one process only"):
        ExperimentConfig.model_validate({**base, "compile": True, "distributed": {"nproc_per_node": 2}})
