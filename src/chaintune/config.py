"""Experiment configuration: YAML validated with pydantic; unknown keys are rejected by name."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from chaintune.errors import ConfigError, validation_problems
from chaintune.names import NAME_PATTERN
from chaintune.overrides import apply_overrides, blame


def _accepts_bool(annotation: Any) -> bool:
    return annotation is bool or annotation is Any or any(_accepts_bool(a) for a in get_args(annotation))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse booleans where numbers are expected: pydantic would read YAML `lr: yes` as lr = 1.0."""
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, bool) for v in items) and not _accepts_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("a boolean (YAML true/false/yes/no/on/off) where another type is expected")
        return value


Seed = Annotated[int, Field(ge=0, lt=2**32)]  # seeds become folder names and RNG seeds: 32-bit, non-negative
STEPS = 10**7  # upper bound of step and example counts: finite work, no overflow deep inside a run


class LoraConfig(Strict):
    r: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16, gt=0, le=1e6)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TrainingConfig(Strict):
    """Hyper-parameters of one stage (SPEC.md §4). Effective batch = batch_size × grad_accum examples."""

    method: Literal["full", "lora"] = "full"
    lr: float = Field(1e-5, ge=0, le=1, description="AdamW learning rate (above 1 it only diverges)")
    batch_size: int = Field(16, ge=1, le=65536)
    grad_accum: int = Field(1, ge=1, le=65536)
    epochs: float = Field(1.0, gt=0, le=1000)
    max_steps: int | None = Field(None, ge=1, le=STEPS)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"  # after warmup: constant, or decay to 0
    warmup_steps: int = Field(0, ge=0, le=STEPS)
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="warmup as a fraction of the stage's steps")
    weight_decay: float = Field(0.0, ge=0, le=10)
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    max_length: int = Field(512, ge=8, le=2**20)
    optimizer: Literal["adamw", "sam"] = "adamw"  # sam: sharpness-aware minimisation around AdamW
    sam_rho: float = Field(0.05, gt=0, le=10, description="SAM neighbourhood radius")
    l2_prev: float = Field(0.0, ge=0, le=1e6,
                           description="coefficient of (λ/2)·‖θ − θ_stage_start‖² (L2 to previous weights)")
    lora: LoraConfig = LoraConfig()
    checkpoint_every: int = Field(100, ge=1, le=STEPS, description="optimizer steps between mid-stage resume checkpoints")
    select_best: bool = Field(False, description="end the stage at the step with the lowest validation loss")
    eval_every: int | None = Field(None, ge=1, le=STEPS,
                                   description="steps between validation losses (default: ~10 per stage)")
    gradient_checkpointing: bool = Field(False, description="recompute each layer's activations in backward: "
                                                            "less memory, ~1/3 more compute, the same weights")

    @model_validator(mode="after")
    def _one_warmup(self) -> "TrainingConfig":
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self

    def warmup(self, total_steps: int) -> int:
        """Warmup steps of a stage of `total_steps` optimizer steps."""
        return self.warmup_steps or round(self.warmup_ratio * total_steps)


TRAINING_FIELDS = set(TrainingConfig.model_fields)
# fields added after schema 1: left out of a node's identity while at their defaults, so that stages trained by an
# earlier release keep their keys (and resume) unless the new option is used
NEW_TRAINING_FIELDS = {"warmup_ratio", "select_best", "eval_every"}


# fields that change how a stage is computed, not its weights: never in a node's identity, so that a stage trained
# with gradient checkpointing resumes without it (recomputed activations are the same numbers: same gradients)
EXECUTION_FIELDS = {"checkpoint_every", "gradient_checkpointing"}


def training_identity(training: TrainingConfig) -> dict[str, Any]:
    """What of a stage's hyper-parameters determines its weights (EXECUTION_FIELDS do not)."""
    defaults = TrainingConfig.model_fields
    return {k: v for k, v in training.model_dump(exclude=EXECUTION_FIELDS).items()
            if not (k in NEW_TRAINING_FIELDS and v == defaults[k].default)}


