"""The chain runner: trains every stage of every chain × seed, evaluates after each stage, writes results.

Stages are nodes of a tree keyed by a hash of (parent, task, data, hyper-parameters, seed): chains that share a
prefix share its nodes, so a shared first stage is trained once and the other chains branch from its checkpoint.

Layout of `output_dir`:
    experiment.yaml, environment.json       resolved config; versions, device, git sha, data hashes
    stages/<node>/node.json                 what the node is; `status: done` once trained + checkpointed
    stages/<node>/checkpoint/               safetensors weights (full) or LoRA adapter
    stages/<node>/train_curve.csv           step, loss, lr, grad_norm, tokens, seconds
    stages/<node>/eval/<task>.json          acc, acc_norm, per-group; <task>.predictions.parquet per example
    runs/<chain>-seed<k>/                   per run: accuracy_matrix.csv, group_accuracy.csv, predictions.parquet,
                                            train_curves.csv, metrics.json, run.json
    results.parquet / results.csv           one tidy table for the whole experiment
"""
from __future__ import annotations

import random
import re
from collections import Counter
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
import yaml

from chaintune.config import ExperimentConfig, Stage, TrainingConfig, config_hash
from chaintune.errors import ChaintuneError
from chaintune.evaluate import EvalResult, evaluate
from chaintune.io import read_json, write_json, write_table, write_text
from chaintune.models import load_model, pick_device, resolve_model_path
from chaintune.provenance import data_file_hashes, environment, eval_environment, file_sha256
from chaintune.summary import OVERALL, replay_metrics, run_metrics
from chaintune.tasks import Example, canonical_task_name, load_task, resolve_data_dir
from chaintune.tasks.splits import stable_seed
from chaintune.train import attach_lora, train_stage



@dataclass
class Node:
    """One trained stage (or the base model, index 0) in the tree of all chains × seeds."""

    key: str
    index: int  # 0 = base model
    stage: Stage | None
    training: TrainingConfig | None
    seed: int | None
    parent: "Node | None"
    children: list["Node"] = field(default_factory=list)
    eval_tasks: list[str] = field(default_factory=list)  # union over the chains through this node

    @property
    def dirname(self) -> str:
        return f"base-{self.key}" if self.stage is None else f"s{self.index}-{self.stage.label}-seed{self.seed}-{self.key}"

    def lineage(self) -> list["Node"]:
        node, path = self, []
        while node is not None:
            path.append(node)
            node = node.parent
        return path[::-1]


@dataclass
class Run:
    chain: str
    seed: int
    nodes: list[Node]  # base first
    variant: str = ""  # sweep point label, e.g. "lr=1e-05"; "" outside sweeps
    eval_tasks: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        """Folder name under runs/: `<chain>-seed<k>`, plus the sweep point (e.g. `-lr1e-05`) in sweeps."""
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "", self.variant.replace(",", "-"))
        if len(slug) > 80:  # many swept keys: keep folder names well under the 255-byte limit, still unique
            slug = f"{slug[:67]}-{config_hash(self.variant)}"
        return f"{self.chain}-seed{self.seed}" + (f"-{slug}" if slug else "")

    @property
    def display_chain(self) -> str:
        """What summaries group seeds by: the chain, and the sweep point when there is one."""
        return f"{self.chain} [{self.variant}]" if self.variant else self.chain


def eval_spec(cfg: ExperimentConfig, task: str) -> dict[str, Any]:
    """What determines a task's evaluation questions; stored with each result and checked before reusing it."""
    return {"task": task, "eval_limit": cfg.task_settings(task).eval_limit, "data_seed": cfg.data_seed,
            "split_seed": cfg.split_seed}


def eval_done(path: Path, spec: dict[str, Any]) -> bool:
    """True if `path` holds an evaluation with these settings; an evaluation with other settings is an error
    (a changed eval_limit, data_seed or split_seed must not silently mix old and new questions)."""
    if not path.is_file():
        return False
    stored = read_json(path).get("spec", spec)
    if stored != spec:
        raise ChaintuneError(f"{path} was evaluated with {stored}, but this config asks for {spec}",
                             "use a new output_dir, or delete that eval folder to re-evaluate")
    return True


def node_trained(folder: Path, node: Node) -> bool:
    """The base model, or a stage whose node.json (written last, after its checkpoint) says done."""
    meta = folder / "node.json"
    return node.stage is None or (meta.is_file() and read_json(meta).get("status") == "done")


