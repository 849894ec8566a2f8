"""The plan: sweep points → the tree of stage nodes → typed jobs. Pure: reads no file, loads no model.

Stages are nodes of a tree keyed by a hash of (parent, task, data, hyper-parameters, seed): chains that share a
prefix share its nodes, so a shared first stage is trained once and the other chains branch from its checkpoint.
A config without `sweep:` is a sweep of one point (label ""). Every point's tree is merged into one set of jobs:
a job trains its node (unless it is the base model), evaluates it and measures its curvature if asked; a point that
evaluates a shared node differently gets a second job on it, which runs after the node is trained.
"""
from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaintune.config import (CurvatureConfig, DistributedConfig, ExperimentConfig, QualityGateConfig, Stage,
                              TaskSettings, TrainingConfig, config_hash, read_config, training_identity, validate_config)
from chaintune.overrides import set_path
from chaintune.tasks import canonical_task_name


@dataclass(frozen=True)
class Node:
    """One trained stage (or the base model, index 0) in the tree of all chains × seeds."""

    key: str
    index: int  # 0 = base model
    stage: Stage | None
    training: TrainingConfig | None
    seed: int | None
    parent: "Node | None"
    repeats_task: bool = False  # an earlier stage of its chain trained the same task (the gate's min_gain_repeated)

    @property
    def dirname(self) -> str:
        return f"base-{self.key}" if self.stage is None else f"s{self.index}-{self.stage.label}-seed{self.seed}-{self.key}"

    @property
    def name(self) -> str:
        return "base" if self.stage is None else self.stage.label

    def lineage(self) -> list["Node"]:
        """Base first, this node last."""
        node, path = self, []
        while node is not None:
            path.append(node)
            node = node.parent
        return path[::-1]


@dataclass(frozen=True)
class Run:
    """One chain × seed (× sweep point): its nodes, base first, and the tasks scored after each stage."""

    chain: str
    seed: int
    nodes: tuple[Node, ...]
    variant: str = ""  # sweep point label, e.g. "lr=1e-05"; "" outside sweeps
    eval_tasks: tuple[str, ...] = ()

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
    """What determines a task's evaluation questions; stored with each result and checked before reusing it
    (`eval_balance` only when not the default, so older results keep matching)."""
    settings = cfg.task_settings(task)
    spec = {"task": task, "eval_limit": settings.eval_limit, "data_seed": cfg.data_seed, "split_seed": cfg.split_seed}
    if settings.eval_balance != "proportional":
        spec["eval_balance"] = settings.eval_balance
    return spec


def run_identity(cfg: ExperimentConfig, run: Run) -> str:
    """Stable id of a run: a hash of everything that determines its numbers (stages, seeds, evaluation)."""
    return config_hash({"nodes": [n.key for n in run.nodes],
                        "eval": [eval_spec(cfg, t) for t in run.eval_tasks],
                        "curvature": cfg.curvature.model_dump() if cfg.curvature else None,
                        "min_group_size": cfg.min_group_size})


def task_id(cfg: ExperimentConfig, task: str) -> str:
    """A task's canonical name: a user task's own name, a built-in alias resolved (no registry lookup for user
    tasks, so planning works before they are registered)."""
    return task if task in {spec.get("name") for spec in cfg.custom_tasks} else canonical_task_name(task)


