"""Stage 0 (data): where a dataset comes from, and reading it.

Every dataset has a path relative to the local data directory (laid out like ``shared/data``)
and a Hugging Face hub equivalent. A run reads local files when a data directory is
configured (``data.dir`` or ``$H3FUSION_DATA_DIR``), else the hub. Anything a user can fix
(missing directory or file, corrupt line, unreachable hub) becomes a one-line H3FusionError
that names the file and the fix.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from h3fusion.config import RunConfig
from h3fusion.errors import H3FusionError

log = logging.getLogger(__name__)

_SET_DIR = "set H3FUSION_DATA_DIR (or data.dir in the config) to a directory laid out like shared/data"


@dataclass(frozen=True)
class HubSource:
    """A hub dataset: ``load_dataset(repo, name, split=split)``, or one JSON file of the repo."""

    repo: str
    name: str | None = None
    split: str = "train"
    file: str | None = None
    """Read this file of the repo as JSON instead (for datasets whose loading script
    `datasets` >= 4 no longer runs, e.g. tatsu-lab/alpaca_eval)."""

    def __str__(self) -> str:
        return f"{self.repo} ({self.file or '/'.join(p for p in (self.name, self.split) if p)})"


def data_root(config: RunConfig) -> Path | None:
    """The configured local data directory (checked to exist), or None for the hub."""
    root = config.data_dir()
    if root is not None and not root.is_dir():
        origin = "data.dir in the config" if config.data.dir else "H3FUSION_DATA_DIR"
        raise H3FusionError(
            f"data directory {root} (from {origin}) does not exist: point it at a directory laid out "
            "like shared/data, or leave data.dir and H3FUSION_DATA_DIR unset to read the Hugging Face hub"
        )
    return root


def where(config: RunConfig, local: str, hub: HubSource | str) -> str:
    """The file (or hub dataset) a loader reads, for messages."""
    root = data_root(config)
    return str(root / local) if root is not None else str(hub)


def load_rows(
    config: RunConfig, local: str, hub: HubSource | str, fields: Sequence[str] = ()
) -> Sequence[dict[str, Any]]:
    """Rows of ``local`` under the data directory, or of ``hub`` when there is none.

    ``hub`` may be a plain description when the dataset has no hub form (then the hub is
    never read). The rows are shared with a cache: read them, never modify them.
    """
    root = data_root(config)
    if root is None:
        if isinstance(hub, str):
            raise H3FusionError(f"{local} exists only as a local file: {_SET_DIR}")
        rows, origin = hub_rows(hub), str(hub)
    else:
        path = root / local
        if not path.is_file():
            raise H3FusionError(f"{path} not found: {_SET_DIR}, or leave both unset to read the hub dataset {hub}")
        rows, origin = read_rows(path), str(path)
    check_fields(rows, fields, origin)
    return rows


def check_fields(rows: Sequence[Any], fields: Sequence[str], origin: str) -> None:
    for i, row in enumerate(rows):
        missing = [f for f in fields if not isinstance(row, dict) or f not in row]
        if missing:
            has = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise H3FusionError(
                f"{origin}: record {i} lacks field '{missing[0]}' (has: {has}); "
                "re-copy the file from the source listed in shared/data/SOURCES.md"
            )


# ----------------------------------------------------------------------------- local files


def read_rows(path: str | Path) -> Sequence[dict[str, Any]]:
    """Records of a .json / .jsonl / .csv file (each optionally .gz). Cached until the file changes."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise H3FusionError(f"{path} not found: {_SET_DIR}") from None
    return _read_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _read_cached(name: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], ...]:
    fix = "re-copy it from the source listed in shared/data/SOURCES.md"
    suffix = name.removesuffix(".gz").rsplit(".", 1)[-1]
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(name, "rt", encoding="utf-8-sig", newline="" if suffix == "csv" else None) as f:
            if suffix == "jsonl":
                rows = []
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise H3FusionError(f"{name} line {number}: invalid JSON ({error.msg}); {fix}") from None
            elif suffix == "json":
                rows = json.load(f)
                if not isinstance(rows, list):
                    raise H3FusionError(f"{name}: expected a JSON list of records, got {type(rows).__name__}; {fix}")
            elif suffix == "csv":
                reader = csv.DictReader(f)
                try:
                    rows = list(reader)
                except csv.Error as error:
                    raise H3FusionError(f"{name} line {reader.line_num}: malformed CSV ({error}); {fix}") from None
            else:
                raise H3FusionError(f"{name}: unknown format (expected .json, .jsonl or .csv, optionally .gz)")
    except json.JSONDecodeError as error:
        raise H3FusionError(f"{name} line {error.lineno}: invalid JSON ({error.msg}); {fix}") from None
    except (OSError, EOFError, UnicodeDecodeError) as error:  # bad gzip, truncated file, wrong encoding
        raise H3FusionError(f"{name}: unreadable ({type(error).__name__}: {error}); {fix}") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise H3FusionError(f"{name}: record {i} is a {type(row).__name__}, not an object; {fix}")
    return tuple(rows)


# ----------------------------------------------------------------------------- hub


@functools.lru_cache(maxsize=16)
def hub_rows(source: HubSource) -> tuple[dict[str, Any], ...]:
    """All rows of a hub split, via ``datasets`` (imported here: the local path never needs it)."""
    try:
        import datasets

        if source.file:
            ds = datasets.load_dataset(
                "json", data_files=f"hf://datasets/{source.repo}/{source.file}", split="train"
            )
        else:
            ds = datasets.load_dataset(source.repo, source.name, split=source.split)
        return tuple(ds.to_list())
    except Exception as error:  # network, auth, renamed dataset ...: all fixable by using local files
        detail = (str(error).strip().splitlines() or [""])[0][:200]
        raise H3FusionError(
            f"could not read the hub dataset {source} ({type(error).__name__}: {detail}); check the network "
            f"and HF_HUB_OFFLINE, or {_SET_DIR}"
        ) from None


# ----------------------------------------------------------------------------- shared helpers


def norm(text: str) -> str:
    """Key for matching prompts across datasets: case and whitespace do not make a prompt new."""
    return " ".join(text.split()).lower()


def seed_of(config: RunConfig) -> int:
    return config.data.seed if config.data.seed is not None else config.seed


def sample_with_share(items: Sequence[Any], size: int | None, seed: int, share: float | None,
                      is_special: Callable[[Any], bool], what: str = "items") -> list[Any]:
    """Like ``sample``, but ``share`` of the ``size`` items are drawn from those ``is_special`` accepts and
    the rest from the others (each part seeded, kept in original order). None: a plain ``sample``."""
    if share is None or size is None:
        return sample(items, size, seed, what)
    special = [i for i, item in enumerate(items) if is_special(item)]
    other = [i for i, item in enumerate(items) if not is_special(item)]
    wanted = round(size * share)
    if wanted > len(special) or size - wanted > len(other):
        raise H3FusionError(
            f"asked for {size} {what} with a share of {share:g} ({wanted}) from {len(special)} special and "
            f"{size - wanted} from {len(other)} other ones: lower the size or change the share"
        )
    rng = random.Random(seed)
    keep = sorted(rng.sample(special, wanted) + rng.sample(other, size - wanted))
    return [items[i] for i in keep]


def sample(items: Sequence[Any], size: int | None, seed: int, what: str = "items") -> list[Any]:
    """A seeded subset of ``size`` items kept in their original order (None or too few: all)."""
    if size is None or size >= len(items):
        if size is not None and size > len(items):
            log.warning("asked for %d %s but only %d exist; using all of them", size, what, len(items))
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), size))
    return [items[i] for i in keep]
