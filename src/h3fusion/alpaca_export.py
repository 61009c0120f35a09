"""`h3fusion export-outputs`: every system's AlpacaEval answers as alpaca_eval's ``model_outputs.json``.

The offline helpful judge stands in for GPT-4; with an API key, the real AlpacaEval reads these files:
one per system at ``<run>/alpaca_eval/<system>/model_outputs.json``, a JSON list of
``{"instruction", "output", "generator", "dataset"}`` (all strings), the evaluated subset (the first
``evaluate.helpful_n`` instructions) in AlpacaEval's order. ``instruction`` is AlpacaEval's own text,
unchanged, since alpaca_eval pairs each output with the reference answer of the same instruction;
``generator`` is ``<run name>/<system>`` (the name alpaca_eval's leaderboard shows). For the paper's
protocol (AlpacaEval 1: GPT-4 against text-davinci-003), run

    IS_ALPACA_EVAL_2=False alpaca_eval --model_outputs <run>/alpaca_eval/<system>/model_outputs.json
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from h3fusion import runs
from h3fusion.config import RunConfig
from h3fusion.errors import H3FusionError
from h3fusion.generate import evaluated_records
from h3fusion.io import read_jsonl, write_json

FIELDS = ("instruction", "output", "generator", "dataset")


def alpaca_eval_outputs(config: RunConfig, system: str) -> list[dict[str, str]]:
    """One system's answers to the evaluated AlpacaEval instructions, in alpaca_eval's model_outputs format."""
    tests = evaluated_records(config, "helpful")
    from h3fusion.systems import answers_file

    path = answers_file(config, system, "helpful")
    answers = read_jsonl(path) if path.is_file() else []
    if len(answers) < len(tests):
        raise H3FusionError(f"{path} holds {len(answers)} of {len(tests)} answers; finish it with `h3fusion generate` "
                            "(or `h3fusion evaluate` for the systems it assembles) first")
    rows = []
    for line, (test, answer) in enumerate(zip(tests, answers, strict=False), 1):
        if answer.get("instruction") != test["instruction"]:
            raise H3FusionError(f"{path} line {line} answers another instruction than AlpacaEval's #{test['id'] + 1}; "
                                "it was generated for other test data: move it away and generate again")
        rows.append({"instruction": test["instruction"], "output": str(answer.get("response") or ""),
                     "generator": f"{config.name}/{system}", "dataset": str(test.get("dataset") or "")})
    return rows


def export_outputs(config: RunConfig, systems: Sequence[str] | None = None, log=print) -> dict[str, Path]:
    """Write ``<run>/alpaca_eval/<system>/model_outputs.json`` for each system (default: every system with
    AlpacaEval answers); returns {system: path}."""
    if not systems:
        systems = answered_systems(config)
    if not systems:
        raise H3FusionError(f"no AlpacaEval answers under {runs.generations_dir(config)}; run `h3fusion generate` first")
    written = {}
    for system in systems:
        out = runs.alpaca_outputs_file(config, system)
        write_json(out, alpaca_eval_outputs(config, system))
        written[system] = out
        log(f"[export-outputs] {system}: {out}")
    return written


def answered_systems(config: RunConfig) -> list[str]:
    """The systems with AlpacaEval answers on disk: those `generate` answered and those `evaluate` assembled."""
    from h3fusion.systems import assembled_systems

    # (a run evaluated before assembled answers had their own folder holds stale copies among the generations)
    generated = {p.parent.name for p in runs.generations_dir(config).glob("*/helpful.jsonl")} - set(assembled_systems())
    assembled = {p.parent.name for p in runs.assembled_dir(config).glob("*/helpful.jsonl")}
    return sorted(generated | assembled)
