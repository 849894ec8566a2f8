"""The stage executor: one job, in any process — replay mix → train → save → evaluate → curvature.

`execute(job)` is what every executor runs. It keeps one `WeightCache` per process, so consecutive jobs on the same
output directory and model reuse the loaded weights (a child branches from its parent without reloading).
"""
from __future__ import annotations

import contextlib
import functools
import random
import shutil
import statistics
import time
from collections import Counter
from typing import Any, Callable

import pandas as pd

from chaintune.config import Stage
from chaintune.distributed import Ranks, gather_weights, launch, shard_for_curvature
from chaintune.errors import ChaintuneError
from chaintune.evaluate import EvalResult, evaluate
from chaintune.plan import Job, Node, Settings
from chaintune.io import file_sha256, read_json
from chaintune.provenance import eval_environment
from chaintune.gate import (chance_baseline, diverged, failure_reasons, loss_ends, majority_baseline,
                            split_validation, train_seed)
from chaintune.runtime import release_freed_memory
from chaintune.rundir import CurvatureRecord, EvalRecord, GateAttempt, GateRecord, NodeRecord, RunDir
from chaintune.tasks import (Example, canonical_task_name, get_task, load_eval_set, load_task, register_user_tasks,
                             resolve_data_dir)
from chaintune.tasks.splits import stable_seed, subsample
from chaintune.train import DivergedError, StageTrainResult, attach_lora, train_stage
from chaintune.weights import WeightCache, checkpoint_ok


def eval_done(out: RunDir, node: str, spec: dict[str, Any]) -> bool:
    """True if `node` holds an evaluation with these settings; an evaluation with other settings is an error
    (a changed eval_limit, data_seed or split_seed must not silently mix old and new questions)."""
    record = out.evaluation(node, spec["task"])
    if record is None:
        return False
    stored = record.spec if record.spec is not None else spec
    if stored != spec:
        raise ChaintuneError(f"{out.eval_path(node, spec['task'])} was evaluated with {stored}, but this config asks "
                             f"for {spec}", "use a new output_dir, or delete that eval folder to re-evaluate")
    return True


def job_done(out: RunDir, job: Job) -> bool:
    """Trained, every evaluation stored with the job's settings (other settings raise), curvature measured if asked."""
    name = job.node.dirname
    if job.node.stage is not None and not out.node_done(name):
        return False
    if not all([eval_done(out, name, spec) for spec in job.evals]):
        return False
    return job.curvature is None or curvature_done(out, name, job.curvature)


def curvature_done(out: RunDir, name: str, cc) -> bool:
    """λ_max of node `name` is stored with the curvature settings `cc` asks for; other settings: not done, so it is
    measured again. A record without settings (from before they were stored) counts when it holds one subset's
    largest-magnitude λ_max and `cc` asks for that: the pooled estimator of one subset is the same number; its
    subsets' mean (several subsets) is not."""
    stored = out.curvature(name)
    if stored is None:
        return False
    if stored.get("settings") is None:
        return not stored.get("lambda_max_subsets") and cc.subsets == 1 and cc.eigenvalue == "magnitude"
    return stored["settings"] == cc.identity()


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


def train_pool(settings: Settings, task: str) -> tuple[list[Example], list[Example]]:
    """(trainable, validation) parts of a task's train split: the quality gate's validation slice is held out
    (chaintune.gate.split_validation); without the gate, the whole split and no slice."""
    pool = load_task(task, "train", resolve_data_dir(settings.data_dir), split_seed=settings.split_seed)
    return split_validation(pool, settings.quality_gate.validation_size, settings.data_seed, canonical_task_name(task))


def own_examples(settings: Settings, stage: Stage) -> list[Example]:
    """The stage task's train split without its validation slice, subsampled to its train_limit (seeded by
    data_seed, stratified by group: the same examples for every run seed)."""
    rest, _ = train_pool(settings, stage.task)
    return subsample(rest, settings.task(stage.task).train_limit, settings.data_seed, group=lambda e: e.group,
                     salt=f"{canonical_task_name(stage.task)}/train")


