"""lm-evaluation-harness tasks as chaintune tasks (chaintune.tasks.lmeval): read through lm-eval's TaskManager from
local data files, scored with the same per-choice log-likelihoods as lm-eval's own requests, grouped by a doc field,
listed by `chaintune tasks --lm-eval`, and used in a run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from lm_eval_parity import TOLERANCE, make_hflm  # noqa: E402

from chaintune.cli import main  # noqa: E402
from chaintune.errors import ChaintuneError  # noqa: E402
from chaintune.tasks import load_splits, load_task, parse_user_task, register_user_task  # noqa: E402

TOPICS = ("plants", "rocks", "stars")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A folder with an lm-eval task YAML (dataset_path json + data_files, a description, Jinja doc_to_* fields)
    and its train/test JSONL: 12 + 9 questions, three topics, three choices each."""
    root = tmp_path_factory.mktemp("lm-eval-task")
    for split, n in (("train", 12), ("test", 9)):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for i in range(n):
                fh.write(json.dumps({"question": f"{split} question {i} about {TOPICS[i % 3]}?",
                                     "options": [f"answer {i}", f"reply {i + 1}", "neither"], "label": i % 3,
                                     "topic": TOPICS[i % 3], "level": i % 2,
                                     "passage": "long context " * 20}) + "\n")
    (root / "ct_tiny.yaml").write_text(yaml.safe_dump({
        "task": "ct_tiny", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(root / "train.jsonl"), "test": str(root / "test.jsonl")}},
        "output_type": "multiple_choice", "training_split": "train", "test_split": "test",
        "description": "Answer the question.\n\n", "doc_to_text": "Q: {{question}}\nA:",
        "doc_to_choice": "{{options}}", "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))
    return root


@pytest.fixture(scope="module")
def tiny_task(task_dir) -> str:
    return register_user_task({"name": "ct_tiny", "lm_eval": str(task_dir / "ct_tiny.yaml"), "kind": "safety",
                               "group": "topic"})


def test_examples_come_from_lm_eval_templates(tiny_task):
    splits = load_splits(tiny_task)
    assert {k: len(v) for k, v in splits.items()} == {"train": 12, "test": 9}
    first = splits["test"][0]
    assert first.prompt == "Answer the question.\n\nQ: test question 0 about plants?\nA:"
    assert first.choices == (" answer 0", " reply 1", " neither") and first.gold == 0
    assert first.group == "plants" and sorted({e.group for e in splits["test"]}) == sorted(TOPICS)
    # short scalar doc fields are kept as metadata (so --group-by can use them); long texts and lists are not
    assert set(first.meta) == {"label", "level", "question", "topic"}


def test_same_log_likelihoods_as_lm_eval(tiny_task, task_dir):
    """lm-eval builds its own requests for the task (build_all_requests) and scores them with HFLM; chaintune scores
    the bridged examples: every per-choice log-likelihood agrees to 1e-3 nats."""
    from chaintune.evaluate import score_examples
    from chaintune.models import tiny_llama
    from chaintune.tasks.lmeval import load_lm_eval_task

    model, tokenizer = tiny_llama()
    task = load_lm_eval_task(parse_user_task({"name": "ct_tiny", "lm_eval": str(task_dir / "ct_tiny.yaml")}))
    task.build_all_requests(rank=0, world_size=1)
    lm = make_hflm(model, tokenizer, batch_size=4)
    results = lm.loglikelihood(task.instances, disable_tqdm=True)
    theirs: dict[int, dict[int, float]] = {}
    for inst, (ll, _greedy) in zip(task.instances, results):
        theirs.setdefault(inst.doc_id, {})[inst.idx] = ll
    examples = load_task(tiny_task, "test")
    ours = score_examples(model, tokenizer, examples)
    assert len(theirs) == len(ours) == 9
    deltas = [abs(a - theirs[d][i]) for d, scores in enumerate(ours) for i, a in enumerate(scores)]
    assert len(deltas) == 27 and max(deltas) < TOLERANCE


@pytest.mark.slow  # renders lm-eval's templates for 2,376 questions (about a minute on 2 shared cores)
def test_lm_evals_own_arc_easy_config_on_local_files(tmp_path, real_data_dir):
    """lm-eval's arc_easy.yaml (its doc_to_text / doc_to_choice / doc_to_target), pointed at the local ARC-Easy
    test file: the bridged questions score as lm-eval's own requests do."""
    import lm_eval

    from chaintune.evaluate import score_examples
    from chaintune.models import tiny_llama
    from chaintune.tasks.lmeval import load_lm_eval_task

    config = tmp_path / "arc_easy_local.yaml"
    config.write_text(yaml.safe_dump({
        "include": str(Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"), "task": "arc_easy_local",
        "dataset_path": "json", "dataset_name": None, "training_split": None, "validation_split": None,
        "dataset_kwargs": {"data_files": {"test": str(real_data_dir / "arc" / "ARC-Easy_hf_format" / "test.json")}}}))
    spec = {"name": "arc_easy_local", "lm_eval": str(config), "kind": "capability"}
    register_user_task(spec)
    examples = load_splits("arc_easy_local")["test"]
    assert len(examples) == 2376 and examples[0].prompt.startswith("Question: ")
    task = load_lm_eval_task(parse_user_task(spec))
    task.build_all_requests(limit=24, rank=0, world_size=1)
    model, tokenizer = tiny_llama()
    theirs: dict[int, dict[int, float]] = {}
    for inst, (ll, _) in zip(task.instances, make_hflm(model, tokenizer, 8).loglikelihood(task.instances,
                                                                                           disable_tqdm=True)):
        theirs.setdefault(inst.doc_id, {})[inst.idx] = ll
    ours = score_examples(model, tokenizer, examples[:24])
    assert max(abs(a - theirs[d][i]) for d, scores in enumerate(ours) for i, a in enumerate(scores)) < TOLERANCE


def test_unusable_tasks_are_one_line_errors(task_dir, tmp_path):
    register_user_task({"name": "ct_missing", "lm_eval": str(tmp_path / "nope.yaml")})
    with pytest.raises(ChaintuneError, match="lm-eval task config .* does not exist"):
        load_task("ct_missing")
    register_user_task({"name": "ct_badgroup", "lm_eval": str(task_dir / "ct_tiny.yaml"), "group": "colour"})
    with pytest.raises(ChaintuneError, match="no scalar field 'colour' for the group"):
        load_task("ct_badgroup")
    with pytest.raises(ChaintuneError, match="user task 'x': lm_eval: String should have at least 1 character"):
        register_user_task({"name": "x", "lm_eval": ""})


def test_multiple_choice_tasks_of_an_include_folder(task_dir):
    from chaintune.tasks.lmeval import multiple_choice_tasks

    assert multiple_choice_tasks(task_dir, defaults=False) == [
        {"task": "lmeval:ct_tiny", "data": "local files", "config": str(task_dir / "ct_tiny.yaml")}]


@pytest.mark.slow  # indexes lm-eval's whole catalogue (13k YAML files) twice: 20 s to 2 min on 2 shared cores
def test_cli_lists_lm_eval_tasks_and_prefixed_names_resolve(task_dir, capsys, monkeypatch):
    assert main(["tasks", "--lm-eval", "--include", str(task_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = {line.split("\t")[0]: line.split("\t")[1] for line in out}
    assert listed["lmeval:ct_tiny"] == "local files" and listed["lmeval:arc_easy"] == "allenai/ai2_arc"
    assert "lmeval:wikitext" not in listed  # not multiple choice
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "--task", "lmeval:no_such_task_here"]) == 2
    assert "lm-eval knows no task 'no_such_task_here'" in capsys.readouterr().err


def test_run_with_an_lm_eval_task_has_per_group_forgetting(tmp_path, mcq_experiment, task_dir):
    """A chain trains the lm-eval task, then a user task; the lm-eval task's groups get F_g and BF_g."""
    import chaintune
    from chaintune.analysis import load_runs
    from chaintune.rundir import RunDir

    out = tmp_path / "out"
    cfg = mcq_experiment(out, quality_gate={"validation_size": 0}, min_group_size=1)
    cfg["custom_tasks"] = cfg["custom_tasks"] + [{"name": "ct_tiny", "lm_eval": str(task_dir / "ct_tiny.yaml"),
                                                  "kind": "safety", "group": "topic"}]
    cfg["tasks"] = cfg["tasks"] | {"ct_tiny": {"train_limit": 8}}
    cfg["chains"] = [{"name": "lm", "stages": [{"task": "ct_tiny"}, {"task": "mcq_a"}]}]
    outcome = chaintune.run(cfg, echo=lambda *_: None, progress=False)
    assert not outcome.failed
    run = load_runs(RunDir(out))[0]
    groups = [g for g in run.metrics["group_forgetting"] if g["task"] == "ct_tiny"]
    assert sorted(g["group"] for g in groups) == sorted(TOPICS) and all(g["n"] == 3 for g in groups)
    regrouped = load_runs(RunDir(out), ("level",))[0]  # a doc field stored as metadata
    assert sorted(g["group"] for g in regrouped.metrics["group_forgetting"] if g["task"] == "ct_tiny") == ["0", "1"]
