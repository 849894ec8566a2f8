"""`chaintune export RUN_DIR --stage NODE | --run RUN --out DIR [--merge]`: one stage's model as a folder that plain
transformers or PEFT loads, with its tokenizer and a model card (README.md).

- a full fine-tune, or a LoRA stage with `--merge`: the stage's weights (built by `weights.WeightCache`, the one way
  to build a node's weights), loadable by `AutoModelForCausalLM.from_pretrained(DIR)`;
- a LoRA stage without `--merge`: its adapter, loadable by `PeftModel.from_pretrained(base, DIR)`. The adapter was
  trained on its parent's weights: for a first stage that is the base model (named in adapter_config.json); for a
  later stage the parent's merged weights are written to DIR/base/ too.

The card holds the chain (the stage's lineage), the stage's data and hyper-parameters, its accuracies (per task and
group) and its forgetting of the earlier stages' tasks (chaintune.metrics, from the lineage's stored evaluations).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from chaintune.config import ExperimentConfig
from chaintune.errors import ChaintuneError
from chaintune.plan import Node, build_tree
from chaintune.rundir import RunDir, check_outside_data
from chaintune.weights import WeightCache, checkpoint_problem


def find_stage(out: RunDir, stage: str | None, run: str | None, overrides: dict[str, Any]
               ) -> tuple[ExperimentConfig, Node, list[str]]:
    """(config, node, ids of the runs through it) of the stage named by its folder name or key (`stage`), or of
    the last stage of `run`."""
    from chaintune.verify import run_configs

    if run is not None:
        if run not in out.run_ids():
            raise ChaintuneError(f"'{run}' is no finished run of '{out.root}'",
                                 f"pass one of: {', '.join(out.run_ids()[:8]) or '(none finished)'}")
        stage = out.run(run).stages[-1]
    found: dict[str, tuple[ExperimentConfig, Node, list[str]]] = {}
    for label, cfg in run_configs(out, overrides):
        runs, nodes, _ = build_tree(cfg, label)
        for node in nodes:
            through = [r.run_id for r in runs if node in r.nodes]
            previous = found.get(node.dirname, (cfg, node, []))
            found[node.dirname] = (previous[0], previous[1], previous[2] + through)
    match = [v for k, v in found.items() if stage in (k, v[1].key)]
    if not match:
        trained = [k for k, (_, n, _) in found.items() if n.stage is not None and out.node_done(k)]
        raise ChaintuneError(f"'{stage}' is no stage of '{out.root}'",
                             f"pass a stage folder name, e.g. {', '.join(trained[:4]) or '(none trained yet)'}")
    cfg, node, runs = match[0]
    if node.stage is None:
        raise ChaintuneError(f"'{stage}' is the base model, not a trained stage", "export a trained stage")
    return cfg, node, sorted(set(runs))


def check_out(path: Path, data_dir: Path | None) -> Path:
    """The export folder: absent or empty, outside the data, in a writable folder (checked before any work)."""
    from chaintune.io import probe_writable

    path = Path(path).expanduser()
    check_outside_data(path, data_dir, what="--out")
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise ChaintuneError(f"--out '{path}' exists and is not an empty folder", "pass a new folder")
    probe_writable(path.parent, "the folder of --out", "pass an --out in a writable folder")
    return path


def _save_full(cache: WeightCache, node: Node, folder: Path) -> None:
    model = cache.materialize(node)
    model.save_pretrained(folder, safe_serialization=True)
    cache.tokenizer.save_pretrained(folder)


def write_adapter(cache: WeightCache, node: Node, folder: Path, final: Path) -> None:
    """The stage's LoRA adapter, its tokenizer, and (for a later stage) its parent's merged weights in base/."""
    checkpoint = cache.out.checkpoint_dir(node.dirname)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(checkpoint / name, folder / name)
    assert node.parent is not None
    if node.parent.stage is None:
        from chaintune.models import load_tokenizer, resolve_model_path

        base = resolve_model_path(cache.model_name)
        load_tokenizer(base, cache.trust_remote_code).save_pretrained(folder)
    else:
        _save_full(cache, node.parent, folder / "base")
        cache.tokenizer.save_pretrained(folder)
        base = str(final.resolve() / "base")
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": base}, indent=2),
                                                encoding="utf-8")


# ------------------------------------------------------------------------------------------------ the model card
def _table(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".2f") if not df.empty else "(none)"


def lineage_table(out: RunDir, node: Node) -> pd.DataFrame:
    rows = []
    for n in node.lineage()[1:]:
        t = n.training
        rows.append({"stage": n.index, "name": n.stage.label, "task": n.stage.task,
                     "replay": f"{n.stage.replay.task} × {n.stage.replay.fraction:g}" if n.stage.replay else "—",
                     "method": t.method, "lr": f"{t.lr:g}", "steps": getattr(out.node(n.dirname), "steps", None),
                     "seed": n.seed, "folder": n.dirname})
    return pd.DataFrame(rows)


def accuracy_rows(out: RunDir, node: Node) -> pd.DataFrame:
    """The stage's stored evaluations: one row per task and group (group ALL: the whole task)."""
    rows = []
    for ev in out.evaluations(node.dirname):
        rows.append({"task": ev.task, "group": "ALL", "n": ev.n, "acc": ev.acc, "acc_norm": ev.acc_norm})
        rows += [{"task": ev.task, "group": g, "n": v["n"], "acc": v["acc"], "acc_norm": v["acc_norm"]}
                 for g, v in ev.per_group.items()]
    return pd.DataFrame(rows)