def build_tree(cfg: ExperimentConfig, variant: str = "") -> tuple[list[Run], list[Node], dict[str, list[str]]]:
    """Every (chain, seed) run, the nodes in execution order (base first, then depth first) and each node's
    evaluation tasks (the union over the chains through it)."""
    base = Node(config_hash({"model": cfg.model or "embedded"}), 0, None, None, None, None)
    nodes: dict[str, Node] = {base.key: base}
    eval_tasks: dict[str, list[str]] = {base.key: []}
    runs = []
    for seed in cfg.seeds:
        for chain in cfg.chains:
            if chain.seeds is not None and seed not in chain.seeds:
                continue
            parent, path = base, [base]
            trained = [task_id(cfg, s.task) for s in chain.stages]  # each stage's task, in order
            for i, stage in enumerate(chain.stages, start=1):
                training = stage.training(cfg.training)
                repeats = trained[i - 1] in trained[:i - 1]
                gate = cfg.quality_gate.identity(repeats)
                ident = {"parent": parent.key, "task": trained[i - 1],
                         "replay": stage.replay.model_dump() if stage.replay else None,
                         "train_limit": cfg.task_settings(stage.task).train_limit,
                         "training": training_identity(training), "seed": seed, "split_seed": cfg.split_seed,
                         "data_seed": cfg.data_seed}
                if gate is not None:  # the held-out slice changes the training examples
                    ident["quality_gate"] = gate
                custom = [t for t in cfg.custom_tasks if t.get("name") in (stage.task, stage.replay and stage.replay.task)]
                if custom:  # a user dataset is identified by its spec (path, columns), not only its name
                    ident["custom_tasks"] = custom
                key = config_hash(ident)
                if key not in nodes:
                    nodes[key] = Node(key, i, stage, training, seed, parent, repeats)
                    eval_tasks[key] = []
                parent = nodes[key]
                path.append(parent)
            tasks = cfg.chain_eval_tasks(chain)
            for node in path:
                eval_tasks[node.key] += [t for t in tasks if t not in eval_tasks[node.key]]
            runs.append(Run(chain.name, seed, tuple(path), variant, tuple(tasks)))
    return runs, list(nodes.values()), eval_tasks


# ------------------------------------------------------------------------------------------------------- sweeps
@dataclass(frozen=True)
class Point:
    label: str  # e.g. "lr=1e-05,fraction=0.05"; "" without a sweep
    overrides: dict[str, Any]
    cfg: ExperimentConfig


def _short_names(keys: list[str]) -> dict[str, str]:
    """Shortest unique dotted suffix of each key: training.lr → lr, chains.0.stages.1.lr vs training.lr → both longer."""
    for depth in range(1, max((k.count(".") + 1 for k in keys), default=1) + 1):
        names = {k: ".".join(k.split(".")[-depth:]) for k in keys}
        if len(set(names.values())) == len(keys):
            return names
    return {k: k for k in keys}


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), sort_keys=True)


def expand_sweep(data: dict[str, Any], source: str = "config", overrides: list[str] | None = None) -> list[Point]:
    """Every point of the config's `sweep:` grid as a validated config (one point, label "", without a sweep);
    `overrides` (the `--set` texts already applied to `data`) are named in the errors they cause."""
    top = validate_config(data, source, overrides or [])
    if top.sweep is None:
        return [Point("", {}, top)]
    axes = [[{key: v} for v in values] for key, values in top.sweep.product.items()]
    axes += [[{key: values[i] for key, values in group.items()} for i in range(len(next(iter(group.values()))))]
             for group in top.sweep.zip]
    # a zip group whose lists are all equal (e.g. the same lr for two chains) is labelled by its first key only
    shown = list(top.sweep.product) + [k for g in top.sweep.zip
                                       for k in (list(g)[:1] if all(v == next(iter(g.values())) for v in g.values())
                                                 else list(g))]
    names = _short_names(shown)
    base = {k: v for k, v in data.items() if k != "sweep"}
    points = []
    for combo in itertools.product(*axes):
        assignment = {k: v for part in combo for k, v in part.items()}
        point = copy.deepcopy(base)
        for key, value in assignment.items():
            set_path(point, key.split("."), copy.deepcopy(value), f"sweep key '{key}'")
        label = ",".join(f"{names[k]}={_fmt_value(v)}" for k, v in assignment.items() if k in names)
        points.append(Point(label, assignment, validate_config(point, f"{source} [sweep point {label}]",
                                                                     overrides or [])))
    return points


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> list[Point]:
    """Read an experiment YAML (with `--set` overrides) and expand its sweep."""
    return expand_sweep(read_config(path, overrides), str(path), overrides)


def as_points(experiment: ExperimentConfig | dict[str, Any] | list[Point]) -> list[Point]:
    """A config (validated or a mapping, with or without `sweep:`) or its points, as a list of points."""
    if isinstance(experiment, list):
        return experiment
    if isinstance(experiment, ExperimentConfig):
        return expand_sweep(experiment.model_dump(mode="json"))
    return expand_sweep(experiment)


# --------------------------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True, order=True)
class JobId:
    """A node's own job (point None), or a second job on a shared node for sweep point `point`."""

    node: str
    point: int | None = None

    def __str__(self) -> str:  # the key of sweep/failures.json
        return self.node if self.point is None else f"{self.node}@{self.point}"


