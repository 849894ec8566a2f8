"""Reports: plotting functions on synthetic tables, the learning-rate / replay helpers on a faked results table, and
the whole report of a real (tiny-model) run as HTML and Markdown, checked as files and in headless Chromium."""
from __future__ import annotations

import base64
import io
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.figure import Figure

from chaintune.errors import ChaintuneError
from chaintune.metrics import correlation
from chaintune.report import (
    accuracy_matrices, chain_tasks, lr_sweep_points, plot_accuracy_matrices, plot_accuracy_matrix, plot_bbq_bias,
    plot_curvature, plot_curvature_vs_forgetting, plot_forgetting, plot_group_forgetting, plot_lr_forgetting,
    plot_replay, plot_training_curves, replay_points, write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOX_GROUPS = ["asian", "black", "jewish", "latino", "lgbtq", "muslim", "women", "tiny_group"]


# ------------------------------------------------------------------------------------------------ synthetic data
def fake_experiment() -> dict:
    """A first-stage learning-rate sweep (3 rates), the reverse order, and a replay sweep (f = 0, 0.05, 0.25)."""
    chains = [{"name": f"tox_arc_lr{lr:g}", "stages": [{"task": "toxigenqa", "lr": lr}, {"task": "arc_easy"}]}
              for lr in (1e-6, 1e-5, 1e-4)]
    chains.append({"name": "arc_tox", "stages": [{"task": "arc_easy"}, {"task": "toxigenqa"}]})
    for f in (0.0, 0.05, 0.25):
        third = {"task": "arc_easy"} | ({"replay": {"task": "toxigenqa", "fraction": f}} if f else {})
        chains.append({"name": f"replay_f{f:g}", "stages": [{"task": "toxigenqa"}, {"task": "arc_easy"}, third]})
    return {"name": "fake", "training": {"lr": 1e-5, "method": "full"}, "seeds": [0, 1, 2], "chains": chains,
            "min_group_size": 30}


def fake_results(experiment: dict) -> pd.DataFrame:
    """A tidy results table (the columns chain.write_results writes) from a simple model of learning/forgetting."""
    rng = np.random.default_rng(0)
    rows = []
    for chain in experiment["chains"]:
        stages = chain["stages"]
        first_lr = stages[0].get("lr", experiment["training"]["lr"])
        for seed in experiment["seeds"]:
            acc = {"toxigenqa": 60.0, "arc_easy": 50.0}
            for s in range(len(stages) + 1):
                if s > 0:
                    st = stages[s - 1]
                    if st["task"] == "toxigenqa":
                        acc["arc_easy"] -= 4 + rng.normal(0, 1)
                        acc["toxigenqa"] = 80 + rng.normal(0, 1)
                    elif s == 2:
                        acc["toxigenqa"] -= 6 + 4 * math.log10(first_lr / 1e-6) + rng.normal(0, 1)
                        acc["arc_easy"] = 70 + rng.normal(0, 1)
                    else:  # third (replay) stage
                        f = (st.get("replay") or {}).get("fraction", 0.0)
                        acc["toxigenqa"] += min(1.0, 4 * f) * 8 + rng.normal(0, 0.5)
                        acc["arc_easy"] -= 10 * f + rng.normal(0, 0.5)
                common = {"experiment": experiment["name"], "chain": chain["name"], "seed": seed,
                          "run_id": f"{chain['name']}-seed{seed}", "stage": s,
                          "stage_name": "base" if s == 0 else stages[s - 1]["task"],
                          "trained_task": None if s == 0 else stages[s - 1]["task"], "node": f"n{s}"}
                for task, a in acc.items():
                    rows.append(common | {"eval_task": task, "group": "ALL", "n": 100, "acc": a, "acc_norm": a})
                for k, g in enumerate(TOX_GROUPS):
                    a = float(np.clip(acc["toxigenqa"] + 3 * (k - 3) + rng.normal(0, 2), 0, 100))
                    rows.append(common | {"eval_task": "toxigenqa", "group": g, "n": 10 if g == "tiny_group" else 40,
                                          "acc": a, "acc_norm": a})
    return pd.DataFrame(rows)


def fake_runs(experiment: dict, results: pd.DataFrame) -> list:
    """The runs of `fake_results` as analysis sees a folder without stage records (analysis.RunData)."""
    from chaintune.analysis.records import runs_from_results

    return runs_from_results(results, experiment)


def _ci(df: pd.DataFrame, col: str, half: float = 2.0) -> pd.DataFrame:
    return df.assign(**{f"{col}_ci_low": df[col] - half, f"{col}_ci_high": df[col] + half, "seeds": 3})


def fake_tables() -> dict[str, pd.DataFrame]:
    """Summary tables shaped like chaintune.analysis.summary_tables's, with plausible values."""
    rng = np.random.default_rng(1)
    forg = pd.DataFrame([{"chain": c, "task": t, "trained_stage": 1, "after_stage": 2, "F": f, "RF": 100 * f / 80}
                         for c, t, f in [("tox_arc", "toxigenqa", 9.0), ("arc_tox", "arc_easy", 3.0),
                                         ("bbq_arc", "bbq", 6.5), ("arc_bbq", "arc_easy", 2.0)]])
    forg = _ci(_ci(forg, "F"), "RF", 2.5)
    groups = pd.DataFrame([{"chain": "tox_arc", "task": "toxigenqa", "group": g, "F_g": 9 + rng.normal(0, 5),
                            "n": 10 if g == "tiny_group" else 40, "included": g != "tiny_group"} for g in TOX_GROUPS])
    groups["BF_g"] = groups["F_g"] - 9.0
    groups = _ci(_ci(groups, "F_g", 3), "BF_g", 3)
    bbq = pd.DataFrame([{"chain": "bbq_arc", "task": "bbq", "stage": s, "category": c,
                         "s_dis": rng.normal(5 * s, 8), "s_amb": rng.normal(10 - 3 * s, 5)}
                        for s in (0, 1, 2) for c in ["Age", "Nationality", "Religion", "Sexual_orientation",
                                                     "overall"]])
    bbq = _ci(_ci(bbq, "s_dis", 4), "s_amb", 3)
    points = pd.DataFrame([{"chain": c, "seed": s, "task": t, "stage": 1, "lambda_max": lam + rng.normal(0, 3),
                            "F": f + rng.normal(0, 1)}
                           for c, t, lam, f in [("tox_arc", "toxigenqa", 40, 9), ("arc_tox", "arc_easy", 15, 3)]
                           for s in range(3)])
    points["RF"] = 100 * points["F"] / 80
    corr = pd.DataFrame([{"target": t, "group": "ALL", **vars(correlation(points.lambda_max, points[t]))}
                         for t in ("F", "RF")])
    curv = points.groupby(["chain", "stage", "task"], as_index=False, sort=False).lambda_max.mean()
    curv = _ci(curv, "lambda_max", 4)
    curves = pd.DataFrame([{"chain": c, "seed": seed, "stage": s, "task": t, "step": k,
                            "loss": 2.5 / (1 + 0.1 * k) + 0.3 * (s - 1) + rng.normal(0, 0.05)}
                           for c, tasks in [("tox_arc", ["toxigenqa", "arc_easy"]),
                                            ("arc_tox", ["arc_easy", "toxigenqa"])]
                           for seed in (0, 1) for s, t in enumerate(tasks, start=1) for k in range(1, 21)])
    return {"forgetting": forg, "group_forgetting": groups, "bbq_bias": bbq, "curvature": curv,
            "curvature_points": points, "curvature_vs_forgetting": corr, "training_curves": curves}


def _png_ok(data: bytes) -> tuple[int, int]:
    """Raise unless `data` is a PNG that PIL decodes; returns (width, height)."""
    from PIL import Image

    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.size


def _render(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ plotting functions
def test_every_plot_function_returns_a_paper_sized_figure():
    import matplotlib.pyplot as plt

    t = fake_tables()
    exp = fake_experiment()
    res = fake_results(exp)
    before = plt.get_fignums()
    figs = {
        "accuracy_matrix": plot_accuracy_matrix(accuracy_matrices(res)["tox_arc_lr1e-05"]),
        "accuracy_matrices": plot_accuracy_matrices(accuracy_matrices(res)),
        "forgetting": plot_forgetting(t["forgetting"], {"tox_arc": ["toxigenqa", "arc_easy"],
                                                        "arc_tox": ["arc_easy", "toxigenqa"]}),
        "forgetting_no_routes": plot_forgetting(t["forgetting"]),
        "group_forgetting": plot_group_forgetting(t["group_forgetting"], 30),
        "bbq_bias": plot_bbq_bias(t["bbq_bias"], {0: "base", 1: "bbq", 2: "arc_easy"}),
        "curvature": plot_curvature(t["curvature"], t["curvature_points"]),
        "curvature_vs_forgetting": plot_curvature_vs_forgetting(t["curvature_points"], t["curvature_vs_forgetting"]),
        "curvature_vs_forgetting_no_corr": plot_curvature_vs_forgetting(t["curvature_points"]),
        "lr_forgetting": plot_lr_forgetting(lr_sweep_points(fake_runs(exp, res))),
        "replay": plot_replay(replay_points(fake_runs(exp, res))),
        "training_curves": plot_training_curves(t["training_curves"]),
    }
    for name, fig in figs.items():
        assert isinstance(fig, Figure), name
        w, h = fig.get_size_inches()
        assert 3.3 <= w <= 7.0 + 1e-9 and h <= 9.5, (name, w, h)
        width, height = _png_ok(_render(fig))
        assert width > 300 and height > 150, name
    assert plt.get_fignums() == before  # no pyplot figures were created (nothing to leak or to show)


def test_accuracy_matrix_draws_into_given_axes_and_annotates_every_cell():
    R = pd.DataFrame({"toxigenqa": [60.0, 80.0, 71.5], "arc_easy": [50.0, 46.0, float("nan")]},
                     index=pd.Index([0, 1, 2], name="stage"))
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_accuracy_matrix(R, ax=ax) is fig
    assert sorted(t.get_text() for t in ax.texts) == sorted(["60.0", "80.0", "71.5", "50.0", "46.0", "–"])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]


def test_group_forgetting_hatches_and_labels_small_groups_and_draws_task_average():
    t = fake_tables()["group_forgetting"]
    fig = plot_group_forgetting(t, min_group_size=30)
    ax = fig.axes[0]
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == 1  # only tiny_group
    labels = [lab.get_text() for lab in ax.get_xticklabels()]
    assert "tiny group (n=10)" in labels and "asian" in labels
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(9.0)
    legend = [x.get_text() for x in ax.get_legend().get_texts()]
    assert any("n < 30" in x for x in legend) and any("9.0 pp" in x for x in legend)


def test_curvature_scatter_legend_has_r_and_p_and_fitted_line():
    t = fake_tables()
    fig = plot_curvature_vs_forgetting(t["curvature_points"], t["curvature_vs_forgetting"])
    row = t["curvature_vs_forgetting"].iloc[0]
    texts = [x.get_text() for x in fig.axes[0].get_legend().get_texts()]
    assert any(f"r = {row.pearson_r:.2f}" in x and f"p = {row.pearson_p:.2g}" in x for x in texts)
    line = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == 50][0]
    x, y = line.get_xdata(), line.get_ydata()
    assert y[0] == pytest.approx(row.slope * x[0] + row.intercept)


