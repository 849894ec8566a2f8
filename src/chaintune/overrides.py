"""Key paths into a config mapping: `--set key.path=value` overrides (parse, set, apply; sweeps set their points
the same way) and the blame of a validation problem on the override whose key path it lies on."""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

import yaml

from chaintune.errors import ConfigError, one_line


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` → (['a','b','0','c'], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' has no '='", "write --set key.path=value")
    key, raw = text.split("=", 1)
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", key):
        raise ConfigError(f"override key '{key}' is not a dotted path", "write --set training.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as exc:
        try:
            value = json.loads(raw)  # JSON allows characters YAML refuses (e.g. DEL inside quotes)
        except ValueError:
            if raw[:1] in "\"'[{":  # meant as a quoted or structured value: plain text would be a silent misreading
                raise ConfigError(f"--set {key}: the value is not valid YAML ({one_line(str(exc).splitlines()[0])})",
                                  "quote or escape it as YAML/JSON") from None
            value = raw
    return key.split("."), value


def set_path(data: dict[str, Any], path: list[str], value: Any, what: str) -> None:
    """Set `data[path[0]][path[1]]… = value` (list items by index; missing mapping keys are created)."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            nxt = node[int(part)] if part.isdigit() and int(part) < len(node) else None
        else:
            nxt = node.get(part) if isinstance(node, dict) else None
        if nxt is None:
            nxt = {}
            if isinstance(node, dict):
                node[part] = nxt
            else:
                raise ConfigError(f"{what}: '{'.'.join(path[:i + 1])}' does not exist", "check the key path")
        node = nxt
    last = path[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{what}: cannot set '{last}'", "check the key path")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        set_path(data, path, value, f"override '{text}'")
    return data


def override_of(loc: str, overrides: Sequence[str]) -> str | None:
    """The `--set` text whose key path contains the location `loc` (or lies inside it), if any."""
    path = loc.split(".")
    for text in overrides:
        key = text.split("=", 1)[0].split(".")
        if path[:len(key)] == key or key[:len(path)] == path:
            return f"--set {text}"
    return None


def blame(problems: list[tuple[str, str]], source: str, overrides: Sequence[str]) -> tuple[str, bool]:
    """Every (location, message) problem with what caused it — the `--set` override on whose key path it lies,
    else the config file — and whether all of them came from overrides."""
    parts, all_set = [], True
    for loc, msg in problems:
        cause = override_of(loc, overrides)
        all_set = all_set and cause is not None
        if cause is None and overrides and loc == "(top level)":
            cause = f"{source} with --set {' '.join(overrides)}"
        parts.append(f"{cause or source}: {msg}" if loc == "(top level)" else f"{cause or source}: {loc}: {msg}")
    return "; ".join(parts), all_set