@dataclass(frozen=True)
class Settings:
    """What a worker needs of the experiment to execute a job (not the whole config)."""

    model: str | None
    trust_remote_code: bool
    data_dir: str | None
    device: str
    eval_max_tokens: int
    data_seed: int
    split_seed: int
    tasks: dict[str, TaskSettings]
    custom_tasks: tuple[dict[str, Any], ...]
    quality_gate: QualityGateConfig
    compile: bool = False
    distributed: DistributedConfig = DistributedConfig()  # nproc_per_node: ranks per job (ExperimentConfig.ranks_per_job)

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> "Settings":
        ranks = cfg.distributed.model_copy(update={"nproc_per_node": cfg.ranks_per_job()})
        return cls(cfg.model, cfg.trust_remote_code, cfg.data_dir, cfg.device, cfg.eval_max_tokens, cfg.data_seed,
                   cfg.split_seed, dict(cfg.tasks), tuple(cfg.custom_tasks), cfg.quality_gate, cfg.compile, ranks)

    def task(self, name: str) -> TaskSettings:
        return self.tasks.get(name, TaskSettings())


@dataclass(frozen=True)
class Job:
    """Train `node` (unless it is the base model), evaluate it on `evals`, measure its curvature if asked."""

    id: JobId
    node: Node
    point: int
    evals: tuple[dict[str, Any], ...]  # eval_spec of each task
    curvature: CurvatureConfig | None  # None: not measured on this node
    settings: Settings
    output_dir: str
    deps: tuple[JobId, ...]


@dataclass
class Plan:
    points: list[Point]
    out: Path
    runs: list[tuple[int, Run]]  # (point index, run)
    jobs: dict[JobId, Job]  # in an order where every job comes after its dependencies
    children: dict[str, set[str]] = field(default_factory=dict)  # node key → child node keys (all points)

    @property
    def trained_nodes(self) -> list[Node]:
        return [j.node for j in self.jobs.values() if j.node.stage is not None and j.id.point is None]

    @property
    def stages_without_reuse(self) -> int:
        return sum(len(run.nodes) - 1 for _, run in self.runs)

    def run_jobs(self, point: int, run: Run) -> list[JobId]:
        """The jobs whose completion makes this run's results complete."""
        return [self.job_for(point, n.key) for n in run.nodes]

    def job_for(self, point: int, node_key: str) -> JobId:
        own = JobId(node_key, point)
        return own if own in self.jobs else JobId(node_key)

    def jobs_on(self, node_key: str) -> list[JobId]:
        return [k for k in self.jobs if k.node == node_key]


def _wants_curvature(cfg: ExperimentConfig, node: Node) -> CurvatureConfig | None:
    wanted = cfg.curvature is not None and node.stage is not None and cfg.curvature.wants(node.index, node.stage)
    return cfg.curvature if wanted else None


def make_plan(points: list[Point]) -> Plan:
    """Merge every point's stage tree: nodes with equal keys become one job; a point that evaluates a shared node
    differently (other eval tasks or limits, curvature) gets an extra job on it that runs after the node is trained."""
    out = str(points[0].cfg.output_dir)
    runs: list[tuple[int, Run]] = []
    jobs: dict[JobId, Job] = {}
    signatures: dict[str, set[str]] = {}
    children: dict[str, set[str]] = {}
    for i, point in enumerate(points):
        point_runs, nodes, eval_tasks = build_tree(point.cfg, point.label)
        runs += [(i, r) for r in point_runs]
        settings = Settings.of(point.cfg)
        for node in nodes:
            evals = tuple(eval_spec(point.cfg, t) for t in eval_tasks[node.key])
            curvature = _wants_curvature(point.cfg, node)
            sig = config_hash({"eval": list(evals), "curvature": curvature.model_dump() if curvature else None})
            if node.key not in signatures:
                deps = (JobId(node.parent.key),) if node.parent is not None and node.parent.stage is not None else ()
                job_id = JobId(node.key)
                signatures[node.key] = {sig}
            elif sig not in signatures[node.key]:
                signatures[node.key].add(sig)
                job_id, deps = JobId(node.key, i), (JobId(node.key),)
            else:
                job_id = None
            if job_id is not None:
                jobs[job_id] = Job(job_id, node, i, evals, curvature, settings, out, deps)
            if node.parent is not None:
                children.setdefault(node.parent.key, set()).add(node.key)
    return Plan(points, Path(out), runs, jobs, children)
