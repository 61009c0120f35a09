"""The study README's outcome table is what ``results/cpu-bench/outcome_table.py`` reads from the committed report:
for recipe C's scoring, every row of the README's table (figures and H3Fusion − row) equals the script's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

STUDY = Path(__file__).resolve().parents[1] / "results" / "cpu-bench"


def outcome_table():
    spec = importlib.util.spec_from_file_location("outcome_table", STUDY / "outcome_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(table: str) -> dict[str, tuple[str, ...]]:
    """System name -> its cells, bold and minus signs normalised (the README bolds only verdicts it discusses)."""
    out = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
        out[cells[0].split(" (")[0]] = tuple(c.replace("-", "−") for c in cells[1:])
    return out


def readme_table(text: str, heading: str) -> str:
    section = text.split(heading, 1)[1]
    start = section.index("| system | win rate | flagged")
    return section[start:section.index("\n\n", start)]


def test_recipe_c_readme_table_is_the_script_output():
    script = outcome_table()
    produced = rows(script.markdown(script.outcome_rows((STUDY / "recipe-c" / "report.md").read_text())))
    committed = rows(readme_table((STUDY / "README.md").read_text(), "## The first scoring, recipe C"))
    assert committed == produced
    assert list(produced)[0] == "h3fusion" and len(produced) == 12  # the other merges stay in the report