# ------------------------------------------------------------------------------------------------ sweep helpers
def test_lr_sweep_points_use_stage_lr_and_forgetting_of_first_task():
    exp = fake_experiment()
    res = fake_results(exp)
    pts = lr_sweep_points(fake_runs(exp, res))
    assert len(pts) == len(exp["chains"]) * 3
    lrs = pts.groupby("chain").lr.first()
    assert lrs["tox_arc_lr1e-06"] == 1e-6 and lrs["arc_tox"] == 1e-5  # stage key, else training.lr
    overall_tox = res[(res.group == "ALL") & (res.eval_task == "toxigenqa")]
    r = overall_tox[(overall_tox.chain == "tox_arc_lr0.0001") & (overall_tox.seed == 1)].set_index("stage").acc
    row = pts[(pts.chain == "tox_arc_lr0.0001") & (pts.seed == 1)].iloc[0]
    assert row.F == pytest.approx(r[1] - r[2]) and row.RF == pytest.approx(100 * (r[1] - r[2]) / r[1])
    replay = pts[(pts.chain == "replay_f0.05") & (pts.seed == 0)].iloc[0]  # K = 3 for the replay chains
    r = res[(res.chain == "replay_f0.05") & (res.seed == 0) & (res.group == "ALL") & (res.eval_task == "toxigenqa")]
    assert replay.F == pytest.approx(r.set_index("stage").acc[1] - r.set_index("stage").acc[3])
    mean_f = pts[pts.chain.str.startswith("tox_arc")].groupby("lr").F.mean()
    assert mean_f.is_monotonic_increasing  # the fake data forgets more at higher rates