class TaskSettings(Strict):
    """Per-task data limits: how many train examples a stage uses and how many test questions are scored."""

    train_limit: int | None = Field(None, ge=1, le=10**9)
    eval_limit: int | None = Field(None, ge=1, le=10**9)
    # how eval_limit is shared among the task's groups: in proportion to their sizes, or equally (a group smaller
    # than its share gives all its questions and the others share the rest), for equal power per group
    eval_balance: Literal["proportional", "equal"] = "proportional"


class ReplayConfig(Strict):
    task: str
    fraction: float = Field(ge=0, lt=1, description="n_replayed / (n_replayed + n_stage)")
    # groups: equal numbers of replayed examples per group; targeted: numbers proportional to each group's forgetting
    # of the replayed task, measured between the stage that trained it and the previous stage (needs that task
    # among the chain's eval_tasks)
    balance: Literal["none", "groups", "targeted"] = "none"


class Stage(Strict):
    """One stage: fine-tune on `task` (optionally mixed with replayed examples); other keys override `training`."""

    model_config = ConfigDict(extra="allow", frozen=True)

    task: str
    name: str | None = Field(None, pattern=NAME_PATTERN)
    replay: ReplayConfig | None = None

    @model_validator(mode="after")
    def _only_training_overrides(self) -> "Stage":
        unknown = set(self.model_extra or {}) - TRAINING_FIELDS
        if unknown:
            raise ValueError(f"unknown stage key(s) {sorted(unknown)}; a stage takes task, name, replay and "
                             f"training keys ({', '.join(sorted(TRAINING_FIELDS))})")
        try:  # each override alone: TrainingConfig has no checks across fields
            self.training(TrainingConfig())
        except ValidationError as exc:
            raise ValueError("; ".join(f"{loc}: {msg}" for loc, msg in validation_problems(exc))) from None
        return self

    def training(self, defaults: TrainingConfig) -> TrainingConfig:
        merged = defaults.model_dump() | dict(self.model_extra or {})
        return TrainingConfig.model_validate(merged)

    @property
    def label(self) -> str:
        return self.name or (self.task if self.replay is None else f"{self.task}+{self.replay.task}")


class QualityGateConfig(Strict):
    """The stage quality gate: each stage holds out `validation_size` examples of its own train split (seeded, the
    same for every seed, never trained on) and is **failed** when its loss diverged, when its validation accuracy
    is below the task's majority-class baseline, or when it gained less than `min_gain` pp on that slice. A stage
    whose task an earlier stage of its chain trained (e.g. a replay stage) starts near its ceiling, so its gain is
    held to `min_gain_repeated` instead (null: no gain requirement; retrying on a chance shortfall would select
    attempts by noise)."""

    validation_size: int = Field(64, ge=0, le=10**6, description="held-out train examples per stage task (0: no gate)")
    min_gain: float = Field(0.0, ge=-100, le=100, description="pp of validation accuracy the stage must gain")
    min_gain_repeated: float | None = Field(None, ge=-100, le=100,
                                            description="pp a stage must gain when an earlier stage of its chain "
                                                        "trained the same task (null: no gain requirement)")
    divergence_factor: float = Field(1.5, gt=1, le=1e6, description="diverged: last-10%-of-steps mean loss > factor × first")
    on_failed_stage: Literal["flag", "retry", "stop"] = "flag"  # retry: a new training seed; stop: no later stages
    max_attempts: int = Field(3, ge=1, le=20, description="retry: training attempts per stage, the first included")

    @property
    def enabled(self) -> bool:
        return self.validation_size > 0

    def gain_floor(self, repeats_task: bool) -> float | None:
        """The gain (pp) a stage must reach: `min_gain`, or `min_gain_repeated` when its task was trained before
        in its chain (None: no requirement)."""
        return self.min_gain_repeated if repeats_task else self.min_gain

    def identity(self, repeats_task: bool = False) -> dict[str, Any] | None:
        """What of the gate determines a stage's weights (None when the gate is off: old node keys)."""
        if not self.enabled:
            return None
        ident: dict[str, Any] = {"validation_size": self.validation_size}
        if self.on_failed_stage == "retry":
            ident["retry"] = self.model_dump(include={"divergence_factor", "max_attempts"}) | {
                "min_gain": self.gain_floor(repeats_task)}
        return ident


