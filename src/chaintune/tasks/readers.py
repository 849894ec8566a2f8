"""File readers that report the file and line of a malformed record."""
from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any, Iterator

from chaintune.errors import DataError


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _decode_error(path: Path, exc: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})", "re-save the file as UTF-8")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a JSON-lines file (optionally gzipped)."""
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})",
                                    "fix or delete that line (one JSON object per line)") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}",
                                    "write one JSON object per line")
                yield lineno, obj
    except UnicodeDecodeError as exc:
        raise _decode_error(path, exc) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})", "check that the file is complete and readable") from None


def read_json(path: Path) -> Any:
    try:
        with _open_text(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})", "fix the file or re-download it") from None
    except UnicodeDecodeError as exc:
        raise _decode_error(path, exc) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})", "check that the file is complete and readable") from None


def read_csv(path: Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row) for each CSV row; checks that the `required` columns exist."""
    csv.field_size_limit(1 << 24)
    try:
        with _open_text(path) as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
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
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})", "check that the file is complete and readable") from None
