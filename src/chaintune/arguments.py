"""The command line's grammar: every `chaintune` command and its arguments (argparse), with one-line usage errors.
The values' checks live in `options.py`, the commands in `cli.py`. Imports nothing heavy: `chaintune --help` stays
fast."""
from __future__ import annotations

import argparse
import sys

from chaintune.errors import one_line
from chaintune.options import add_file_task_options, column_list, int_list, like_field, memory_size, number

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), like every other error of the CLI."""

    def error(self, message: str):  # type: ignore[override]
        print(f"chaintune: error: {one_line(message)} — see `{self.prog} --help`", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """Every command and its arguments; `args.command` names the command (`cli.cmd_<command>` runs it)."""
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

    p = sub.add_parser("curvature", help="Hessian λ_max (top-k, trace) of a task's training loss for a checkpoint")
    model_args(p)
    p.add_argument("--split", default="train", choices=["train", "validation", "test"], help="data for the loss")
    p.add_argument("--examples", type=like_field("config:CurvatureConfig.examples"), default=512,
                   help="examples per subset (SPEC default 512)")
    p.add_argument("--subsets", type=like_field("config:CurvatureConfig.subsets"), default=1,
                   help="disjoint subsets pooled for λ_max; ≥ 2 give its interval")
    p.add_argument("--held-out", type=like_field("config:CurvatureConfig.held_out"), default=0,
                   help="more disjoint subsets whose Rayleigh quotients along the Ritz vector narrow the interval "
                        "(one HVP per example; needs --subsets ≥ 2)")
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
    p.set_defaults(dtype="float32")

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

    def group_by_arg(p: argparse.ArgumentParser, folder: str) -> None:
        p.add_argument("--group-by", type=column_list, default=(), metavar="COL[,COL...]",
                       help="regroup the per-group tables by stored per-example metadata columns (several: their "
                            "intersection, e.g. category,context_condition), from the predictions, no inference; "
                            f"written to {folder}/by_<cols>/")

    p = sub.add_parser("summarize", help="print forgetting / biased-forgetting tables of a finished run")
    p.add_argument("run_dir", help="an experiment output_dir")
    group_by_arg(p, "RUN_DIR/summary")

    p = sub.add_parser("report", help="write an HTML (or Markdown) report with figures and tables of a run or sweep")
    p.add_argument("run_dir", help="an experiment output_dir, or a folder of several experiments (a sweep)")
    p.add_argument("--out", metavar="FOLDER", help="folder for the report file, figures/ and tables/ (default: "
                                                   "RUN_DIR/report/)")
    p.add_argument("--format", choices=["html", "md"], help="html (self-contained, the default) or md")
    group_by_arg(p, "RUN_DIR/report (without --out)")

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
    return parser
