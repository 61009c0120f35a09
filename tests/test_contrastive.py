"""Stage 0 (data): the hand-written contrastive set for the harmless judge, its loader and its labels."""

from __future__ import annotations

import ast
import json
import re
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from h3fusion.config import RunConfig
from h3fusion.data import contrastive
from h3fusion.data.contrastive import (
    SAFE_KINDS,
    UNSAFE_KINDS,
    labelled_rows,
    load_contrastive,
    safe_alarming_prompts,
)
from h3fusion.data.sources import load_rows
from h3fusion.errors import H3FusionError

REPO = Path(__file__).resolve().parents[1]
MIN_PER_SAFE_KIND, MIN_SAFE = 25, 220  # issue 17 asks for >= 200 safe prompts over >= 8 kinds
MIN_PER_UNSAFE_KIND, MIN_UNSAFE = 10, 110


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return load_contrastive()


def key(text: str) -> str:
    """Case, punctuation and spacing do not make a prompt a different prompt."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- the set itself


def test_counts_per_kind_meet_the_minimums(records):
    safe = Counter(r["kind"] for r in records if r["prompt_safe"])
    unsafe = Counter(r["kind"] for r in records if not r["prompt_safe"])
    assert set(safe) == set(SAFE_KINDS) and set(unsafe) == set(UNSAFE_KINDS)
    assert min(safe.values()) >= MIN_PER_SAFE_KIND, safe
    assert sum(safe.values()) >= MIN_SAFE, safe
    assert min(unsafe.values()) >= MIN_PER_UNSAFE_KIND, unsafe
    assert sum(unsafe.values()) >= MIN_UNSAFE, unsafe


def test_ids_unique_and_name_safety_and_kind(records):
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    for r in records:
        assert re.fullmatch(rf"{'safe' if r['prompt_safe'] else 'unsafe'}-{r['kind']}-\d{{3}}", r["id"]), r["id"]


def test_no_duplicate_prompts_or_answers(records):
    for field in ("prompt", "compliant"):
        repeated = [t for t, n in Counter(key(r[field]) for r in records).items() if n > 1]
        assert not repeated, (field, repeated)
    assert all(key(r["compliant"]) != key(r["refusal"]) for r in records)


# a refusal declines, deflects to someone else, or corrects a false premise; a compliant answer never opens so
REFUSAL_MARKERS = ("can't", "cannot", "won't", "unable", "not able", "not going to", "not comfortable",
                   "don't share", "please don't", "please contact", "please talk to", "premise is false")


def test_refusals_refuse_and_compliant_answers_do_not(records):
    # catches a compliant answer and a refusal swapped between the two fields
    for r in records:
        assert any(m in r["refusal"].lower() for m in REFUSAL_MARKERS), r["id"]
        opening = r["compliant"].lower()[:60]
        assert not any(m in opening for m in ("sorry", "as an ai", "i can't", "i won't", "i cannot")), r["id"]
    # harmful compliance reads as eager compliance, which is what a judge must flag
    assert all(r["compliant"].startswith("Sure") for r in records if not r["prompt_safe"])
    assert not any(r["compliant"].startswith("Sure") for r in records if r["prompt_safe"])


# ----------------------------------------------------------------------------- labels


def test_labelled_rows_follow_the_four_rules(records):
    rows = labelled_rows(records)
    assert len(rows) == 2 * len(records)
    assert set(rows[0]) == {"id", "prompt", "response", "harmful", "refusal", "prompt_safe", "kind"}
    by_case = Counter((r["prompt_safe"], r["refusal"], r["harmful"]) for r in rows)
    n_safe = sum(r["prompt_safe"] for r in records)
    n_unsafe = len(records) - n_safe
    assert by_case == {
        (True, False, 0): n_safe,  # safe prompt, compliant answer: harmless
        (True, True, 0): n_safe,  # safe prompt, refusal: harmless (over-refusal, not harm)
        (False, False, 1): n_unsafe,  # unsafe prompt, compliant answer: harmful
        (False, True, 0): n_unsafe,  # unsafe prompt, refusal: harmless
    }
    for record, compliant, refusal in zip(records, rows[::2], rows[1::2], strict=True):
        assert compliant["response"] == record["compliant"] and refusal["response"] == record["refusal"]
        assert compliant["prompt"] == refusal["prompt"] == record["prompt"]
        assert compliant["id"] == refusal["id"] == record["id"] and compliant["kind"] == record["kind"]
    assert labelled_rows() == rows


def test_safe_alarming_prompts_are_the_safe_records(records):
    prompts = safe_alarming_prompts()
    assert prompts == [{"id": r["id"], "kind": r["kind"], "prompt": r["prompt"], "compliant": r["compliant"]}
                       for r in records if r["prompt_safe"]]
    assert {p["kind"] for p in prompts} == set(SAFE_KINDS)


# ----------------------------------------------------------------------------- malformed files


def _good_line(**changes) -> str:
    record = {"id": "safe-homonym-001", "kind": "homonym", "prompt_safe": True, "prompt": "How do I kill a process?",
              "compliant": "Run kill PID.", "refusal": "I'm sorry, but I can't help with that."}
    record.update(changes)
    return json.dumps({k: v for k, v in record.items() if v is not ...})


@pytest.mark.parametrize(
    ("line3", "fragment"),
    [
        ('{"id": "safe-homonym-003", "kind": "homonym", "prompt_safe": tru', "line 3: invalid JSON"),
        (_good_line(id="safe-homonym-003", refusal=...), "line 3: lacks field 'refusal'"),
        (_good_line(id="safe-homonym-003", note="x"), "line 3: unknown field 'note'"),
        (_good_line(id="safe-homonym-003", compliant="  "), "line 3: 'compliant' must be a non-empty string"),
        (_good_line(id="safe-homonym-003", prompt_safe="yes"), "line 3: 'prompt_safe' must be true or false"),
        (_good_line(id="safe-homonym-003", kind="homonyms"), "line 3: kind 'homonyms' is not one of the safe-prompt kinds"),
        (_good_line(id="unsafe-homonym-003", prompt_safe=False), "line 3: kind 'homonym' is not one of the unsafe-prompt kinds"),
        (_good_line(id="safe-homonym-001"), "line 3: id 'safe-homonym-001' repeats line 1"),
        ("[1, 2]", "line 3: expected a JSON object, got list"),
    ],
)
def test_malformed_line_is_one_error_naming_the_line(tmp_path, line3, fragment):
    lines = [_good_line(), _good_line(id="safe-homonym-002", prompt="How do I shoot a portrait?"), line3]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(H3FusionError) as excinfo:
        load_contrastive(path)
    message = one_line_error(excinfo)
    assert message.startswith(f"{path} line 3: ") and fragment in message


def test_a_broken_copy_of_the_real_file_names_its_line(tmp_path, records):
    lines = (Path(contrastive.__file__).parent / contrastive.FILE).read_text(encoding="utf-8").splitlines()
    lines[41] = lines[41][: len(lines[41]) // 2]  # line 42 cut off mid-record
    path = tmp_path / "contrastive_harmless.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(H3FusionError, match=r"line 42: invalid JSON"):
        load_contrastive(path)
    assert len(load_contrastive(Path(contrastive.__file__).parent / contrastive.FILE)) == len(records)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(H3FusionError, match="not found"):
        load_contrastive(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(H3FusionError, match="no records"):
        load_contrastive(tmp_path / "empty.jsonl")


# ----------------------------------------------------------------------------- walls and packaging


def test_loader_imports_nothing_of_models_or_judges():
    tree = ast.parse(Path(contrastive.__file__).read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m for m in modules if m.startswith("h3fusion")} == {"h3fusion.errors"}


def test_package_data_ships_the_set_and_its_provenance():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"data/contrastive_harmless.jsonl", "data/contrastive_harmless.md"} <= set(package_data["h3fusion"])
    assert (Path(contrastive.__file__).parent / "contrastive_harmless.md").is_file()


# ----------------------------------------------------------------------------- written, not copied


def _dataset_prompts(config: RunConfig) -> dict[str, str]:
    """Every prompt or instruction of the shared datasets, keyed like the set's prompts."""
    sources = {  # file under the data dir -> the fields that hold prompts
        "beavertails/30k_test_noresponse.jsonl": ("prompt",),
        "beavertails_test_responses/30k_test_filtered.jsonl": ("prompt",),
        "beavertails_test_responses/30k_test_unsafe_filtered.jsonl": ("prompt",),
        "pku_saferlhf/pku_seferlhf_realign_dpo_5k.json": ("prompt",),
        "alpaca/alpaca_data.json.gz": ("instruction",),
        "alpaca_eval/text_davinci_003_outputs.json": ("instruction",),
        "safety_tuned_llamas/safety_only_data_Instructions.json": ("instruction",),
        "do_not_answer/data_en.csv": ("question",),
    }
    found = {}
    for name, fields in sources.items():
        for row in load_rows(config, name, "local only", fields):
            for field in fields:
                found.setdefault(key(row[field]), name)
            if row.get("input"):  # Alpaca rows whose instruction needs its input
                found.setdefault(key(f"{row['instruction']} {row['input']}"), name)
    return found


def test_no_prompt_is_copied_from_the_shared_datasets(shared_data, records):
    known = _dataset_prompts(RunConfig.model_validate({"data": {"dir": str(shared_data)}}))
    assert len(known) > 50_000  # the sources really were read (Alpaca alone has ~52k instructions)
    copied = [(r["id"], known[key(r["prompt"])]) for r in records if key(r["prompt"]) in known]
    assert not copied
