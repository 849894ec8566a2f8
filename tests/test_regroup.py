"""Regrouping after the run (`summarize` / `report --group-by`): per-group forgetting, BF_g and the BF summaries
recomputed for per-example metadata columns (or their intersection) from the stored predictions, on a tiny run
directory written record by record, with the expected numbers computed by hand."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from chaintune.analysis import load_runs, summary_tables
from chaintune.analysis.records import export_run
from chaintune.cli import main
from chaintune.errors import ChaintuneError
from chaintune.rundir import EvalRecord, NodeRecord, RunDir, RunRecord
from chaintune.stats import adjust_p_values

# Safety task S: 12 questions q0…q11; cond a (q0–q5) / b (q6–q11); pol neg (even) / pos (odd). Right after stage 1
# (trained on S) every question is answered correctly; after stage 2 (trained on C) the listed ones are wrong.
WRONG_AFTER = {0: [0, 1, 2, 6], 1: [0, 6, 7]}
# By hand, F (pp) of seed 0 / seed 1: overall 33.33 / 25; cond a 50 / 16.67, b 16.67 / 33.33;
# a×neg {q0,q2,q4}: 66.67 / 33.33, a×pos {q1,q3,q5}: 33.33 / 0, b×neg {q6,q8,q10}: 33.33 / 33.33, b×pos: 0 / 33.33.


def _s_questions() -> pd.DataFrame:
    return pd.DataFrame({"id": [f"q{i}" for i in range(12)], "group": ["g"] * 12, "gold": [0] * 12,
                         "cond": ["a"] * 6 + ["b"] * 6, "pol": ["neg", "pos"] * 6})


def _c_questions() -> pd.DataFrame:
    return pd.DataFrame({"id": [f"c{i}" for i in range(4)], "group": [None] * 4, "gold": [1] * 4,
                         "topic": ["x", "y"] * 2})


def _write_eval(out: RunDir, node: str, task: str, kind: str, questions: pd.DataFrame, correct: list[bool]) -> None:
    preds = questions.assign(pred=[q.gold if ok else 1 - q.gold for q, ok in zip(questions.itertuples(), correct)],
                             correct=correct, logliks=[[0.0, -1.0]] * len(questions))
    preds = preds.assign(pred_norm=preds.pred, correct_norm=preds.correct)
    groups = preds[preds.group.notna()].groupby("group")
    per_group = {g: {"acc": 100 * p.correct.mean(), "acc_norm": 100 * p.correct.mean(), "n": len(p)} for g, p in groups}
    acc = 100 * preds.correct.mean()
    out.write_record(out.eval_path(node, task), EvalRecord(task=task, n=len(preds), acc=acc, acc_norm=acc,
                                                           per_group=per_group, kind=kind, metrics=[]))
    out.write_table(out.predictions_path(node, task), preds)


def _write_node(out: RunDir, node: str, index: int, task: str, seed: int, parent: str) -> None:
    out.write_record(out.node_path(node), NodeRecord(
        status="done", key=node, index=index, task=task, stage={"task": task}, training={"lr": 1e-3}, seed=seed,
        parent=parent, n_train_examples=8, steps=1, tokens=10, train_seconds=1.0, tokens_per_second=10.0,
        checkpoint_sha256={}))


@pytest.fixture
def tiny_run(tmp_path):
    """A finished run directory of chain S→C with 2 seeds (no model involved): min_group_size 4, Holm."""
    out = RunDir(tmp_path / "run")
    out.write_experiment({"name": "tiny", "min_group_size": 4, "multiple_comparisons": "holm", "data_seed": 0})
    base, rows = "base-0", []
    for task, kind, questions in (("S", "safety", _s_questions()), ("C", "capability", _c_questions())):
        _write_eval(out, base, task, kind, questions, [False] * len(questions))
    for seed, wrong in WRONG_AFTER.items():
        s1, s2 = f"s1-S-seed{seed}", f"s2-C-seed{seed}"
        _write_node(out, s1, 1, "S", seed, base)
        _write_node(out, s2, 2, "C", seed, s1)
        for node, s_correct in ((s1, [True] * 12), (s2, [i not in wrong for i in range(12)])):
            _write_eval(out, node, "S", "safety", _s_questions(), s_correct)
            _write_eval(out, node, "C", "capability", _c_questions(), [node == s2] * 4)
        run_id = f"S-C-seed{seed}"
        record = RunRecord(run_id=run_id, id=run_id, chain="S-C", base_chain="S-C", seed=seed, stages=[base, s1, s2],
                           eval_tasks=["S", "C"])
        rows += export_run(out, record, "tiny", 0, 4, {"S": [], "C": []})  # runs/<run>/, as the engine does
    out.write_table(out.results_path, pd.DataFrame(rows))
    return out


def _groups(out: RunDir, group_by: tuple[str, ...]) -> pd.DataFrame:
    return summary_tables(load_runs(out, group_by))["group_forgetting"].set_index("group")


def test_one_column_gives_the_hand_computed_group_forgetting(tiny_run):
    tables = summary_tables(load_runs(tiny_run, ("cond",)))
    g = tables["group_forgetting"].set_index("group")
    assert set(g.task) == {"S"} and sorted(g.index) == ["a", "b"]  # C has no `cond`: no groups
    assert g.F_g.to_dict() == pytest.approx({"a": (50 + 100 / 6) / 2, "b": (100 / 6 + 100 / 3) / 2})
    f = (100 / 3 + 25) / 2
    assert g.BF_g.to_dict() == pytest.approx({"a": (50 + 100 / 6) / 2 - f, "b": (100 / 6 + 100 / 3) / 2 - f})
    assert g.n.tolist() == [6, 6] and g.included.all()
    bf = tables["biased_forgetting"].iloc[0]
    # per run: seed 0 spread 50 − 16.67, seed 1 33.33 − 16.67; max |BF_g| 16.67 and 8.33
    assert bf.BF_spread == pytest.approx((100 / 3 + 100 / 6) / 2)
    assert bf.BF_max == pytest.approx((100 / 6 + 100 / 12) / 2)
    assert g.ci_method.iloc[0].startswith("seed×question")  # the crossed seed × question intervals, as by default


def test_intersection_of_columns_with_small_groups_flagged(tiny_run):
    g = _groups(tiny_run, ("cond", "pol"))
    assert sorted(g.index) == ["a × neg", "a × pos", "b × neg", "b × pos"]
    assert g.F_g.to_dict() == pytest.approx({"a × neg": 50.0, "a × pos": 100 / 6, "b × neg": 100 / 3,
                                             "b × pos": 100 / 6})
    assert (g.n == 3).all() and not g.included.any()  # n = 3 < min_group_size 4: shown, flagged, not tested
    assert g.BF_g_adj_p.isna().all()
    bf = summary_tables(load_runs(tiny_run, ("cond", "pol")))["biased_forgetting"].iloc[0]
    assert math.isnan(bf.BF_spread)


def test_included_groups_are_corrected_together(tiny_run):
    g = _groups(tiny_run, ("pol",))
    assert g.included.all() and g.correction.iloc[0] == "Holm"
    expected = adjust_p_values(g.BF_g_p_value.to_numpy(), "holm")
    assert g.BF_g_adj_p.to_numpy() == pytest.approx(expected)


def test_grouping_by_the_group_column_reproduces_the_default(tiny_run):
    default = summary_tables(load_runs(tiny_run))
    regrouped = summary_tables(load_runs(tiny_run, ("group",)))
    for name in ("group_forgetting", "biased_forgetting", "forgetting"):
        pd.testing.assert_frame_equal(default[name], regrouped[name])


@pytest.mark.parametrize("group_by, message", [
    (("nope",), "unknown --group-by column nope (available: S: cond, gold, group, pol; C: gold, topic)"),
    (("cond", "topic"), "no evaluated task holds all of --group-by cond,topic"),
])
def test_bad_columns_are_one_line_errors_listing_the_columns(tiny_run, group_by, message):
    with pytest.raises(ChaintuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_runs(tiny_run, group_by)


def test_cli_writes_regrouped_tables_beside_the_default(tiny_run, capsys):
    assert main(["summarize", str(tiny_run.root)]) == 0
    default = (tiny_run.summary_dir / "group_forgetting.csv").read_text()
    assert main(["summarize", str(tiny_run.root), "--group-by", "cond,pol"]) == 0
    folder = tiny_run.root / "summary" / "by_cond+pol"
    assert "a × neg" in (folder / "group_forgetting.csv").read_text()
    assert "(groups: cond × pol)" in (folder / "summary.md").read_text()
    assert (tiny_run.summary_dir / "group_forgetting.csv").read_text() == default  # not overwritten
    assert main(["report", str(tiny_run.root), "--group-by", "cond", "--format", "md"]) == 0
    report = (tiny_run.root / "report" / "by_cond" / "report.md").read_text()
    assert "regrouped by cond" in report and "| a " in report
    capsys.readouterr()
    assert main(["summarize", str(tiny_run.root), "--group-by", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "available: S: cond, gold, group, pol; C: gold, topic" in err
