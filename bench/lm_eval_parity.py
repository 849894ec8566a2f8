"""Per-choice log-likelihood parity between chaintune and lm-evaluation-harness `multiple_choice` (SPEC.md §3).

Both sides score the same questions with the same in-memory model. lm-eval gets, per question, the requests that its
`ConfigurableTask.construct_requests` builds for a `multiple_choice` task (lm_eval/api/task.py):
`arguments = [(ctx, f"{target_delimiter}{cont}") for cont in doc_to_choice(doc)]`, and its metrics are those of
`process_results`: `pred = argmax(lls)`, `pred_norm = argmax(lls / [len(c) for c in doc_to_choice(doc)])`.

The requests are modelled on lm-eval's own `arc_challenge` task (default `target_delimiter=" "`,
`doc_to_choice` = answer texts without the leading space), so the argument is `(prompt, " " + text)`, byte-identical
to `(prompt, choice)`. A task written with `target_delimiter=""` and the spaced choices sends the same requests but
divides acc_norm by one more character per choice; that variant is reported as `acc_norm_nodelim` for information.

    python bench/lm_eval_parity.py --task arc_challenge --limit 200
    python bench/lm_eval_parity.py --task bbq --limit 24 --shared   # questions chaintune packs behind a shared prefix
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

import numpy as np

from chaintune.evaluate import predictions_from_scores, score_examples
from chaintune.tasks import Example, load_task

TOLERANCE = 1e-3  # nats, SPEC.md §3
DELIMITER = " "  # lm-eval's default target_delimiter


def make_hflm(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's HFLM wrapped around an already loaded model and tokenizer (it cannot load the GGUF tokenizer)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))


def lm_eval_choices(example: Example) -> list[str]:
    """`doc_to_choice` of the equivalent lm-eval task: the choice texts without the leading target delimiter."""
    return [c[len(DELIMITER):] if c.startswith(DELIMITER) else c for c in example.choices]


def lm_eval_requests(examples: Sequence[Example]) -> list[Any]:
    """Loglikelihood `Instance`s exactly as lm-eval's `multiple_choice` `construct_requests` builds them."""
    from lm_eval.api.instance import Instance

    requests = []
    for doc_id, ex in enumerate(examples):
        doc = {"id": ex.id, "prompt": ex.prompt, "choices": lm_eval_choices(ex), "gold": ex.gold}
        for i, cont in enumerate(doc["choices"]):
            requests.append(Instance(request_type="loglikelihood", doc=doc, arguments=(ex.prompt, f"{DELIMITER}{cont}"),
                                     idx=i, metadata=("chaintune", doc_id, 1)))
    return requests


def lm_eval_scores(lm: Any, examples: Sequence[Example]) -> list[list[float]]:
    """lm-eval's per-choice log-likelihoods (nats), regrouped per question in input order."""
    results = lm.loglikelihood(lm_eval_requests(examples), disable_tqdm=True)
    flat = iter(ll for ll, _greedy in results)
    return [[next(flat) for _ in ex.choices] for ex in examples]


def lm_eval_metrics(examples: Sequence[Example], scores: Sequence[Sequence[float]],
                    delimiter: str = DELIMITER) -> dict[str, Any]:
    """acc / acc_norm (percent) and predictions computed as lm-eval's `process_results` does (np.argmax)."""
    preds, preds_norm = [], []
    for ex, lls in zip(examples, scores):
        choices = lm_eval_choices(ex) if delimiter else list(ex.choices)
        lls_arr = np.array(lls)
        preds.append(int(np.argmax(lls_arr)))
        preds_norm.append(int(np.argmax(lls_arr / np.array([float(len(c)) for c in choices]))))
    n = len(examples)
    return {"acc": 100.0 * sum(p == ex.gold for p, ex in zip(preds, examples)) / n,
            "acc_norm": 100.0 * sum(p == ex.gold for p, ex in zip(preds_norm, examples)) / n,
            "pred": preds, "pred_norm": preds_norm}


