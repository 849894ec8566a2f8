"""Command-line interface: `chaintune tasks | eval | curvature | plan | run | summarize | report | power | export |
verify`."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from chaintune.errors import ChaintuneError, one_line
from chaintune.options import (add_file_task_options, check_output_file, column_list, int_list, like_field,
                               memory_size, number, save_results, task_from_args)

EXIT_USAGE = 2
EXIT_BUG = 70  # an exception that is not a ChaintuneError: a bug in chaintune


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), like every other error of the CLI."""

    def error(self, message: str):  # type: ignore[override]
        print(f"chaintune: error: {one_line(message)} — see `{self.prog} --help`", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _console():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def print_frame(df, title: str, std: bool = False) -> None:
    """A table on the terminal, formatted like the report's (chaintune.formatting.display_frame)."""
    from rich.markup import escape
    from rich.table import Table

    from chaintune.formatting import display_frame

    shown, numeric = display_frame(df, std=std)
    table = Table(title=title, title_justify="left", header_style="bold")
    for col in shown.columns:
        table.add_column(str(col), justify="right" if col in numeric else "left", overflow="fold")  # never cut
    for row in shown.itertuples(index=False):
        table.add_row(*[escape(v) for v in row])  # "[lr=1e-05]" is data, not rich markup
    _console().print(table)


# ---------------------------------------------------------------------------------------------------- commands
def cmd_tasks(args: argparse.Namespace) -> int:
    import pandas as pd

    if args.include is not None and not (args.lm_eval and Path(args.include).is_dir()):
        raise ChaintuneError(f"--include '{args.include}' is not a folder, or --lm-eval is missing",
                             "pass --lm-eval --include FOLDER (a folder of lm-eval task YAMLs)")
    if args.lm_eval:
        from chaintune.tasks.lmeval import multiple_choice_tasks

        rows = multiple_choice_tasks(args.include)
        for row in rows:  # thousands: plain lines, not a table
            print(f"{row['task']}\t{row['data']}\t{row['config']}")
        print(f"{len(rows)} lm-eval multiple-choice tasks (name, data, config); use one as a task name, or in "
              "custom_tasks with lm_eval: (docs/tasks.md)", file=sys.stderr)
        return 0
    from chaintune.tasks import get_task, load_splits, resolve_data_dir, task_names

    data_dir = resolve_data_dir(args.data_dir)
    rows = []
    for name in task_names():
        spec = get_task(name)
        try:
            splits = load_splits(name, data_dir)
        except ChaintuneError as exc:
            rows.append({"task": name, "kind": spec.kind, "train": None, "validation": None, "test": None,
                         "groups": f"unavailable: {exc.problem}"})
            continue
        groups = sorted({e.group for ex in splits.values() for e in ex if e.group is not None})
        rows.append({"task": name, "kind": spec.kind,
                     **{s: len(splits[s]) if s in splits else None for s in ("train", "validation", "test")},
                     "groups": f"{len(groups)}: {', '.join(groups)}" if groups else "—"})
    df = pd.DataFrame(rows).astype({s: "Int64" for s in ("train", "validation", "test")})  # counts, not floats
    print_frame(df, f"chaintune tasks (data dir: {data_dir or 'none — Hugging Face hub when online'})")
    return 0


def _model_task_output(args: argparse.Namespace, default_output: str | None):
    """Check every argument of eval/curvature before loading data or weights: device, model, adapter, data dir,
    task (a user file is registered), output path. Returns (task, data dir, output path or None)."""
    from chaintune.models import adapter_folder, pick_device, resolve_model_path
    from chaintune.tasks import get_task, resolve_data_dir

    pick_device(args.device)
    resolve_model_path(args.model)
    if args.adapter:
        adapter_folder(args.adapter)
    data_dir = resolve_data_dir(args.data_dir)
    task = task_from_args(args)
    output = args.output or (default_output.format(task=task) if default_output else None)
    if output is not None:
        output = check_output_file(Path(output), data_dir, get_task(task).data_files, "--output")
    return task, data_dir, output


def cmd_eval(args: argparse.Namespace) -> int:
    import pandas as pd

    from chaintune.stage import predictions_frame
    from chaintune.evaluate import evaluate
    from chaintune.io import write_json, write_table
    from chaintune.tasks import load_task

    task, data_dir, out = _model_task_output(args, f"eval-{{task}}-{args.split}.json")
    examples = load_task(task, args.split, data_dir, limit=args.limit, seed=args.seed)
    model, tokenizer = _load_for_cli(args)
    result = evaluate(model, tokenizer, examples, task, progress=not args.no_progress, max_tokens=args.batch_tokens)
    rows = [{"group": "ALL", "n": result.n, "acc": result.acc, "acc_norm": result.acc_norm}]
    rows += [{"group": g, **v} for g, v in result.per_group.items()]
    print_frame(pd.DataFrame(rows)[["group", "n", "acc", "acc_norm"]], f"{task} ({args.split}, {result.n} questions)")
    summary = result.summary() | {"model": args.model or "embedded SmolLM2-135M-Instruct", "split": args.split,
                                  "limit": args.limit}
    written = save_results({out: lambda p: write_json(p, summary),
                            out.with_suffix(".predictions.parquet"): lambda p: write_table(p, predictions_frame(result))})
    _console().print(f"wrote {' and '.join(map(str, written))}")
    return 0


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """`chaintune run`'s executor, distributed and tracker flags as `--set` overrides (a flag replaces the config's
    value)."""
    flags = {"executor.kind": args.executor, "executor.workers": args.workers, "executor.address": args.address,
             "executor.retries": args.retries, "distributed.nproc_per_node": args.nproc_per_node,
             "distributed.strategy": args.strategy}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.tracker:
        overrides.append(f"logging.trackers=[{','.join(args.tracker)}]")
    return overrides


def cmd_run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from chaintune.engine import run
    from chaintune.plan import load_sweep, make_plan

    points = load_sweep(args.config, args.set + _flag_overrides(args))
    cfg, plan = points[0].cfg, make_plan(points)
    trained = len(plan.trained_nodes)
    _console().print(f"[bold]{cfg.name}[/]: {len(points)} sweep point(s), {len(plan.runs)} runs, {trained} stages to "
                     f"train ({plan.stages_without_reuse - trained} saved by prefix reuse) → {cfg.output_dir}")
    outcome = run(points, echo=_console().print, progress=not args.no_progress)
    if outcome.completed_runs:
        summarize(Path(cfg.output_dir))
    if outcome.failed or outcome.incomplete_runs:
        _console().print(f"[red]{len(outcome.incomplete_runs)} run(s) incomplete[/]; failed jobs:")
        for info in outcome.failed.values():
            _console().print(escape(f"  {info['node']} {info['point']}: {info['error']} (attempts: {info['attempts']})"))
        _console().print("rerun the same command to retry them; finished stages are kept")
        return 1
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from chaintune.plan import load_sweep
    from chaintune.status import plan_status

    points = load_sweep(args.config, args.set)
    if args.memory:
        return print_memory_plan(points, args)
    status = plan_status(points, args.tokens_per_second)
    runs = status["runs"]
    if not args.all and len(runs) > 40:
        _console().print(f"(showing 40 of {len(runs)} runs; --all shows every run)")
        runs = runs.head(40)
    empty = [c for c in ("variant", "error") if not runs[c].any()]
    print_frame(runs.drop(columns=empty), f"Runs of {points[0].cfg.name}")
    saved = status["stages_without_reuse"] - status["stages_planned"]
    lines = [
        f"sweep points: {status['n_points']}   runs: {status['n_runs']}",
        f"stages to train: {status['stages_planned']} (without prefix reuse: {status['stages_without_reuse']}; "
        f"reuse saves {saved} = {100 * saved / max(status['stages_without_reuse'], 1):.1f}%)",
        f"stages trained: {status['stages_done']}/{status['stages_planned']}   "
        f"jobs pending: {status['jobs_pending']}/{status['jobs']}",
    ]
    est = status["estimate_seconds"]
    lines.append("time left: " + (f"≈ {est / 3600:.1f} h ({est / 60:.0f} min), from throughput measured on this "
                                  f"sweep's finished stages" if est is not None else
                                  "unknown until a stage has finished (or pass --tokens-per-second)"))
    for key, info in status["failed"].items():
        lines.append("[red]failed[/] " + escape(f"{info['node']} {info['point']}: {info['error']} "
                                                 f"(attempts: {info['attempts']})"))
    gates = status["stage_gate"]
    if not gates.empty:
        lines.append(f"quality gate: {int(gates.passed.sum())}/{len(gates)} trained stages passed")
        lines += ["[yellow]failed gate[/] " + escape(f"{r.node}: {r.reasons} (attempts: {r.attempts})")
                  for r in gates[~gates.passed].itertuples()]
    _console().print("\n".join(lines))
    return 0


def print_memory_plan(points, args: argparse.Namespace) -> int:
    from chaintune.memory import Setup, memory_table

    cfg = points[0].cfg
    precision = args.precision or ("fp32" if cfg.device == "cpu" else "bf16-mixed")
    setup = Setup(devices=args.nproc_per_node or cfg.distributed.nproc_per_node,
                  strategy=args.strategy or cfg.distributed.strategy, checkpointing=args.gradient_checkpointing,
                  precision=precision)
    table, notes = memory_table(points, setup, args.device_memory)
    where = "1 device" if setup.devices == 1 else f"{setup.devices} devices, {setup.strategy}"
    print_frame(table, f"Peak memory per device (GiB) of {points[0].cfg.name}'s stages: {where}, {precision}, "
                       "sequences of training.max_length tokens")
    _console().print("\n".join(notes + ["formulas and their check against measured peaks: docs/memory.md"]))
    return 0


def _load_for_cli(args: argparse.Namespace, trainable_adapter: bool = False):
    from chaintune.models import load_adapter, load_model

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code)
    if args.adapter:
        model = load_adapter(model, args.adapter, trainable=trainable_adapter)
    return model, tokenizer