CURVATURE_ESTIMATOR = "pooled"  # λ_max of the subsets' pooled Hessian, interval from their quotients (stored with
# each λ_max: records measured by the earlier subset-mean estimator are measured again); with held-out subsets "split"
SPLIT_ESTIMATOR = "split"  # the mean of the search subsets' pooled value and the held-out subsets' quotient


class CurvatureConfig(Strict):
    """Hessian curvature of the training loss after selected stages (SPEC.md §6)."""

    after: list[str] = ["first"]  # stage names/labels (e.g. "toxigenqa"), "first" (stage 1) or "all"
    examples: int = Field(512, ge=1, le=10**6, description="examples per subset, from the stage's training data")
    subsets: int = Field(4, ge=1, le=64, description="disjoint example subsets, pooled for λ_max; their Rayleigh "
                                                     "quotients give its interval")
    held_out: int = Field(0, ge=0, le=4096,
                          description="more disjoint subsets, not in the eigen-solve: their Rayleigh quotients along "
                                      "its vector narrow λ_max's interval at one HVP per example (0, or ≥ 2 with "
                                      "subsets ≥ 2)")
    disagreement: float = Field(2.0, gt=1, le=1e6,
                                description="warn when λ_max's interval's far / near end exceed this ratio (or span 0)")
    topk: int = Field(1, ge=1, le=100, description="eigenvalues by Lanczos when > 1")
    trace: bool = False
    trace_samples: int = Field(50, ge=2, le=10**5)
    micro_batch: int = Field(8, ge=1, le=65536)
    tol: float = Field(1e-3, gt=0, le=1)
    max_iter: int = Field(100, ge=1, le=10**4)
    method: Literal["lanczos", "power"] = "lanczos"  # λ_max solver (Lanczos needs fewer HVPs)
    eigenvalue: Literal["magnitude", "largest"] = "magnitude"  # λ_max: largest magnitude (SPEC §6) or algebraically
    # largest (the top of the spectrum: positive near a saddle; Lanczos only)
    graph_budget: float = Field(0, ge=0, le=2**50, description="bytes of first-order graphs kept between HVPs (0: recompute)")
    basis_budget: float = Field(2**30, ge=0, le=2**50,
                                description="bytes of Lanczos basis kept for λ_max's vector (subsets ≥ 2); when "
                                            "max_iter vectors do not fit, the recurrence is replayed (more HVPs)")

    def identity(self) -> dict[str, Any]:
        """The settings that determine a stored λ_max (not micro_batch / graph_budget / basis_budget: memory only)."""
        keys = {"examples", "subsets", "topk", "tol", "max_iter", "method", "eigenvalue", "trace"} | (
            {"trace_samples"} if self.trace else set())
        if self.held_out:
            keys.add("held_out")
        estimator = SPLIT_ESTIMATOR if self.held_out else CURVATURE_ESTIMATOR
        return self.model_dump(include=keys) | {"estimator": estimator}

    @model_validator(mode="after")
    def _check(self) -> "CurvatureConfig":
        if self.method == "power" and self.eigenvalue != "magnitude":
            raise ValueError("curvature.eigenvalue: largest needs method: lanczos (power iteration finds the "
                             "largest-magnitude eigenvalue)")
        if self.held_out and (self.held_out < 2 or self.subsets < 2):
            raise ValueError(f"curvature.held_out: {self.held_out} with subsets: {self.subsets} gives no interval; "
                             "use held_out: 0, or held_out ≥ 2 with subsets ≥ 2")
        return self

    def wants(self, stage_index: int, stage: "Stage") -> bool:
        return ("all" in self.after or ("first" in self.after and stage_index == 1)
                or stage.label in self.after or stage.task in self.after)


