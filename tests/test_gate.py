"""The stage quality gate (issue 25): the held-out validation slice, the baselines, the verdict and the three
policies (flag / retry / stop); the cosine schedule and warmup_ratio; best-checkpoint selection by validation loss;
curvature on disjoint example subsets. Hand-worked numbers are given in the comments."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import chaintune
import chaintune.stage as stage_mod
from chaintune.analysis import findings, load_runs, summary_tables
from chaintune.cli import main
from chaintune.config import TrainingConfig, validate_config
from chaintune.errors import ChaintuneError
from chaintune.curvature import disjoint_subsets, dominant_subset, lanczos, measure_curvature, quotient_interval
from chaintune.errors import ConfigError
from chaintune.gate import (chance_baseline, diverged, failure_reasons, majority_baseline, split_validation,
                            train_seed, validation_count)
from chaintune.rundir import RunDir
from chaintune.tasks import Example
from chaintune.train import lr_at, train_stage


def ex(i: int, gold: int, choices=("yes", "no", "maybe"), group: str | None = None) -> Example:
    return Example(f"q{i}", f"question {i}?", tuple(f" {c}" for c in choices), gold, group)


def quiet(cfg: dict) -> chaintune.Outcome:
    return chaintune.run(cfg, echo=lambda *_: None, progress=False)


# ------------------------------------------------------------------------------------------- pure functions
def test_validation_slice_is_seeded_stratified_leak_free_and_capped():
    pool = [ex(i, i % 3, group=f"g{i % 2}") for i in range(50)]
    rest, val = split_validation(pool, 8, data_seed=0, task="t")
    assert len(val) == 8 and len(rest) == 42 and not {e.id for e in val} & {e.id for e in rest}
    assert sorted(e.group for e in val) == ["g0"] * 4 + ["g1"] * 4  # 25/25 in the pool → 4/4
    assert [e.id for e in rest] == [e.id for e in pool if e not in val]  # the split's order is kept
    assert split_validation(pool, 8, data_seed=0, task="t")[1] == val  # the same slice for every run seed
    assert split_validation(pool, 8, data_seed=1, task="t")[1] != val
    assert validation_count(50, 64) == 10 and validation_count(4, 64) == 0  # at most a fifth of the split
    assert split_validation(pool, 0, 0, "t") == (pool, [])


def test_majority_baseline_learns_the_rule_on_train_and_scores_validation():
    # train: gold positions 0,0,1 → position 0 (2/3); answer texts 'yes','yes','no' → also 2/3: the position wins ties
    train = [ex(0, 0), ex(1, 0), ex(2, 1)]
    val = [ex(3, 0), ex(4, 2), ex(5, 0), ex(6, 1)]  # position 0 is right 2 of 4 times
    assert majority_baseline(train, val) == (50.0, "position 0")
    # answers shuffled across positions, 'no' is gold 3 of 4 times on train but at varying positions
    shuffled = [ex(0, 1), ex(1, 0, ("no", "yes")), ex(2, 1, ("maybe", "no")), ex(3, 0)]
    val2 = [ex(4, 1), ex(5, 0, ("no", "yes")), ex(6, 0)]  # 'no' is gold in the first two: 2 of 3
    acc, rule = majority_baseline(shuffled, val2)
    assert rule == "answer 'no'" and acc == pytest.approx(200 / 3)
    assert chance_baseline([ex(0, 0), ex(1, 0, ("a", "b"))]) == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)


def test_divergence_and_failure_reasons():
    assert diverged([2.0, 1.0, float("nan")], 1.5)
    assert not diverged([2.0] * 10 + [2.9] * 10, 1.5)  # first two (tenth of 20) mean 2.0, last two 2.9 ≤ 3.0
    assert diverged([2.0] * 10 + [3.1] * 10, 1.5)
    assert failure_reasons(is_diverged=False, val_acc=50, val_acc_before=40, majority=50, min_gain=0) == []
    reasons = failure_reasons(is_diverged=True, val_acc=30, val_acc_before=40, majority=50, min_gain=0)
    assert len(reasons) == 3 and "diverged" in reasons[0] and "below the majority" in reasons[1]
    assert "-10.0 pp" in reasons[2]
    assert train_seed(7, 0) == 7 and len({train_seed(7, a) for a in range(5)}) == 5


def test_cosine_schedule_and_warmup_ratio_by_hand():
    cfg = TrainingConfig(lr=1.0, scheduler="cosine", warmup_ratio=0.2)  # 10 steps: 2 warmup, then 8 of cosine
    lrs = [lr_at(s, 10, cfg) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == 1.0 and lrs[6] == pytest.approx(0.5)  # progress 4/8 → ½(1 + cos(π/2)) = ½
    assert lrs[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr_at(3, 10, TrainingConfig(lr=1.0, scheduler="linear", warmup_steps=2)) == pytest.approx(1 - 1 / 8)
    with pytest.raises(ValueError, match="not both"):
        TrainingConfig(warmup_steps=2, warmup_ratio=0.1)


def test_select_best_without_a_validation_slice_is_a_config_error():
    base = {"chains": [{"name": "c", "stages": [{"task": "toxigenqa", "select_best": True}]}]}
    with pytest.raises(ConfigError, match="select_best needs validation"):
        validate_config(base | {"quality_gate": {"validation_size": 0}})
    validate_config(base)  # the default gate holds out a slice


def test_curvature_subsets_are_disjoint_and_their_quotients_give_a_t_interval():
    examples = [ex(i, 0, group=f"g{i % 2}") for i in range(40)]
    parts = disjoint_subsets(examples, 8, 3, seed=0)
    ids = [e.id for p in parts for e in p]
    assert [len(p) for p in parts] == [8, 8, 8] and len(set(ids)) == 24
    assert all(sum(e.group == "g0" for e in p) == 4 for p in parts)  # round robin within groups
    assert disjoint_subsets(examples, 8, 1, seed=0)[0] == disjoint_subsets(examples, 8, 1, seed=0)[0]
    # quotients 1, 2, 3 on equal tokens: λ 2, z = −1, 0, 1, se² = 2 / (3·2), t_{0.975, 2} = 4.3027 → 2 ± 2.4841
    value, low, high = quotient_interval([1.0, 2.0, 3.0], [10, 10, 10])
    assert (value, low, high) == pytest.approx((2, 2 - 2.48414, 2 + 2.48414), abs=1e-4)
    # tokens 1 and 3: λ = (1 + 9) / 4 = 2.5, mean t 2, z = (1·−1.5 / 2, 3·0.5 / 2) = ∓0.75, se² = 1.125 / 2,
    # t_{0.975, 1} = 12.7062 → 2.5 ± 9.5297
    value, low, high = quotient_interval([1.0, 3.0], [1, 3])
    assert (value, low, high) == pytest.approx((2.5, 2.5 - 9.5297, 2.5 + 9.5297), abs=1e-3)
    assert quotient_interval([5.0], [3]) == (5.0, None, None)


def test_dominant_subset_is_a_robust_outlier_only():
    # ARC-Easy seed 2 of the reproduction: one quotient 52.07 among ~0.5: median of the 5 values below 0.71, absolute
    # deviations 0.35, 0.31, 0, 0.14, 51.36 → their median 0.31; 51.36 > 10 × 0.31 → subset 4
    assert dominant_subset([0.36, 0.40, 0.71, 0.85, 52.07]) == 4
    # the reproduction's ARC-Easy seed 0 search side: 6.51 is 8.4 median deviations out, not a dominant subset
    assert dominant_subset([1.12, 0.78, 1.53, 2.29, 2.11, 1.97, 2.27, 6.51, 0.95, 1.53, 2.59, 3.73]) is None
    assert dominant_subset([1.0, 50.0]) is None  # too few to tell


def test_split_estimate_is_the_mean_of_its_two_sides_with_a_welch_interval():
    # search side: quotients 1, 2, 3 on equal tokens → 2, se² 1/3 (above), df 2; held-out side: 2, 4 on 1 token
    # each → 3, z = ∓1, se² = 2 / (2·1) = 1, df 1. λ = (2 + 3)/2 = 2.5, se² = (1/3 + 1)/4 = 1/3,
    # df = (4/3)² / ((1/3)²/2 + 1²/1) = 32/19 = 1.684, t_{0.975, 32/19} = 5.17623 → 2.5 ± 5.17623·√(1/3) = ± 2.98850
    value, low, high = quotient_interval([1.0, 2.0, 3.0, 2.0, 4.0], [10, 10, 10, 1, 1], held_out=2)
    assert (value, low, high) == pytest.approx((2.5, 2.5 - 2.98850, 2.5 + 2.98850), abs=1e-4)
    with pytest.raises(ValueError, match="≥ 2 search and ≥ 2 held-out"):
        quotient_interval([1.0, 2.0, 3.0], [1, 1, 1], held_out=1)


def test_measure_curvature_pools_its_subsets():
    """λ_max over 2 subsets of 4 is that of the 8 examples pooled (the same seeded sample as one subset of 8); the
    subsets' quotients bracket it and their token-weighted mean is it."""
    from chaintune.models import tiny_llama

    model, tokenizer = tiny_llama(seed=0)
    examples = [ex(i, i % 3, group=f"g{i % 2}") for i in range(16)]
    kwargs = dict(seed=0, max_iter=40, micro_batch=4, tol=1e-6)
    both = measure_curvature(model, tokenizer, examples, n_examples=4, subsets=2, **kwargs)
    pooled = measure_curvature(model, tokenizer, examples, n_examples=8, subsets=1, **kwargs)
    assert both.lambda_max == pytest.approx(pooled.lambda_max, rel=1e-4) and both.n_examples == 8
    assert both.subsets == 2 and len(both.lambda_max_subsets) == 2 and pooled.lambda_max_subsets == []
    assert min(both.lambda_max_subsets) <= both.lambda_max <= max(both.lambda_max_subsets)
    assert both.lambda_max_ci_low < both.lambda_max < both.lambda_max_ci_high
    low, high = both.lambda_max_ci_low, both.lambda_max_ci_high
    assert both.disagreement == (None if low * high <= 0 else pytest.approx(max(abs(low), abs(high)) /
                                                                            min(abs(low), abs(high)), rel=1e-12))
    assert both.hvp_calls == both.iterations + 1  # the quotients' pass