def node_complete(cfg: ExperimentConfig, folder: Path, node: Node) -> bool:
    """Trained, every evaluation stored with `cfg`'s settings (other settings raise), curvature measured if asked."""
    if not node_trained(folder, node):
        return False
    if not all([eval_done(folder / "eval" / f"{t}.json", eval_spec(cfg, t)) for t in node.eval_tasks]):
        return False
    wants_curvature = cfg.curvature is not None and node.stage is not None and cfg.curvature.wants(node.index, node.stage)
    return not wants_curvature or (folder / "curvature.json").is_file()


def run_identity(cfg: ExperimentConfig, run: Run) -> str:
    """Stable id of a run: a hash of everything that determines its numbers (stages, seeds, evaluation)."""
    return config_hash({"nodes": [n.key for n in run.nodes],
                        "eval": [eval_spec(cfg, t) for t in run.eval_tasks],
                        "curvature": cfg.curvature.model_dump() if cfg.curvature else None,
                        "min_group_size": cfg.min_group_size})


def build_plan(cfg: ExperimentConfig, variant: str = "") -> tuple[Node, list[Run], list[Node]]:
    """The base node, every (chain, seed) run, and the unique trained nodes in execution order (depth first)."""
    base = Node(config_hash({"model": cfg.model or "embedded"}), 0, None, None, None, None)
    nodes: dict[str, Node] = {}
    runs = []
    for seed in cfg.seeds:
        for chain in cfg.chains:
            if chain.seeds is not None and seed not in chain.seeds:
                continue
            parent, path = base, [base]
            for i, stage in enumerate(chain.stages, start=1):
                training = stage.training(cfg.training)
                ident = {"parent": parent.key, "task": canonical_task_name(stage.task),
                         "replay": stage.replay.model_dump() if stage.replay else None,
                         "train_limit": cfg.task_settings(stage.task).train_limit, "training": training.model_dump(
                             exclude={"checkpoint_every"}), "seed": seed, "split_seed": cfg.split_seed,
                         "data_seed": cfg.data_seed}
                custom = [t for t in cfg.custom_tasks if t.get("name") in (stage.task, stage.replay and stage.replay.task)]
                if custom:  # a user dataset is identified by its spec (path, columns), not only its name
                    ident["custom_tasks"] = custom
                key = config_hash(ident)
                if key not in nodes:
                    nodes[key] = Node(key, i, stage, training, seed, parent)
                    parent.children.append(nodes[key])
                parent = nodes[key]
                path.append(parent)
            tasks = cfg.chain_eval_tasks(chain)
            for node in path:
                node.eval_tasks += [t for t in tasks if t not in node.eval_tasks]
            runs.append(Run(chain.name, seed, path, variant, tasks))
    return base, runs, list(nodes.values())


