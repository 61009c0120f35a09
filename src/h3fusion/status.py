"""`h3fusion status`: what a run has finished, what is part-way and what is left, read from its files.

A long run (the CPU study: hours, over several sittings) is resumed by running the same command again; this says
where that command will pick up. It reads the run directory and the evaluated prompts (to know how many answers
finish an axis; from the hub when no data directory is set, like every stage): it loads no model, takes no lock
and writes nothing into the run, so it is safe beside the process that is writing it (a checkpoint or an answer
being written is counted as not there yet).

What it cannot see without loading models: a finished stage made with other settings (``h3fusion run`` then stops
with one line naming them) and judgements by a judge since refitted (``evaluate`` scores them again).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from h3fusion import runs
from h3fusion.config import RunConfig

DONE, PART_WAY, TO_DO, GIVEN, MISSING = "done", "part-way", "to do", "given", "missing"


@dataclass(frozen=True)
class Row:
    stage: str
    item: str
    state: str  # DONE | PART_WAY | TO_DO | GIVEN | MISSING (a given input that is not there: no stage makes it)
    detail: str = ""


def _json(path: Path) -> dict | None:
    """A JSON object's contents; None when absent, being written this instant, or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _number(value) -> bool:
    """A count or duration as stats.json records one: finite and not negative (an edited file may say otherwise)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _complete_lines(path: Path) -> int:
    """Lines a writer has finished (a killed or running writer's last line has no newline yet)."""
    try:
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.endswith(b"\n"))
    except OSError:
        return 0


def _checkpoint(stage_dir: Path) -> tuple[int, int] | None:
    """(step, max steps) of the newest complete Trainer checkpoint, without dropping incomplete ones as a
    resuming stage does (``sft.last_checkpoint``): one may be being written now."""
    states = [_json(c / runs.CHECKPOINT_MARKER) for c in runs.checkpoints_dir(stage_dir).glob("checkpoint-*")]
    states = [s for s in states if s and _number(s.get("global_step"))]
    if not states:
        return None
    newest = max(states, key=lambda s: s["global_step"])
    total = newest.get("max_steps")
    return int(newest["global_step"]), int(total) if _number(total) else 0


def _trained(stage: str, item: str, stage_dir: Path, complete: bool, marker: str) -> Row:
    """A Trainer stage (an expert, multitask-sft, fusion): done with its marker's steps, part-way at its newest
    checkpoint, or to do."""
    if complete:
        log = _json(stage_dir / marker) or {}
        detail = f"{log['steps']} steps" if _number(log.get("steps")) else ""
        if _number(log.get("heldout_loss_before")) and _number(log.get("heldout_loss_after")):
            detail += f", held-out loss {log['heldout_loss_before']:.3f} -> {log['heldout_loss_after']:.3f}"
        return Row(stage, item, DONE, detail)
    checkpoint = _checkpoint(stage_dir)
    if checkpoint is not None:
        step, total = checkpoint
        return Row(stage, item, PART_WAY, f"resumes from step {step}" + (f" of {total}" if total else ""))
    return Row(stage, item, TO_DO)


def _moe_rows(run: Path) -> list[Row]:
    build = Row("build", "moe", DONE if runs.moe_is_built(runs.moe_dir(run)) else TO_DO)
    fused = runs.fused_dir(run)
    return [build, _trained("fuse", "fused", fused, runs.fused_is_complete(fused), runs.FUSE_MARKER)]