def test_replay_points_recovery_cost_and_zero_fraction_twin():
    exp = fake_experiment()
    res = fake_results(exp)
    pts = replay_points(fake_runs(exp, res))
    assert sorted(pts.fraction.unique()) == [0.0, 0.05, 0.25]  # replay_f0 (no replay key) is the f = 0 twin
    assert set(pts.safety_task) == {"toxigenqa"} and set(pts.capability_task) == {"arc_easy"}
    row = pts[(pts.chain == "replay_f0.25") & (pts.seed == 2)].iloc[0]
    R = res[(res.chain == "replay_f0.25") & (res.seed == 2) & (res.group == "ALL")].pivot(
        index="stage", columns="eval_task", values="acc")
    S, C = R["toxigenqa"], R["arc_easy"]
    assert row.recovery == pytest.approx((S[3] - S[2]) / (S[1] - S[2]))
    assert row.capability_cost == pytest.approx(C[2] - C[3])
    assert row.stage == 3
    assert replay_points(fake_runs(exp | {"chains": exp["chains"][:4]}, res)).empty  # no replay stage → no rows


def test_chain_tasks_and_accuracy_matrices_average_seeds():
    exp = fake_experiment()
    res = fake_results(exp)
    assert chain_tasks(res)["replay_f0.05"] == ["toxigenqa", "arc_easy", "arc_easy"]
    R = accuracy_matrices(res)["arc_tox"]
    assert list(R.index) == ["0: base", "1: arc_easy", "2: toxigenqa"] and list(R.columns) == ["toxigenqa", "arc_easy"]
    expected = res[(res.chain == "arc_tox") & (res.group == "ALL") & (res.stage == 2) &
                   (res.eval_task == "toxigenqa")].acc.mean()
    assert R.loc["2: toxigenqa", "toxigenqa"] == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------ whole reports