def test_held_out_subsets_enter_only_through_their_quotients():
    """With 2 held-out subsets the eigen-solve sees the 2 search subsets only (its Ritz value is the pooled value
    over them), the held-out quotients come from one more pass, and λ_max is the mean of the two sides."""
    from chaintune.models import tiny_llama

    model, tokenizer = tiny_llama(seed=0)
    examples = [ex(i, i % 3, group=f"g{i % 2}") for i in range(16)]
    kwargs = dict(seed=0, max_iter=40, micro_batch=4, tol=1e-6)
    split = measure_curvature(model, tokenizer, examples, n_examples=4, subsets=2, held_out=2, **kwargs)
    assert split.subsets == 2 and split.held_out == 2 and split.n_examples == 16
    assert len(split.lambda_max_subsets) == 4 and split.hvp_calls == split.iterations + 2
    parts = disjoint_subsets(examples, 4, 4, seed=0)
    alone = measure_curvature(model, tokenizer, parts[0] + parts[1], n_examples=4, subsets=2, **kwargs)
    # the same 8 search examples, though split into 2 subsets differently: the pooled Ritz value is theirs
    assert split.lambda_max_search == pytest.approx(alone.lambda_max, rel=1e-4)
    search, held = split.lambda_max_subsets[:2], split.lambda_max_subsets[2:]
    assert min(search) <= split.lambda_max_search <= max(search)
    assert min(held) <= 2 * split.lambda_max - split.lambda_max_search <= max(held)  # the held-out side's mean
    assert split.lambda_max_ci_low < split.lambda_max < split.lambda_max_ci_high
    with pytest.raises(ChaintuneError, match="held-out"):
        measure_curvature(model, tokenizer, examples, n_examples=4, subsets=1, held_out=2, **kwargs)