def stage_examples(settings: Settings, stage: Stage, seed: int,
                   group_forgetting: dict[str, float] | None = None) -> list[Example]:
    """Training examples of a stage: the task's train split (train_limit), plus replayed examples if configured.

    Replay with fraction f adds n_r = round(f·n/(1−f)) examples from the replayed task's *train* split, so that
    n_r / (n_r + n) = f (SPEC.md §7); they are drawn seeded by the run seed. Group-balanced replay draws equal
    numbers per group; targeted replay draws numbers proportional to `group_forgetting` (pp, clipped at 0).
    """
    examples = own_examples(settings, stage)
    if stage.replay and stage.replay.fraction > 0:
        pool, _ = train_pool(settings, stage.replay.task)  # never the replayed task's validation slice
        n_replay = min(len(pool), round(stage.replay.fraction * len(examples) / (1 - stage.replay.fraction)))
        rng = random.Random(stable_seed("replay", seed, stage.replay.task, n_replay))
        if stage.replay.balance != "none":
            by_group: dict[str, list[Example]] = {}
            for ex in pool:
                by_group.setdefault(str(ex.group), []).append(ex)
            if stage.replay.balance == "targeted":
                if group_forgetting is None:
                    raise ChaintuneError(f"targeted replay of {stage.replay.task} needs its per-group forgetting",
                                         "run it inside a chain, after a stage trained on that task")
                weights = {g: group_forgetting.get(g, 0.0) for g in by_group}
            else:
                weights = {g: 1.0 for g in by_group}
            quota = allocate(n_replay, weights)
            drawn = [ex for g in sorted(by_group) for ex in rng.sample(by_group[g], min(quota[g], len(by_group[g])))]
        else:
            drawn = rng.sample(pool, n_replay)
        examples = examples + drawn
    return examples


def replay_group_forgetting(out: RunDir, node: Node) -> dict[str, float]:
    """Per-group forgetting (pp) of the node's replayed task: accuracy after the last stage that trained it minus
    accuracy after the node's parent (from their stored evaluations)."""
    assert node.stage is not None and node.stage.replay is not None and node.parent is not None
    task = canonical_task_name(node.stage.replay.task)
    trained = [n for n in node.lineage()[1:-1] if canonical_task_name(n.stage.task) == task]
    if not trained:
        raise ChaintuneError(f"targeted replay of {task} in stage {node.index} has no earlier stage trained on it",
                             "use balance: groups, or train that task earlier in the chain")
    records = [out.evaluation(trained[-1].dirname, task), out.evaluation(node.parent.dirname, task)]
    if any(r is None for r in records):
        raise ChaintuneError(f"targeted replay of {task} needs its evaluation after stages {trained[-1].index} "
                             f"and {node.parent.index}", f"add {task} to the chain's eval_tasks")
    before, after = (r.per_group for r in records)
    return {g: before[g]["acc"] - after[g]["acc"] for g in before if g in after}


def node_examples(out: RunDir, settings: Settings, node: Node) -> list[Example]:
    assert node.stage is not None and node.seed is not None
    targeted = node.stage.replay is not None and node.stage.replay.balance == "targeted"
    return stage_examples(settings, node.stage, node.seed, replay_group_forgetting(out, node) if targeted else None)


def weight_digests(checkpoint_sha256: dict[str, str] | None) -> dict[str, str]:
    """The SHA-256 of a checkpoint's weight files (*.safetensors) only: configs and model cards may differ."""
    return {name: d for name, d in (checkpoint_sha256 or {}).items() if name.endswith(".safetensors")}


def predictions_frame(result: EvalResult) -> pd.DataFrame:
    df = pd.DataFrame(result.predictions)
    df["logliks"] = df["logliks"].map(list)
    return df


