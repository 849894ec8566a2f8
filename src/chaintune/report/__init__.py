"""Reports: the figures and tables of a finished experiment (or a sweep of experiments) in one self-contained file.

`write_report(run_dir)` reads what `chaintune run` wrote (results.parquet; the runs and their summary tables through
`chaintune.analysis`; runs/*/train_curves.csv, stages/*/node.json, experiment.yaml, environment.json via `RunDir`)
and writes, under `<out_dir>` (default `<run_dir>/report/`):

    report.html  (or report.md)   self-contained HTML: figures embedded as base64 PNG, tables inline
    figures/<name>.png, .pdf      every figure, paper-sized (3.3–7 in wide, 8–9 pt fonts)
    tables/<name>.csv, .md        every table: raw CSV (all columns) and compact Markdown ("x [ci_low, ci_high]")

Sections whose data is absent are skipped. A *sweep directory* (no results.parquet of its own, but sub-folders that
each hold a finished experiment) gives one report: sections 1–4 and 6 per experiment, section 5 (learning-rate and
replay sweeps) over all of them together.

The plotting functions are public and work on their own (each returns a `matplotlib.figure.Figure`, created without
pyplot, so no GUI backend and no global figure state is involved; PNG output goes through Agg).

Modules: `style` (palette, rcParams), `figures` (the `plot_*` functions), `data` (reading a run directory, preparing
frames), `sections` (one builder per section), `render` (collecting items; HTML and Markdown); number and table
formatting is `chaintune.formatting`.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from chaintune.analysis.tables import lr_sweep_points, replay_points
from chaintune.errors import ChaintuneError
from chaintune.rundir import Folder, RunDir
from chaintune.report.data import _Experiment, _experiment_dirs, _load, accuracy_matrices, chain_tasks, training_curves
from chaintune.report.figures import (
    plot_accuracy_matrices, plot_accuracy_matrix, plot_bbq_bias, plot_curvature, plot_curvature_vs_forgetting,
    plot_forgetting, plot_group_forgetting, plot_lr_forgetting, plot_replay, plot_training_curves,
)
from chaintune.report.render import _Builder, _html, _markdown
from chaintune.report.sections import _bbq, _curvature, _findings, _gate, _groups, _overview, _sweeps, _training
from chaintune.report.style import KIND_COLOURS, OKABE_ITO, PALETTE, RC

__all__ = [
    "OKABE_ITO", "PALETTE", "KIND_COLOURS", "RC", "write_report", "accuracy_matrices", "chain_tasks",
    "lr_sweep_points", "replay_points", "training_curves", "plot_accuracy_matrix", "plot_accuracy_matrices",
    "plot_forgetting", "plot_group_forgetting", "plot_bbq_bias", "plot_curvature", "plot_curvature_vs_forgetting",
    "plot_lr_forgetting", "plot_replay", "plot_training_curves",
]


def write_report(run_dir: str | Path, out: str | Path | None = None, fmt: str = "html") -> Path:
    """Write the report of a finished experiment (or of a sweep folder holding several) and return its path.

    `out`: the report file, or a folder for `report.html` / `report.md` (default `<run_dir>/report/`); figures go to
    `<out's folder>/figures/` (PNG + PDF) and tables to `<out's folder>/tables/` (CSV + Markdown). `fmt="html"`
    embeds every figure as a base64 PNG (one self-contained file, no external resources); `fmt="md"` writes
    Markdown that references the PNG files. Every file is written atomically.
    """
    if fmt not in ("html", "md"):
        raise ChaintuneError(f"unknown report format '{fmt}'", "use --format html or --format md")
    run_dir = Path(run_dir)
    dirs = _experiment_dirs(run_dir)
    if out is None:  # report/ of the run directory: written through it, so a symlinked report/ is refused
        folder: Folder = RunDir(run_dir)
        out = folder.root / "report" / f"report.{fmt}"
    else:
        out = Path(out)
        if out.is_dir() or not out.suffix:  # a folder: the report goes inside it
            out = out / f"report.{fmt}"
        folder = Folder(out.parent)
        out = folder.root / out.name
    for path in (out, out.parent / "figures" / "x", out.parent / "tables" / "x"):  # before any work
        folder.path_for_write(path)
    exps = [_load(d) for d in dirs]
    b = _Builder(folder, out.parent)
    def tags(e: _Experiment) -> tuple[str, str]:  # in a sweep, titles and file names carry the experiment folder
        return (f" — {e.path.name}", f"{e.path.name}_") if len(exps) > 1 else ("", "")

    for e in exps:
        for build in (_findings, _gate, _overview, _groups, _bbq, _curvature):
            build(b, e, *tags(e))
    _sweeps(b, exps)
    for e in exps:
        _training(b, e, *tags(e))
    title = f"chaintune report: {exps[0].name if len(exps) == 1 else run_dir.name}"
    subtitle = (f"{run_dir.resolve()} · {len(exps)} experiment(s) · generated "
                f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} · {len(b.names['figure'])} figures "
                f"(PNG + PDF in figures/), {len(b.names['table'])} tables (CSV + Markdown in tables/)")
    text = _html(b, title, subtitle) if fmt == "html" else _markdown(b, title, subtitle)
    folder.write_text(out, text)
    return out