def cmd_curvature(args: argparse.Namespace) -> int:
    import pandas as pd

    from chaintune.curvature import measure_curvature, sign_note
    from chaintune.io import write_json
    from chaintune.tasks import load_task

    task, data_dir, out = _model_task_output(args, None)
    examples = load_task(task, args.split, data_dir)
    model, tokenizer = _load_for_cli(args, trainable_adapter=True)
    if not args.adapter:
        model.requires_grad_(True)
    result = measure_curvature(model, tokenizer, examples, n_examples=args.examples, subsets=args.subsets,
                               seed=args.seed, topk=args.topk, trace=args.trace, micro_batch=args.micro_batch,
                               method=args.method, eigenvalue=args.eigenvalue, graph_budget=args.graph_budget_mib * 2**20)
    row = {"task": task, "examples": result.n_examples, "parameters": result.n_parameters, "loss": result.loss,
           "lambda_max": result.lambda_max, "iterations": result.iterations, "converged": result.converged,
           "seconds": result.seconds}
    if result.lambda_max_ci_low is not None:
        row["95% interval"] = f"[{result.lambda_max_ci_low:.4g}, {result.lambda_max_ci_high:.4g}] ({result.subsets} subsets)"
    if result.topk:
        row["top_k"] = ", ".join(f"{v:.4g}" for v in result.topk)
    if result.trace is not None:
        row["trace"] = f"{result.trace:.4g} ± {result.trace_std_error:.2g}"
    print_frame(pd.DataFrame([row]), "Hessian curvature of the mean answer-token loss")
    if sign_note(result.lambda_max, result.eigenvalue):
        _console().print(sign_note(result.lambda_max, result.eigenvalue).strip(" ()"))
    if out is not None:
        record = vars(result) | {"task": task, "model": args.model, "adapter": args.adapter}
        save_results({out: lambda p: write_json(p, record)})
    return 0