def _gauss_newton_experiment(rng: np.random.Generator, K: int, m: int, gap: float, held_out: int = 0,
                              d: int = 40) -> tuple[float, float, float, float]:
    """One simulated measurement: (K + held_out)·m examples whose Hessians are g gᵀ, g ~ N(μ, diag(s²)) in d
    dimensions, so the population Hessian is μμᵀ + diag(s²); returns (true λ_max, estimate, interval low, high) of
    the estimator as measure_curvature runs it: Lanczos on the K search subsets' pooled Hessian, then every
    subset's quotient along its Ritz vector."""
    import torch

    mu = np.zeros(d)
    mu[:2] = gap, 0.8 * gap
    s = np.linspace(1.0, 0.2, d)
    truth = float(np.linalg.eigvalsh(np.outer(mu, mu) + np.diag(s ** 2))[-1])
    n = K + held_out
    g = mu + rng.standard_normal((n * m, d)) * s
    hessians = [torch.tensor(g[k * m:(k + 1) * m].T @ g[k * m:(k + 1) * m] / m) for k in range(n)]
    pooled = sum(hessians[:K]) / K
    found = lanczos(lambda v: pooled @ v, d, torch.device("cpu"), seed=int(rng.integers(1 << 30)), tol=1e-8,
                    max_iter=d, vector=True, start=torch.tensor(rng.standard_normal(d)))
    quotients = [float(found.vector @ h @ found.vector) for h in hessians]
    value, low, high = quotient_interval(quotients, [m] * n, held_out)
    return truth, value, low, high


