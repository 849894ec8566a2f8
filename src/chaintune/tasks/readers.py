"""File readers that report the file and line of a malformed record."""
from __future__ import annotations

import csv
import gzip
import json
import zlib
from pathlib import Path
from typing import Any, Iterator

from chaintune.errors import DataError


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _decode_error(path: Path, exc: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})", "re-save the file as UTF-8")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing repeated keys (json.loads would silently keep the last value)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"key '{repeated}' appears twice in one object")
    return obj


def _parse_json(text: str) -> Any:
    """json.loads that reports every malformed input as ValueError (too deep nesting and huge integers included)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _json_problem(exc: ValueError) -> str:
    return f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)


_READ_ERRORS = (OSError, EOFError, zlib.error)  # zlib.error: corrupt gzip data


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a JSON-lines file (optionally gzipped)."""
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = _parse_json(line)
                except ValueError as exc:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({_json_problem(exc)})",
                                    "fix or delete that line (one JSON object per line)") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}",
                                    "write one JSON object per line")
                yield lineno, obj
    except UnicodeDecodeError as exc:
        raise _decode_error(path, exc) from None
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read ({exc})", "check that the file is complete and readable") from None


def read_json(path: Path) -> Any:
    try:
        with _open_text(path) as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise _decode_error(path, exc) from None
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read ({exc})", "check that the file is complete and readable") from None
    try:
        return _parse_json(text)
    except ValueError as exc:
        where = f"{path}:{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else str(path)
        raise DataError(f"{where}: malformed JSON ({_json_problem(exc)})", "fix the file or re-download it") from None


def read_csv(path: Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row) for each CSV row; checks that the `required` columns exist."""
    csv.field_size_limit(1 << 24)
    try:
        with _open_text(path) as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:
                raise DataError(f"{path}: column(s) {', '.join(repeated)} appear more than once in the header",
                                "give every column its own name")
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(reader.fieldnames or [])})",
                                "rename the columns or map them in the task definition")
            for row in reader:
                if None in row:  # more fields than header columns
                    raise DataError(f"{path}:{reader.line_num}: row has more fields than the header",
                                    "quote fields that contain commas")
                yield reader.line_num, row
    except UnicodeDecodeError as exc:
        raise _decode_error(path, exc) from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})", "fix the quoting of that row") from None
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read ({exc})", "check that the file is complete and readable") from None