def _fake_run_dir(path: Path, experiment: dict) -> Path:
    path.mkdir(parents=True)
    fake_results(experiment).to_parquet(path / "results.parquet", index=False)
    (path / "experiment.yaml").write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


def _html_images(text: str) -> list[str]:
    return re.findall(r"<img\b[^>]*>", text)


def _without_images(text: str) -> str:
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", text)


def _no_external_resources(text: str) -> None:
    for attr, value in re.findall(r"""\b(src|href)\s*=\s*["']([^"']*)["']""", text):
        assert value.startswith("data:") or value.startswith("#"), (attr, value[:80])
    assert "@import" not in text and "url(" not in text


def test_report_from_results_only_skips_absent_sections_and_shows_sweeps(tmp_path):
    run_dir = _fake_run_dir(tmp_path / "fake", fake_experiment())
    out = write_report(run_dir)
    assert out == run_dir / "report" / "report.html" and out.is_file()
    figures = sorted(p.stem for p in (run_dir / "report" / "figures").glob("*.png"))
    assert figures == ["accuracy_matrix", "lr_forgetting", "replay"]  # no metrics.json: no forgetting tables etc.
    assert all((run_dir / "report" / "figures" / f"{f}.pdf").is_file() for f in figures)
    text = out.read_text()
    assert len(_html_images(text)) == len(figures)
    shown = _without_images(text)
    assert "Per-group" not in shown and "BBQ" not in shown and "Curvature" not in shown
    _no_external_resources(text)
    for table in ("accuracy_matrix", "lr_sweep", "replay_summary", "replay_runs", "run_metadata"):
        assert (run_dir / "report" / "tables" / f"{table}.csv").is_file(), table
        assert (run_dir / "report" / "tables" / f"{table}.md").is_file(), table
    summary = pd.read_csv(run_dir / "report" / "tables" / "replay_summary.csv")
    assert sorted(summary.fraction) == [0.0, 0.05, 0.25]
    md = write_report(run_dir, tmp_path / "md-folder", fmt="md")  # a folder as `out`
    assert md == tmp_path / "md-folder" / "report.md" and (tmp_path / "md-folder" / "figures" / "replay.png").is_file()