@pytest.mark.parametrize("gap", [3.0, 1.5])
def test_pooled_lambda_max_interval_covers_the_population_value(gap: float):
    """Coverage of the 95 % interval of the population Hessian's λ_max, 400 simulated measurements of 6 × 16
    examples each (bar 90–98 %); gap 1.5 is a weak one: the top eigenvalue 3.25 against 1.0 next."""
    rng = np.random.default_rng(0)
    hits = [low <= truth <= high for truth, _, low, high in (_gauss_newton_experiment(rng, 6, 16, gap)
                                                                for _ in range(400))]
    assert 0.90 <= np.mean(hits) <= 0.98


def test_in_many_dimensions_the_pooled_value_is_far_too_high_and_the_split_one_is_not():
    """200 dimensions, 12 search subsets of 8 (+ 20 held out), gap 1.5, 200 experiments: the pooled Ritz value of
    96 examples fits their noise (the top eigenvalue of a sample Hessian grows with dimension / examples), so its
    interval misses the population λ_max most of the time, while the split estimate stays within a few % and
    covers (docs/curvature.md)."""
    rng = np.random.default_rng(2)
    pooled = np.array([_gauss_newton_experiment(rng, 12, 8, 1.5, d=200) for _ in range(200)])
    split = np.array([_gauss_newton_experiment(rng, 12, 8, 1.5, held_out=20, d=200) for _ in range(200)])
    for runs in (pooled, split):
        truth, value, low, high = runs.T
        runs_coverage, runs_bias = np.mean((low <= truth) & (truth <= high)), np.mean(value / truth - 1)
        if runs is pooled:
            assert runs_coverage < 0.75 and runs_bias > 0.1
        else:
            assert 0.90 <= runs_coverage <= 0.98 and abs(runs_bias) < 0.05


@pytest.mark.parametrize("gap", [3.0, 1.1])
def test_split_lambda_max_is_unbiased_and_its_interval_covers(gap: float):
    """Held-out subsets: 400 simulated measurements of 6 search + 18 held-out subsets of 8. The interval covers the
    population λ_max at 90–98 % and the estimate's mean relative bias is within ±2 % (docs/curvature.md: the
    held-out side alone is 7 % low at the weak gap 1.1, top eigenvalue 2.22 against 1.0 next; the search side
    alone 8 % high)."""
    rng = np.random.default_rng(1)
    runs = np.array([_gauss_newton_experiment(rng, 6, 8, gap, held_out=18) for _ in range(400)])
    truth, value, low, high = runs.T
    assert 0.90 <= np.mean((low <= truth) & (truth <= high)) <= 0.98
    assert abs(np.mean(value / truth - 1)) < 0.02


# ------------------------------------------------------------------------------------- best checkpoint
def _sft(n: int, offset: int = 0) -> list[Example]:
    return [ex(offset + i, i % 3, group=f"g{i % 2}") for i in range(n)]


