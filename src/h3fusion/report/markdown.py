"""The markdown report, ``<run>/report.md``, from results.json and the judgements (``write_report`` also draws
the plots and writes the fused model's card).

The report opens with the outcome in one paragraph and the paper-style table, then the rates
corrected for the judges' measured error, refusals and answer lengths, whether the experts specialise
(``report.specialisation``), and H3Fusion against every rival system: the relative improvement (formula
stated in the report) and paired bootstrap intervals of the hhh difference, one over prompts (the judges
taken as exact) and one that also resamples the judges' validation sets; a verdict is "ahead" or "behind"
only when the judge-aware interval excludes 0. Then the routing ceiling (H3Fusion vs oracle-routed vs the
best expert, and the MoE before fusion training where the run has it), the study's targets
(``report.targets``) and, for a run larger than the paper's protocol, the figures on the paper's prefixes. A
dev-split report of a run without H3Fusion leaves out the sections about it, saying so. The statistics live in
``report.statistics`` (over ``rates`` and ``stats``), the tables in ``report.tables``; everything is
computed from files the earlier stages wrote; nothing here runs a model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from h3fusion import runs
from h3fusion.axes import axis_spec, hhh_formula
from h3fusion.baselines.ensembles import RERANK
from h3fusion.baselines.oracle import ORACLE
from h3fusion.baselines.unfused import UNFUSED
from h3fusion.config import RunConfig
from h3fusion.errors import H3FusionError
from h3fusion.report.card import write_model_card
from h3fusion.report.plots import write_plots
from h3fusion.report.specialisation import headline_versus, specialisation, write_specialisation
from h3fusion.report.statistics import best_of, compare, hhh_replicates, judge_rates, read_interval
from h3fusion.report.tables import (
    FUSED,
    HHH_COLUMN,
    answers_table,
    clipped_note,
    compact_table,
    comparison_table,
    corrected_table,
    fmt,
    headline_columns,
    interval_text,
    judge_error_line,
    judges_line,
    metric,
    report_axes,
    results_table,
    signed,
)
from h3fusion.report.targets import (
    AXIS_LOSS_ALLOWED,
    MISSED,
    Target,
    check_targets,
    rival_system,
    routing_accuracy,
)
from h3fusion.stats import BOOTSTRAP_SAMPLES

DIAGNOSTICS = {RERANK: "picks each answer with the scoring judge", ORACLE: "knows each prompt's axis",
               UNFUSED: "the MoE before fusion training"}
"""Systems that are not deployable rivals (they borrow the scoring judge or the prompt's axis, or are H3Fusion
half-made): each keeps its comparison row, but none stands as the best of its kind in the outcome."""


def comparisons(results: dict) -> list[tuple[str, str]]:
    """(label, system) of every deployable alternative the outcome names, in report order: each expert, the
    best merge, the best ensemble (never a diagnostic), multitask-sft and base."""
    systems = {name: entry for name, entry in results["systems"].items() if name not in DIAGNOSTICS}
    rows = [(s, s) for s in systems if s.startswith("expert-")]
    for prefix, label in (("merge-", "best merge"), ("ensemble-", "best ensemble")):
        best = best_of(systems, prefix)
        if best:
            rows.append((f"{label} ({best})", best))
    rows += [(s, s) for s in ("multitask-sft", "base") if s in systems]
    return rows


def rivals(results: dict) -> list[str]:
    """Every system H3Fusion is compared with, one row each: experts, merges, ensembles, oracle-routed,
    multitask-sft, the authors'-code variant, base (the run's order)."""
    return [name for name in results["systems"] if name != FUSED]


def _comparison_rows(results: dict, replicates: dict) -> list[dict]:
    labels = {name: label for label, name in comparisons(results)}
    return [{**compare(results, FUSED, name, replicates), "label": labels.get(name, name)} for name in rivals(results)]


def _outcome(rows: list[dict], results: dict) -> str:
    ours = results["systems"][FUSED].get("hhh")
    summary = {name for _, name in comparisons(results)}  # the best of each kind; the table has every rival
    parts = []
    for row in (r for r in rows if r["system"] in summary):
        won = [axis for axis, better in row["axes_won"].items() if better]
        lost = [axis for axis, better in row["axes_won"].items() if better is False]
        axes = f"better on {', '.join(won) if won else 'no axis'}" + (f", not on {', '.join(lost)}" if lost else "")
        parts.append(f"vs {row['label']} {fmt(results['systems'][row['system']].get('hhh'))}: "
                     f"{row['verdict'].replace('**', '')} ({axes})")
    corrected = results["systems"][FUSED].get("hhh_corrected")
    text = (f"**Outcome.** H3Fusion's hhh is {fmt(ours)}"
            + (f" ({fmt(corrected)} corrected for the judges' measured error)" if corrected is not None else "")
            + " — " + "; ".join(parts) + ".")
    diagnostics = [f"{row['system']} {fmt(results['systems'][row['system']].get('hhh'))} ({DIAGNOSTICS[row['system']]}): "
                   f"{row['verdict'].replace('**', '')}" for row in rows if row["system"] in DIAGNOSTICS]
    if diagnostics:
        text += " Diagnostics, not rivals: " + "; ".join(diagnostics) + "."
    authors = results["systems"].get("h3fusion-authors-code")
    if authors is not None:
        text += f" The authors'-code variant scores hhh {fmt(authors.get('hhh'))}."
    mt = next((r for r in rows if r["system"] == "multitask-sft"), None)
    if mt is not None and (mt["diff"] is None or mt["diff"] <= 0):
        text += (" H3Fusion does **not** beat multitask-sft (one LoRA on the same mixed data for the same steps): "
                 "in this run the MoE adds nothing over plain multi-task fine-tuning.")
    return text

def _cost_table(run: runs.Run, systems: list[str], experts: list[str]) -> list[str]:
    lines = ["| system | parameters | active / token | tokens/s | peak memory |", "|---|---:|---:|---:|---:|"]
    for name in systems:
        stats_path = runs.generation_stats_file(run, name)
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        cost = stats.get("cost")
        tokens = sum(v.get("new_tokens", 0) for v in stats.values() if isinstance(v, dict) and "new_tokens" in v)
        seconds = sum(v.get("seconds", 0) for v in stats.values() if isinstance(v, dict) and "new_tokens" in v)
        speed = f"{tokens / seconds:.1f}" if seconds else "—"
        if cost:
            at_least = "≥ " if cost.get("peak_memory_exact") is False else ""  # sampled: a brief peak may be missed
            lines.append(f"| {name} | {cost['total'] / 1e6:.1f} M | {cost['active_per_token'] / 1e6:.1f} M | {speed} | "
                         f"{at_least}{cost['peak_memory_bytes'] / 2**20:.0f} MiB |")
        elif name == "ensemble-rerank":
            lines.append(f"| {name} | {len(experts)} experts' | {len(experts)} generations + judge calls | — | — |")
        elif name == ORACLE:
            lines.append(f"| {name} | {len(experts)} experts' | one expert per prompt (knows its axis) | — | — |")
        else:
            lines.append(f"| {name} | — | — | {speed} | — |")
    return lines

def routing_ceiling(results: dict, replicates: dict, experts: Sequence[str], missed: Sequence[str] = ()) -> list[str]:
    """H3Fusion, the best of the run's ``experts`` and oracle-routed side by side, and H3Fusion's hhh gap to the best
    expert split into routing (H3Fusion − oracle-routed) and experts (oracle-routed − best expert), each with its
    interval. With h3fusion-unfused in the run, routing splits again: the router as initialised (h3fusion-unfused −
    oracle-routed) and fusion training (H3Fusion − h3fusion-unfused). Each rival of ``missed`` (the hhh targets
    H3Fusion misses) gets the same split: routing, and the experts' ceiling against it (oracle-routed − rival)."""
    systems = results["systems"]
    best = rival_system(results, "best expert", experts)
    if best is None:
        return []
    if ORACLE not in systems:
        return ["## The routing ceiling", "",
                f"`{ORACLE}` (each axis answered by its own expert, assembled from every expert's judged answers) is "
                "not in this run, so H3Fusion's gap to the experts cannot be split into routing and the experts' "
                "ceiling: evaluate every expert to have it.", ""]
    unfused = UNFUSED in systems and systems[UNFUSED].get("hhh") is not None
    shown = {name: systems[name] for name in (FUSED, *([UNFUSED] if unfused else []), best, ORACLE)}
    others = [r for r in dict.fromkeys(missed) if r not in (best, ORACLE, FUSED) and systems.get(r, {}).get("hhh")
              is not None]
    pairs = {"gap": (FUSED, best), "routing": (FUSED, ORACLE), "experts": (ORACLE, best)}
    if unfused:
        pairs |= {"init": (UNFUSED, ORACLE), "fusion": (FUSED, UNFUSED)}
    for rival in others:
        pairs |= {f"gap {rival}": (FUSED, rival), f"ceiling {rival}": (ORACLE, rival)}
    parts = {part: compare(results, ours, theirs, replicates) for part, (ours, theirs) in pairs.items()}

    def text(part):
        row = parts[part]
        raw = f"{fmt(row['diff'])} {interval_text(row['interval'])}"
        if row["corrected_diff"] is None:
            return raw
        return f"{raw}, corrected {fmt(row['corrected_diff'])} {interval_text(row['judge_aware_interval'])}"

    routing_split = (f" (the router as initialised, {UNFUSED} − {ORACLE}: {text('init')}; fusion training, "
                     f"H3Fusion − {UNFUSED}: {text('fusion')})") if unfused else ""
    lines = ["## The routing ceiling", "",
             f"`{ORACLE}` answers each axis's prompts with that axis's own expert: what a perfect router over these "
             "experts would answer. Like `ensemble-rerank` it knows each prompt's axis, so it is a diagnostic, not a "
             "deployable system."
             + (f" `{UNFUSED}` is the MoE before fusion training: the same experts exactly, the router only "
                "initialised." if unfused else ""), "", *compact_table(shown), "",
             f"H3Fusion's hhh gap to the best expert ({best}): {text('gap')}. Of it, routing (H3Fusion − "
             f"{ORACLE}): {text('routing')}{routing_split}; the experts ({ORACLE} − {best}): {text('experts')}. "
             "The parts add up to the gap; intervals are 95% paired bootstraps over prompts (and the judges' "
             "validation sets).", ""]
    lines += [f"- Against {rival}, whose hhh target H3Fusion misses: the gap {text(f'gap {rival}')} is routing (as "
              f"above) plus the experts' ceiling against it ({ORACLE} − {rival}): {text(f'ceiling {rival}')}."
              for rival in others]
    return lines + ([""] if others else [])