class StageExecutor:
    """Executes jobs of one output directory with one weight cache (see the module docstring)."""

    def __init__(self, cache: WeightCache, echo: Callable[[str], None] = print, progress: bool = False,
                 ranks: Ranks | None = None):
        self.cache, self.out, self.echo, self.progress = cache, cache.out, echo, progress
        self.ranks = ranks  # a rank of a multi-rank job (chaintune.distributed): only rank 0 writes
        self.writes = ranks is None or ranks.writer
        self._eval_sets: dict[tuple, list[Example]] = {}

    def eval_set(self, settings: Settings, spec: dict[str, Any]) -> list[Example]:
        key = (settings.data_dir, *spec.values())
        if key not in self._eval_sets:
            self._eval_sets[key] = load_eval_set(spec, settings.data_dir)
        return self._eval_sets[key]

    def run(self, job: Job) -> dict[str, Any]:
        started = time.perf_counter()
        with self.out.node_lock(job.node.dirname) if self.writes else contextlib.nullcontext():
            if job.node.stage is not None:
                self.train(job)
            self.evaluate(job)
            self.measure_curvature(job)
        return {"seconds": time.perf_counter() - started}

    def evaluate(self, job: Job) -> None:
        node = job.node
        for spec in job.evals:
            if eval_done(self.out, node.dirname, spec):
                continue
            model = self.cache.materialize(node)
            t0 = time.perf_counter()
            task = spec["task"]
            result = evaluate(model, self.cache.tokenizer, self.eval_set(job.settings, spec), task,
                              progress=self.progress, max_tokens=job.settings.eval_max_tokens, ranks=self.ranks,
                              compile=job.settings.compile)
            if not self.writes:
                continue
            self.out.write_table(self.out.predictions_path(node.dirname, task), predictions_frame(result))
            info = get_task(task)
            record = EvalRecord(**result.summary(), seconds=time.perf_counter() - t0, spec=spec,
                                env=eval_environment(model), kind=info.kind, metrics=list(info.metrics))
            self.out.write_record(self.out.eval_path(node.dirname, task), record)
            self.echo(f"  eval {node.dirname:<48} {task:<12} acc {result.acc:6.2f}  acc_norm {result.acc_norm:6.2f}"
                      f"  (n={result.n}, {record.seconds:.0f}s)")

    def train(self, job: Job) -> None:
        """Train the job's node and save it: with the quality gate, score its validation slice before and after,
        and under `on_failed_stage: retry` train again with a new seed until it passes or attempts run out."""
        node, out, cache = job.node, self.out, self.cache
        assert node.stage is not None and node.training is not None and node.seed is not None
        folder = out.stage_dir(node.dirname)
        replaced = None  # the weights' digests of a done stage whose checkpoint is retrained
        if out.node_done(node.dirname):
            if checkpoint_ok(out, node):
                return
            self.echo(f"  checkpoint of {node.dirname} is missing or corrupt: retraining it")
            replaced = weight_digests(out.node(node.dirname).checkpoint_sha256)
        gate = job.settings.quality_gate
        min_gain = gate.gain_floor(node.repeats_task)
        examples = node_examples(out, job.settings, node)
        trainable, validation = train_pool(job.settings, node.stage.task)
        attempts = self._finished_attempts(node)
        if validation:
            before = self._validation_accuracy(cache.materialize(node.parent), job, validation)
            majority, rule = majority_baseline(trainable, validation)
        while True:
            seed = train_seed(node.seed, len(attempts))
            work = folder / "work" / f"attempt{len(attempts)}"
            result, nan_error = self._train_attempt(job, examples, seed, validation, work)
            if not validation:
                break
            losses = [r["loss"] for r in result.curve]
            is_diverged = nan_error is not None or diverged(losses, gate.divergence_factor)
            val_acc = self._validation_accuracy(cache.model, job, validation)
            first, last = loss_ends(losses)
            attempts.append(GateAttempt(
                attempt=len(attempts), train_seed=seed, val_acc=val_acc, val_acc_before=before,
                loss_first=first, loss_last=last, diverged=is_diverged, reasons=failure_reasons(
                    is_diverged=is_diverged, val_acc=val_acc, val_acc_before=before, majority=majority,
                    min_gain=min_gain)))
            verdict = "passed" if not attempts[-1].failed else "FAILED: " + "; ".join(attempts[-1].reasons)
            self.echo(f"  gate {node.dirname} (attempt {len(attempts)}): validation {before:.1f} → {val_acc:.1f} % "
                      f"(majority {majority:.1f} %) {verdict}")
            if not attempts[-1].failed or gate.on_failed_stage != "retry" or len(attempts) >= gate.max_attempts:
                if nan_error is not None:  # no attempt left: NaN weights are no stage to build on
                    raise nan_error
                break
            if self.writes:
                out.write_json(out.attempts_path(node.dirname), [a.model_dump() for a in attempts])
        gate_record = None
        if validation:
            gate_record = GateRecord(n_validation=len(validation), majority_baseline=majority, majority_rule=rule,
                                     chance_baseline=chance_baseline(validation), min_gain=min_gain,
                                     policy=gate.on_failed_stage, attempts=attempts)
        self._save(job, examples, result, gate_record, replaced)

    def _finished_attempts(self, node: Node) -> list[GateAttempt]:
        """Gate attempts that failed before a kill (attempts.json), so a rerun goes on with the next one."""
        path = self.out.attempts_path(node.dirname)
        return [GateAttempt.model_validate(a) for a in read_json(path)] if path.is_file() else []

    def _validation_accuracy(self, model, job: Job, validation: list[Example]) -> float:
        task = canonical_task_name(job.node.stage.task)
        return evaluate(model, self.cache.tokenizer, validation, task, max_tokens=job.settings.eval_max_tokens,
                        ranks=self.ranks, compile=job.settings.compile).acc

    def _train_attempt(self, job: Job, examples: list[Example], seed: int, validation: list[Example], work
                       ) -> tuple[StageTrainResult, DivergedError | None]:
        """One training run of the node from its parent's weights with `seed`: (result, the NaN-loss error or None).
        A NaN loss fails the job (it is almost always a wrong setting), except under `on_failed_stage: retry`,
        where it is a failed attempt and another seed is tried."""
        node, cache = job.node, self.cache
        cache.materialize(node.parent)
        if node.training.method == "lora":
            cache.model = attach_lora(cache.model, node.training, seed)
        cache.loaded = None  # weights are about to change
        self.echo(f"  train {node.dirname}: {len(examples)} examples, lr {node.training.lr:g}, {node.training.method}"
                  + (f", seed {seed}" if seed != node.seed else ""))
        work = self.out.path_for_write(work)
        work.mkdir(parents=True, exist_ok=True)
        try:
            result, error = train_stage(cache.model, cache.tokenizer, examples, node.training, seed, work_dir=work,
                                        progress=self.progress, desc=node.dirname, validation=validation,
                                        compile=job.settings.compile, ranks=self.ranks), None
        except DivergedError as exc:
            if not validation or job.settings.quality_gate.on_failed_stage != "retry":
                raise
            curve = exc.curve
            result, error = StageTrainResult(len(curve), int(curve[-1]["tokens"]) if curve else 0,
                                             float(curve[-1]["seconds"]) if curve else 0.0, curve), exc
        if self.ranks is not None:
            cache.model = gather_weights(cache.model, self.ranks)
        return result, error

    def _save(self, job: Job, examples: list[Example], result: StageTrainResult, gate: GateRecord | None,
              replaced: dict[str, str] | None = None) -> None:
        """Write the trained node: curve, checkpoint (atomic rename), then node.json — the record that marks it done.
        In a multi-rank job rank 0 writes and the others wait for it. `replaced`: the weight digests of the
        checkpoint a retraining replaces (see `_write_node`)."""
        node, cache = job.node, self.cache
        if self.writes:
            self._write_node(job, examples, result, gate, replaced)
        if node.training.method == "lora":
            cache.model = cache.model.merge_and_unload()
        if self.ranks is not None:
            self.ranks.barrier()
        cache.model.eval()
        cache.loaded = node.key

    def _write_node(self, job: Job, examples: list[Example], result: StageTrainResult, gate: GateRecord | None,
                    replaced: dict[str, str] | None) -> None:
        """Curve, checkpoint, node.json. A retrained stage (`replaced`: the lost checkpoint's weight digests) keeps
        its evaluations and λ_max when its new weights are bit-identical (seeded CPU training is); otherwise they
        are deleted before node.json is replaced, so that they are measured again on the new weights."""
        node, out, cache = job.node, self.out, self.cache
        folder = out.stage_dir(node.dirname)
        out.write_table(out.train_curve_path(node.dirname), pd.DataFrame(result.curve, columns=list(
            dict.fromkeys(["step", "epoch", "loss", "lr", "grad_norm", "tokens", "seconds",
                           *(k for r in result.curve for k in r)]))))
        ckpt = out.path_for_write(out.checkpoint_dir(node.dirname))
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp = out.path_for_write(folder / ".checkpoint.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cache.model.save_pretrained(tmp, safe_serialization=True)
        if node.training.method != "lora":
            cache.tokenizer.save_pretrained(tmp)
        tmp.rename(ckpt)
        digests = {p.name: file_sha256(p) for p in sorted(ckpt.iterdir()) if p.is_file()}
        if replaced is not None and weight_digests(digests) != replaced:
            self.echo(f"  {node.dirname}: the retrained weights differ from the lost ones: evaluating it again")
            shutil.rmtree(out.path_for_write(folder / "eval"), ignore_errors=True)
            out.path_for_write(out.curvature_path(node.dirname)).unlink(missing_ok=True)
        n_own = len(own_examples(job.settings, node.stage))
        replayed = (dict(sorted(Counter(str(e.group) for e in examples[n_own:]).items()))
                    if node.stage.replay is not None else None)
        out.write_record(out.node_path(node.dirname), NodeRecord(
            status="done", key=node.key, index=node.index, task=node.stage.task, stage=node.stage.model_dump(),
            training=node.training.model_dump(), seed=node.seed, parent=node.parent.dirname if node.parent else None,
            n_train_examples=len(examples), replayed_per_group=replayed, steps=result.steps, tokens=result.tokens,
            train_seconds=result.seconds, tokens_per_second=result.tokens / max(result.seconds, 1e-9),
            checkpoint_sha256=digests,
            gate=gate, best_step=result.best_step, compile_seconds=result.compile_seconds))
        shutil.rmtree(out.path_for_write(folder / "work"), ignore_errors=True)
        out.path_for_write(out.attempts_path(node.dirname)).unlink(missing_ok=True)

    def measure_curvature(self, job: Job) -> None:
        """λ_max (and top-k / trace if asked) of the stage's training loss w.r.t. its trainable parameters: all
        weights for full fine-tuning, the stage's LoRA adapter for LoRA. Under `fsdp` the cached model is sharded
        for it (its parameters become this rank's shards) and dropped from the cache after."""
        from chaintune.curvature import dominant_subset, measure_curvature, sign_note

        cc, node, cache = job.curvature, job.node, self.cache
        if cc is None or curvature_done(self.out, node.dirname, cc):
            return
        assert node.training is not None and node.seed is not None and node.stage is not None
        if node.training.method == "lora":
            from peft import PeftModel

            cache.materialize(node.parent)
            model = PeftModel.from_pretrained(cache.model, self.out.checkpoint_dir(node.dirname), is_trainable=True)
            cache.loaded = None
        else:
            model = cache.materialize(node).requires_grad_(True)
        sharded = self.ranks is not None and self.ranks.strategy == "fsdp"
        if sharded:
            model = shard_for_curvature(model)
        result = measure_curvature(model, cache.tokenizer, node_examples(self.out, job.settings, node),
                                   n_examples=cc.examples, subsets=cc.subsets, held_out=cc.held_out, seed=node.seed,
                                   topk=cc.topk, trace=cc.trace,
                                   trace_samples=cc.trace_samples, micro_batch=cc.micro_batch, tol=cc.tol,
                                   max_iter=cc.max_iter, method=cc.method, eigenvalue=cc.eigenvalue,
                                   graph_budget=cc.graph_budget, basis_budget=cc.basis_budget,
                                   ranks=self.ranks)
        if sharded:  # its parameters are shards now: materialize loads the weights again if a later step needs them
            cache.model, cache.loaded = None, None
        elif node.training.method == "lora":
            cache.model = model.unload()  # drop the adapter again: parent weights, no merge
        unstable = result.lambda_max_ci_low is not None and (result.disagreement is None
                                                             or result.disagreement > cc.disagreement)
        if not self.writes:
            return
        self.out.write_record(self.out.curvature_path(node.dirname),
                              CurvatureRecord(stage=node.index, task=node.stage.task, **vars(result), unstable=unstable,
                                              settings=cc.identity()))
        interval = (f" [{result.lambda_max_ci_low:.4g}, {result.lambda_max_ci_high:.4g}] from {result.subsets} subsets"
                    f"{f' + {result.held_out} held out' if result.held_out else ''}"
                    if result.lambda_max_ci_low is not None else "")
        self.echo(f"  curvature {node.dirname}: λ_max {result.lambda_max:.4g}{interval} ({result.iterations} "
                  f"iterations{'' if result.converged else ', not converged'}, {result.seconds:.0f}s)"
                  f"{sign_note(result.lambda_max, result.eigenvalue)}")
        if unstable:
            ratio = ("spans 0" if result.disagreement is None else
                     f"ends differ by a factor {result.disagreement:.2f} (> {cc.disagreement:g})")
            self.echo(f"  warning: λ_max of {node.dirname} is not stable at {cc.examples} × "
                      f"{result.subsets + result.held_out} examples: its interval {ratio} — raise curvature.examples, "
                      "subsets or held_out")
            k = dominant_subset(result.lambda_max_subsets)
            if k is not None:
                self.echo(f"  subset {k} ({'search' if k < result.subsets else 'held out'}) reads "
                          f"{result.lambda_max_subsets[k]:.4g} against a median of "
                          f"{statistics.median(result.lambda_max_subsets):.4g}: one of its examples may curve sharply "
                          f"on its own — {', '.join(result.subset_ids[k])}")


_PROCESS: dict[str, StageExecutor] = {}  # this process's executor: consecutive jobs reuse the loaded model


def execute(job: Job, progress: bool = False) -> dict[str, Any]:
    """Run one job in this process (what every executor submits), or as several ranks under torchrun when its
    settings ask for them (chaintune.distributed); returns {"seconds": wall time}."""
    if job.settings.distributed.nproc_per_node > 1:
        return launch(job, job.settings.distributed.nproc_per_node)
    register_user_tasks(list(job.settings.custom_tasks))
    out = RunDir(job.output_dir)
    ident = (str(out.root), job.settings.model, job.settings.device, job.settings.trust_remote_code)
    current = _PROCESS.get("executor")
    if current is None or current.cache.identity() != ident:
        cache = WeightCache(out, job.settings.model, job.settings.device, job.settings.trust_remote_code)
        current = _PROCESS["executor"] = StageExecutor(cache, echo=functools.partial(print, flush=True))
    current.progress = progress
    try:
        return current.run(job)
    finally:
        release_freed_memory()  # the next job starts from what this one still holds, not from its peak