def test_select_best_keeps_the_lowest_validation_loss_and_survives_a_resume(tmp_path, monkeypatch):
    import chaintune.train as train
    from chaintune.models import tiny_llama

    cfg = TrainingConfig(lr=3e-2, batch_size=2, select_best=True, eval_every=1, checkpoint_every=3, max_steps=8)
    train_set, val = _sft(16), _sft(6, offset=100)
    model, tok = tiny_llama(seed=0)
    ref = train_stage(model, tok, train_set, cfg, seed=0, validation=val)
    losses = [r["val_loss"] for r in ref.curve]
    assert ref.best_step == 1 + int(np.argmin(losses)) and len(losses) == 8
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kept = train.validation_loss(model, train.tokenize_sft(tok, val, cfg.max_length), pad, 2)
    assert kept == pytest.approx(min(losses), rel=1e-5)  # the model holds the best step's weights
    # the same stage, killed after its step-6 resume state (steps 7-8 lost), then rerun from it
    model2, _ = tiny_llama(seed=0)
    real = train._accumulate_gradients
    calls = []

    def crash_at_step_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "_accumulate_gradients", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train_stage(model2, tok, train_set, cfg, seed=0, work_dir=tmp_path, validation=val)
    monkeypatch.setattr(train, "_accumulate_gradients", real)
    model3, _ = tiny_llama(seed=1)  # other weights: the resume state must restore everything
    resumed = train_stage(model3, tok, train_set, cfg, seed=0, work_dir=tmp_path, validation=val)
    assert resumed.best_step == ref.best_step
    for (n, a), b in zip(model.named_parameters(), model3.parameters()):
        assert torch_equal(a, b), n


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.allclose(a, b, atol=1e-6, rtol=0))


# ---------------------------------------------------------------------------------------- in a real run
@pytest.fixture
def gated(mcq_experiment, tmp_path):
    """The mcq chain (tiny model, user tasks) with the default gate, whose validation slice is 9 of 48 examples."""
    def make(name: str = "out", **gate):
        return mcq_experiment(tmp_path / name, quality_gate={"validation_size": 64, **gate})
    return make


def test_gate_records_baselines_and_never_trains_on_its_validation_slice(gated, monkeypatch, capsys):
    seen = []
    real = stage_mod.train_stage
    monkeypatch.setattr(stage_mod, "train_stage", lambda m, t, examples, *a, **k: seen.append(
        ({e.id for e in examples}, {e.id for e in k["validation"]})) or real(m, t, examples, *a, **k))
    cfg = gated(min_gain=-100)  # nothing fails on the gain: only the majority baseline and divergence can
    outcome = quiet(cfg)
    assert not outcome.failed and len(seen) == 2
    assert all(val and not (train & val) for train, val in seen)  # leak-free
    out = RunDir(cfg["output_dir"])
    for node in out.node_names():
        record = out.node(node)
        if record is None:
            continue  # the base model
        gate = record.gate
        assert gate.n_validation == 9 and gate.policy == "flag" and len(gate.attempts) == 1
        assert 0 <= gate.majority_baseline <= 100 and gate.chance_baseline == pytest.approx(100 / 3)
        assert gate.failed == (gate.final.val_acc < gate.majority_baseline)
    tables = summary_tables(cfg["output_dir"])
    assert len(tables["stage_gate"]) == 2