def summarize(out_dir: Path, group_by: tuple[str, ...] = ()) -> int:
    from rich.markup import escape

    from chaintune.analysis import findings, load_runs, summary_tables, write_summary
    from chaintune.rundir import RunDir

    if not out_dir.is_dir():
        raise ChaintuneError(f"run directory '{out_dir}' does not exist", "pass the output_dir of a `chaintune run`")
    out = RunDir(out_dir)
    out.path_for_write(out.summary_folder(group_by) / "summary.md")  # a symlinked summary/ fails before any work
    runs = load_runs(out, group_by)
    tables = summary_tables(runs)
    titles = {"stage_gate": "Stage quality gate: each stage's held-out validation accuracy (pp) vs its baselines",
              "excluded_runs": "Runs left out of every table below: a stage failed its quality gate",
              "learning_gain": "Learning gain of each stage on its own task (pp; must be > 0)",
              "forgetting": "Forgetting F and relative forgetting RF (%) of earlier stages' tasks after the last stage",
              "order_asymmetry": "Order asymmetry: RF(A→B) vs RF(B→A), seed × question interval, Welch and permutation "
                                 "tests",
              "group_forgetting": "Per-group forgetting F_g and biased forgetting BF_g = F_g − F (pp)",
              "biased_forgetting": "Biased-forgetting summaries (groups with n < min_group_size excluded)",
              "bbq_bias": "BBQ bias scores (−100…100) per stage",
              "curvature": "Hessian λ_max of the training loss after the stage (trainable parameters; the eigenvalue "
                           "of largest magnitude: negative = strongest curvature downward)",
              "curvature_vs_forgetting": "Does curvature predict later forgetting? (across runs)",
              "replay": "Replay: recovery of forgotten safety accuracy (1 = all) and capability cost (pp)",
              "replay_groups": "Replay recovery per group"}
    for name, df in tables.items():
        if name == "curvature_points":
            continue
        if name == "bbq_bias":
            df = df[df.category == "overall"]
        print_frame(df.drop(columns=["note"], errors="ignore"), titles.get(name, name), std=True)
    for question, lines in findings(runs, tables).items():
        _console().print(f"[bold]{question}[/]\n" + "\n".join(f"  • {escape(line)}" for line in lines), highlight=False)
    folder = write_summary(out, runs, tables, group_by)
    _console().print(f"tables written to {folder}/ (CSV + summary.md)")
    return 0


