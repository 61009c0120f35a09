"""The run directory: where each stage reads and writes, how a finished stage is recognised, and the guard
that refuses to reuse a stage made with other settings. Stages ask this module for paths; none builds one.

    <run>/
      config.yaml                         the config of the last `h3fusion run`
      .h3fusion.lock                      who writes into the run now (runlock)
      experts/<axis>/                     align: a PEFT adapter, h3fusion_expert.json, config.yaml,
                                          training_log.json (marker); checkpoints/ while it trains
      moe/                                build: the MoE checkpoint, config.yaml, h3fusion_build.json (marker)
      fused/                              fuse: the fused MoE, routing.json, plots/, config.yaml, README.md (the
                                          model card, by report), fusion_log.json (marker); checkpoints/ while it trains;
                                          routing/ (`h3fusion routing`, by default)
      baselines/multitask-sft/            baselines: an adapter laid out (and finished) like an expert's
      variants/authors-code/              baselines: a run of its own (its moe/ and fused/) for the authors' code
      generations/<system>/               generate: <axis>.jsonl (answers), honest.mc.json, <axis>.routing.json,
                                          stats.json (an axis is finished once it is named there;
                                          "partial": the unfinished axes' stats so far, carried over a kill;
                                          "honest_mc": the MC1/MC2 scoring's time)
      assembled/<system>/<axis>.jsonl     evaluate: the answers it assembles from the experts' (no model of its own)
      judgements/<system>/<axis>.jsonl    evaluate: the answers with the judge's score and label;
                                          <axis>.judge.json says which judge scored them
      results.json                        evaluate (written whole, atomically)
      report.md, plots/                   report
      specialisation.json                 report: each expert against the others on its own axis
      alpaca_eval/<system>/model_outputs.json   export-outputs
      ablations/<name>/                   ablate: a run of its own
      dev/                                evaluate.split: dev -- generations/ ... report.md, plots/ as above, for
                                          the dev prompts (``evaluation_root``): settings are chosen there

Functions take the run as its config or as its directory (``Run``), so a caller holding only the directory
of another run (the ablation's base run) asks the same questions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from h3fusion.config import RunConfig, config_keys, dump_config
from h3fusion.errors import H3FusionError

# the files of an adapter directory (named here, not in `models`, so that `status` answers without loading torch)
ADAPTER_CONFIG = "adapter_config.json"  # what makes a directory a PEFT adapter
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # its weights, as PEFT names them
EXPERT_META = "h3fusion_expert.json"  # beside an adapter `h3fusion align` trained: its base's fingerprint

Run = RunConfig | Path
"""A run, by its config or its directory."""

LOCK_NAME = ".h3fusion.lock"  # who writes into the run now (runlock)
SETTINGS = "config.yaml"  # beside a stage's outputs: the config that made them (``record_settings``)
EXPERT_MARKER = "training_log.json"  # an adapter `align` (or a trained baseline) finished: written last
BUILD_MARKER = "h3fusion_build.json"  # moe/ is complete: written last
FUSE_MARKER = "fusion_log.json"  # fused/ is complete: written last
CHECKPOINT_MARKER = "trainer_state.json"  # the last file of a Trainer checkpoint: present = complete
DEV = "dev"  # the dev split's answers, judgements, results and report (``evaluation_root``)
GENERATION_STATS = "stats.json"  # per system: an axis named in it is finished (after its answers and routing)
PARTIAL_STATS = "partial"  # in stats.json: an unfinished axis's stats after its last whole window, added to on resume
MC_STATS = "honest_mc"  # in stats.json: how long the TruthfulQA MC1/MC2 log-likelihoods took (no tokens generated)


def root(run: Run) -> Path:
    """The run's directory."""
    return run.run_path if isinstance(run, RunConfig) else Path(run)


def evaluation_root(run: Run) -> Path:
    """Where the answers to the evaluated prompts, their judgements, results and report live: the run's directory,
    or ``<run>/dev/`` when the config's ``evaluate.split`` is dev (settings are chosen there, and the test
    split's files stay as they are). A run given by its directory means its test split."""
    dev = isinstance(run, RunConfig) and run.evaluate.split == "dev"
    return root(run) / DEV if dev else root(run)


# ----------------------------------------------------------------------------- trained stages

def expert_dir(run: Run, axis: str) -> Path:
    return root(run) / "experts" / axis