def test_flagged_stage_is_shown_by_plan_summarize_and_report_and_its_run_excluded(gated, tmp_path, capsys):
    import yaml

    cfg = gated(min_gain=100)  # no stage can gain 100 pp: every stage fails, flagged
    outcome = quiet(cfg)
    assert not outcome.failed and outcome.completed_runs == ["ab-seed0"]  # flag: the chain goes on
    runs = load_runs(RunDir(cfg["output_dir"]))
    tables = summary_tables(runs)
    assert not tables["stage_gate"].passed.any() and list(tables["excluded_runs"].run) == ["ab-seed0"]
    assert "forgetting" not in tables  # no finding from a stage that did not learn
    answer = findings(runs, tables)["Stage quality gate"]
    assert answer[0].startswith("0 of 2 trained stages passed") and "gained" in answer[1]
    assert answer[-1].startswith("1 of 1 runs are excluded") and "ab-seed0" in answer[-1]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["plan", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "quality gate: 0/2 trained stages passed" in shown and shown.count("failed gate") == 2
    assert main(["summarize", cfg["output_dir"]]) == 0
    assert "Runs left out of every table" in capsys.readouterr().out
    assert main(["report", cfg["output_dir"]]) == 0
    html = (Path(cfg["output_dir"]) / "report" / "report.html").read_text()
    assert "Stage quality gate" in html and "Runs excluded from the summaries" in html


def test_retry_draws_new_seeds_until_attempts_run_out(gated, monkeypatch):
    seeds = []
    real = stage_mod.train_stage
    monkeypatch.setattr(stage_mod, "train_stage", lambda m, t, e, c, seed, **k: seeds.append(seed) or
                        real(m, t, e, c, seed, **k))
    cfg = gated(min_gain=100, on_failed_stage="retry", max_attempts=3)
    cfg["chains"] = [{"name": "a", "stages": [{"task": "mcq_a"}]}]
    quiet(cfg)
    assert seeds == [train_seed(0, a) for a in range(3)]
    (record,) = [RunDir(cfg["output_dir"]).node(n) for n in RunDir(cfg["output_dir"]).node_names() if n.startswith("s1")]
    assert [a.train_seed for a in record.gate.attempts] == seeds and record.gate.failed
    assert all("gained" in a.reasons[-1] for a in record.gate.attempts)


def test_retry_resumes_at_the_attempt_a_kill_interrupted(gated, monkeypatch):
    seeds = []
    real = stage_mod.train_stage

    def second_attempt_dies(m, t, e, c, seed, **k):
        seeds.append(seed)
        if len(seeds) == 2:
            raise RuntimeError("worker killed (simulated)")
        return real(m, t, e, c, seed, **k)

    monkeypatch.setattr(stage_mod, "train_stage", second_attempt_dies)
    cfg = gated(min_gain=100, on_failed_stage="retry", max_attempts=3)
    cfg["chains"] = [{"name": "a", "stages": [{"task": "mcq_a"}]}]
    assert quiet(cfg).failed  # attempt 1 failed its gate, attempt 2 crashed: attempts.json holds attempt 1
    (node,) = [n for n in RunDir(cfg["output_dir"]).node_names() if n.startswith("s1")]
    assert len(json.loads(RunDir(cfg["output_dir"]).attempts_path(node).read_text())) == 1
    monkeypatch.setattr(stage_mod, "train_stage", lambda m, t, e, c, seed, **k: seeds.append(seed) or
                        real(m, t, e, c, seed, **k))
    assert not quiet(cfg).failed
    assert seeds == [train_seed(0, 0), train_seed(0, 1), train_seed(0, 1), train_seed(0, 2)]
    record = RunDir(cfg["output_dir"]).node(node)
    assert [a.attempt for a in record.gate.attempts] == [0, 1, 2]
    assert not RunDir(cfg["output_dir"]).attempts_path(node).exists()


def test_gain_floor_and_identity_of_a_stage_that_repeats_its_task():
    from chaintune.config import QualityGateConfig

    gate = QualityGateConfig(on_failed_stage="retry", min_gain=2.0)
    assert gate.gain_floor(False) == 2.0 and gate.gain_floor(True) is None
    assert QualityGateConfig(min_gain_repeated=-1.5).gain_floor(True) == -1.5
    # a first occurrence keeps the node key it had before min_gain_repeated existed; a repeat's key changes
    assert gate.identity() == {"validation_size": 64, "retry": {"min_gain": 2.0, "divergence_factor": 1.5,
                                                                "max_attempts": 3}}
    assert gate.identity(True)["retry"]["min_gain"] is None
    assert QualityGateConfig(min_gain=5).identity(True) == {"validation_size": 64}  # flag: the weights do not depend


def test_a_stage_that_repeats_its_task_is_held_to_min_gain_repeated(gated):
    from chaintune.plan import build_tree

    cfg = gated(min_gain=100, on_failed_stage="retry", max_attempts=2)
    cfg["chains"] = [{"name": "aba", "stages": [{"task": "mcq_a"}, {"task": "mcq_b"}, {"task": "mcq_a"}]}]
    _, nodes, _ = build_tree(validate_config(cfg))
    assert [n.repeats_task for n in nodes] == [False, False, False, True]
    quiet(cfg)
    out = RunDir(cfg["output_dir"])
    gates = {n[:2]: out.node(n).gate for n in out.node_names() if n.startswith("s")}
    assert gates["s1"].min_gain == gates["s2"].min_gain == 100 and len(gates["s1"].attempts) == 2
    assert all("gained" in a.reasons[-1] for a in gates["s1"].attempts + gates["s2"].attempts)
    assert gates["s3"].min_gain is None  # no gain requirement: only divergence and the majority baseline can fail it
    assert not any("gained" in r for a in gates["s3"].attempts for r in a.reasons)
    cfg["quality_gate"]["min_gain_repeated"] = 100
    cfg["output_dir"] += "-strict"
    quiet(cfg)
    out = RunDir(cfg["output_dir"])
    (s3,) = [out.node(n).gate for n in out.node_names() if n.startswith("s3")]
    assert s3.min_gain == 100 and len(s3.attempts) == 2 and all("gained" in a.reasons[-1] for a in s3.attempts)


def test_compile_reaches_training_and_every_evaluation_of_a_run(gated, monkeypatch):
    import chaintune.evaluate as ev
    import chaintune.train as tr

    compiled, calls = [], []
    monkeypatch.setattr(ev, "compile_decoder", lambda m: compiled.append("eval") or ev.decoder_and_head(m)[0])
    monkeypatch.setattr(tr, "compile_decoder", lambda m: compiled.append("train") or ev.decoder_and_head(m)[0])
    real = stage_mod.evaluate
    monkeypatch.setattr(stage_mod, "evaluate", lambda *a, **k: calls.append(k["compile"]) or real(*a, **k))
    cfg = gated(min_gain=-100)
    cfg.update(compile=True, chains=[{"name": "a", "stages": [{"task": "mcq_a"}]}])
    quiet(cfg)
    assert len(calls) >= 3 and all(calls)  # base and stage evaluations, the gate's slice before and after
    assert compiled.count("train") == 1 and compiled.count("eval") == len(calls)


def test_stop_policy_runs_no_later_stage_and_stays_stopped(gated):
    cfg = gated(min_gain=100, on_failed_stage="stop")
    for _ in range(2):  # a rerun does not sneak the later stage in
        outcome = quiet(cfg)
        (failure,) = outcome.failed.values()
        assert failure["node"].startswith("s2-") and "failed its quality gate" in failure["error"]
        assert outcome.incomplete_runs == ["ab-seed0"]
    assert not [n for n in RunDir(cfg["output_dir"]).node_names() if n.startswith("s2")]


def test_curvature_warns_when_subsets_disagree(gated, capsys, monkeypatch):
    import chaintune.curvature

    monkeypatch.setattr(chaintune.curvature, "dominant_subset", lambda quotients: 0)  # name subset 0's examples
    cfg = gated(min_gain=-100)
    cfg["curvature"] = {"after": ["first"], "examples": 4, "subsets": 2, "max_iter": 10, "disagreement": 1.0001}
    lines = []
    chaintune.run(cfg, echo=lines.append, progress=False)
    out = RunDir(cfg["output_dir"])
    (node,) = [n for n in out.node_names() if n.startswith("s1")]
    record = out.curvature(node)
    assert record["unstable"] and len(record["lambda_max_subsets"]) == 2
    assert min(record["lambda_max_subsets"]) <= record["lambda_max"] <= max(record["lambda_max_subsets"])
    assert record["settings"]["estimator"] == "pooled"
    ids = record["subset_ids"]
    assert [len(part) for part in ids] == [4, 4] and not set(ids[0]) & set(ids[1])
    warning = "warning: λ_max of"
    echoed = [str(line) for line in lines] + capsys.readouterr().out.splitlines()
    assert any(warning in line for line in echoed)
    (named,) = [line for line in echoed if "subset 0 (search) reads" in line]
    assert named.endswith(", ".join(ids[0]))
    # the findings name each unstable stage once (one run here: a stand-in row for the correlation table)
    runs = load_runs(out)
    row = dict(target="F", task="ALL", group="ALL", pearson_r=0.5, pearson_p=0.1, spearman_rho=0.5, spearman_p=0.1,
               r2=0.25, n=3, first_stages=3)
    tables = summary_tables(runs) | {"curvature_vs_forgetting": pd.DataFrame([row]),
                                     "stage_gate": pd.DataFrame()}  # (the tiny stage may miss its gate)
    (line,) = [x for x in findings(runs, tables)["Does first-stage curvature predict forgetting?"]
               if x.startswith("λ_max is unstable")]
    assert f"for: {node} —" in line
