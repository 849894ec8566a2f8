"""CLI: task listing, evaluation, and one-line errors with exit code 2 for bad input."""
from __future__ import annotations

import json

import pytest

from chaintune.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: usage errors (one line, exit 2) and --help
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("chaintune: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in err


def test_tasks_lists_all_tasks_with_sizes_and_groups(capsys, real_data_dir):
    code, out, _ = run_cli(capsys, "tasks", "--data-dir", str(real_data_dir))
    assert code == 0
    for fragment in ("toxigenqa", "bbq", "arc_easy", "arc_challenge", "cqa", "cqa2", "7169", "1791", "9244", "2712",
                     "1172", "1221", "9264", "2541", "2249", "women", "Religion", "Sexual_orientation"):
        assert fragment in out, fragment
    assert "2249.00" not in out and ".00 " not in out  # split sizes are counts, not floats (issue 19)


def test_eval_writes_json_and_predictions(capsys, tmp_path, tiny_model_dir, real_data_dir):
    out_file = tmp_path / "e.json"
    code, out, _ = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--task", "toxigenqa", "--limit", "26",
                           "--data-dir", str(real_data_dir), "--output", str(out_file), "--no-progress")
    assert code == 0 and "toxigenqa" in out
    summary = json.loads(out_file.read_text())
    assert summary["n"] == 26 and len(summary["per_group"]) == 13 and 0 <= summary["acc"] <= 100
    assert out_file.with_suffix(".predictions.parquet").is_file()


@pytest.mark.parametrize("argv, fragments", [
    (["eval", "--task", "nope", "--limit", "2"], ["unknown task 'nope'", "toxigenqa"]),
    (["eval", "--task", "toxigenqa", "--data-dir", "/does/not/exist"], ["data directory", "--data-dir"]),
    (["eval", "--task", "toxigenqa", "--limit", "2", "--model", "/no/such/model"], ["does not exist", "--model"]),
    (["eval", "--task", "toxigenqa", "--limit", "0"], ["--limit: 0 is out of range", "≥ 1"]),
    (["eval", "--task", "arc_challenge", "--split", "train"], ["no 'train' split", "arc_easy"]),
    (["run", "/no/such/config.yaml"], ["config file", "does not exist"]),
    (["summarize", "/no/such/run"], ["does not exist"]),
])
def test_bad_input_is_one_line_exit_2(capsys, real_data_dir, argv, fragments):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *fragments)


def test_malformed_record_names_file_and_line(capsys, tmp_path):
    (tmp_path / "csqa2").mkdir()
    import gzip

    with gzip.open(tmp_path / "csqa2" / "CSQA2_dev.json.gz", "wt") as fh:
        fh.write('{"id": "1", "question": "q?", "answer": "yes"}\n{broken\n')
    code, _, err = run_cli(capsys, "eval", "--task", "cqa2", "--data-dir", str(tmp_path), "--limit", "1")
    assert_one_line_error(code, err, "CSQA2_dev.json.gz:2", "malformed JSON")


