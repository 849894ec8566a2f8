"""Fault injection for tests/test_faults.py: `chaintune run CONFIG` in forked children, each SIGKILLed at a named
point and resumed by the next; after each kill the output folder is copied for inspection.

    python tests/fault_driver.py REFERENCE CONFIG SNAPSHOTS REPORT POINT ...

REFERENCE (a config) is first run uninterrupted and timed; then CONFIG once per POINT. POINT is `NAME[@N]` (killed
the N-th time NAME is reached in that child, default 1), `end` (run to completion) or `random` (an independent trial:
a fresh run SIGKILLed at a random moment of the reference's duration, then resumed; the resumed folder is kept as
SNAPSHOTS/NN-random-final). Names:

    train_step          after an optimizer step
    eval_batch          after a batch of questions is scored
    write:FILE          while FILE (a file name) is written: its temporary file half written, not yet renamed

REPORT gets one JSON record per point: {"point", "killed", "exit_code"} (+ "resume_exit_code" for a random trial). The driver itself only imports (no torch
work), so forking is safe and every child starts without the import cost.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path

import peft  # noqa: F401  (imported before forking: children start fast)
import transformers

import chaintune.engine  # noqa: F401
import chaintune.executors  # noqa: F401
from chaintune.cli import main
from chaintune.config import read_config

stage, evaluate, io = (import_module(f"chaintune.{m}") for m in ("stage", "evaluate", "io"))  # modules, not functions

transformers.LlamaForCausalLM  # noqa: B018  (loads the modeling code before forking)


def install_kill_point(name: str, nth: int) -> None:
    """Patch this process so that it SIGKILLs itself the `nth` time it reaches point `name`."""
    hits = 0

    def reached(point: str, before_kill=lambda: None) -> None:
        nonlocal hits
        if point == name:
            hits += 1
            if hits == nth:
                before_kill()
                os.kill(os.getpid(), signal.SIGKILL)

    train_stage = stage.train_stage
    stage.train_stage = lambda *a, **k: train_stage(*a, on_step=lambda _: reached("train_step"), **k)
    score_packed = evaluate.score_packed

    def scored(*args, **kwargs):
        result = score_packed(*args, **kwargs)
        reached("eval_batch")
        return result

    evaluate.score_packed = scored
    atomic_path = io.atomic_path

    @contextmanager
    def torn_atomic_path(path):
        with atomic_path(path) as tmp:
            yield tmp
            reached(f"write:{Path(path).name}", lambda: tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2]))

    io.atomic_path = torn_atomic_path


def run_child(config: str, point: str, log: Path) -> int:
    """Fork a child that runs the experiment (with `point` installed); returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        if point != "end" and not point.startswith("random:"):
            name, _, nth = point.partition("@")
            install_kill_point(name, int(nth or 1))
        code = main(["run", config, "--no-progress"])
    except BaseException:  # noqa: BLE001 — a child never returns into the driver's loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid: int, kill_after: float | None = None) -> tuple[bool, int | None]:
    """(killed by SIGKILL, exit code) of child `pid`; with `kill_after`, SIGKILL it after so many seconds."""
    status = None
    if kill_after is not None:
        time.sleep(kill_after)
        finished, status = os.waitpid(pid, os.WNOHANG)
        if not finished:
            os.kill(pid, signal.SIGKILL)
            status = None
    if status is None:
        _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return killed, None if killed else os.waitstatus_to_exitcode(status)


def drive(reference: str, config: str, snapshots: Path, points: list[str]) -> list[dict]:
    out = Path(read_config(config)["output_dir"])
    rng = random.Random(0)
    started = time.perf_counter()
    killed, code = wait(run_child(reference, "end", snapshots / "reference.log"))
    seconds = time.perf_counter() - started
    records = [{"point": "reference", "killed": killed, "exit_code": code}]
    for i, point in enumerate(points):
        tag = f"{i:02d}-{point.replace(':', '_')}"
        if point == "random":  # an independent trial: a fresh run, killed at a random moment, then resumed
            shutil.rmtree(out, ignore_errors=True)
            killed, code = wait(run_child(config, "end", snapshots / f"{tag}.log"), rng.uniform(0, seconds))
        else:
            killed, code = wait(run_child(config, point, snapshots / f"{tag}.log"))
        records.append({"point": point, "killed": killed, "exit_code": code})
        if killed and out.exists():
            shutil.copytree(out, snapshots / tag, symlinks=True)
        if killed and point == "random":
            records[-1]["resume_exit_code"] = wait(run_child(config, "end", snapshots / f"{tag}-resume.log"))[1]
            shutil.copytree(out, snapshots / f"{tag}-final", symlinks=True)
    return records


if __name__ == "__main__":
    reference_path, config_path, snapshot_dir, report = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    snapshot_dir.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(drive(reference_path, config_path, snapshot_dir, sys.argv[5:]), indent=1))
