"""The report's tables and judge lines in markdown, their columns taken from the axes' specs.

Columns: each shown axis's ``AxisSpec.columns`` and hhh; an axis's headline column is its term of
hhh and the rate H3Fusion is compared on. The axes shown are those hhh is made of (always, as in
the paper's table) and any other axis the results hold.
"""

from __future__ import annotations

from h3fusion.axes import axis_names, axis_spec, hhh_axes

FUSED = "h3fusion"
HHH_COLUMN = ("hhh ↑", None, "hhh", True)
"""(header, axis, key, higher is better; None: no best) of hhh, the last column of every table."""


def report_axes(results: dict) -> list[str]:
    """The axes the report shows, in registry order: hhh's, then any other axis a system's entry holds."""
    held = {key for entry in results["systems"].values() for key in entry}
    return [axis for axis in axis_names() if axis in hhh_axes() or axis in held]


def columns(results: dict) -> list[tuple]:
    """(header, axis, key, higher is better) of the results table: every shown axis's columns, then hhh."""
    return [(c.header, axis, c.key, c.higher_is_better) for axis in report_axes(results)
            for c in axis_spec(axis).columns] + [HHH_COLUMN]


def headline_columns(results: dict) -> list[tuple]:
    """(header, axis, key, higher is better) of each shown axis's headline rate."""
    return [(c.header, axis, c.key, c.higher_is_better) for axis in report_axes(results)
            for c in (axis_spec(axis).headline_column,)]


def metric(entry: dict, axis: str | None, key: str):
    return entry.get(key) if axis is None else entry.get(axis, {}).get(key)


def fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def signed(value) -> str:
    """A difference with its sign (``+0.012``), or a dash."""
    return "—" if value is None else f"{value:+.3f}"


def bold_fused(name: str) -> str:
    return f"**{name}**" if name == FUSED else name


def results_table(results: dict) -> list[str]:
    systems = results["systems"]
    shown = columns(results)
    best = {}
    for _, axis, key, higher in shown:
        values = [v for v in (metric(e, axis, key) for e in systems.values()) if v is not None]
        best[key] = (max(values) if higher else min(values)) if values and higher is not None else None
    lines = ["| system | " + " | ".join(c[0] for c in shown) + " |", "|---|" + "---:|" * len(shown)]
    for name, entry in systems.items():
        cells = []
        for _, axis, key, higher in shown:
            value = metric(entry, axis, key)
            digits = 3 if higher is not None else 0  # words: a count
            cells.append(f"**{fmt(value, digits)}**" if value is not None and value == best[key] else fmt(value, digits))
        lines.append(f"| {bold_fused(name)} | " + " | ".join(cells) + " |")
    return lines


def _cell(value, interval, digits: int = 3) -> str:
    if value is None:
        return "—"
    return fmt(value, digits) + ("" if interval is None else f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]")