def cmd_summarize(args: argparse.Namespace) -> int:
    return summarize(Path(args.run_dir), args.group_by)


def cmd_report(args: argparse.Namespace) -> int:
    from chaintune.report import write_report
    from chaintune.rundir import check_outside_data
    from chaintune.tasks import resolve_data_dir

    out = Path(args.out).expanduser() if args.out else None
    if out is not None:
        if out.suffix in (".html", ".md") or out.is_file():
            raise ChaintuneError(f"--out '{out}' names a file; --out takes a folder (the report, figures/ and tables/ "
                                 "all go inside it)", f"pass --out {out.with_suffix('')} (and --format md for Markdown)")
        check_outside_data(out, resolve_data_dir(None), what="--out")
    path = write_report(Path(args.run_dir), out, fmt=args.format or "html", group_by=args.group_by)
    _console().print(f"report written to {path} (figures/ and tables/ beside it)")
    return 0


def _design_cell(d) -> str:
    """A `chaintune power` design: questions and CPU time to the target, first stages and their power, or power."""
    from chaintune.formatting import format_number, format_seconds

    if d.questions == d.questions and d.questions:  # NaN / None: no question count reaches the target
        return f"×{d.question_factor:.2g} = {d.questions:.0f} q, {format_seconds(3600 * d.cpu_hours)}"
    if d.points == d.points:
        return f"{d.points:.0f} stages: power {format_number(d.power)}, {format_seconds(3600 * d.cpu_hours)}"
    return f"— (power {format_number(d.power)})"


def cmd_power(args: argparse.Namespace) -> int:
    import pandas as pd

    from chaintune.analysis.power import Targets, plan_power
    from chaintune.formatting import format_seconds

    targets = Targets(args.order, args.spread, args.recovery, args.correlation, args.alpha, args.power, args.seeds)
    plan = plan_power(args.run_dir, targets)
    f = plan.findings
    shown = f[["finding", "subject", "estimate", "seeds"]].assign(**{
        "questions (points)": [f"{q:.0f}" if q == q else f"({p:.0f} stages)" for q, p in zip(f.questions, f.points)],
        "se": f.se,
        "seed / question / residual %": [f"{100 * a:.0f} / {100 * b:.0f} / {100 * c:.0f}" if a == a else "—"
                                         for a, b, c in zip(f.seed_share, f.question_share, f.residual_share)],
        "level": f.level, f"MDE at {100 * args.power:g}% power": f.mde, "target": f.target,
        "power at target": f.power_at_target, "CPU time": [format_seconds(3600 * h) for h in f.cpu_hours]})
    print_frame(shown, f"Minimal detectable effects of {args.run_dir}'s design (two-sided, seed × question variance)")
    if not plan.designs.empty:
        rows = []
        for (finding, subject), part in plan.designs.groupby(["finding", "subject"], sort=False):
            row = {"finding": finding, "subject": subject, "target": part.target.iloc[0]}
            for d in part.itertuples():
                row[f"{d.seeds} seeds"] = _design_cell(d)
            rows.append(row)
        print_frame(pd.DataFrame(rows), f"Test questions (× the pilot's, all test sets of the finding) and CPU time "
                                        f"to detect each target with {100 * args.power:g}% power")
    print_frame(plan.speeds, "Measured speeds of the pilot")
    _console().print("\n".join(plan.notes))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from chaintune.verify import verdict, verify_run

    table, notes = verify_run(args.run_dir, device=args.device, data_dir=args.data_dir, tolerance=args.tolerance,
                              trust_remote_code=args.trust_remote_code, progress=not args.no_progress)
    for note in notes:
        _console().print(f"[yellow]{note}[/]")
    print_frame(table, f"Stored vs re-derived accuracies of {args.run_dir} (pp)")
    code, line = verdict(table)
    _console().print(line)
    return code