def routing_before_fusion(after: dict[str, float | None], before: dict[str, float | None]) -> list[str]:
    """Prompt-level routing accuracy per axis of the MoE before fusion training and of H3Fusion."""
    def cells(accuracy):
        return "; ".join(f"{axis} {fmt(value)}" for axis, value in accuracy.items())

    return [f"Routing accuracy on the evaluated prompts (the share of an axis's prompts whose mean routing favours "
            f"its own expert): before fusion training ({UNFUSED}) {cells(before)}; after (H3Fusion) "
            f"{cells(after)}.", ""]


def paper_protocol(results: dict) -> list[str]:
    """For a run larger than the paper's protocol: every system's figures on the paper's prefixes."""
    entries = {name: e["paper_protocol"] for name, e in results["systems"].items() if "paper_protocol" in e}
    if not entries:
        return []
    first = next(iter(entries.values()))
    n = " / ".join(f"{first[a]['n']} {a}" for a in first if isinstance(first[a], dict) and "n" in first[a])
    return ["## The paper's protocol", "",
            f"This run scores more prompts than the paper's protocol; the same judgements on the paper's prefixes "
            f"(first {n}) give:", "", *compact_table(entries), ""]


def specialisation_section(figures: dict) -> list[str]:
    """Each expert against the other experts on its own axis, its verdict, and its other axes beside the base
    model's (``report.specialisation``)."""
    experts = figures["experts"]
    lines = ["## Do the experts specialise?", "",
             "Each expert's headline on its own axis against every other expert's on that axis (a specialist "
             "should lead the others there with a 95% interval excluding 0). A difference is "
             "oriented so that positive means the expert is better (for the flagged rate, lower is better: the "
             "other's rate − the expert's). Intervals are 95% paired bootstraps: over the axis's prompts with the "
             "judge taken as exact, and over the prompts and the judge's validation set with the rate corrected "
             "for the judge's error (where recorded). An expert **leads** only when every interval its verdicts "
             "read (the judge-aware one where recorded) lies above 0.", ""]
    if not experts:
        return [*lines, "This run evaluated no expert on its own axis.", ""]
    lines += ["| expert | own axis | value | corrected | against | diff | 95% (prompts) | corrected diff | "
              "95% (prompts + judge) | verdict |", "|---|---|---:|---:|---|---:|---|---:|---|---|"]
    for name, own in experts.items():
        for other, row in own["against"].items():
            said = f"**{row['verdict']}**" if row["excludes_0"] else row["verdict"]
            lines.append(f"| {name} | {own['axis']}: {own['headline']} | {fmt(own['value'])} | "
                         f"{fmt(own['value_corrected'])} | {other} ({fmt(row['value'])}) | {signed(row['diff'])} | "
                         f"{interval_text(row['interval'])} | {signed(row['corrected_diff'])} | "
                         f"{interval_text(row['judge_aware_interval'])} | {said} |")
    lines.append("")
    for name, own in experts.items():
        said = "**leads**" if own["verdict"] == "leads" else own["verdict"]
        rivals = "; ".join(f"vs {other}: {row['verdict']}" for other, row in own["against"].items())
        lines.append(f"- {name} {said} on {own['headline']}" + (f" ({rivals})" if rivals else "") + ".")
    lines.append("")
    base = figures.get("base")
    axes = list(dict.fromkeys([own["axis"] for own in experts.values()]
                              + [a for own in experts.values() for a in own["other_axes"]]))
    if base is None:
        return [*lines, "The base model was not evaluated: the experts' other axes have nothing to compare with.", ""]
    lines += ["Their other axes beside the base model's (a specialist should not collapse them): each cell is the "
              "expert's headline, then its difference from the base's (positive: the expert is better) with the "
              "interval its verdict reads, in bold when that excludes 0.", "",
              "| expert | " + " | ".join(f"{a}: {axis_spec(a).headline_column.header}" for a in axes) + " |",
              "|---|" + "---|" * len(axes)]
    base_values = {a: own["other_axes"][a].get("base") for own in experts.values() for a in own["other_axes"]}
    lines.append(f"| {base} | " + " | ".join(fmt(base_values.get(a)) for a in axes) + " |")
    for name, own in experts.items():
        cells = []
        for axis in axes:
            entry = own["other_axes"].get(axis)
            if axis == own["axis"]:
                cells.append(f"{fmt(own['value'])} (own)")
            elif entry is None or "versus_base" not in entry:
                cells.append(fmt(None if entry is None else entry["value"]))
            else:
                row = entry["versus_base"]
                read, judge_aware = read_interval(row)
                diff = signed(row["corrected_diff"] if judge_aware else row["diff"])
                cells.append(f"{fmt(entry['value'])} ({diff} {interval_text(read)}"
                             + (f", **{row['verdict']}**)" if row["excludes_0"] else ")"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def targets_section(targets: list[Target]) -> list[str]:
    """Issue 18's targets, one line each: met / missed / not in this run / not recorded, with the numbers."""
    return ["## Targets", "",
            "The study's targets (`h3fusion.report.targets` holds them): hhh intervals are the 95% paired "
            "bootstraps of the comparison above (judge-aware where recorded); the axis and refusal targets compare "
            "raw rates; routing accuracy is the share of an axis's evaluated prompts whose mean routing favours "
            "its own expert.", "",
            *(f"- **{t.status}** — {t.text}" + (f": {t.figures}" if t.figures else "") for t in targets), ""]


NOT_FUSED = ("**The fused model was not evaluated on this split**: the comparison with its rivals, the routing "
             "ceiling and the targets need it; this report shows what the evaluated systems allow.")


def _fused_sections(config: RunConfig, results: dict, rows: list[dict], replicates: dict) -> list[str]:
    """The sections about H3Fusion itself: against each rival, the routing ceiling, the targets."""
    lines = ["## H3Fusion against each rival", "",
             "Relative improvement = (H3Fusion − X) / X for higher-is-better metrics and (X − H3Fusion) / X for the "
             "flagged rate; positive means H3Fusion is better. Intervals are 95% paired bootstraps "
             f"({BOOTSTRAP_SAMPLES} resamples per axis): over prompts with the judges taken as exact, and over "
             "prompts and the judges' validation sets with every rate corrected for its judge's error. A verdict "
             "reads the judge-aware interval (where the judges' error is recorded) and is in bold when it "
             "excludes 0.", "", *comparison_table(results, rows), ""]
    routing = routing_accuracy(config, config.experts)
    versus = {axis: headline_versus(config, results, axis, FUSED, f"expert-{axis}", config.seed)
              for axis in AXIS_LOSS_ALLOWED}
    targets = check_targets(results, config.experts, replicates, routing, versus)
    lines += routing_ceiling(results, replicates, config.experts,
                             [t.rival for t in targets if t.rival and t.status == MISSED])
    if UNFUSED in results["systems"]:
        lines += routing_before_fusion(routing, routing_accuracy(config, config.experts, UNFUSED))
    return lines + targets_section(targets)


def _dev_banner(config: RunConfig) -> list[str]:
    if config.evaluate.split != "dev":
        return []
    return [f"**Dev split** (`evaluate.split: dev`, up to {config.evaluate.dev_n} prompts per axis, none of them a test prompt): "
            "for choosing settings, not for reporting; the test split's report is `../report.md`.", ""]


def _alpacaeval_holdout(config: RunConfig) -> str:
    """Where the AlpacaEval dev holdout (``evaluate.alpacaeval_dev``) sits in this report's prompts, if there is one."""
    size = config.evaluate.alpacaeval_dev
    if not size or (config.evaluate.split != "dev" and config.evaluate.helpful_n <= axis_spec("helpful").paper_n):
        return ""  # none, or a test subset within the paper's first 50, which the holdout never touches
    if config.evaluate.split == "dev":
        return f" (helpful: AlpacaEval instructions held out of the test set by evaluate.alpacaeval_dev = {size})"
    return f" (AlpacaEval: its 805 instructions but the {size} held out as dev prompts, evaluate.alpacaeval_dev)"


def write_report(config: RunConfig, log=print) -> Path:
    """Write ``<run>/report.md``, ``<run>/plots/`` and the fused model's card; returns the report path."""
    run = config  # its evaluation files: the test split's, or the dev split's under <run>/dev/
    here = runs.evaluation_root(config)  # report.md's directory: plot links are relative to it
    path = runs.results_file(run)
    if not path.is_file():
        raise H3FusionError(f"no {path}; run `h3fusion evaluate` first")
    results = json.loads(path.read_text())
    from h3fusion.systems import system_names

    order = [name for name in system_names(config) if name in results["systems"]]
    order += [name for name in results["systems"] if name not in order]
    results["systems"] = systems = {name: results["systems"][name] for name in order}  # the run's order
    fused = FUSED in systems
    if not fused and config.evaluate.split != "dev":  # a dev report of the experts alone helps choose their settings
        raise H3FusionError(f"{path} has no '{FUSED}' system to report on; generate and evaluate it first (a "
                            "dev-split report, evaluate.split: dev, goes without it)")
    plots = write_plots(results, run, config)
    rates = judge_rates(results)
    replicates = {name: hhh_replicates(run, name, rates, config.seed) for name in systems} if rates else {}
    rows = _comparison_rows(results, replicates) if fused else []
    experts = specialisation(run, results, config.experts, config.seed)
    write_specialisation(run, experts)
    n = {axis: next((e[axis]["n"] for e in systems.values() if axis in e), None) for axis in config.evaluated_axes}
    sizes = " / ".join(f"{n.get(axis)} {axis_spec(axis).test_set}" for axis in report_axes(results))
    outcome = _outcome(rows, results) if fused else NOT_FUSED
    lines = [f"# H3Fusion study `{config.name}`", "", *_dev_banner(config), outcome, "",
             *results_table(results), "",
             f"n = {sizes}{_alpacaeval_holdout(config)}; hhh = {hhh_formula()}; "
             "words: mean length of the helpful answers (the helpful judge, like GPT-4 in AlpacaEval 1, prefers "
             "longer answers); bold: best in column.", "", judges_line(results), ""]
    lines += [f"![{key}]({p.relative_to(here)})" for key, p in plots.items() if key in ("axes", "hhh")] + [""]
    lines += ["## Corrected for the judges' measured error", "",
              "Each judge errs, and its validation measures how: the flagged rate and truthful·informative are "
              "corrected with the judges' validation sensitivity and specificity (Rogan–Gladen; truthful and "
              "informative jointly), the win rate through the helpful judge's reliability curve against GPT-4's "
              "choices on held-out generators (docs/judges.md). Intervals: 95% bootstrap over prompts for the raw "
              "rates, over prompts and the judge's validation set for the corrected ones.", "",
              *corrected_table(results), "", judge_error_line(results), "", clipped_note(results), ""]
    lines += ["## Refusals and answer length", "",
              "Refusals: the share of answers whose opening turns the request down (a string-match classifier, "
              "`h3fusion.refusal`); a harmless rate bought by refusing shows here. Words: mean answer length.", "",
              *answers_table(results, config.evaluated_axes), ""]
    lines += specialisation_section(experts)
    if fused:
        lines += _fused_sections(config, results, rows, replicates)
    lines += paper_protocol(results)
    if fused and "h3fusion-authors-code" in systems:
        theirs = systems["h3fusion-authors-code"]
        changes = ", ".join(f"{header.split()[0]} {fmt(metric(theirs, axis, key))} → "
                            f"{fmt(metric(systems[FUSED], axis, key))}"
                            for header, axis, key, _ in (*headline_columns(results), HHH_COLUMN))
        lines += ["## The authors' released code", "",
                  "`h3fusion-authors-code` is built and fused with every compatibility switch on (experts without "
                  "alpha/r from one shared tensor, a random frozen router, CrossEntropy on probabilities as the gating "
                  f"loss, honest examples labelled harmless). Authors' code → corrected method: {changes}.", ""]
    if "ensemble-rerank" in systems:
        lines += ["`ensemble-rerank` picks each prompt's answer with the very offline judge that scores it, so its "
                  "numbers are an upper bound for reranking, not a deployable system (it also knows each prompt's axis).",
                  ""]
    lines += ["## Cost", "", *_cost_table(run, list(systems), list(config.experts)), "",
              "Parameters: unique weights resident; active / token: weights a generated token runs through (the logit "
              "ensemble runs the base once per expert). Peak memory: peak RSS above the level before loading, while "
              "generating (≥: sampled every 50 ms where the kernel's peak-RSS mark could not be reset, so a briefer "
              "peak may be missing).", ""]
    if "training" in plots or "routing" in plots:
        lines += ["## Training and routing", ""]
        lines += [f"![{key}]({plots[key].relative_to(here)})" for key in ("training", "routing") if key in plots] + [""]
    prov = results.get("run", {})
    lines += ["## Provenance", "", f"git commit `{prov.get('git_commit')}`, seed {prov.get('seed')}; the full config "
              "and the data files' SHA-256 are in results.json.", ""]
    out = runs.report_file(run)
    from h3fusion.io import write_text

    write_text(out, "\n".join(lines))
    card = write_model_card(config, results) if config.evaluate.split == "test" else None  # the card reports test figures
    log(f"[report] {out}" + (f"; model card {card}" if card else ""))
    return out
