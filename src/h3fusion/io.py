"""Files every stage writes: atomic JSON, and append-only JSONL whose last line a kill may cut.

A stage's "done" marker is always an atomically written JSON file, so a killed stage never looks
complete; JSONL outputs are appended record by record and repaired on resume.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from h3fusion.errors import H3FusionError


def write_text(path: Path, text: str) -> None:
    """Atomic write (temp file + rename): a kill mid-write never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, payload) -> None:
    """Atomic JSON write: a kill mid-write never leaves a truncated file that looks complete."""
    write_text(path, json.dumps(payload, indent=2, allow_nan=True))


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    """Atomic JSONL write, for files derived whole from others (rewritten, never appended)."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path, *, repair: bool = False) -> list[dict]:
    """Records of a JSONL file. ``repair`` truncates an incomplete last line (a killed writer's)
    instead of failing; any other corrupt line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise H3FusionError(f"{path} not found")
    records, good_bytes = [], 0
    with path.open("rb") as handle:
        lines = handle.readlines()
    for number, raw in enumerate(lines, 1):
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            if repair and number == len(lines):
                _truncate(path, good_bytes)
                break
            raise H3FusionError(f"{path} line {number} is not a valid JSON object ({error}); "
                                "fix or remove that line") from None
        if repair and not raw.endswith(b"\n"):  # complete JSON but no newline: the writer died here
            _truncate(path, good_bytes)
            break
        records.append(record)
        good_bytes += len(raw)
    return records


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as handle:
        handle.truncate(size)


def append_jsonl(path: Path, records: Sequence[dict]) -> None:
    """Append records, one line each, flushed to disk before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
