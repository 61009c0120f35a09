"""`h3fusion run`: every stage in order, each skipped when its outputs are complete.

    align -> build -> fuse -> baselines -> generate -> evaluate -> report

Each stage reads the previous stage's files, so a killed run resumes with the same command, and
any stage can also be run alone through its own verb.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from h3fusion import runs
from h3fusion.config import RunConfig
from h3fusion.errors import H3FusionError


def _align(config: RunConfig, log) -> None:
    from h3fusion.experts import align

    align(config, log=log)


def _build(config: RunConfig, log) -> None:
    from h3fusion.build import build_run

    build_run(config, log=log)


def _fuse(config: RunConfig, log) -> None:
    from h3fusion.fusion import fuse_run

    fuse_run(config, log=log)


def _baselines(config: RunConfig, log) -> None:
    from h3fusion.baselines.trained import run_authors_code, train_multitask_sft

    if config.baselines.multitask_sft:
        train_multitask_sft(config, log=log)
    if config.baselines.authors_code:
        run_authors_code(config, log=log)


def _generate(config: RunConfig, log) -> None:
    from h3fusion.generate import generate_run

    generate_run(config, log=log)


def _evaluate(config: RunConfig, log) -> None:
    from h3fusion.evaluate import evaluate_run

    evaluate_run(config, log=log)


def _report(config: RunConfig, log) -> None:
    from h3fusion.report import write_report

    write_report(config, log=log)


STAGES: dict[str, Callable[[RunConfig, Callable], None]] = {
    "align": _align,
    "build": _build,
    "fuse": _fuse,
    "baselines": _baselines,
    "generate": _generate,
    "evaluate": _evaluate,
    "report": _report,
}


def run(config: RunConfig, stages: list[str] | None = None, log=print) -> None:
    """Run the given stages (default: all) in pipeline order."""
    stages = stages or list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise H3FusionError(f"unknown stage '{unknown[0]}'; stages are {', '.join(STAGES)}")
    runs.record_settings(config, runs.root(config))
    for name in STAGES:
        if name in stages:
            started = time.time()
            STAGES[name](config, log)
            log(f"[run] {name} done in {time.time() - started:.0f} s")