def test_sweep_folder_gives_one_report_with_the_lr_sweep_across_experiments(tmp_path):
    base = fake_experiment()
    for lr in (1e-6, 1e-4):  # one first-stage rate per experiment, as `--set training.lr=...` would give
        exp = {**base, "name": f"lr{lr:g}", "training": {"lr": lr},
               "chains": [{"name": "tox_arc", "stages": [{"task": "toxigenqa"}, {"task": "arc_easy"}]}]}
        _fake_run_dir(tmp_path / "sweep" / f"lr{lr:g}", exp)
    out = write_report(tmp_path / "sweep", tmp_path / "elsewhere" / "sweep.html")
    assert out == tmp_path / "elsewhere" / "sweep.html"
    figures = sorted(p.stem for p in (tmp_path / "elsewhere" / "figures").glob("*.png"))
    assert figures == ["lr0.0001_accuracy_matrix", "lr1e-06_accuracy_matrix", "lr_forgetting"]
    lr = pd.read_csv(tmp_path / "elsewhere" / "tables" / "lr_sweep.csv")
    assert sorted(lr.lr.unique()) == [1e-6, 1e-4] and set(lr.experiment) == {"lr1e-06", "lr0.0001"}


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(ChaintuneError, match="does not exist"):
        write_report(tmp_path / "missing")
    with pytest.raises(ChaintuneError, match="no results"):
        write_report(tmp_path)
    _fake_run_dir(tmp_path / "r", fake_experiment())
    with pytest.raises(ChaintuneError, match="unknown report format"):
        write_report(tmp_path / "r", fmt="pdf")


# ------------------------------------------------------------------------------------------------ a real tiny run
@pytest.fixture(scope="module")
def real_run(tmp_path_factory, tiny_model_dir, real_data_dir) -> Path:
    """Both orders toxigenqa ↔ arc_easy, 2 seeds, curvature after the first stage, BBQ evaluated (tiny model)."""
    import chaintune

    out = tmp_path_factory.mktemp("report-run") / "out"
    cfg = {
        "name": "report_test", "model": str(tiny_model_dir), "data_dir": str(real_data_dir), "output_dir": str(out),
        "seeds": [0, 1],
        "tasks": {"toxigenqa": {"train_limit": 16, "eval_limit": 26}, "arc_easy": {"train_limit": 16, "eval_limit": 12},
                  "bbq": {"eval_limit": 12}},
        "eval_tasks": ["toxigenqa", "arc_easy", "bbq"],
        "training": {"lr": 1e-3, "batch_size": 4, "checkpoint_every": 4},
        "chains": [{"name": "tox_arc", "stages": [{"task": "toxigenqa"}, {"task": "arc_easy"}]},
                   {"name": "arc_tox", "stages": [{"task": "arc_easy"}, {"task": "toxigenqa"}]}],
        "curvature": {"after": ["first"], "examples": 8, "max_iter": 10, "subsets": 2},
        "quality_gate": {"validation_size": 0},  # tiny random models learn nothing: test_gate.py tests the gate
    }
    outcome = chaintune.run(cfg, echo=lambda *_: None, progress=False)
    assert not outcome.failed, outcome.failed
    return out


