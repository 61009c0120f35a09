"""Files every stage writes: atomic JSON, and append-only JSONL whose last line a kill may cut.

A stage's "done" marker is always an atomically written JSON file, so a killed stage never looks
complete; JSONL outputs are appended record by record and repaired on resume.

A write the machine refuses (a full disk, a quota, a read-only mount, no permission) becomes one
``H3FusionError`` line naming the path, the free space there and about what the stage needs
(``stage_writes``): the stage is left unfinished, so the same command redoes it once there is room.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from h3fusion.errors import H3FusionError

WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large", errno.EROFS: "read-only file system",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}
"""OS errors that say the place cannot take the write: the fix is the user's (space, quota, mount, rights)."""
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust writers (safetensors) report an OS error
_TORCH_WRITER = re.compile(r"PytorchStreamWriter|unexpected pos \d+|basic_ios::clear")  # torch.save: no errno kept


def write_errno(error: BaseException) -> int | None:
    """The errno of an OS write failure, however the writing library reported it: an ``OSError``,
    safetensors' ``... (os error 28)``, or 0 for torch.save's writer failing (it keeps no errno).
    None for anything else, and for an error already turned into an ``H3FusionError``."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen and not isinstance(error, H3FusionError):
        seen.add(id(error))
        if isinstance(error, OSError):
            if error.errno in WRITE_ERRNOS:
                return error.errno
        else:
            match = _RUST_OS_ERROR.search(str(error))
            if match and int(match[1]) in WRITE_ERRNOS:
                return int(match[1])
            if isinstance(error, RuntimeError) and _TORCH_WRITER.search(str(error)):
                return 0
        error = error.__cause__ or error.__context__
    return None


def _failed_file(error: BaseException) -> str | None:
    """The file an OSError in ``error``'s chain names (open() and our writers set it), if any."""
    while error is not None and not isinstance(error, H3FusionError):
        if isinstance(error, OSError) and error.filename:
            return os.fsdecode(error.filename)
        error = error.__cause__ or error.__context__
    return None


def free_space(path: str | Path) -> int | None:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    for place in (Path(path), *Path(path).parents):
        if place.exists():
            try:
                return shutil.disk_usage(place).free
            except OSError:
                return None
    return None


def human_size(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def write_failure(error: BaseException, path: str | Path | None = None, doing: str | None = None,
                  need: int | None = None) -> str | None:
    """The one-line message for an OS write failure (None when ``error`` is not one): the file written
    (from the error, else ``path``), why, the free space there and about what ``doing`` needs."""
    code = write_errno(error)
    if code is None:
        return None
    where = _failed_file(error) or (str(path) if path is not None else None)
    facts = []
    if code:
        reason = WRITE_ERRNOS[code]
    else:  # torch.save lost the errno: its own words, and the free space tells the rest
        reason = "the write was cut short"
        facts.append(f"torch: {str(error).splitlines()[0].split('] . ')[-1].strip()}")
    free = free_space(where) if where else None
    if free is not None:
        facts.append(f"{human_size(free)} free there")
    if need and doing:
        facts.append(f"{doing} needs about {human_size(need)}")
    elif doing:
        facts.append(f"while {doing}")
    fix = "make it writable" if code in (errno.EROFS, errno.EACCES, errno.EPERM) else "free some space there"
    return (f"{'cannot write ' + where if where else 'a write failed'}: {reason}"
            + (f" ({'; '.join(facts)})" if facts else "")
            + f"; {fix} or write elsewhere (--out DIR), then rerun the same command: it redoes what is unfinished")


@contextmanager
def stage_writes(path: str | Path, doing: str, need: int | None = None,
                 cleanup: Callable[[], object] | None = None) -> Iterator[None]:
    """Turn an OS write failure inside the block into one ``H3FusionError`` line (see ``write_failure``;
    the free space it gives is after ``cleanup`` removed the partial output). The stage's completion
    marker is written last, so it is never there: the next call redoes the stage. Anything else passes
    through untouched."""
    try:
        yield
    except Exception as error:
        if write_errno(error) is None:
            raise
        if cleanup is not None:
            with suppress(OSError):
                cleanup()
        raise H3FusionError(write_failure(error, path, doing, need)) from error


def _name_file(error: OSError, path: Path) -> None:
    """Make a write error name the file (a failing write() names none)."""
    if error.filename is None or str(error.filename).endswith(".tmp"):
        error.filename = str(path)


def write_text(path: Path, text: str) -> None:
    """Atomic write (temp file + rename): a kill mid-write never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as error:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)  # a full disk keeps no half-written temp file
        _name_file(error, path)
        raise


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
    try:
        with path.open("a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:  # a cut last line is repaired by the next read (``read_jsonl(repair=True)``)
        _name_file(error, path)
        raise