def allocate(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split `total` items over groups in proportion to non-negative weights (largest remainder, ties by name);
    equal shares when every weight is 0."""
    names = sorted(weights)
    w = {g: max(weights[g], 0.0) for g in names}
    mass = sum(w.values())
    share = {g: total * (w[g] / mass if mass > 0 else 1 / len(names)) for g in names}
    quota = {g: int(share[g]) for g in names}
    for g in sorted(names, key=lambda g: (-(share[g] - quota[g]), g))[:total - sum(quota.values())]:
        quota[g] += 1
    return quota


def stage_examples(cfg: ExperimentConfig, stage: Stage, seed: int,
                   group_forgetting: dict[str, float] | None = None) -> list[Example]:
    """Training examples of a stage: the task's train split (train_limit), plus replayed examples if configured.

    Replay with fraction f adds n_r = round(f·n/(1−f)) examples from the replayed task's *train* split, so that
    n_r / (n_r + n) = f (SPEC.md §7); they are drawn seeded by the run seed. Group-balanced replay draws equal
    numbers per group; targeted replay draws numbers proportional to `group_forgetting` (pp, clipped at 0).
    """
    data_dir = resolve_data_dir(cfg.data_dir)
    examples = load_task(stage.task, "train", data_dir, limit=cfg.task_settings(stage.task).train_limit,
                         seed=cfg.data_seed, split_seed=cfg.split_seed)
    if stage.replay and stage.replay.fraction > 0:
        pool = load_task(stage.replay.task, "train", data_dir, split_seed=cfg.split_seed)
        n_replay = min(len(pool), round(stage.replay.fraction * len(examples) / (1 - stage.replay.fraction)))
        rng = random.Random(stable_seed("replay", seed, stage.replay.task, n_replay))
        if stage.replay.balance != "none":
            by_group: dict[str, list[Example]] = {}
            for ex in pool:
                by_group.setdefault(str(ex.group), []).append(ex)
            if stage.replay.balance == "targeted":
                if group_forgetting is None:
                    raise ChaintuneError(f"targeted replay of {stage.replay.task} needs its per-group forgetting",
                                         "run it inside a chain (ChainRunner) after a stage trained on that task")
                weights = {g: group_forgetting.get(g, 0.0) for g in by_group}
            else:
                weights = {g: 1.0 for g in by_group}
            quota = allocate(n_replay, weights)
            drawn = [ex for g in sorted(by_group) for ex in rng.sample(by_group[g], min(quota[g], len(by_group[g])))]
        else:
            drawn = rng.sample(pool, n_replay)
        examples = examples + drawn
    return examples


def replayed_per_group(cfg: ExperimentConfig, stage: Stage, examples: list[Example]) -> dict[str, int] | None:
    """How many replayed examples of each group a stage's mixture holds (they follow the stage's own examples)."""
    if stage.replay is None:
        return None
    n_own = len(load_task(stage.task, "train", resolve_data_dir(cfg.data_dir), limit=cfg.task_settings(stage.task)
                          .train_limit, seed=cfg.data_seed, split_seed=cfg.split_seed))
    return dict(sorted(Counter(str(e.group) for e in examples[n_own:]).items()))


class ChainRunner:
    """Runs (or resumes) an experiment; see the module docstring for what it writes."""

    def __init__(self, cfg: ExperimentConfig, progress: bool = True, echo: Callable[[str], None] = print,
                 variant: str = ""):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.progress = progress
        self.echo = echo
        self.base, self.runs, self.nodes = build_plan(cfg, variant)
        self.node_by_key = {n.key: n for n in [self.base, *self.nodes]}
        self.device = pick_device(cfg.device)
        self.model = None
        self.tokenizer = None
        self.loaded_key: str | None = None  # which node's weights are in self.model
        self._eval_sets: dict[str, list[Example]] = {}

    # ------------------------------------------------------------------------------------------------ paths / state
    def node_dir(self, node: Node) -> Path:
        return self.out / "stages" / node.dirname

    def node_done(self, node: Node) -> bool:
        return node_trained(self.node_dir(node), node)

    def checkpoint_ok(self, node: Node) -> bool:
        """True if the node's checkpoint exists and matches the checksum recorded when it was saved."""
        if node.stage is None:
            return True
        meta = self.node_dir(node) / "node.json"
        if not meta.is_file():
            return False
        recorded = read_json(meta).get("checkpoint_sha256", {})
        ckpt = self.node_dir(node) / "checkpoint"
        return bool(recorded) and all((ckpt / name).is_file() and file_sha256(ckpt / name) == digest
                                      for name, digest in recorded.items())

    def eval_path(self, node: Node, task: str) -> Path:
        return self.node_dir(node) / "eval" / f"{task}.json"

    # ------------------------------------------------------------------------------------------------ model state
    def _fresh_base(self) -> None:
        self.model, self.tokenizer = load_model(resolve_model_path(self.cfg.model), device=str(self.device),
                                                dtype="float32", trust_remote_code=self.cfg.trust_remote_code)
        self.loaded_key = self.base.key

    def _materialize(self, node: Node) -> None:
        """Put `node`'s weights into self.model: base, then the latest full checkpoint, then LoRA adapters merged."""
        if self.loaded_key == node.key:
            return
        lineage = node.lineage()[1:]
        start = max((i for i, n in enumerate(lineage) if n.training and n.training.method == "full"), default=-1)
        if start >= 0:
            from transformers import AutoModelForCausalLM

            ckpt = self.node_dir(lineage[start]) / "checkpoint"
            self.model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, trust_remote_code=self.cfg
                                                              .trust_remote_code).to(self.device).eval()
            if self.tokenizer is None:
                self._fresh_base_tokenizer()
        else:
            self._fresh_base()
        for n in lineage[start + 1:]:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, self.node_dir(n) / "checkpoint").merge_and_unload()
        self.model.eval()
        self.loaded_key = node.key

    def _fresh_base_tokenizer(self) -> None:
        from chaintune.models import load_tokenizer

        self.tokenizer = load_tokenizer(resolve_model_path(self.cfg.model), self.cfg.trust_remote_code)

    # ------------------------------------------------------------------------------------------------ work
    def eval_set(self, task: str) -> list[Example]:
        if task not in self._eval_sets:
            self._eval_sets[task] = load_task(task, "test", resolve_data_dir(self.cfg.data_dir),
                                              limit=self.cfg.task_settings(task).eval_limit, seed=self.cfg.data_seed,
                                              split_seed=self.cfg.split_seed)
        return self._eval_sets[task]

    def evaluate_node(self, node: Node) -> None:
        for task in node.eval_tasks:
            path = self.eval_path(node, task)
            spec = eval_spec(self.cfg, task)
            if eval_done(path, spec):
                continue
            self._materialize(node)
            t0 = time.perf_counter()
            result = evaluate(self.model, self.tokenizer, self.eval_set(task), task, progress=self.progress,
                              max_tokens=self.cfg.eval_max_tokens)
            write_table(path.with_suffix(".predictions.parquet"), predictions_frame(result))
            summary = result.summary() | {"seconds": time.perf_counter() - t0, "spec": spec,
                                          "env": eval_environment(self.model)}
            write_json(path, summary)
            self.echo(f"  eval {node.dirname:<48} {task:<12} acc {result.acc:6.2f}  acc_norm {result.acc_norm:6.2f}"
                      f"  (n={result.n}, {summary['seconds']:.0f}s)")

    def replay_group_forgetting(self, node: Node) -> dict[str, float]:
        """Per-group forgetting (pp) of the node's replayed task: accuracy after the last stage that trained it minus
        accuracy after the node's parent (from their stored evaluations)."""
        assert node.stage is not None and node.stage.replay is not None and node.parent is not None
        task = canonical_task_name(node.stage.replay.task)
        trained = [n for n in node.lineage()[1:-1] if canonical_task_name(n.stage.task) == task]
        if not trained:
            raise ChaintuneError(f"targeted replay of {task} in stage {node.index} has no earlier stage trained on it",
                                 "use balance: groups, or train that task earlier in the chain")
        paths = [self.eval_path(trained[-1], task), self.eval_path(node.parent, task)]
        if not all(p.is_file() for p in paths):
            raise ChaintuneError(f"targeted replay of {task} needs its evaluation after stages {trained[-1].index} "
                                 f"and {node.parent.index}", f"add {task} to the chain's eval_tasks")
        before, after = (read_json(p)["per_group"] for p in paths)
        return {g: before[g]["acc"] - after[g]["acc"] for g in before if g in after}

    def node_examples(self, node: Node) -> list[Example]:
        assert node.stage is not None and node.seed is not None
        targeted = node.stage.replay is not None and node.stage.replay.balance == "targeted"
        return stage_examples(self.cfg, node.stage, node.seed,
                              self.replay_group_forgetting(node) if targeted else None)

    def train_node(self, node: Node) -> None:
        assert node.stage is not None and node.training is not None and node.seed is not None
        folder = self.node_dir(node)
        if self.node_done(node) and self.checkpoint_ok(node):
            return
        if self.node_done(node):
            self.echo(f"  checkpoint of {node.dirname} is missing or corrupt: retraining it")
            (folder / "node.json").unlink()
            shutil.rmtree(folder / "eval", ignore_errors=True)
        self._materialize(node.parent)
        examples = self.node_examples(node)
        if node.training.method == "lora":
            self.model = attach_lora(self.model, node.training, node.seed)
        self.loaded_key = None  # weights are about to change
        self.echo(f"  train {node.dirname}: {len(examples)} examples, lr {node.training.lr:g}, {node.training.method}")
        work = folder / "work"
        work.mkdir(parents=True, exist_ok=True)
        result = train_stage(self.model, self.tokenizer, examples, node.training, node.seed, work_dir=work,
                             progress=self.progress, desc=node.dirname)
        write_table(folder / "train_curve.csv", pd.DataFrame(result.curve))
        ckpt = folder / "checkpoint"
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp = folder / ".checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if node.training.method == "lora":
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.model = self.model.merge_and_unload()
        else:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
        tmp.rename(ckpt)
        digests = {p.name: file_sha256(p) for p in sorted(ckpt.iterdir()) if p.is_file()}
        write_json(folder / "node.json", {
            "status": "done", "key": node.key, "index": node.index, "task": node.stage.task,
            "stage": node.stage.model_dump(), "training": node.training.model_dump(), "seed": node.seed,
            "parent": node.parent.dirname if node.parent else None, "n_train_examples": len(examples),
            "replayed_per_group": replayed_per_group(self.cfg, node.stage, examples),
            "steps": result.steps, "tokens": result.tokens, "train_seconds": result.seconds,
            "tokens_per_second": result.tokens / max(result.seconds, 1e-9), "checkpoint_sha256": digests})
        shutil.rmtree(work, ignore_errors=True)
        self.model.eval()
        self.loaded_key = node.key

    def curvature_path(self, node: Node) -> Path:
        return self.node_dir(node) / "curvature.json"

    def curvature_node(self, node: Node) -> None:
        """Measure λ_max (and top-k / trace if asked) of the stage's training loss w.r.t. its trainable parameters:
        all weights for full fine-tuning, the stage's LoRA adapter for LoRA."""
        from chaintune.curvature import measure_curvature

        cc = self.cfg.curvature
        if cc is None or node.stage is None or not cc.wants(node.index, node.stage) or self.curvature_path(node).is_file():
            return
        assert node.training is not None and node.seed is not None
        if node.training.method == "lora":
            from peft import PeftModel

            self._materialize(node.parent)
            model = PeftModel.from_pretrained(self.model, self.node_dir(node) / "checkpoint", is_trainable=True)
            self.loaded_key = None
        else:
            self._materialize(node)
            model = self.model.requires_grad_(True)
        result = measure_curvature(model, self.tokenizer, self.node_examples(node),
                                   n_examples=cc.examples, seed=node.seed, topk=cc.topk, trace=cc.trace,
                                   trace_samples=cc.trace_samples, micro_batch=cc.micro_batch, tol=cc.tol,
                                   max_iter=cc.max_iter, method=cc.method, graph_budget=cc.graph_budget)
        if node.training.method == "lora":
            self.model = model.unload()  # drop the adapter again: parent weights, no merge
        write_json(self.curvature_path(node), {"stage": node.index, "task": node.stage.task, **vars(result)})
        self.echo(f"  curvature {node.dirname}: λ_max {result.lambda_max:.4g} ({result.iterations} iterations"
                  f"{'' if result.converged else ', not converged'}, {result.seconds:.0f}s)")

    def finished(self, node: Node) -> bool:
        """The node and every node below it are trained, evaluated and measured: nothing needs its weights."""
        return node_complete(self.cfg, self.node_dir(node), node) and all(self.finished(c) for c in node.children)

    def release_checkpoints(self) -> None:
        """With keep_checkpoints: false, delete a checkpoint once its node and every node below it are finished
        (the nodes below a LoRA stage read its adapter, not only its children)."""
        if self.cfg.keep_checkpoints:
            return
        for node in self.nodes:
            if self.finished(node):
                shutil.rmtree(self.node_dir(node) / "checkpoint", ignore_errors=True)

    def prepare_output(self) -> None:
        probe = self.out / ".write-test"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ChaintuneError(f"cannot write to output_dir '{self.out}' ({exc.strerror})",
                                 "choose a writable output_dir (--set output_dir=...)") from None
        data_dir = resolve_data_dir(self.cfg.data_dir)
        hashes = data_file_hashes(data_dir, [canonical_task_name(t) for t in self.cfg.all_tasks()])
        stored = self.out / "environment.json"
        before = read_json(stored).get("data_files", {}) if stored.is_file() else {}
        changed = sorted(f for f in before.keys() & hashes.keys() if before[f] != hashes[f])
        if changed:
            raise ChaintuneError(f"data file(s) {', '.join(changed)} changed since {self.out} was started",
                                 "use a new output_dir (resuming would mix results of both versions), or restore them")
        write_text(self.out / "experiment.yaml", yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
        write_json(stored, environment(self.device) | {"data_dir": str(data_dir) if data_dir else None,
                                                        "data_files": hashes})

    def preflight(self) -> None:
        """Load every stage's training data and every evaluation set: missing splits fail before any training."""
        for stage in {s.model_dump_json(): s for c in self.cfg.chains for s in c.stages}.values():
            stage_examples(self.cfg, stage, self.cfg.seeds[0], group_forgetting={})  # data only: any weights
        for task in self.cfg.evaluation_tasks():
            self.eval_set(task)

    def run(self) -> pd.DataFrame:
        """Train and evaluate everything not done yet, then (re)write the run folders and the results table."""
        self.prepare_output()
        self.preflight()
        started = time.perf_counter()
        self.evaluate_node(self.base)
        for node in self.nodes:
            if self.finished(node):
                continue  # nothing needs this node's weights again (its checkpoint may have been released)
            self.train_node(node)
            self.evaluate_node(node)
            self.curvature_node(node)
            self.release_checkpoints()
        results = write_results(self.cfg, self.out, self.runs, self.node_dir)
        self.echo(f"done in {time.perf_counter() - started:.0f}s → {self.out / 'results.parquet'}")
        return results


def predictions_frame(result: EvalResult) -> pd.DataFrame:
    df = pd.DataFrame(result.predictions)
    df["logliks"] = df["logliks"].map(list)
    return df


def _stage_name(node: Node) -> str:
    return "base" if node.stage is None else node.stage.label


def write_run(cfg: ExperimentConfig, out: Path, run: Run, node_dir: Callable[[Node], Path]) -> list[dict[str, Any]]:
    """Write one run's folder (runs/<run_id>/) from its nodes' evaluations; returns its rows of the results table."""
    run_rows, preds, curves = [], [], []
    for node in run.nodes:
        for task in run.eval_tasks:
            summary = read_json(node_dir(node) / "eval" / f"{task}.json")
            common = {"experiment": cfg.name, "chain": run.display_chain, "seed": run.seed, "run_id": run.run_id,
                      "variant": run.variant, "stage": node.index, "stage_name": _stage_name(node),
                      "trained_task": node.stage.task if node.stage else None, "eval_task": task, "node": node.dirname}
            run_rows.append(common | {"group": OVERALL, "n": summary["n"], "acc": summary["acc"],
                                      "acc_norm": summary["acc_norm"]})
            for group, g in summary["per_group"].items():
                run_rows.append(common | {"group": group, "n": g["n"], "acc": g["acc"], "acc_norm": g["acc_norm"]})
            p = pd.read_parquet(node_dir(node) / "eval" / f"{task}.predictions.parquet")
            preds.append(p.assign(stage=node.index, eval_task=task))
        curve = node_dir(node) / "train_curve.csv"
        if node.stage is not None and curve.is_file():
            curves.append(pd.read_csv(curve).assign(stage=node.index, task=node.stage.task))
    run_df = pd.DataFrame(run_rows)
    folder = out / "runs" / run.run_id
    overall = run_df[run_df.group == OVERALL]
    write_table(folder / "accuracy_matrix.csv",
                overall.pivot(index=["stage", "stage_name"], columns="eval_task", values="acc").reset_index())
    write_table(folder / "group_accuracy.csv", run_df[run_df.group != OVERALL][
        ["stage", "stage_name", "eval_task", "group", "n", "acc", "acc_norm"]])
    write_table(folder / "predictions.parquet", pd.concat(preds, ignore_index=True))
    if curves:
        write_table(folder / "train_curves.csv", pd.concat(curves, ignore_index=True))
    curvature = [read_json(node_dir(n) / "curvature.json") for n in run.nodes
                 if (node_dir(n) / "curvature.json").is_file()]
    replay_stages = [{"stage": n.index, "task": n.stage.task, "replay_task": n.stage.replay.task,
                      "fraction": n.stage.replay.fraction} for n in run.nodes if n.stage and n.stage.replay]
    write_json(folder / "metrics.json", run_metrics(run_df, pd.concat(preds, ignore_index=True), cfg) |
               {"curvature": curvature, "replay": replay_metrics(run_df, replay_stages)})
    write_json(folder / "run.json", {"run_id": run.run_id, "id": run_identity(cfg, run), "chain": run.display_chain,
                                     "base_chain": run.chain, "variant": run.variant, "seed": run.seed,
                                     "stages": [n.dirname for n in run.nodes]})
    return run_rows


def write_results(cfg: ExperimentConfig, out: Path, runs: list[Run], node_dir: Callable[[Node], Path]) -> pd.DataFrame:
    """Assemble per-run folders and the experiment's tidy results table from the node evaluations."""
    results = pd.DataFrame([row for run in runs for row in write_run(cfg, out, run, node_dir)])
    write_table(out / "results.parquet", results)
    write_table(out / "results.csv", results)
    return results