class SweepConfig(Strict):
    """A grid over config keys (dotted paths, e.g. `training.lr`, `chains.0.stages.1.replay.fraction`).

    `product` keys combine as a Cartesian product; each `zip` group's keys vary together (equal-length lists);
    groups and product combine as a product. Every combination is one sweep point.
    """

    product: dict[str, list[Any]] = {}
    zip: list[dict[str, list[Any]]] = []

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        keys = list(self.product) + [k for group in self.zip for k in group]
        for key in keys:
            if not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", key):
                raise ValueError(f"sweep key '{key}' is not a dotted path like training.lr")
            if key.split(".")[0] in {"sweep", "executor", "output_dir", "name", "logging"}:
                raise ValueError(f"sweep key '{key}' cannot be swept (one output_dir holds the whole sweep)")
        if len(set(keys)) != len(keys):
            raise ValueError("a sweep key appears twice")
        for key, values in list(self.product.items()) + [kv for g in self.zip for kv in g.items()]:
            if not values:
                raise ValueError(f"sweep key '{key}' has no values")
        for group in self.zip:
            if len({len(v) for v in group.values()}) > 1:
                raise ValueError(f"zip group {sorted(group)} has lists of different lengths")
        return self


class ExecutorConfig(Strict):
    """Where stage jobs run: `local` (in this process, or N worker processes) or an existing/new `ray` cluster."""

    kind: Literal["local", "ray"] = "local"
    workers: int = Field(1, ge=1, le=1024, description="local: concurrent worker processes (one per GPU when GPUs exist)")
    retries: int = Field(1, ge=0, le=100, description="re-runs of a failed stage job (crash, OOM, killed worker; "
                                                      "errors caused by the input are not retried)")
    address: str | None = None  # ray: "auto" or "ray://host:10001"; None starts a local Ray instance
    gpus_per_job: float | None = Field(None, ge=0, le=64, description="ray: GPUs per stage job (default 1 if CUDA)")
    cpus_per_job: float = Field(1, gt=0, le=1024)


TRACKERS = ("tensorboard", "mlflow", "wandb")


class LoggingConfig(Strict):
    """Experiment trackers that receive each run's curves, evaluations, curvature and forgetting tables (see
    docs/trackers.md). Not part of any stage or run identity: adding a tracker later logs the stored records."""

    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    mlflow_tracking_uri: str | None = Field(None, pattern=r"^(file:|sqlite:|https?://|databricks)\S*$",
                                            description="default: a file store under the run directory")
    wandb_project: str | None = Field(None, pattern=NAME_PATTERN, description="default: the experiment's name")
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: files under the run directory, no network

    @field_validator("trackers")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class DistributedConfig(Strict):
    """Ranks per stage job (torch.distributed, docs/distributed.md): with `nproc_per_node` > 1 every stage job runs as
    that many processes launched by torchrun, each taking a disjoint slice of every batch (the global batch stays
    `batch_size`). Not part of a stage's identity: the weights equal single-process training up to float order."""

    nproc_per_node: int = Field(1, ge=1, le=1024, description="ranks per stage job (1: one process, no torch.distributed)")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: a full replica per rank; fsdp: FSDP2 "
                                             "(fully_shard) shards weights, gradients and AdamW moments")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on CUDA, else gloo")