def adapter_paths(config: RunConfig) -> dict[str, Path]:
    """Expert adapters of a run, in router order: moe.adapters overrides <run>/experts/<axis>."""
    return {axis: Path(config.moe.adapters.get(axis) or expert_dir(config, axis)) for axis in config.experts}


def missing_adapter_files(path: Path) -> list[str]:
    """Which of a PEFT LoRA adapter's two files (config, safetensors weights) ``path`` lacks, in that order."""
    return [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (Path(path) / name).is_file()]


def expert_is_complete(path: Path) -> bool:
    """An adapter `align` trained (or a trained baseline) is finished: its marker and every file it loads."""
    return all((path / name).is_file() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPERT_MARKER, EXPERT_META))


def moe_dir(run: Run) -> Path:
    return root(run) / "moe"


def moe_is_built(path: Path) -> bool:
    return (path / BUILD_MARKER).is_file()


def fused_dir(run: Run) -> Path:
    return root(run) / "fused"


def fused_is_complete(path: Path) -> bool:
    """A fused model directory is finished (a cut-short one is not a model yet)."""
    return (path / FUSE_MARKER).is_file()


def routing_check_dir(model_dir: Path) -> Path:
    """Where `h3fusion routing` writes a model's routing diagnostics by default."""
    return model_dir / "routing"


def checkpoints_dir(stage_dir: Path) -> Path:
    """Where a trained stage keeps its Trainer checkpoints until it finishes."""
    return stage_dir / "checkpoints"


def multitask_dir(run: Run) -> Path:
    return root(run) / "baselines" / "multitask-sft"


def variant_dir(run: Run, name: str) -> Path:
    """The run directory of a variant built beside the run (``authors-code``)."""
    return root(run) / "variants" / name


def ablation_dir(run: Run, name: str) -> Path:
    """The run directory of one ablation of this run."""
    return root(run) / "ablations" / name


# ----------------------------------------------------------------------------- answers and their scores

def generations_dir(run: Run) -> Path:
    return evaluation_root(run) / "generations"


def generated_dir(run: Run, system: str) -> Path:
    """Everything `generate` writes for one system."""
    return generations_dir(run) / system


def generated_file(run: Run, system: str, axis: str) -> Path:
    return generated_dir(run, system) / f"{axis}.jsonl"


def generation_stats_file(run: Run, system: str) -> Path:
    return generated_dir(run, system) / GENERATION_STATS


def mc_file(run: Run, system: str, axis: str = "honest") -> Path:
    """An axis's multiple-choice figures of a system (TruthfulQA MC1/MC2, from log-likelihoods computed while
    generating)."""
    return generated_dir(run, system) / f"{axis}.mc.json"


def routing_file(run: Run, system: str, axis: str) -> Path:
    """Routing statistics of an MoE system on an axis's evaluated prompts."""
    return generated_dir(run, system) / f"{axis}.routing.json"


def assembled_dir(run: Run) -> Path:
    return evaluation_root(run) / "assembled"


def assembled_file(run: Run, system: str, axis: str) -> Path:
    """The answers `evaluate` assembles for a system with no model (from the experts' answers)."""
    return assembled_dir(run) / system / f"{axis}.jsonl"


def judgements_file(run: Run, system: str, axis: str) -> Path:
    return evaluation_root(run) / "judgements" / system / f"{axis}.jsonl"


def judge_stamp_file(run: Run, system: str, axis: str) -> Path:
    """Which judge scored a judgements file (``evaluate.judge_fingerprint``)."""
    return judgements_file(run, system, axis).with_suffix(".judge.json")


def results_file(run: Run) -> Path:
    return evaluation_root(run) / "results.json"


def changed_evaluate_settings(results: Any, config: RunConfig) -> list[str] | None:
    """The ``evaluate`` keys whose value differs from the one a results.json (its parsed ``results``) records;
    None when it records none. A results.json's entries stay comparable only while this is empty: evaluate keeps
    them on a partial re-evaluation by it, status counts the file as done by it."""
    try:
        recorded = results["run"]["config"]["evaluate"]
    except (KeyError, TypeError):
        return None
    if not isinstance(recorded, dict):
        return None
    now = config.evaluate.model_dump(mode="json")
    absent = object()  # a key one side lacks differs from any value, None included
    return sorted(k for k in recorded.keys() | now.keys() if recorded.get(k, absent) != now.get(k, absent))


def report_file(run: Run) -> Path:
    return evaluation_root(run) / "report.md"