REAL_FIGURES = ["accuracy_matrix", "forgetting", "group_forgetting_tox_arc_toxigenqa", "bbq_bias_tox_arc_bbq",
                "bbq_bias_arc_tox_bbq", "curvature", "curvature_vs_forgetting", "training_curves"]


def test_html_report_of_a_real_run(real_run):
    out = write_report(real_run)
    folder = real_run / "report"
    assert out == folder / "report.html"
    for name in REAL_FIGURES:
        png = folder / "figures" / f"{name}.png"
        assert png.is_file() and (folder / "figures" / f"{name}.pdf").is_file(), name
        _png_ok(png.read_bytes())
        assert (folder / "figures" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.stem for p in (folder / "figures").glob("*.png")) == sorted(REAL_FIGURES)
    text = out.read_text()
    images = _html_images(text)
    assert len(images) == len(REAL_FIGURES)
    embedded = [re.search(r'src="data:image/png;base64,([^"]+)"', img).group(1) for img in images]
    assert all(embedded) and len(embedded) == len(images)
    decoded = [base64.b64decode(data, validate=True) for data in embedded]
    for data in decoded:
        _png_ok(data)
    assert {d for d in decoded} == {(folder / "figures" / f"{n}.png").read_bytes() for n in REAL_FIGURES}
    _no_external_resources(text)
    for table in ("accuracy_matrix", "learning_gain", "forgetting", "order_asymmetry", "group_forgetting",
                  "biased_forgetting", "bbq_bias", "curvature", "curvature_vs_forgetting", "run_metadata", "stages"):
        assert (folder / "tables" / f"{table}.csv").is_file() and (folder / "tables" / f"{table}.md").is_file(), table
        assert f"<b>{table}</b>" in _without_images(text), table
    meta = pd.read_csv(folder / "tables" / "run_metadata.csv").set_index("key").value
    assert meta["model"] == str(yaml.safe_load((real_run / "experiment.yaml").read_text())["model"])
    assert meta["seeds"] == "0, 1" and "torch" in meta["versions"] and "training" in meta["wall time"]
    assert "Learning-rate and replay" not in _without_images(text)  # one learning rate, no replay: section skipped
    assert not list(folder.rglob("*.tmp"))


def test_markdown_report_of_a_real_run_references_the_png_files(real_run, tmp_path):
    out = write_report(real_run, tmp_path / "md" / "report.md", fmt="md")
    text = out.read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(Path(r).stem for r in refs) == sorted(REAL_FIGURES)
    for ref in refs:
        assert not ref.startswith("/") and (out.parent / ref).is_file()
    assert "| chain" in text and "data:image" not in text


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--virtual-time-budget=5000"]

IMAGE_CHECK = """<script>window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; });
  document.body.setAttribute("data-images", imgs.length + "/" + ok.length);
});</script>"""


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary")
def test_html_report_renders_in_headless_chromium(real_run, tmp_path):
    from PIL import Image

    report = write_report(real_run, tmp_path / "report" / "report.html")
    browser = _chromium()
    shot = tmp_path / "shot.png"
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    proc = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,3000", report.as_uri()],
                          capture_output=True, timeout=120)
    assert shot.is_file(), proc.stderr.decode(errors="replace")[-2000:]
    with Image.open(shot) as im:
        im.load()
        assert im.size == (1200, 3000)
        gray = np.asarray(im.convert("L"), dtype=float)
    assert gray.std() > 10 and (gray < 128).mean() > 0.005  # text and figures, not a blank page
    # every <img> decodes in the browser: a copy of the report records complete/naturalWidth after load
    probe = report.with_name("probe.html")
    probe.write_text(report.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    proc = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, timeout=120)
    dom = proc.stdout.decode(errors="replace")
    found = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert found, proc.stderr.decode(errors="replace")[-2000:]
    total, ok = map(int, found.groups())
    assert total == len(REAL_FIGURES) and ok == total