def forgetting_rows(out: RunDir, node: Node) -> pd.DataFrame:
    """F and RF (chaintune.metrics) of each earlier stage's task at this stage, from the lineage's evaluations."""
    from chaintune import metrics as M

    lineage = node.lineage()
    cells = [{"stage": n.index, "task": ev.task, "acc": ev.acc} for n in lineage for ev in out.evaluations(n.dirname)]
    if not cells:
        return pd.DataFrame()
    R = M.accuracy_matrix(pd.DataFrame(cells))
    rows = []
    for n in lineage[1:-1]:
        task = n.stage.task
        if task in R.columns and not pd.isna(R.loc[n.index, task]) and not pd.isna(R.loc[node.index, task]):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # RF of a task at 0 % is NaN
                rows.append({"task": task, "trained at stage": n.index, "acc then": R.loc[n.index, task],
                             "acc now": R.loc[node.index, task], "F (pp)": M.forgetting(R, task, n.index, node.index),
                             "RF (%)": M.relative_forgetting(R, task, n.index, node.index)})
    return pd.DataFrame(rows)


def model_card(out: RunDir, cfg: ExperimentConfig, node: Node, runs: list[str], adapter: bool) -> str:
    record = out.node(node.dirname)
    assert record is not None and node.stage is not None
    gate = record.gate
    gate_line = ("no quality gate" if gate is None else
                 f"validation accuracy {gate.final.val_acc_before:.2f} → {gate.final.val_acc:.2f} % on "
                 f"{gate.n_validation} held-out examples: {'FAILED (' + '; '.join(gate.final.reasons) + ')' if gate.failed else 'passed'}")
    training = pd.DataFrame([{"key": k, "value": json.dumps(v) if isinstance(v, (dict, list)) else v}
                             for k, v in record.training.items()])
    if adapter:
        load = ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, "
                "AutoTokenizer\n\n"
                + (f"base = AutoModelForCausalLM.from_pretrained(\"DIR/base\")  # stage {node.index - 1}'s weights\n"
                   if node.parent.stage is not None else
                   f"base = AutoModelForCausalLM.from_pretrained({cfg.model or 'the embedded SmolLM2-135M'!r})\n")
                + "model = PeftModel.from_pretrained(base, \"DIR\")\ntokenizer = AutoTokenizer.from_pretrained(\"DIR\")\n```")
    else:
        load = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                "model = AutoModelForCausalLM.from_pretrained(\"DIR\")\ntokenizer = AutoTokenizer.from_pretrained(\"DIR\")\n```")
    replay = node.stage.replay
    data = [f"- task: `{node.stage.task}`, {record.n_train_examples} training examples "
            f"(train_limit {cfg.task_settings(node.stage.task).train_limit or 'none'}, data_seed {cfg.data_seed}, "
            f"split_seed {cfg.split_seed})"]
    if replay is not None:
        data.append(f"- replay: `{replay.task}`, fraction {replay.fraction:g}, balance {replay.balance}; replayed per "
                    f"group: {record.replayed_per_group}")
    front = {"library_name": "peft" if adapter else "transformers", "base_model": cfg.model or "SmolLM2-135M-Instruct",
             "tags": ["chaintune", "chained-fine-tuning"]}
    return "\n".join([
        "---", *(f"{k}: {json.dumps(v)}" for k, v in front.items()), "---", "",
        f"# {cfg.name}: stage {node.index} ({node.stage.label})", "",
        f"Exported by `chaintune export` from `{out.root}`, stage folder `{node.dirname}`"
        f"{' (LoRA adapter)' if adapter else ''}. Runs through this stage: {', '.join(runs) or '—'}.", "",
        load, "", "## Chain", "", _table(lineage_table(out, node)), "",
        "## This stage's data and hyper-parameters", "", *data,
        f"- trained {record.steps} optimizer steps, {record.tokens} tokens, seed {record.seed}; quality gate: "
        f"{gate_line}", "", _table(training), "",
        "## Accuracies after this stage (%, log-likelihood multiple choice)", "", _table(accuracy_rows(out, node)), "",
        "## Forgetting of the earlier stages' tasks at this stage (pp; RF: % of the accuracy then)", "",
        _table(forgetting_rows(out, node)), ""])


# ------------------------------------------------------------------------------------------------ the command
def export_stage(run_dir: str | Path, out_dir: str | Path, *, stage: str | None = None, run: str | None = None,
                 merge: bool = False, device: str | None = None, trust_remote_code: bool = False) -> Path:
    """Write the stage (or `run`'s last stage) to `out_dir` (see the module docstring); returns the folder."""
    from chaintune.tasks import resolve_data_dir

    if not Path(run_dir).is_dir():
        raise ChaintuneError(f"run directory '{run_dir}' does not exist", "pass the output_dir of a `chaintune run`")
    out = RunDir(run_dir)
    overrides = {"trust_remote_code": trust_remote_code} | ({"device": device} if device else {})
    cfg, node, runs = find_stage(out, stage, run, overrides)
    target = check_out(Path(out_dir), resolve_data_dir(cfg.data_dir))
    problem = checkpoint_problem(out, node, cfg.keep_checkpoints)
    if problem is not None:
        raise ChaintuneError(f"stage {node.dirname} cannot be exported: {problem}",
                             "rerun the experiment (keep_checkpoints: true keeps every stage exportable)")
    adapter = node.training.method == "lora" and not merge
    cache = WeightCache(out, cfg.model, cfg.device, trust_remote_code)
    tmp = target.parent / f".{target.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if adapter:
            write_adapter(cache, node, tmp, target)
        else:
            _save_full(cache, node, tmp)
        (tmp / "README.md").write_text(model_card(out, cfg, node, runs, adapter), encoding="utf-8")
        if target.is_dir():
            target.rmdir()  # empty (checked above)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