def test_bad_config_key_is_named(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("chains:\n  - name: a\n    stages: [{task: toxigenqa, lr: 1e-5, bacth_size: 4}]\nlearning_rate: 3\n")
    code, _, err = run_cli(capsys, "run", str(cfg))
    assert_one_line_error(code, err, "bacth_size", "learning_rate: unknown key")


def test_debug_shows_traceback(capsys):
    from chaintune.errors import ChaintuneError

    with pytest.raises(ChaintuneError):
        main(["--debug", "eval", "--task", "nope"])


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    for option in ("--model", "--task", "--split", "--limit", "--seed", "--adapter", "--output", "--device", "--dtype",
                   "--batch-tokens", "--trust-remote-code", "--data-dir"):
        assert option in out


def test_curvature_command(capsys, tmp_path, tiny_model_dir, real_data_dir):
    out_file = tmp_path / "c.json"
    code, out, _ = run_cli(capsys, "curvature", "--model", str(tiny_model_dir), "--task", "toxigenqa",
                           "--examples", "8", "--topk", "2", "--data-dir", str(real_data_dir), "--output", str(out_file))
    assert code == 0 and "lambda_max" in out
    result = json.loads(out_file.read_text())
    assert result["n_examples"] == 8 and len(result["topk"]) == 2
    assert result["topk"] == sorted(result["topk"], reverse=True) and result["iterations"] >= 2
    assert result["method"] == "lanczos"


def test_curvature_command_with_held_out_subsets(capsys, tmp_path, tiny_model_dir, real_data_dir):
    out_file = tmp_path / "c.json"
    code, out, _ = run_cli(capsys, "curvature", "--model", str(tiny_model_dir), "--task", "toxigenqa",
                           "--examples", "3", "--subsets", "2", "--held-out", "2", "--data-dir", str(real_data_dir),
                           "--output", str(out_file))
    assert code == 0 and "(2 subsets + 2 held out)" in out
    result = json.loads(out_file.read_text())
    assert result["n_examples"] == 12 and result["held_out"] == 2 and len(result["lambda_max_subsets"]) == 4
    assert result["lambda_max_ci_low"] < result["lambda_max"] < result["lambda_max_ci_high"]
    code, _, err = run_cli(capsys, "curvature", "--model", str(tiny_model_dir), "--task", "toxigenqa",
                           "--examples", "3", "--held-out", "2", "--data-dir", str(real_data_dir))
    assert code != 0 and "held-out" in err and "Traceback" not in err


def test_curvature_command_power_method_agrees_with_lanczos(capsys, tmp_path, tiny_model_dir, real_data_dir):
    results = {}
    for method in ("lanczos", "power"):
        out_file = tmp_path / f"{method}.json"
        code, _, _ = run_cli(capsys, "curvature", "--model", str(tiny_model_dir), "--task", "toxigenqa",
                             "--examples", "8", "--method", method, "--graph-budget-mib", "64",
                             "--data-dir", str(real_data_dir), "--output", str(out_file))
        assert code == 0
        results[method] = json.loads(out_file.read_text())
    assert results["power"]["method"] == "power"
    lanczos, power = results["lanczos"]["lambda_max"], results["power"]["lambda_max"]
    assert abs(lanczos - power) <= 0.02 * abs(lanczos)


def test_terminal_tables_show_mean_std_and_ci():
    import pandas as pd

    from chaintune.formatting import display_frame

    df = pd.DataFrame({"chain": ["a", "b"], "F": [2.0, 1.0], "F_std": [1.0, float("nan")],
                       "F_ci_low": [0.0, float("nan")], "F_ci_high": [4.0, float("nan")], "n": [1, None]})
    shown, numeric = display_frame(df.astype({"n": "Int64"}), std=True)
    assert shown.to_dict("list") == {"chain": ["a", "b"], "F": ["2.00 ± 1.00 [0.00, 4.00]", "1.00"], "n": ["1", "—"]}
    assert numeric == ["F", "n"]
    assert display_frame(df)[0].F.tolist() == ["2.00 [0.00, 4.00]", "1.00"]  # the report's form: no ± sd


def test_summarize_and_report_of_user_tasks_in_a_fresh_process(tmp_path, mcq_experiment):
    """A run on grouped user tasks (custom_tasks) is summarised and reported by new processes, which know the tasks
    only from the run directory (issue 18: this failed with "unknown task")."""
    import subprocess
    import sys

    import chaintune

    out = tmp_path / "out"
    # the tiny random model learns nothing: with the quality gate its run would (rightly) leave every table empty
    cfg = mcq_experiment(out, quality_gate={"validation_size": 0})
    outcome = chaintune.run(cfg, echo=lambda *_: None, progress=False)
    assert not outcome.failed and outcome.completed_runs == ["ab-seed0"]
    script = (f"from chaintune.cli import main; import sys; sys.exit(main(['summarize', {str(out)!r}]) or "
              f"main(['report', {str(out)!r}]))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    group_forgetting = (out / "summary" / "group_forgetting.csv").read_text()
    assert "mcq_a" in group_forgetting and "g0" in group_forgetting and "g1" in group_forgetting
    assert (out / "report" / "report.html").is_file()
