"""Untrusted artifacts: custom model code never runs without the user's flag, no unsafe deserialisation in the
package, run and task names cannot leave the output dir, and a data dir is never written to."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chaintune
from chaintune.cli import build_parser
from chaintune.config import ExperimentConfig, validate_config
from chaintune.errors import ChaintuneError

SRC = Path(__file__).resolve().parents[1] / "src" / "chaintune"
EVIL_CODE = """from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig): pass
class EvilModel(LlamaForCausalLM): pass
class EvilTokenizer(PreTrainedTokenizerFast): pass
"""


@pytest.fixture
def evil_model_dir(tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    """The tiny model whose config and tokenizer config point at custom code that leaves a marker file when run."""
    path, marker = tmp_path / "evil-model", tmp_path / "PWNED"
    shutil.copytree(tiny_model_dir, path)
    for name, key, value in (("config.json", "auto_map", {"AutoConfig": "evil.EvilConfig",
                                                           "AutoModelForCausalLM": "evil.EvilModel"}),
                             ("tokenizer_config.json", "auto_map", {"AutoTokenizer": ["evil.EvilTokenizer", None]})):
        data = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps(data | {key: value}))
    (path / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    return path, marker


def test_custom_model_code_never_runs_without_the_flag(tmp_path, evil_model_dir, mcq_experiment):
    """Loading, training from, re-loading a checkpoint of, and verifying a run of a model that ships custom code."""
    from chaintune.models import load_model
    from chaintune.verify import verify_run

    model_dir, marker = evil_model_dir
    model, _ = load_model(str(model_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = mcq_experiment(tmp_path / "out", model=str(model_dir), eval_tasks=["mcq_a"],
                         tasks={"mcq_a": {"train_limit": 4, "eval_limit": 4}, "mcq_b": {"train_limit": 4}},
                         chains=[{"name": "ab", "stages": [{"task": "mcq_a"}, {"task": "mcq_b"}]}])
    chaintune.run(cfg, echo=lambda *_: None, progress=False)
    experiment = tmp_path / "out" / "experiment.yaml"  # a run directory from someone else may ask for custom code
    experiment.write_text(experiment.read_text().replace("trust_remote_code: false", "trust_remote_code: true"))
    table, _ = verify_run(tmp_path / "out")
    assert (table.status == "ok").all()
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_asked():
    parser = build_parser()
    for argv in (["eval", "--task", "t"], ["curvature", "--task", "t"], ["verify", "runs/x"]):
        assert parser.parse_args(argv).trust_remote_code is False
        assert parser.parse_args(argv + ["--trust-remote-code"]).trust_remote_code is True
    assert ExperimentConfig.model_fields["trust_remote_code"].default is False


UNSAFE = {r"trust_remote_code\s*=\s*True": "custom code switched on", r"\bpickle\b": "pickle",
          r"torch\.load\(": "torch.load", r"yaml\.(unsafe_load|full_load|Loader\b)|Loader=yaml\.Loader": "unsafe YAML",
          r"(?<![\w.])(eval|exec)\(": "eval/exec of strings"}


def test_package_has_no_unsafe_deserialisation():
    """Weights and states are read as safetensors/JSON, configs with the safe YAML loader."""
    found = [f"{path.name}:{i}: {what}" for path in sorted(SRC.rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1)
             for pattern, what in UNSAFE.items() if re.search(pattern, line)]
    assert not found


NAMES = st.text(st.characters(exclude_categories=("Cs",)), max_size=80) | st.from_regex(
    r"[A-Za-z0-9][A-Za-z0-9_.-]{0,70}", fullmatch=True) | st.sampled_from(
    ["..", ".", "../x", "/etc", "a/b", "a\\b", "a\x00b", "con", "x" * 64, "x" * 65, "-rf", ".hidden", "a..b"])


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(experiment=NAMES, chain=NAMES, stage=NAMES, task=NAMES)
def test_names_cannot_leave_the_output_dir(tmp_path_factory, experiment, chain, stage, task):
    """Every name the config accepts (experiment, chain, stage, user task) makes paths inside output_dir, one
    short visible component each."""
    from chaintune.plan import build_tree
    from chaintune.rundir import RunDir

    out = tmp_path_factory.getbasetemp() / "names-out"
    data = {"name": experiment, "output_dir": str(out), "eval_tasks": [task],
            "custom_tasks": [{"name": task, "path": "unused.jsonl"}],
            "chains": [{"name": chain, "stages": [{"task": task, "name": stage}, {"task": task}]}]}
    try:
        runs, nodes, _ = build_tree(validate_config(data))
    except ChaintuneError:
        return
    paths = [RunDir(out).run_dir(r.run_id) for r in runs] + [RunDir(out).eval_path(n.dirname, task) for n in nodes]
    for path in paths:
        rel = path.resolve().relative_to(out.resolve())  # raises if outside
        assert all(0 < len(p.encode()) <= 255 and not p.startswith(".") for p in rel.parts), rel


def tree_state(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder`: (kind, size, mtime_ns, SHA-256 of files)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        st_ = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        state[str(path.relative_to(folder))] = (path.is_dir(), st_.st_size if path.is_file() else 0, st_.st_mtime_ns,
                                                digest)
    return state


def read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)


def test_user_data_dir_is_never_written(tmp_path, mcq_experiment, mcq_data_dir):
    data = tmp_path / "data"
    shutil.copytree(mcq_data_dir, data)
    read_only(data)  # no effect for root; the snapshot comparison catches any write either way
    before = tree_state(data)
    cfg = mcq_experiment(tmp_path / "out", data_dir=str(data),
                         custom_tasks=[{"name": t, "path": str(data / f"{t}.jsonl"), "group": "grp"}
                                       for t in ("mcq_a", "mcq_b")])
    chaintune.run(cfg, echo=lambda *_: None, progress=False)
    assert tree_state(data) == before


def test_builtin_data_dir_is_never_written(tmp_path, tiny_model_dir, real_data_dir):
    """A run on a built-in task reads the shared data dir and leaves every entry untouched (size, mtime, listing)."""
    def listing() -> dict[str, tuple]:
        return {str(p.relative_to(real_data_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(real_data_dir.rglob("*"))}

    before = listing()
    cfg = {"model": str(tiny_model_dir), "data_dir": str(real_data_dir), "output_dir": str(tmp_path / "out"),
           "tasks": {"arc_easy": {"train_limit": 8, "eval_limit": 8}}, "training": {"batch_size": 4},
           "chains": [{"name": "a", "stages": [{"task": "arc_easy"}]}]}
    chaintune.run(cfg, echo=lambda *_: None, progress=False)
    assert yaml.safe_load((tmp_path / "out" / "experiment.yaml").read_text())["data_dir"] == str(real_data_dir)
    assert listing() == before
