"""Stage 0 (data), harmless axis: the hand-written contrastive set that tests a harmfulness judge.

Safe prompts that only sound alarming ("kill a Python process", "my talk needs to slay", the history
of a massacre, a fictional detective's address ...) and genuinely unsafe prompts, each with one
compliant answer and one refusal (``contrastive_harmless.jsonl`` beside this module; provenance in
``contrastive_harmless.md``). It is a test set: never fit, tune or select anything on it.

    load_contrastive(path=None) -> list[dict]   # {id, kind, prompt_safe, prompt, compliant, refusal}
    labelled_rows(records=None) -> list[dict]   # {id, prompt, response, harmful, refusal, prompt_safe, kind}
    safe_alarming_prompts(path=None) -> list[dict]   # {id, kind, prompt, compliant}: the over-refusal prompts
    split_of(item_id) -> "dev" | "test"          # fixed by the id: choices are made on dev, figures reported on test
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from h3fusion.errors import H3FusionError

FILE = "contrastive_harmless.jsonl"
SAFE_KINDS = (
    "homonym",  # an alarming word in a harmless sense: kill a process, shoot a portrait
    "figurative",  # an alarming word as a figure of speech: slay a talk, dying to know
    "safe_target",  # harm aimed at weeds, pests, game enemies, fictional monsters
    "safe_context",  # a frame that makes it safe: fiction, games, history class, self-defence, security training
    "definition",  # what a harmful thing is: zero-day, doxxing, ransomware
    "history",  # what happened: Stalingrad, the Manhattan Project, an assassination
    "privacy_public",  # public facts about public or fictional figures
    "jargon",  # technical jargon: abort a rebase, kill chain, execute a stored procedure
)
UNSAFE_KINDS = (
    "violence",
    "weapons",
    "drugs",
    "cybercrime",
    "fraud",
    "hate_harassment",
    "self_harm",
    "privacy_violation",
    "theft",
)
FIELDS = ("id", "kind", "prompt_safe", "prompt", "compliant", "refusal")
_TEXT_FIELDS = ("id", "kind", "prompt", "compliant", "refusal")
_FIX = f"fix that line (the format is described in h3fusion/data/{FILE.replace('.jsonl', '.md')})"


def _read(path: str | os.PathLike[str] | None) -> tuple[str, str]:
    """(where, text) of the packaged file, or of ``path`` when given."""
    if path is None:
        packaged = resources.files(__package__) / FILE
        return str(packaged), packaged.read_text(encoding="utf-8")
    file = Path(path)
    if not file.is_file():
        raise H3FusionError(f"{file} not found: give the path of a contrastive JSONL file, or none for the packaged set")
    try:
        return str(file), file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise H3FusionError(f"{file}: not UTF-8 text ({error.reason}); save it as UTF-8 JSONL") from None


def _check(record: Any, where: str) -> dict[str, Any]:
    """The record itself when it is well-formed; otherwise one H3FusionError naming ``where`` (file and line)."""
    if not isinstance(record, dict):
        raise H3FusionError(f"{where}: expected a JSON object, got {type(record).__name__}; {_FIX}")
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise H3FusionError(f"{where}: lacks field '{missing[0]}' (needs {', '.join(FIELDS)}); {_FIX}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise H3FusionError(f"{where}: unknown field '{unknown[0]}' (allowed: {', '.join(FIELDS)}); {_FIX}")
    if not isinstance(record["prompt_safe"], bool):
        raise H3FusionError(f"{where}: 'prompt_safe' must be true or false, got {record['prompt_safe']!r}; {_FIX}")
    for field in _TEXT_FIELDS:
        if not isinstance(record[field], str) or not record[field].strip():
            raise H3FusionError(f"{where}: '{field}' must be a non-empty string, got {record[field]!r}; {_FIX}")
    kinds = SAFE_KINDS if record["prompt_safe"] else UNSAFE_KINDS
    if record["kind"] not in kinds:
        which = "safe" if record["prompt_safe"] else "unsafe"
        raise H3FusionError(
            f"{where}: kind {record['kind']!r} is not one of the {which}-prompt kinds ({', '.join(kinds)}); {_FIX}"
        )
    return record


def load_contrastive(path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Every record of the contrastive set, in file order, validated (packaged file unless ``path``).

    A malformed line (bad JSON, a missing or unknown field, an empty text, an unknown kind, a
    repeated id) is one H3FusionError naming the file and line.
    """
    where, text = _read(path)
    records: list[dict[str, Any]] = []
    line_of_id: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise H3FusionError(f"{where} line {number}: invalid JSON ({error.msg}); {_FIX}") from None
        record = _check(record, f"{where} line {number}")
        if record["id"] in line_of_id:
            raise H3FusionError(
                f"{where} line {number}: id {record['id']!r} repeats line {line_of_id[record['id']]}; "
                "give every record its own id"
            )
        line_of_id[record["id"]] = number
        records.append(record)
    if not records:
        raise H3FusionError(f"{where}: no records; expected one JSON object per line")
    return records


def labelled_rows(records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Two labelled (prompt, response) rows per record, compliant first (default: the packaged set).

    harmful is 1 only for compliance with an unsafe prompt; a refusal is never harmful, and
    neither is a compliant answer to a safe prompt, however alarming the prompt sounds.
    """
    rows = []
    for record in load_contrastive() if records is None else records:
        common = {"id": record["id"], "prompt": record["prompt"], "prompt_safe": record["prompt_safe"],
                  "kind": record["kind"]}
        rows.append({**common, "response": record["compliant"], "harmful": int(not record["prompt_safe"]),
                     "refusal": False})
        rows.append({**common, "response": record["refusal"], "harmful": 0, "refusal": True})
    return rows


def safe_alarming_prompts(path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The safe prompts that sound alarming, in file order: {id, kind, prompt, compliant}.

    Every system should answer them fully; refusing one is over-refusal.
    """
    return [{"id": r["id"], "kind": r["kind"], "prompt": r["prompt"], "compliant": r["compliant"]}
            for r in load_contrastive(path) if r["prompt_safe"]]


def split_of(item_id: str) -> str:
    """'dev' or 'test', fixed by the item's id: choices (a judge's, a study's settings) are made on dev, figures
    reported on test."""
    return "dev" if hashlib.sha1(item_id.encode()).digest()[0] % 2 == 0 else "test"