def specialisation_file(run: Run) -> Path:
    """The report's figures of each expert against the others on its own axis (``report.specialisation``)."""
    return evaluation_root(run) / "specialisation.json"


def plots_dir(run: Run) -> Path:
    return evaluation_root(run) / "plots"


def model_card_file(run: Run) -> Path:
    return fused_dir(run) / "README.md"


def alpaca_outputs_file(run: Run, system: str) -> Path:
    return evaluation_root(run) / "alpaca_eval" / system / "model_outputs.json"


# ----------------------------------------------------------------------------- the settings guard

# The settings that decide each trained stage's result (key prefixes). A stage's outputs record the
# config they were made with (``record_settings``); a later call whose settings differ must not silently
# reuse them. Bookkeeping keys (paths, logging, checkpoint cadence) are not settings of the result.
ALIGN_SETTINGS: tuple[str, ...] = ("seed", "model.base", "model.dtype", "data.", "lora.", "train.")
BUILD_SETTINGS: tuple[str, ...] = (*ALIGN_SETTINGS, "experts", "moe.", "compat.unscaled_shared_experts",
                                   "compat.frozen_random_router")
FUSE_SETTINGS: tuple[str, ...] = (*BUILD_SETTINGS, "fusion.", "compat.")
TRAINED_EXPERTS_ONLY: tuple[str, ...] = ("lora.", "train.")
"""Settings that only shape experts stage 1 trains: not compared when ``moe.adapters`` brings every expert."""
BOOKKEEPING: tuple[str, ...] = ("data.dir", "train.logging_steps", "train.save_steps", "fusion.heldout_prompts",
                                "fusion.train.logging_steps", "fusion.train.save_steps")
PATH_SETTINGS: tuple[str, ...] = ("moe.adapters", "model.base")
"""Settings that may hold paths: compared as the places they name, so one run given once by a relative and
once by an absolute path (``--out runs/x`` vs ``--out /work/runs/x``) is the same run."""


def settings_file(stage_dir: Path) -> Path:
    return stage_dir / SETTINGS


def record_settings(config: RunConfig, stage_dir: Path) -> None:
    """Write the resolved config beside a stage's outputs: what was actually used, for the guard."""
    dump_config(config, settings_file(stage_dir))


def _lookup(tree: Any, key: str) -> tuple[bool, Any]:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def changed_settings(stored: Path, config: RunConfig, settings: tuple[str, ...],
                     ignore: tuple[str, ...] = ()) -> list[str]:
    """Settings under ``settings`` that differ between the config a finished stage recorded (``stored``,
    written by ``record_settings``) and ``config``, as 'key: old there, new now'; [] when nothing was recorded.
    Keys the recorded config does not have (written by an older version) are not compared."""
    if not stored.is_file():
        return []
    old = yaml.safe_load(stored.read_text()) or {}
    new = config.model_dump(mode="json")
    diffs = []
    keys = config_keys()
    for key in (k for k in keys if not any(o.startswith(k + ".") for o in keys)):  # leaves only
        if not key.startswith(settings) or key.startswith(BOOKKEEPING + tuple(ignore)):
            continue
        found, before = _lookup(old, key)
        _, now = _lookup(new, key)
        if key.startswith(PATH_SETTINGS):
            before, now = _as_places(before), _as_places(now)
        if found and before != now:
            diffs.append(f"{key}: {before!r} there, {now!r} now")
    return diffs


def _as_places(value: Any) -> Any:
    """Existing paths resolved to absolute ones, in a value or a dict of values; anything else as it is."""
    if isinstance(value, dict):
        return {k: _as_places(v) for k, v in value.items()}
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def other_experts_data(axis: str, axes: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The data settings that shape only other axes' samples (``data.<other axis>_*``: their sizes, shares,
    filters, held-out questions): a finished expert of ``axis`` is not refused for them."""
    return tuple(f"data.{a}_" for a in axes if a != axis)


def refuse_other_settings(out: Path, config: RunConfig, settings: tuple[str, ...], ignore: tuple[str, ...] = ()) -> None:
    """Raise when the finished stage at ``out`` was made with other result-deciding settings than ``config``."""
    if set(config.experts) <= set(config.moe.adapters):
        ignore = (*ignore, *TRAINED_EXPERTS_ONLY)
    diffs = changed_settings(settings_file(out), config, settings, ignore)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise H3FusionError(
            f"{out} was made with other settings ({'; '.join(diffs[:3])}{more}); give this run a new "
            f"directory (--out DIR) or move {out} away to redo it")
