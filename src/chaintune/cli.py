"""Command-line interface: the commands `chaintune tasks | eval | curvature | plan | run | summarize | report | power |
export | verify` as `cmd_<command>` (their arguments: `arguments.py`) and the one error boundary (`main`)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from chaintune.arguments import EXIT_USAGE, build_parser
from chaintune.errors import ChaintuneError, one_line
from chaintune.options import check_output_file, save_results, task_from_args

EXIT_BUG = 70  # an exception that is not a ChaintuneError: a bug in chaintune


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
                               held_out=args.held_out, seed=args.seed, topk=args.topk, trace=args.trace,
                               micro_batch=args.micro_batch, method=args.method, eigenvalue=args.eigenvalue,
                               graph_budget=args.graph_budget_mib * 2**20)
    row = {"task": task, "examples": result.n_examples, "parameters": result.n_parameters, "loss": result.loss,
           "lambda_max": result.lambda_max, "iterations": result.iterations, "converged": result.converged,
           "seconds": result.seconds}
    if result.lambda_max_ci_low is not None:
        held = f" + {result.held_out} held out" if result.held_out else ""
        row["95% interval"] = (f"[{result.lambda_max_ci_low:.4g}, {result.lambda_max_ci_high:.4g}] "
                               f"({result.subsets} subsets{held})")
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
        return globals()[f"cmd_{args.command}"](args)  # each command runs cmd_<command>
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