def _answer_rows(config: RunConfig, counts: dict[str, int]) -> list[Row]:
    """generate's answers and evaluate's judgements, per system, from the counts of answered / judged lines
    against each axis's evaluated prompts (the assembled systems' answers: evaluate's own)."""
    from h3fusion.systems import assembled_systems, generated_systems, system_names

    axes = config.evaluated_axes
    rows = []
    for stage, systems, path in (("generate", generated_systems(config), runs.generated_file),
                                 ("evaluate", system_names(config), runs.judgements_file)):
        for system in systems:
            if stage == "generate":
                stats = _json(runs.generation_stats_file(config, system)) or {}
                finished = {a: a in stats and _complete_lines(path(config, system, a)) >= counts[a] for a in axes}
            else:  # evaluate scores again a judgements file without its judge's stamp (an assembled system's are
                # written whole, with no stamp of their own)
                stamped = {a: system in assembled_systems() or runs.judge_stamp_file(config, system, a).is_file()
                           for a in axes}
                finished = {a: stamped[a] and _complete_lines(path(config, system, a)) >= counts[a] for a in axes}
            done = {a: counts[a] if finished[a] else min(_complete_lines(path(config, system, a)), counts[a])
                    for a in axes}
            if stage == "evaluate":
                done = {a: n if stamped[a] else 0 for a, n in done.items()}
            detail = ", ".join(f"{a} {done[a]}/{counts[a]}" for a in axes)
            if stage == "generate" and "honest" in axes and not runs.mc_file(config, system).is_file():
                finished["honest MC"] = False
                detail += ", honest MC1/MC2 to do"
            state = DONE if all(finished.values()) else (TO_DO if not any(done.values()) else PART_WAY)
            if stage == "evaluate":
                detail = "judged " + detail + (" (answers assembled from the experts')"
                                               if system in assembled_systems() else "")
            rows.append(Row(stage, system, state, detail if state == PART_WAY else ""))
    return rows


def evaluated_counts(config: RunConfig) -> dict[str, int]:
    """How many answers finish each evaluated axis: its evaluated prompts."""
    from h3fusion.data import load_evaluated

    return {axis: len(load_evaluated(axis, config)) for axis in config.evaluated_axes}


def generation_left(config: RunConfig, counts: dict[str, int]) -> tuple[float, int] | None:
    """(seconds, parts they are estimated from) of the answers still to generate, at this run's pace: the median
    seconds per answer of every part on that axis with answers timed (``stats.json``: a finished axis, or an
    unfinished one's windows so far under "partial"), times the system's own speed against those medians on the axes
    it has timed (ensemble-logits, three passes a token, runs slower; 1 for a system with none timed). The TruthfulQA
    MC1/MC2 scoring each system does before its answers counts too, once one system has timed it ("honest_mc"): the
    median seconds per question of those timed, each divided by its system's speed, times the speed of the system
    still to score. None when nothing is left to generate or an axis with answers left has no timed part yet."""
    from h3fusion.systems import generated_systems

    systems = generated_systems(config)
    paces: dict[str, dict[str, float]] = {}  # system -> axis -> seconds per answer
    mc_paces: dict[str, float] = {}  # system -> seconds per MC question
    for system in systems:
        stats = _json(runs.generation_stats_file(config, system)) or {}
        mc = stats.get(runs.MC_STATS)
        if isinstance(mc, dict) and _number(mc.get("seconds")) and _number(mc.get("questions")) and mc["questions"] > 0:
            mc_paces[system] = mc["seconds"] / mc["questions"]
        partial = stats.get(runs.PARTIAL_STATS)
        for axis in counts:
            part = stats.get(axis, partial.get(axis) if isinstance(partial, dict) else None)
            if not isinstance(part, dict) or not _number(part.get("seconds")) or not _number(part.get("prompts")):
                continue
            if part["prompts"] > 0:  # none: every answer was there before that process (no pace to read)
                paces.setdefault(system, {})[axis] = part["seconds"] / part["prompts"]
    medians = {axis: median(found) for axis in counts if (found := [p[axis] for p in paces.values() if axis in p])}
    factors = {}
    for system in systems:
        own = [pace / medians[axis] for axis, pace in paces.get(system, {}).items() if medians[axis] > 0]
        # a system whose timed parts took no time (only an edited stats.json) has no speed to scale by
        factors[system] = median(own) if own and median(own) > 0 else 1.0
    mc_median = median(pace / factors[system] for system, pace in mc_paces.items()) if mc_paces else None
    left = 0.0
    for system in systems:
        for axis, needed in counts.items():
            remaining = needed - min(_complete_lines(runs.generated_file(config, system, axis)), needed)
            if remaining <= 0:
                continue
            if axis not in medians:
                return None
            left += remaining * medians[axis] * factors[system]
        if mc_median is not None and "honest" in counts and not runs.mc_file(config, system).is_file():
            left += counts["honest"] * mc_median * factors[system]
    return (left, sum(len(p) for p in paces.values()) + len(mc_paces)) if left > 0 else None