def cmd_export(args: argparse.Namespace) -> int:
    from chaintune.export import export_stage

    folder = export_stage(args.run_dir, args.out, stage=args.stage, run=args.run, merge=args.merge,
                          device=args.device, trust_remote_code=args.trust_remote_code)
    _console().print(f"exported to {folder} (model card: {folder / 'README.md'})")
    return 0


# ---------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="chaintune", description="Chained fine-tuning and (biased) forgetting.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks, warnings and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="folder with the benchmark files (default: $CHAINTUNE_DATA_DIR, else "
                                          "../shared/data when present, else the Hugging Face hub when online)")

    def progress_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--no-progress", action="store_true", help="hide progress bars (chaintune's and those of "
                                                                   "transformers and the Hugging Face hub)")

    seed = like_field("config:ExperimentConfig.data_seed")
    p = sub.add_parser("tasks", help="list tasks with split sizes and groups")
    data_dir_arg(p)
    p.add_argument("--lm-eval", action="store_true", help="list lm-evaluation-harness multiple-choice tasks instead "
                                                          "(usable as lmeval:<task>; 'local files' = readable offline)")
    p.add_argument("--include", metavar="FOLDER", help="with --lm-eval: also the task YAMLs in FOLDER")
    p.set_defaults(func=cmd_tasks)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="HF model id, local model directory or .gguf file (default: embedded "
                                       "SmolLM2-135M)")
        p.add_argument("--task", required=True, help="task name (see `chaintune tasks`), or a JSONL/CSV file of "
                                                     "multiple-choice questions (see the column options below)")
        p.add_argument("--adapter", help="LoRA adapter directory (a stage checkpoint) applied to the model")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
        p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
        data_dir_arg(p)
        progress_arg(p)
        add_file_task_options(p)

    p = sub.add_parser("eval", help="score one task with a model (log-likelihood multiple choice)")
    model_args(p)
    p.add_argument("--split", default="test", choices=["train", "validation", "test"],
                   help="split to score (a file without a split column: its seeded test share, see --test-fraction)")
    p.add_argument("--limit", type=like_field("config:TaskSettings.eval_limit"),
                   help="score at most N questions (seeded, stratified by group)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the --limit subsample")
    p.add_argument("--output", help="JSON summary path (predictions go next to it as .predictions.parquet; default "
                                    "eval-TASK-SPLIT.json)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-tokens", type=like_field("config:ExperimentConfig.eval_max_tokens"), default=1024,
                   help="tokens per forward pass (memory vs speed)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("curvature", help="Hessian λ_max (top-k, trace) of a task's training loss for a checkpoint")
    model_args(p)
    p.add_argument("--split", default="train", choices=["train", "validation", "test"], help="data for the loss")
    p.add_argument("--examples", type=like_field("config:CurvatureConfig.examples"), default=512,
                   help="examples per subset (SPEC default 512)")
    p.add_argument("--subsets", type=like_field("config:CurvatureConfig.subsets"), default=1,
                   help="disjoint subsets pooled for λ_max; ≥ 2 give its interval")
    p.add_argument("--seed", type=seed, default=0, help="seed of the subsets and the start vector")
    p.add_argument("--topk", type=like_field("config:CurvatureConfig.topk"), default=1,
                   help="also the top-k eigenvalues by Lanczos when > 1")
    p.add_argument("--trace", action="store_true", help="also a Hutchinson trace estimate")
    p.add_argument("--micro-batch", type=like_field("config:CurvatureConfig.micro_batch"), default=8,
                   help="examples per HVP micro-batch (memory)")
    p.add_argument("--method", default="lanczos", choices=["lanczos", "power"], help="λ_max solver")
    p.add_argument("--eigenvalue", default="magnitude", choices=["magnitude", "largest"],
                   help="λ_max: largest magnitude (SPEC) or algebraically largest (Lanczos)")
    p.add_argument("--graph-budget-mib", type=number(float, ge=0, le=2**30), default=0.0,
                   help="MiB of first-order graphs kept between HVPs (0: recompute them, least memory)")
    p.add_argument("--output", help="write the result as JSON")
    p.set_defaults(func=cmd_curvature, dtype="float32")

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="experiment YAML, e.g. configs/quickstart.yaml")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set training.lr=1e-4 --set seeds=[0,1] (repeatable)")

    p = sub.add_parser("run", help="run (or resume) an experiment or sweep from a YAML config")
    config_args(p)
    p.add_argument("--executor", choices=["local", "ray"], help="where stage jobs run (default: config, else local)")
    p.add_argument("--workers", type=like_field("config:ExecutorConfig.workers"),
                   help="local: parallel worker processes (one per GPU when GPUs exist)")
    p.add_argument("--address", help="ray: cluster address, e.g. auto (default: start a local Ray instance)")
    p.add_argument("--retries", type=like_field("config:ExecutorConfig.retries"),
                   help="re-runs of a failed stage job (default 1; errors caused by the input are not retried)")
    p.add_argument("--tracker", action="append", choices=["tensorboard", "mlflow", "wandb"],
                   help="send curves, evaluations and forgetting tables to this tracker (repeatable; replaces the "
                        "config's logging.trackers; pip install 'chaintune[trackers]'; see docs/trackers.md)")
    p.add_argument("--nproc-per-node", type=like_field("config:DistributedConfig.nproc_per_node"),
                   help="ranks per stage job, launched by torchrun (DDP, or FSDP with --strategy fsdp; "
                        "docs/distributed.md)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], help="multi-rank training: ddp (a replica per rank) or "
                                                               "fsdp (sharded weights, gradients, moments)")
    progress_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plan", help="list an experiment's or sweep's runs: done, failed, stage counts, time left")
    config_args(p)
    p.add_argument("--tokens-per-second", type=number(float, gt=0, le=1e12),
                   help="training throughput for the estimate before any stage has finished")
    p.add_argument("--all", action="store_true", help="list every run (default: the first 40)")
    memory = p.add_argument_group("memory plan (docs/memory.md)")
    memory.add_argument("--memory", action="store_true", help="print each stage's peak memory per device instead: "
                        "weights, gradients, optimizer state, activations, curvature (from the model's config.json)")
    memory.add_argument("--nproc-per-node", type=like_field("config:DistributedConfig.nproc_per_node"),
                        help="devices the stage is spread over (default: the config's distributed.nproc_per_node)")
    memory.add_argument("--strategy", choices=["ddp", "fsdp"],
                        help="ddp (replicated weights) or fsdp (sharded weights, gradients and moments); default: "
                             "the config's distributed.strategy")
    memory.add_argument("--gradient-checkpointing", action="store_true",
                        help="as if training.gradient_checkpointing were true for every stage")
    memory.add_argument("--precision", choices=["fp32", "bf16-mixed"],
                        help="bf16-mixed: fp32 weights and moments, bf16 autocast (default, CUDA); fp32 (device: cpu)")
    memory.add_argument("--device-memory", type=memory_size, metavar="SIZE",
                        help="memory per device, e.g. 80GiB: also print the smallest setup that fits")
    p.set_defaults(func=cmd_plan)

    def group_by_arg(p: argparse.ArgumentParser, folder: str) -> None:
        p.add_argument("--group-by", type=column_list, default=(), metavar="COL[,COL...]",
                       help="regroup the per-group tables by stored per-example metadata columns (several: their "
                            "intersection, e.g. category,context_condition), from the predictions, no inference; "
                            f"written to {folder}/by_<cols>/")

    p = sub.add_parser("summarize", help="print forgetting / biased-forgetting tables of a finished run")
    p.add_argument("run_dir", help="an experiment output_dir")
    group_by_arg(p, "RUN_DIR/summary")
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("report", help="write an HTML (or Markdown) report with figures and tables of a run or sweep")
    p.add_argument("run_dir", help="an experiment output_dir, or a folder of several experiments (a sweep)")
    p.add_argument("--out", metavar="FOLDER", help="folder for the report file, figures/ and tables/ (default: "
                                                   "RUN_DIR/report/)")
    p.add_argument("--format", choices=["html", "md"], help="html (self-contained, the default) or md")
    group_by_arg(p, "RUN_DIR/report (without --out)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("power", help="variance components, minimal detectable effects and the seeds × test "
                                     "questions (and CPU time) needed to detect target effects, from a pilot run")
    p.add_argument("run_dir", help="the output_dir of a finished pilot run or sweep (>= 2 seeds per chain)")
    p.add_argument("--order", type=number(float, gt=0, le=1000), default=5.0,
                   help="order difference to detect (points of RF, default 5)")
    p.add_argument("--spread", type=number(float, gt=0, le=200), default=10.0, help="BF_spread to detect (pp, default 10)")
    p.add_argument("--recovery", type=number(float, gt=0, le=100), default=0.5,
                   help="replay recovery to detect (fraction, default 0.5)")
    p.add_argument("--correlation", type=number(float, gt=0, lt=1), default=0.5,
                   help="Pearson r of λ_max vs forgetting to detect (default 0.5)")
    p.add_argument("--alpha", type=number(float, gt=0, lt=1), default=0.05, help="two-sided test level (default 0.05)")
    p.add_argument("--power", type=number(float, gt=0, lt=1), default=0.8, help="power to reach (default 0.8)")
    p.add_argument("--seeds", type=int_list(ge=2, le=10000), default=(3, 5, 8, 10, 15, 20),
                   help="numbers of seeds per chain to plan for (comma-separated, default 3,5,8,10,15,20)")
    p.set_defaults(func=cmd_power)

    p = sub.add_parser("export", help="write a stage's model as a folder that transformers (full or --merge) or PEFT "
                                      "(LoRA adapter) loads, with its tokenizer and a model card")
    p.add_argument("run_dir", help="an experiment output_dir")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage", metavar="NODE", help="the stage's folder name under stages/ (or its key)")
    which.add_argument("--run", metavar="RUN", help="a run id (runs/RUN): its last stage")
    p.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder")
    p.add_argument("--merge", action="store_true", help="LoRA stage: merge the adapter into full weights")
    p.add_argument("--device", help="cpu, cuda, ... to build the weights on (default: the run's config)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code (the run's own trust_remote_code setting is ignored)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="re-evaluate a run's stored checkpoints and confirm its stored accuracies "
                                      "(exit 0: all reproduced, 1: a mismatch or corrupt checkpoint, 3: some "
                                      "checkpoints released)")
    p.add_argument("run_dir", help="an experiment output_dir")
    p.add_argument("--device", help="cpu, cuda, ... (default: the run's config)")
    p.add_argument("--tolerance", type=number(float, ge=0, le=100), default=1.0,
                   help="allowed accuracy difference (pp) when the device, dtype or torch version differ from the "
                        "run's; in the same environment every prediction must match exactly")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code (the run's own trust_remote_code setting is ignored)")
    data_dir_arg(p)
    progress_arg(p)
    p.set_defaults(func=cmd_verify)
    return parser


def quiet(debug: bool, progress: bool) -> None:
    """Third-party chatter off unless --debug (warnings, transformers logs), and with --no-progress every progress
    bar: in this process and, through the environment, in the worker processes it starts."""
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # spawned workers: e.g. a deprecation warning per LoRA stage
        import warnings

        warnings.filterwarnings("ignore")
    if not progress:
        os.environ["TQDM_DISABLE"] = os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:  # imported already (the Python API, tests): switch its bars off too
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(message)s")
    quiet(args.debug, progress=not getattr(args, "no_progress", False))
    try:
        return args.func(args)
    except ChaintuneError as exc:
        if args.debug:
            raise
        print(f"chaintune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("chaintune: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (e.g. `chaintune tasks | head -1`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 — the last boundary: one line, never a traceback, unless --debug
        if args.debug:
            raise
        text = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"chaintune: internal error: {type(exc).__name__}: {one_line(text)} — this is a bug in chaintune; rerun "
              "with --debug for the traceback and report it", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