class Chain(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    stages: list[Stage] = Field(min_length=1)
    seeds: list[Seed] | None = None  # a subset of the experiment's seeds (default: all of them)
    eval_tasks: list[str] | None = None  # tasks scored after each stage of this chain (default: the experiment's)


def _file_keys(spec: dict[str, Any]) -> list[str]:
    """The keys of a custom_tasks entry that name files or folders (made absolute when the config is read)."""
    return ["path", "include_path"] + (["lm_eval"] if str(spec.get("lm_eval", "")).endswith((".yaml", ".yml")) else [])


class ExperimentConfig(Strict):
    name: str = Field("experiment", pattern=NAME_PATTERN)
    model: str | None = None  # hub id, local dir or .gguf; None = the embedded SmolLM2-135M-Instruct
    trust_remote_code: bool = False
    data_dir: str | None = None
    output_dir: str = "runs/experiment"
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seeds: list[Seed] = Field([0], min_length=1)
    split_seed: Seed = 0
    data_seed: Seed = 0  # seeds the train_limit / eval_limit subsamples (the same questions for every run)
    custom_tasks: list[dict[str, Any]] = []  # user MCQ datasets, see chaintune.tasks.UserTaskSpec
    tasks: dict[str, TaskSettings] = {}
    eval_tasks: list[str] | None = None  # default: every task named in tasks or chains
    training: TrainingConfig = TrainingConfig()
    chains: list[Chain] = Field(min_length=1)
    keep_checkpoints: bool = True
    curvature: CurvatureConfig | None = None
    eval_max_tokens: int = Field(1024, ge=64, le=2**24, description="tokens per evaluation forward pass")
    compile: bool = Field(False, description="train and evaluate through torch.compile (minutes of compilation "
                                             "per training stage and once per process for evaluation)")
    min_group_size: int = Field(30, ge=1, le=10**9)
    quality_gate: QualityGateConfig = QualityGateConfig()
    sweep: SweepConfig | None = None
    executor: ExecutorConfig = ExecutorConfig()
    logging: LoggingConfig = LoggingConfig()
    distributed: DistributedConfig = DistributedConfig()
    # correction of every family of per-group statements in the summaries: holm (family-wise error, Holm 1979) or
    # bh (false discovery rate, Benjamini–Hochberg 1995)
    multiple_comparisons: Literal["holm", "bh"] = "holm"

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be unique")
        return v

    @field_validator("custom_tasks")
    @classmethod
    def _user_tasks(cls, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each spec checked (without registering it), its file's path made absolute: the run directory records
        where the data is, and commands run later from another folder find it."""
        from chaintune.errors import ChaintuneError
        from chaintune.tasks import builtin_task_names, parse_user_task

        names = []
        for i, spec in enumerate(specs):
            try:
                names.append(parse_user_task(spec).name)
            except ChaintuneError as exc:
                raise ValueError(f"custom_tasks.{i}: {exc.problem}") from None
        taken = sorted(set(names) & builtin_task_names())
        if taken:
            raise ValueError(f"user task name '{taken[0]}' is taken by a built-in task; choose another name")
        if len(set(names)) != len(names):
            raise ValueError(f"custom_tasks name a task twice ({sorted({n for n in names if names.count(n) > 1})})")
        return [spec | {key: os.path.abspath(spec[key]) for key in _file_keys(spec)
                        if isinstance(spec.get(key), (str, os.PathLike))} for spec in specs]

    @model_validator(mode="after")
    def _check_names(self) -> "ExperimentConfig":
        from chaintune.tasks import get_task

        custom = [str(spec["name"]) for spec in self.custom_tasks]
        names = [c.name for c in self.chains]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"duplicate chain name(s) {sorted(dupes)}")
        for task in self.all_tasks():
            if task not in custom:
                get_task(task)  # raises a ChaintuneError naming the known tasks
        for chain in self.chains:
            if chain.seeds is not None and not set(chain.seeds) <= set(self.seeds):
                raise ValueError(f"chain '{chain.name}': seeds {chain.seeds} are not all in the experiment's seeds "
                                 f"{self.seeds}")
        if self.curvature is not None:  # a misspelt stage would silently measure nothing
            known = {"first", "all"} | {x for c in self.chains for s in c.stages for x in (s.label, s.task)}
            unknown = [a for a in self.curvature.after if a not in known]
            if unknown:
                raise ValueError(f"curvature.after names no stage: {unknown[0]!r} (use first, all, or a stage's name "
                                 "or task)")
        return self

    @model_validator(mode="after")
    def _select_best_needs_validation(self) -> "ExperimentConfig":
        if not self.quality_gate.enabled and any(s.training(self.training).select_best
                                                 for c in self.chains for s in c.stages):
            raise ValueError("select_best needs validation examples: set quality_gate.validation_size above 0 "
                             "(or select_best: false)")
        return self

    @model_validator(mode="after")
    def _distributed_fits(self) -> "ExperimentConfig":
        gpus = self.executor.gpus_per_job if self.executor.kind == "ray" else None
        if gpus is not None and gpus > 1 and (gpus != int(gpus) or self.distributed.nproc_per_node not in (1, gpus)):
            raise ValueError(f"executor.gpus_per_job {gpus:g} above 1 runs a job as that many ranks: make it a whole "
                             "number and leave distributed.nproc_per_node at 1 (or equal to it)")
        if self.compile and self.ranks_per_job() > 1:
            raise ValueError("compile: true trains one process only; set compile: false for jobs of several ranks")
        if self.distributed.strategy == "fsdp" and self.ranks_per_job() > 1:
            for stage in (s for c in self.chains for s in c.stages):
                training = stage.training(self.training)
                if training.optimizer == "sam":
                    raise ValueError(f"distributed.strategy fsdp trains with AdamW; stage '{stage.label}' uses sam: "
                                     "use strategy ddp for it")
        return self

    def ranks_per_job(self) -> int:
        """Processes per stage job: distributed.nproc_per_node, or a Ray job's gpus_per_job when that is above 1."""
        gpus = self.executor.gpus_per_job if self.executor.kind == "ray" else None
        return int(gpus) if gpus is not None and gpus > 1 else self.distributed.nproc_per_node

    def all_tasks(self) -> list[str]:
        seen: dict[str, None] = {}
        for chain in self.chains:
            for stage in chain.stages:
                seen[stage.task] = None
                if stage.replay:
                    seen[stage.replay.task] = None
        for task in list(self.tasks) + list(self.eval_tasks or []) + [t for c in self.chains for t in c.eval_tasks or []]:
            seen[task] = None
        return list(seen)

    def evaluation_tasks(self) -> list[str]:
        """Every task evaluated by some chain."""
        seen = dict.fromkeys(t for c in self.chains for t in self.chain_eval_tasks(c))
        return list(seen)

    def chain_eval_tasks(self, chain: "Chain") -> list[str]:
        if chain.eval_tasks is not None:
            return list(chain.eval_tasks)
        return list(self.eval_tasks) if self.eval_tasks is not None else self.all_tasks()

    def task_settings(self, task: str) -> TaskSettings:
        return self.tasks.get(task, TaskSettings())


_SURROGATE = re.compile("[\ud800-\udfff]")


def _invalid_text(value: Any, path: str = "", seen: set[int] | None = None) -> str | None:
    """The dotted path of the first text holding a lone surrogate (not valid Unicode: no file name, no output), or
    None. A container reached twice (YAML aliases) is looked at once."""
    if isinstance(value, str):
        return (path or "(top level)") if _SURROGATE.search(value) else None
    seen = set() if seen is None else seen
    if id(value) in seen:
        return None
    seen.add(id(value))
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return next((found for key, child in children
                 if (found := _invalid_text(child, f"{path}.{key}" if path else str(key), seen))), None)


def validate_config(data: dict[str, Any], source: str = "config", overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The validated config; a problem is one ConfigError line blaming the `--set` override or the file it came from."""
    invalid = _invalid_text(data)
    if invalid is None:
        try:
            return ExperimentConfig.model_validate(data)
        except ValidationError as exc:
            problems = validation_problems(exc)
    else:
        problems = [(invalid, "text that is not valid Unicode (a lone surrogate)")]
    problem, from_overrides = blame(problems, source, overrides)
    raise ConfigError(problem, "fix that --set value" if from_overrides
                      else "fix the config (see configs/quickstart.yaml)")


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment (safe loader), apply `--set key=value` overrides, validate."""
    return validate_config(read_config(path, overrides), str(path), overrides or [])


def read_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML mapping of an experiment (safe loader) with `--set` overrides applied, not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist", "pass the path of a YAML file, e.g. configs/quickstart.yaml")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = ", ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{where}: not valid YAML ({what})", "fix the YAML syntax there") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({(str(exc).splitlines() or [type(exc).__name__])[0]})",
                          "fix the YAML syntax") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config", "fix the YAML structure") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{path}' ({exc.strerror})", "check its permissions") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level", "see configs/quickstart.yaml")
    return apply_overrides(data, overrides or [])


class UniqueKeyLoader(yaml.SafeLoader):
    """The safe YAML loader, refusing a key repeated in one mapping (yaml.safe_load silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def config_hash(obj: Any) -> str:
    """Stable 12-hex-digit hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]