def run_status(config: RunConfig, counts: dict[str, int] | None = None) -> list[Row]:
    """Every stage of ``h3fusion run`` for this config, in pipeline order (``counts``: ``evaluated_counts``, read
    here when not given)."""
    from h3fusion.systems import system_names

    run = runs.root(config)
    rows = []
    for axis, path in runs.adapter_paths(config).items():
        if config.moe.adapters.get(axis):  # align skips it and build reads it as a PEFT adapter: fails there if not one
            absent = runs.missing_adapter_files(path)
            rows.append(Row("align", axis, MISSING, f"moe.adapters gives {path}, which holds no {', '.join(absent)}")
                        if absent else Row("align", axis, GIVEN, str(path)))
        else:
            rows.append(_trained("align", axis, path, runs.expert_is_complete(path), runs.EXPERT_MARKER))
    rows += _moe_rows(run)
    if config.baselines.multitask_sft:
        sft = runs.multitask_dir(config)
        rows.append(_trained("baselines", "multitask-sft", sft, runs.expert_is_complete(sft), runs.EXPERT_MARKER))
    if config.baselines.authors_code:
        rows += [Row("baselines", f"authors-code {r.stage}", r.state, r.detail)
                 for r in _moe_rows(runs.variant_dir(config, "authors-code"))]
    counts = counts or evaluated_counts(config)
    rows += _answer_rows(config, counts)
    # evaluate and report run again on every `h3fusion run` (seconds with the judgements cached): their files count
    # as done only when written after everything they are made from
    judged = [r for r in rows if r.stage == "evaluate"]
    results = runs.results_file(config)
    written = _json(results)
    scored = (written or {}).get("systems")
    scored = scored if isinstance(scored, dict) else {}
    missing = sorted(set(system_names(config)) - set(scored))
    why = ""  # why a results.json on disk is not this run's (judgements still to do say so in their own rows)
    if results.is_file() and all(r.state == DONE for r in judged):
        changed = runs.changed_evaluate_settings(written, config)
        if written is None:
            why = "unreadable"
        elif missing:
            why = f"lacks {', '.join(missing)}"
        elif changed is None:
            why = "records no evaluate settings"
        elif changed:
            why = f"scored with other evaluate settings ({', '.join(changed)})"
        elif not all(_scored_n(scored.get(r.item), a) == counts[a] for r in judged for a in config.evaluated_axes):
            why = "scored on other prompt counts"
        elif not _newer(results, [runs.judgements_file(config, r.item, a) for r in judged
                                  for a in config.evaluated_axes]):
            why = "older than the judgements"
    current = results.is_file() and all(r.state == DONE for r in judged) and not why
    rows.append(Row("evaluate", "results.json", DONE if current else TO_DO, why))
    report = runs.report_file(config)
    rows.append(Row("report", "report.md", DONE if current and _newer(report, [results]) else TO_DO))
    return rows


def _newer(path: Path, sources: list[Path]) -> bool:
    """``path`` exists and was written after every existing one of ``sources``."""
    try:
        written = path.stat().st_mtime_ns
    except OSError:
        return False
    for source in sources:
        try:  # a judgements file may vanish between listing and stat (evaluate rewrites one whose judge changed)
            if written < source.stat().st_mtime_ns:
                return False
        except OSError:
            continue
    return True


def _scored_n(system: object, axis: str) -> object:
    """How many prompts of ``axis`` results.json scored ``system`` on (None when it does not say)."""
    figures = system.get(axis) if isinstance(system, dict) else None
    return figures.get("n") if isinstance(figures, dict) else None


def next_row(rows: list[Row]) -> Row | None:
    """Where the same `h3fusion run` picks up: the first row not done."""
    return next((r for r in rows if r.state not in (DONE, GIVEN)), None)