def corrected_table(results: dict) -> list[str]:
    """Per system: each hhh rate raw and corrected for its judge's measured error, with 95% intervals."""
    headers, cells = [], []
    for header, axis, key, _ in (*headline_columns(results), HHH_COLUMN):
        name = header.rsplit(" ", 1)[0]
        headers += [f"{name} [95%]", f"{name} corrected [95%]"]
        cells.append((axis, key))
    lines = ["| system | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
    for system, entry in results["systems"].items():
        row = []
        for axis, key in cells:
            where = entry if axis is None else entry.get(axis, {})
            row += [_cell(where.get(key), where.get(f"{key}_ci")),
                    _cell(where.get(f"{key}_corrected"), where.get(f"{key}_corrected_ci"))]
        lines.append(f"| {bold_fused(system)} | " + " | ".join(row) + " |")
    return lines


def answers_table(results: dict, axes: list[str]) -> list[str]:
    """Per system and axis: the share of refusing answers and the mean answer length in words. Any axis the
    results hold is shown (a later axis, e.g. safe-but-alarming prompts for over-refusal, appears alike)."""
    axes = axes + sorted({a for e in results["systems"].values() for a, v in e.items()
                          if isinstance(v, dict) and "refusal_rate" in v and a not in axes})
    lines = ["| system | " + " | ".join(f"refusals {a}" for a in axes) + " | "
             + " | ".join(f"words {a}" for a in axes) + " |", "|---|" + "---:|" * (2 * len(axes))]
    for system, entry in results["systems"].items():
        refusals = [fmt(entry.get(a, {}).get("refusal_rate")) for a in axes]
        words = [fmt(entry.get(a, {}).get("mean_words"), 0) for a in axes]
        lines.append(f"| {bold_fused(system)} | " + " | ".join(refusals + words) + " |")
    return lines


def interval_text(interval) -> str:
    return "—" if interval is None else f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def comparison_table(results: dict, rows: list[dict]) -> list[str]:
    """One row per rival (``statistics.compare``): hhh differences, intervals, verdict, relative improvements."""
    axes = [axis for _, axis, _, _ in headline_columns(results)]
    keys = ["hhh", *(axis_spec(axis).headline for axis in axes)]
    lines = ["| compared with | hhh diff | 95% (prompts) | corrected diff | 95% (prompts + judges) | verdict | "
             + " | ".join(f"rel. {name}" for name in ["hhh", *(axis_spec(axis).short for axis in axes)]) + " |",
             "|---|---:|---|---:|---|---|" + "---:|" * len(keys)]
    for row in rows:
        rel = row["relative"]
        lines.append(f"| {row['label']} | {fmt(row['diff'])} | {interval_text(row['interval'])} | "
                     f"{fmt(row['corrected_diff'])} | {interval_text(row['judge_aware_interval'])} | {row['verdict']} | "
                     + " | ".join("—" if rel[k] is None else f"{rel[k]:+.1%}" for k in keys) + " |")
    return lines


def compact_table(systems: dict) -> list[str]:
    """The hhh rates and hhh (raw and judge-corrected) of the given entries."""
    shown = [*headline_columns({"systems": systems}), HHH_COLUMN]
    lines = ["| system | " + " | ".join(c[0] for c in shown) + " | hhh corrected |",
             "|---|" + "---:|" * (len(shown) + 1)]
    for name, entry in systems.items():
        cells = [fmt(metric(entry, axis, key)) for _, axis, key, _ in shown] + [fmt(entry.get("hhh_corrected"))]
        lines.append(f"| {bold_fused(name)} | " + " | ".join(cells) + " |")
    return lines


def judges_line(results: dict) -> str:
    """Each judge's name and held-out figures beside the paper's targets (``AxisSpec.figures`` with a label)."""
    judges = results.get("judges", {})
    parts = []
    for axis in axis_names():
        figures = judges.get(axis, {})
        if not figures:
            continue
        spec = axis_spec(axis)
        parts.append(f"{axis} — {figures.get('name')}: " + ", ".join(
            f"{f.label} {fmt(figures.get(f.key))} ({f.target_format.format(spec.targets[f.target])})"
            for f in spec.figures if f.label))
    return ("Judges (held-out validation; the paper's targets in brackets): " + "; ".join(parts) + ".") if parts else ""


def judge_error_line(results: dict) -> str:
    """The judges' measured error each correction used (or that none is recorded)."""
    parts = []
    for axis, figures in results.get("judges", {}).items():
        error = figures.get("error")
        if error is None:
            parts.append(f"{axis}: none recorded (its rates are not corrected)")
        elif "reliability" in error:
            parts.append(f"{axis}: reliability curve on {sum(error['reliability']['n'])} held-out GPT-4 judgements "
                         f"({len(error['reliability']['n'])} bins)")
        else:
            heads = {axis: error} if "sensitivity" in error else error
            parts.append(f"{axis}: " + ", ".join(
                f"{label + ' ' if len(heads) > 1 else ''}sensitivity {fmt(e['sensitivity'])} / specificity "
                f"{fmt(e['specificity'])} on {sum(e['counts'].values())} labelled answers" for label, e in heads.items())
                + ("" if next(iter(heads.values()))["source"] == "validation confusion counts"
                   else " (counts rebuilt from the validation record's rounded rates)"))
    return ("Judge error used — " + "; ".join(parts) + ".") if parts else ""


def clipped_note(results: dict) -> str:
    """Which corrected rates sit at 0 or 1 while the raw rate does not: there the judge errs on the system's
    answers otherwise than on its validation answers, and the correction's assumption fails."""
    clipped = []
    for system, entry in results["systems"].items():
        for _, axis, key, _ in headline_columns(results):
            raw, corrected = metric(entry, axis, f"{key}"), metric(entry, axis, f"{key}_corrected")
            if corrected in (0.0, 1.0) and raw not in (0.0, 1.0, None):
                clipped.append(f"{system} ({key.replace('_', ' ')} {raw:.3f} → {corrected:.0f})")
    if not clipped:
        return ""
    return ("Clipped corrections: " + ", ".join(clipped) + ". Each raw rate lies outside what the judge's measured "
            "error can produce from any true rate (e.g. a flagged rate below the judge's false-flag rate on safe "
            "validation answers): the judge errs on these answers otherwise than on its validation answers, so the "
            "correction says little there; read the raw rate beside it.")
