"""Analysis of a run directory, in one place: records → per-run data and metrics (`records`, `run_metrics`) →
tables over seeds (`tables`) → the paper's questions answered in sentences (`findings`).

    runs = load_runs(RunDir(out))          # every finished run, metrics computed from the stored records
    tables = summary_tables(runs)          # name → DataFrame
    write_summary(RunDir(out), runs, tables)
    plan = plan_power(out)                 # `chaintune power`: MDEs and designs from a pilot
"""
from chaintune.analysis.findings import findings, write_summary
from chaintune.analysis.power import PowerPlan, Targets, plan_power
from chaintune.analysis.records import OVERALL, RunData, load_runs
from chaintune.analysis.tables import curvature_vs_forgetting, order_pairs, summary_tables

__all__ = ["OVERALL", "RunData", "load_runs", "summary_tables", "curvature_vs_forgetting", "order_pairs", "findings",
           "write_summary", "plan_power", "Targets", "PowerPlan"]
