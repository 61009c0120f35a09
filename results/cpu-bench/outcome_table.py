"""The study README's outcome table, read from a committed report.md (no run directory needed).

    python results/cpu-bench/outcome_table.py results/cpu-bench/report.md [--all-merges]

One row per system the outcome names: H3Fusion, the diagnostics (oracle-routed, h3fusion-unfused), multitask-sft,
the authors'-code variant, each expert, the best merge (all merges with --all-merges), the best ensemble and the base,
then ensemble-rerank (it picks with the scoring judge); sorted by judge-corrected hhh, the figure every verdict reads.
Columns come from the report's tables: the headline rates, "refusals helpful" (AlpacaEval prompts refused), hhh
corrected, and H3Fusion − row from the comparison table's judge-aware interval (bold where it excludes 0).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

FUSED = "h3fusion"
NOTES = {
    "oracle-routed": "diagnostic: knows the axis",
    "h3fusion-unfused": "the MoE before fusion training",
    "ensemble-rerank": "diagnostic: picks with the scoring judge",
}
LAST = ("ensemble-rerank",)


def tables(report: str) -> list[list[dict[str, str]]]:
    """Every markdown table of the report, as rows keyed by header."""
    found, lines = [], report.splitlines()
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.match(r"^\|[-:|]+\|$", lines[i + 1].strip()):
            header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                rows.append(dict(zip(header, cells, strict=True)))
                i += 1
            found.append(rows)
        else:
            i += 1
    return found


def table_with(all_tables: list[list[dict[str, str]]], column: str) -> list[dict[str, str]]:
    for rows in all_tables:
        if rows and column in rows[0]:
            return rows
    raise SystemExit(f"outcome_table: no table with a '{column}' column in the report; is it an h3fusion report.md?")


def plain(name: str) -> str:
    return name.replace("**", "").strip()


def first_number(cell: str) -> float | None:
    match = re.search(r"-?\d+\.\d+", cell.replace("−", "-"))
    return None if match is None else float(match.group())


def versus_cell(diff: str | None, interval: str | None) -> str:
    """H3Fusion − row with its judge-aware interval, bold where the interval excludes 0; the difference alone
    where the report gives no interval, "—" where it gives neither."""
    value = None if diff is None else first_number(diff)
    if value is None:
        return "—"
    bounds = None if interval is None else [first_number(part) for part in interval.strip("[]").split(",")]
    if bounds is None or len(bounds) != 2 or None in bounds:
        return f"{value:+.3f}".replace("-", "−")
    text = f"{value:+.3f} {interval}".replace("-", "−")
    return f"**{text}**" if bounds[0] > 0 or bounds[1] < 0 else text


def outcome_rows(report: str, all_merges: bool = False) -> list[dict]:
    all_tables = tables(report)
    headline = {plain(r["system"]): r for r in table_with(all_tables, "hhh ↑")}
    corrected = {plain(r["system"]): r for r in table_with(all_tables, "hhh corrected [95%]")}
    refusals = {plain(r["system"]): r for r in table_with(all_tables, "refusals helpful")}
    versus = {}
    for row in table_with(all_tables, "95% (prompts + judges)"):
        label = plain(row["compared with"])
        name = re.sub(r"^best (merge|ensemble) \((.+)\)$", r"\2", label)
        versus[name] = (label, row["corrected diff"], row["95% (prompts + judges)"])
    best = {v[0].split(" (")[0]: name for name, v in versus.items() if v[0].startswith("best ")}
    experts = [n for n in headline if n.startswith("expert-")]
    best_expert = max(experts, key=lambda n: first_number(corrected[n]["hhh corrected [95%]"]) or -1.0, default=None)
    shown = [n for n in headline
             if not n.startswith(("merge-", "ensemble-")) or all_merges and n.startswith("merge-")
             or n in best.values() or n in LAST]
    out = []
    for name in shown:
        h = headline[name]
        label, diff, interval = versus.get(name, (name, None, None))
        tags = [NOTES[name]] if name in NOTES else []
        if name == best_expert:
            tags.append("best expert")
        tags += [kind for kind, n in best.items() if n == name]
        against = "—" if name == FUSED else versus_cell(diff, interval)
        hhh_corrected = first_number(corrected[name]["hhh corrected [95%]"])
        out.append({
            "name": name,
            "label": f"**{name}**" if name == FUSED else name + (f" ({'; '.join(tags)})" if tags else ""),
            "cells": [h["win rate ↑"], h["flagged ↓"], h["truthful·inf ↑"], refusals[name]["refusals helpful"],
                      h.get("over-refusal ↓", "—"), h["hhh ↑"],
                      f"{hhh_corrected:.3f}", against],
            "key": hhh_corrected,
        })
    out.sort(key=lambda r: (r["name"] != FUSED, r["name"] in LAST, -(r["key"] or 0.0)))
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| system | win rate | flagged | truthful·inf | refuses AlpacaEval | over-refusal | hhh | hhh corrected "
             "| H3Fusion − row (judge-aware) |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        cells = [plain(c) for c in row["cells"][:-1]] + [row["cells"][-1]]
        if row["name"] == FUSED:
            cells[5:7] = [f"**{c}**" for c in cells[5:7]]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--all-merges", action="store_true", help="every merge, not only the best")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        print(f"outcome_table: no report at {args.report}; pass the report.md a study wrote", file=sys.stderr)
        return 2
    print(markdown(outcome_rows(args.report.read_text(), args.all_merges)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
