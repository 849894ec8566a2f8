"""`chaintune export` (issue 23): a stage exported from a finished run loads in plain transformers (full fine-tune,
merged LoRA) or PEFT (LoRA adapter), and re-scoring it with chaintune.evaluate gives the stored evaluation."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from test_cli import assert_one_line_error
from test_hostile import NO_GATE, experiment, quiet_run

from chaintune.evaluate import evaluate
from chaintune.cli import main
from chaintune.rundir import RunDir
from chaintune.tasks import load_task, register_user_tasks

LORA = {"method": "lora", "lr": 3e-2, "batch_size": 4, "max_steps": 4, "lora": {"r": 4, "alpha": 8}}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, mcq_config, mcq_data_dir, module_isolation) -> Path:
    out = tmp_path_factory.mktemp("export-full") / "out"
    assert not quiet_run(experiment(mcq_config, mcq_data_dir, out, **NO_GATE)).failed
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, mcq_config, mcq_data_dir, module_isolation) -> Path:
    out = tmp_path_factory.mktemp("export-lora") / "out"
    cfg = experiment(mcq_config, mcq_data_dir, out, **NO_GATE, training=LORA,
                     chains=[{"name": "ab", "stages": [{"task": "mcq_a"}, {"task": "mcq_b"}]}])
    assert not quiet_run(cfg).failed
    return out


def rescored(run_dir: Path, node: str, model, tokenizer) -> None:
    """Every stored evaluation of `node` equals the exported model's, question by question."""
    out = RunDir(run_dir)
    register_user_tasks(out.custom_tasks())
    data_dir = Path(out.experiment()["data_dir"])
    evaluations = out.evaluations(node)
    assert evaluations
    for stored in evaluations:
        spec = stored.spec
        questions = load_task(stored.task, "test", data_dir, limit=spec["eval_limit"], seed=spec["data_seed"],
                              split_seed=spec["split_seed"])
        result = evaluate(model.eval(), tokenizer, questions, stored.task, max_tokens=64)
        assert (result.acc, result.acc_norm, result.per_group) == (stored.acc, stored.acc_norm, stored.per_group)
        before = out.predictions(node, stored.task).set_index("id").logliks
        after = {p["id"]: p["logliks"] for p in result.predictions}
        for qid, logliks in before.items():
            np.testing.assert_allclose(after[qid], logliks, rtol=0, atol=1e-4)


def export(*argv: str) -> int:
    return main(["export", *map(str, argv)])


def test_a_full_fine_tune_loads_in_transformers_and_scores_as_stored(full_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "model"
    assert export(full_run, "--run", "ab-seed0", "--out", target) == 0
    node = RunDir(full_run).run("ab-seed0").stages[-1]
    rescored(full_run, node, AutoModelForCausalLM.from_pretrained(target), AutoTokenizer.from_pretrained(target))
    card = (target / "README.md").read_text()
    first = RunDir(full_run).run("ab-seed0").stages[1]
    assert "library_name: \"transformers\"" in card and first in card and node in card  # the chain
    accuracies = card.split("## Accuracies")[1].split("## Forgetting")[0]
    stored = RunDir(full_run).evaluation(node, "mcq_b")
    assert re.search(rf"\| mcq_b\s+\| ALL\s+\|\s+{stored.n} \|\s+{stored.acc:.2f} \|", accuracies)
    forgetting = card.split("## Forgetting")[1]
    stored_f = RunDir(full_run).run_metrics("ab-seed0")["forgetting"][0]
    assert "mcq_a" in forgetting and f"{stored_f['F']:.2f}" in forgetting
    assert "ab-seed0" in card and "train_limit 8" in card and "| lr " in card


def test_a_lora_adapter_loads_in_peft_on_its_base(lora_run, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first, second = RunDir(lora_run).run("ab-seed0").stages[1:]
    one, two = tmp_path / "one", tmp_path / "two"
    assert export(lora_run, "--stage", first, "--out", one) == 0
    assert not (one / "base").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), one)
    rescored(lora_run, first, model, AutoTokenizer.from_pretrained(one))
    # a later stage's adapter was trained on its parent's merged weights: they come along in base/
    assert export(lora_run, "--stage", second, "--out", two) == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(two / "base"), two)
    rescored(lora_run, second, model, AutoTokenizer.from_pretrained(two))
    assert "library_name: \"peft\"" in (two / "README.md").read_text()


def test_a_merged_lora_stage_loads_in_transformers(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "merged"
    assert export(lora_run, "--run", "ab-seed0", "--out", target, "--merge") == 0
    assert not (target / "adapter_config.json").exists()
    node = RunDir(lora_run).run("ab-seed0").stages[-1]
    rescored(lora_run, node, AutoModelForCausalLM.from_pretrained(target), AutoTokenizer.from_pretrained(target))


@pytest.mark.parametrize("case", ["unknown stage", "unknown run", "base model", "output not empty", "no run dir",
                                  "released checkpoint"])
def test_export_errors_are_one_line(full_run, tmp_path, capsys, case):
    base = next(n for n in RunDir(full_run).node_names() if n.startswith("base-"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    argv, fragment = {
        "unknown stage": ([full_run, "--stage", "s9-nope", "--out", tmp_path / "m"], "no stage"),
        "unknown run": ([full_run, "--run", "nope", "--out", tmp_path / "m"], "no finished run"),
        "base model": ([full_run, "--stage", base, "--out", tmp_path / "m"], "base model"),
        "output not empty": ([full_run, "--run", "ab-seed0", "--out", tmp_path / "full"], "not an empty folder"),
        "no run dir": ([tmp_path / "nothing", "--run", "ab-seed0", "--out", tmp_path / "m"], "does not exist"),
        "released checkpoint": ([tmp_path / "copy", "--run", "ab-seed0", "--out", tmp_path / "m"], "missing checkpoint"),
    }[case]
    if case == "released checkpoint":
        import shutil

        shutil.copytree(full_run, tmp_path / "copy")
        node = RunDir(full_run).run("ab-seed0").stages[-1]
        shutil.rmtree(RunDir(tmp_path / "copy").checkpoint_dir(node))
    code = export(*argv)
    assert_one_line_error(code, capsys.readouterr().err, fragment)
    assert not (tmp_path / "m").exists()
