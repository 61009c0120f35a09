"""`h3fusion ablate`: one fusion setting at a time, on the experts of a finished run.

    h3fusion ablate configs/cpu-bench.yaml --name lambda-0.1 --set fusion.gate_lambda=0.1

Builds, fuses, generates and evaluates only the ``h3fusion`` system under
``<base run>/ablations/<name>/``, starting from the settings the base run's H3Fusion was made with
(``<base run>/fused/config.yaml``: a config file edited since does not leak a second change in),
reusing the base run's experts (``moe.adapters``) and judges, and
writes ``results/ablations/<name>.json``: the overrides, the ablated H3Fusion's metrics and the base
run's systems beside them, so one file answers "what did this setting change". Overrides that change
the experts themselves (``lora.*``, ``train.*``, ``data.*``, ``experts``, ``seed``, ``model.*``)
re-align them inside the ablation's directory instead (align trains no expert that ``moe.adapters`` gives: with
every expert given, an ablation setting any lora or train key is refused, and seed, data and model overrides
re-fuse the given experts); overrides of runtime dials only
(``moe.expert_bias``, read when the fused model is loaded) reuse the base run's fused model as it is
(``<ablation>/fused`` links to it) and only generate and evaluate. Every stage skips what is complete,
so a killed ablation resumes with the same command.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from h3fusion import runs
from h3fusion.config import RunConfig, build_config, load_config
from h3fusion.errors import H3FusionError
from h3fusion.io import write_json, write_text
from h3fusion.runlock import run_lock
from h3fusion.runs import FUSE_SETTINGS, changed_settings

REALIGN_PREFIXES = ("lora.", "train.", "data.", "experts", "seed", "model.")
# read when a fused model is loaded for generation: the base run's fused model is reused as it is
RUNTIME_PREFIXES = ("moe.expert_bias",)
FUSED = "h3fusion"


def ablate(base: RunConfig, name: str, overrides: Sequence[str], results_dir: Path = Path("results/ablations"),
           log=print, source: str | Path = "the config") -> Path:
    """Run one ablation of the finished run ``base`` (its config: where it is and what it was meant to be), with
    ``overrides`` (``key.path=value`` strings) on top of the settings its H3Fusion was made with; returns the
    path of its summary JSON. ``source`` names the config ``base`` came from, in messages."""
    from h3fusion.build import build_run
    from h3fusion.evaluate import evaluate_run
    from h3fusion.experts import align
    from h3fusion.fusion import fuse_run
    from h3fusion.generate import generate_system

    if not name or "/" in name:
        raise H3FusionError(f"--name '{name}' must be a plain name (it names a directory and a JSON file)")
    base_results = runs.results_file(base)
    if not base_results.is_file():
        raise H3FusionError(f"no {base_results}: finish the base run first (`h3fusion run {source}`)")
    keys = [k for k in (o.split("=", 1)[0].strip() for o in overrides) if k != "run_dir"]  # run_dir: --out
    realign = any(touches(k, REALIGN_PREFIXES) for k in keys)
    runtime_only = bool(keys) and all(touches(k, RUNTIME_PREFIXES) for k in keys)
    run_dir = runs.ablation_dir(base, name)
    # one setting changed against what the base run's H3Fusion was made with, even if the config file
    # has moved on since (a new default, say): its recorded settings are the ablation's starting point
    recorded = next((p for p in (runs.settings_file(runs.fused_dir(base)), runs.settings_file(runs.root(base)))
                     if p.is_file()), None)
    given = (base if recorded is None else load_config(recorded)).moe.adapters  # the experts it was made with
    extra = [f"run_dir={run_dir}", *([] if realign else base_experts(base, given))]
    if recorded is None:
        config = build_config(base.model_dump(mode="json"), str(source), [*overrides, *extra])
    else:
        config = load_config(recorded, overrides=[*overrides, *extra])
        # ``base`` is the config file as given (run_dir is no setting; the adapters are the ablation's own)
        drifted = changed_settings(recorded, base, FUSE_SETTINGS, ignore=("moe.adapters",))
        if drifted:
            log(f"[ablate] starting from {recorded} (the base run's settings); {source} has since changed "
                f"{'; '.join(drifted)}: not applied")
    if realign:
        # who gives the experts: the overrides when they set moe.adapters, else the settings the run was made with
        where = "--set " + ", ".join(k for k in keys if touches(k, ("moe.adapters",))) \
            if any(touches(k, ("moe.adapters",)) for k in keys) else recorded or source
        realign = realigns_experts(config, [k for k in keys if touches(k, REALIGN_PREFIXES)], name, where, log)
    log(f"[ablate] {name}: {' '.join(overrides) or '(no overrides)'} -> {run_dir}"
        + (" (re-aligning the experts)" if realign else "")
        + (" (runtime dial: the base run's fused model)" if runtime_only else ""))
    with run_lock(run_dir, "ablate", log=log):  # one process per ablation directory, as per run
        if realign:
            align(config, log=log)
        if runtime_only:
            fused = runs.fused_dir(run_dir)
            if not fused.exists():
                run_dir.mkdir(parents=True, exist_ok=True)
                fused.symlink_to(runs.fused_dir(base).resolve(), target_is_directory=True)
        else:
            build_run(config, log=log)
            fuse_run(config, log=log)
        generate_system(config, FUSED, log=log)
        results = json.loads(evaluate_run(config, systems=[FUSED], log=log).read_text())
        base_systems = json.loads(base_results.read_text())["systems"]
        summary = {
            "name": name,
            "overrides": [o for o in overrides if not o.startswith("run_dir=")],  # run_dir: where, not what
            "realigned_experts": realign,
            "fused_again": not runtime_only,  # False: the base run's fused model with a runtime dial
            FUSED: results["systems"][FUSED],
            "base_run": {"dir": str(runs.root(base)), "systems": base_systems},
            "hhh_vs": _hhh_differences(runs.root(config), results["systems"][FUSED].get("hhh"), runs.root(base),
                                       base_systems, config.seed),
            "judges": results["judges"],
            "run": results["run"],
        }
        out = Path(results_dir) / f"{name}.json"
        write_json(out, summary)
        write_text(Path(results_dir) / "README.md", ablation_table(Path(results_dir)))
    ours, theirs = summary[FUSED].get("hhh"), summary["base_run"]["systems"].get(FUSED, {}).get("hhh")
    if ours is not None and theirs is not None:
        log(f"[ablate] {name}: h3fusion hhh {ours:.3f} (base run {theirs:.3f}, {ours - theirs:+.3f}) -> {out}")
    return out


def _hhh_differences(run: Path, ours_hhh: float | None, base_run: Path, base_systems: dict, seed: int) -> dict:
    """This ablation's hhh minus the base run's H3Fusion and best expert, with 95% paired-bootstrap
    intervals over prompts (both answered the same prompts; same resampling as the report's)."""
    from h3fusion.report.statistics import hhh_difference_interval, per_prompt_values

    ours = per_prompt_values(run, FUSED)
    if ours is None or ours_hhh is None:
        return {}
    experts = [s for s in base_systems if s.startswith("expert-") and base_systems[s].get("hhh") is not None]
    others = [FUSED, *([max(experts, key=lambda s: base_systems[s]["hhh"])] if experts else [])]
    out = {}
    for system in others:
        theirs = per_prompt_values(base_run, system)
        if theirs is None or base_systems.get(system, {}).get("hhh") is None:
            continue
        low, high = hhh_difference_interval(ours, theirs, seed)
        out[system] = {"diff": ours_hhh - base_systems[system]["hhh"], "interval": [low, high]}
    return out


def ablation_table(results_dir: Path) -> str:
    """Markdown table of every ablation summary in ``results_dir``, grouped by base run: each group opens with
    its base run's H3Fusion, the row its ablations are compared with."""

    def cells(metrics: dict) -> list[str]:
        values = [metrics.get("helpful", {}).get("win_rate"), metrics.get("harmless", {}).get("flagged_rate"),
                  metrics.get("honest", {}).get("truthful_informative"), metrics.get("hhh")]
        return ["—" if v is None else f"{v:.3f}" for v in values]

    groups: dict[str, list[str]] = {}  # base run dir -> its rows, the base run's h3fusion first
    for path in sorted(results_dir.glob("*.json")):
        summary = json.loads(path.read_text())
        if FUSED not in summary or "base_run" not in summary:
            continue
        base_dir = summary["base_run"]["dir"]
        if base_dir not in groups:
            base = summary["base_run"]["systems"].get(FUSED, {})
            groups[base_dir] = [f"| **base run `{Path(base_dir).name}`: h3fusion** | — | {' | '.join(cells(base))} | | |"]
        versus = summary.get("hhh_vs", {})
        vs_fused = _with_interval(versus.get(FUSED))
        expert = next((s for s in versus if s != FUSED), None)
        vs_expert = f"{_with_interval(versus[expert])} ({expert})" if expert else ""
        settings = " ".join(f"`{o}`" for o in summary["overrides"] if not o.startswith("run_dir="))
        how = "same fused model" if summary.get("fused_again") is False else (
            "experts re-aligned" if summary.get("realigned_experts") else "re-fused")
        groups[base_dir].append(f"| {summary['name']} | {settings} ({how}) | {' | '.join(cells(summary[FUSED]))} "
                                f"| {vs_fused} | {vs_expert} |")
    header = ["# Ablations", "",
              "One setting changed at a time on the CPU study's experts (`h3fusion ablate`); one JSON per row.",
              "Δ hhh: this ablation's H3Fusion minus its base run's H3Fusion, and minus that run's best expert, "
              "with the 95% paired-bootstrap interval over prompts (as in the report).",
              f"Base run{'s (each group of rows against the one that opens it)' if len(groups) > 1 else ''}: "
              + ", ".join(f"`{d}`" for d in groups) + ".", "",
              "| ablation | setting | win rate ↑ | flagged ↓ | truthful·inf ↑ | hhh ↑ | Δ hhh vs base run's h3fusion "
              "| Δ hhh vs best expert |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    return "\n".join([*header, *(row for rows in groups.values() for row in rows)]) + "\n"


def _with_interval(entry: dict | None) -> str:
    if not entry:
        return ""
    low, high = entry["interval"]
    return f"{entry['diff']:+.3f} [{low:+.3f}, {high:+.3f}]"


def touches(key: str, prefixes: Sequence[str]) -> bool:
    """Whether the override key ``key`` sets something under one of ``prefixes``: a key inside the section
    (``train.lr``) or the whole section (``train={lr: 0.001}``)."""
    return any(key == p.removesuffix(".") or key.startswith(p) for p in prefixes)


def realigns_experts(config: RunConfig, keys: Sequence[str], name: str, where: str | Path, log=print) -> bool:
    """Whether an ablation whose overrides ``keys`` touch the experts' settings trains any expert: align trains
    no axis that ``moe.adapters`` gives (``where``: what gives them). With every expert given, a lora or train
    setting would change nothing, whatever else is set (refused in one line: the ablation would report a change it
    never made); seed, data and model settings still act on build, fusion and generation (re-fused, not
    re-aligned). With some given, the others are re-aligned."""
    given = [axis for axis in config.experts if config.moe.adapters.get(axis)]
    if len(given) < len(config.experts):
        if given:
            log(f"[ablate] {where} gives {', '.join(given)} by moe.adapters: kept as given, the other experts "
                "are re-aligned")
        return True
    idle = [k for k in keys if touches(k, ("lora.", "train."))]
    if idle:
        raise H3FusionError(
            f"ablation '{name}' sets {', '.join(idle)}, which would change nothing: {where} gives every expert by "
            "moe.adapters, which align never trains; add --set 'moe.adapters={}' to train them afresh in the "
            "ablation, or ablate another setting")
    return False


def base_experts(base: RunConfig, given: Mapping[str, str]) -> list[str]:
    """Overrides that give an ablation the base run's experts by path (nothing of stage 1 is redone): the ones it
    trained (under ``base``'s run directory), or the ones ``given``, the ``moe.adapters`` its H3Fusion was made with
    (its recorded settings: the config file may name other adapters since)."""
    return [f"moe.adapters.{axis}={given.get(axis) or runs.expert_dir(base, axis)}" for axis in base.experts]