def compare(model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int = 16,
            lm: Any | None = None) -> dict[str, Any]:
    """Score `examples` with chaintune and with lm-eval's HFLM; return deltas, accuracies and disagreements."""
    t0 = time.perf_counter()
    ours = score_examples(model, tokenizer, examples)
    t1 = time.perf_counter()
    theirs = lm_eval_scores(lm or make_hflm(model, tokenizer, batch_size), examples)
    t2 = time.perf_counter()
    deltas = np.array([abs(a - b) for o, t in zip(ours, theirs) for a, b in zip(o, t)])
    rows = predictions_from_scores(examples, ours)
    ref = lm_eval_metrics(examples, theirs)
    nodelim = lm_eval_metrics(examples, theirs, delimiter="")
    n = len(examples)
    worst = int(deltas.argmax()) if len(deltas) else 0
    return {
        "n_questions": n, "n_choices": int(len(deltas)),
        "max_abs_delta": float(deltas.max()) if len(deltas) else 0.0,
        "mean_abs_delta": float(deltas.mean()) if len(deltas) else 0.0, "worst_choice_index": worst,
        "chaintune_acc": 100.0 * sum(r["correct"] for r in rows) / n,
        "chaintune_acc_norm": 100.0 * sum(r["correct_norm"] for r in rows) / n,
        "lm_eval_acc": ref["acc"], "lm_eval_acc_norm": ref["acc_norm"], "lm_eval_acc_norm_nodelim": nodelim["acc_norm"],
        "argmax_differs": sum(r["pred"] != p for r, p in zip(rows, ref["pred"])),
        "argmax_norm_differs": sum(r["pred_norm"] != p for r, p in zip(rows, ref["pred_norm"])),
        "argmax_norm_nodelim_differs": sum(r["pred_norm"] != p for r, p in zip(rows, nodelim["pred_norm"])),
        "chaintune_s": t1 - t0, "lm_eval_s": t2 - t1, "chaintune_scores": ours, "lm_eval_scores": theirs,
    }


def shared_prefix_questions(tokenizer, examples: Sequence[Example], limit: int) -> list[Example]:
    """Up to `limit` of `examples` that `score_examples` packs into rows of several questions behind one copy of
    their shared context prefix (evaluate.pack_rows), whole rows at a time."""
    from chaintune.evaluate import pack_question, pack_rows

    rows = pack_rows([pack_question(i, tokenizer, ex, 2048) for i, ex in enumerate(examples)])
    chosen: list[int] = []
    for row in rows:
        if len(row.questions) > 1 and len(chosen) + len(row.questions) <= limit:
            chosen.extend(index for index, _, _ in row.questions)
    return [examples[i] for i in sorted(chosen)]


def passed(result: dict[str, Any]) -> bool:
    """Parity holds: every |Δ loglik| ≤ 1e-3 nats and identical acc / acc_norm predictions."""
    return (result["max_abs_delta"] <= TOLERANCE and result["argmax_differs"] == 0
            and result["argmax_norm_differs"] == 0)


def report(result: dict[str, Any]) -> str:
    r = result
    return "\n".join([
        f"questions: {r['n_questions']}   choices: {r['n_choices']}",
        f"|Δ loglik| (nats): max {r['max_abs_delta']:.3e}   mean {r['mean_abs_delta']:.3e}   (tolerance {TOLERANCE:g})",
        f"{'':12}{'acc':>8}{'acc_norm':>10}{'score s':>9}",
        f"{'chaintune':12}{r['chaintune_acc']:8.2f}{r['chaintune_acc_norm']:10.2f}{r['chaintune_s']:9.1f}",
        f"{'lm-eval':12}{r['lm_eval_acc']:8.2f}{r['lm_eval_acc_norm']:10.2f}{r['lm_eval_s']:9.1f}",
        f"questions whose argmax differs: acc {r['argmax_differs']}   acc_norm {r['argmax_norm_differs']}",
        f"(info) lm-eval acc_norm if the task used target_delimiter='' with spaced choices: "
        f"{r['lm_eval_acc_norm_nodelim']:.2f} ({r['argmax_norm_nodelim_differs']} argmax_norm differ from chaintune)",
        f"PARITY {'OK' if passed(r) else 'FAILED'}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="arc_challenge")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M), 'tiny', or a model path/id")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval HFLM batch size")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--shared", action="store_true",
                        help="only questions packed behind a shared context prefix (drawn from the whole split)")
    args = parser.parse_args(argv)

    from chaintune.models import load_model, tiny_llama

    model, tokenizer = tiny_llama() if args.model == "tiny" else load_model(args.model)
    examples = load_task(args.task, args.split, data_dir=args.data_dir, limit=None if args.shared else args.limit)
    if args.shared:
        examples = shared_prefix_questions(tokenizer, examples, args.limit)
    print(f"task {args.task}/{args.split}  model {args.model}  lm-eval batch_size {args.batch_size}")
    result = compare(model, tokenizer, examples, args.batch_size)
    print(report(result))
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
