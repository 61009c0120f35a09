"""Fit the offline judges once per data directory and evaluated-subset sizes, then reuse them.

    fit_judges(config, cache_dir=None, log=print, axes=AXES, max_rows=None, force=False, cross_fit=True)
        -> {axis: validation dict}
    load_judges(config, cache_dir=None, log=print, axes=AXES, max_rows=None, cross_fit=True)
        -> {axis: Judge}          # fits first when the cache lacks a judge; CrossFittedJudge for folds

Cache layout (default root ``$H3FUSION_CACHE/judges``, else ``~/.cache/h3fusion/judges``)::

    <root>/embeddings.safetensors     MiniLM vectors by sha1(text) (no labels; shared by all judges)
    <root>/<axis>/<key>/              one fitted judge: meta.json, validation.json, fitted_on.json,
                                      *.lgb.txt (LightGBM text models), calibration.json
    <root>/<axis>-<part>/<key>/       a part of a judge cached on its own (``component_keys``: the harmless
                                      judge's cross-encoder and request model), keyed by its own inputs

``key`` is per judge: it hashes the shared ``JUDGE_VERSION`` and the judge module's own ``VERSION``,
the contents (sha256) of the data files that judge reads (its ``DATA_FILES``), the size of its
evaluated subset (``evaluate.<axis>_n``) and ``max_rows``. So changing one judge refits that judge
alone, and contents, not mtimes, decide: a data directory copied afresh (a new machine, a
re-provisioned share) keeps its fitted judges. Nothing is pickled.

Run a full fit from the shell with ``h3fusion judges fit [CONFIG] [--force] [--axis helpful ...]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from h3fusion.axes import axis_names, axis_spec
from h3fusion.config import AXES, RunConfig
from h3fusion.data.prompts import prompt_text
from h3fusion.data.sources import data_root
from h3fusion.errors import H3FusionError
from h3fusion.io import stage_writes, write_json
from h3fusion.judges.base import JUDGE_VERSION, Judge
from h3fusion.judges.embedder import Embedder
from h3fusion.judges.metrics import rounded
from h3fusion.judges.threads import limit_threads


def _module(axis: str):
    """The axis's judge module (``DATA_FILES``, ``VERSION``, ``fit`` ...; see ``h3fusion.axes``)."""
    return axis_spec(axis).judge_module


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("H3FUSION_CACHE") or Path.home() / ".cache" / "h3fusion"
    return Path(base).expanduser() / "judges"


def exclusion_config(config: RunConfig) -> RunConfig:
    """The config whose evaluated subsets the judges exclude: at least the paper's (first 50 / 500 /
    all 409: each axis's ``paper_n``). Every subset is a prefix of its test set, so a judge that excludes
    the larger prefix is valid for any smaller one, and the demo, the CPU study and the paper setting share
    one fit (at the same ``evaluate.alpacaeval_dev``: its holdout is excluded too, and is part of the key)."""
    sizes = {}
    for axis in axis_names():
        key = f"{axis}_n"
        if key not in type(config.evaluate).model_fields:  # an axis whose test set the config does not size
            continue
        ours, paper = getattr(config.evaluate, key), axis_spec(axis).paper_n
        sizes[key] = None if ours is None or paper is None else max(ours, paper)
    return config.model_copy(update={"evaluate": config.evaluate.model_copy(update=sizes)})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folds(config: RunConfig, axis: str) -> list[tuple[int, int]] | None:
    """The cross-fitting folds of ``axis``'s judge, or None for one judge.

    A judge whose spec says so (``AxisSpec.cross_fit``: the helpful judge) is cross-fitted once
    ``evaluate.<axis>_n`` goes beyond the paper's subset (the first 50 AlpacaEval instructions): the evaluated
    prompts are dealt into ``judges.folds`` folds (every K-th), and fold k is scored by a judge fitted on no
    prompt of fold k (but on the other folds'), so every evaluated prompt is scored by a judge that never saw
    it while the fit keeps most of the data."""
    spec, k = axis_spec(axis), config.judges.folds
    n = getattr(config.evaluate, f"{axis}_n", None)
    if not spec.cross_fit or n is None or spec.paper_n is None or n <= spec.paper_n or k <= 1:
        return None
    return [(i, k) for i in range(k)]


def single_judge_config(config: RunConfig) -> RunConfig:
    """The config of the one judge per axis that scores users' own files (``cross_fit=False``): it excludes the
    paper's first 50 AlpacaEval instructions, not a cross-fitted run's whole evaluated set (which would leave it
    nothing to fit on at 805)."""
    n = min(config.evaluate.helpful_n, axis_spec("helpful").paper_n)
    return config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"helpful_n": n})})


def quick(config: RunConfig, axis: str) -> bool:
    """Whether ``axis``'s judge is fitted small (``judges.fit_size: quick``; judges without a quick fit ignore it)."""
    return config.judges.fit_size == "quick" and hasattr(_module(axis), "QUICK")


def cache_key(config: RunConfig, axis: str, max_rows: int | None = None, fold: tuple[int, int] | None = None) -> str:
    """The hash naming ``axis``'s fitted judge for this data, this evaluated subset, ``max_rows`` and fold."""
    module = _module(_check_axes([axis])[0])
    files = file_digests(config, module.DATA_FILES, axis)
    payload = {"axis": axis, "version": [JUDGE_VERSION, module.VERSION], "files": files,
               "evaluated": getattr(config.evaluate, f"{axis}_n", None), "max_rows": max_rows}
    if fold is not None:  # keys of unfolded, full judges stay as they were: their caches stay valid
        payload["fold"] = list(fold)
    if quick(config, axis):
        payload["fit_size"] = "quick"
    if hasattr(module, "config_material") and (material := module.config_material(config)):
        payload["config"] = material  # settings besides the evaluated subset that move what it never fits on
    if hasattr(module, "key_material"):  # what a judge reads besides its data files (rules, its own test set)
        payload["material"] = module.key_material()
    if hasattr(module, "component_keys"):  # parts cached on their own (the harmless judge's cross-encoder ...)
        payload["components"] = module.component_keys(config, max_rows, quick(config, axis))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def file_digests(config: RunConfig, names: Sequence[str], who: str) -> list[list[str]]:
    """[name, sha256 of its contents] of each data file in ``names`` (under the data root): a cache key's part."""
    root = data_root(config)
    if root is None:
        raise H3FusionError("the offline judges are fitted from local files: set H3FUSION_DATA_DIR "
                            "(or data.dir in the config) to a directory laid out like shared/data")
    files = []
    for name in names:
        path = root / name
        if not path.is_file():
            raise H3FusionError(f"{path} not found: the {who} judge needs it; copy it as shared/data/SOURCES.md lists")
        files.append([name, _sha256(path)])
    return files


def component_key(payload: dict[str, Any]) -> str:
    """The hash naming one cached component of a judge (its data files, settings and version in ``payload``)."""
    return hashlib.sha256(json.dumps({"component_key": JUDGE_VERSION, **payload}, sort_keys=True).encode()).hexdigest()[:16]


def judge_dir(config: RunConfig, axis: str, cache_dir: str | Path | None = None, max_rows: int | None = None,
              fold: tuple[int, int] | None = None) -> Path:
    """Where ``axis``'s judge (of one fold, when cross-fitted) for this data and this evaluated subset lives."""
    return cache_root(cache_dir) / axis / cache_key(exclusion_config(config), axis, max_rows, fold)


def _check_axes(axes: Sequence[str]) -> list[str]:
    bad = [a for a in axes if a not in axis_names()]
    if bad:
        raise H3FusionError(f"unknown judge axis {bad}; choose from {list(axis_names())}")
    return list(axes)


def fit_judges(config: RunConfig, cache_dir: str | Path | None = None, log: Callable[[str], Any] = print,
               axes: Sequence[str] = AXES, max_rows: int | None = None, force: bool = False,
               cross_fit: bool = True) -> dict[str, Any]:
    """Fit (or reuse) every judge in ``axes``; returns {axis: validation figures} (for a cross-fitted judge,
    its folds' figures and their mean, see ``crossfit.combined_validation``).

    ``max_rows`` caps the fitting rows of each judge (for tests; the figures are then meaningless).
    ``force`` refits even when the cache holds a judge. ``cross_fit=False`` fits the one judge for users' own
    files instead of the folds (``folds``).
    """
    from h3fusion.judges.crossfit import combined_validation

    limit_threads()
    config = exclusion_config(config if cross_fit else single_judge_config(config))
    axes = _check_axes(axes)
    embedder = Embedder(cache_root(cache_dir) / "embeddings.safetensors", log=log)
    results = {}
    for axis in axes:
        plan = (folds(config, axis) if cross_fit else None) or [None]
        figures = [_fit_one(config, axis, cache_dir, max_rows, fold, embedder, force, log) for fold in plan]
        results[axis] = figures[0] if plan == [None] else combined_validation(figures)
    return results


def _fit_one(config: RunConfig, axis: str, cache_dir: str | Path | None, max_rows: int | None,
             fold: tuple[int, int] | None, embedder: Embedder, force: bool, log: Callable[[str], Any]) -> dict[str, Any]:
    out = judge_dir(config, axis, cache_dir, max_rows, fold)
    which = axis if fold is None else f"{axis} (fold {fold[0] + 1} of {fold[1]})"
    if (out / "validation.json").is_file() and not force:
        log(f"{which} judge: reusing {out}")
        return _load(out / "validation.json")
    tmp = out.parent / f".{out.name}.tmp"  # moved into place only once complete: a kill leaves no half judge
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    extra = ({} if fold is None else {"fold": fold}) | ({"quick": True} if quick(config, axis) else {})
    # a refused write (full disk ...) is one line, and the half-written judge is removed: the next call refits
    with stage_writes(out.parent, f"fitting the {which} judge",
                      need=axis_spec(axis).fitted_bytes + embedder.disk_bytes(), cleanup=partial(shutil.rmtree, tmp)):
        if hasattr(_module(axis), "component_keys"):  # a forced refit refits its cached components too
            extra["force"] = force
        _module(axis).fit(config, tmp, embedder, log=log, max_rows=max_rows, **extra)
        embedder.save()
        seconds = time.perf_counter() - start
        write_json(tmp / "validation.json", rounded(_load(tmp / "validation.json") | {"fit_seconds": seconds}))
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    log(f"{which} judge: fitted in {seconds:.0f} s -> {out}")
    return _load(out / "validation.json")


def summary(axis: str, validation: dict[str, Any]) -> str:
    """One line of a judge's validation figures: the judge module's own ``summary`` where it has one, else
    every top-level number of its validation record."""
    module = _module(axis)
    if hasattr(module, "summary"):
        return module.summary(validation)
    shown = {k: v for k, v in validation.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return f"{axis}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def load_judges(config: RunConfig, cache_dir: str | Path | None = None, log: Callable[[str], Any] = print,
                axes: Sequence[str] = AXES, max_rows: int | None = None, cross_fit: bool = True) -> dict[str, Judge]:
    """The fitted judges for this data and these evaluated subsets (fitting any that are missing); a
    cross-fitted axis (``folds``) gets a ``CrossFittedJudge`` over its folds' judges."""
    from h3fusion.judges.crossfit import CrossFittedJudge

    axes = _check_axes(axes)
    config = config if cross_fit else single_judge_config(config)
    plans = {axis: (folds(exclusion_config(config), axis) if cross_fit else None) or [None] for axis in axes}
    missing = [axis for axis in axes if any(not (judge_dir(config, axis, cache_dir, max_rows, fold)
                                                 / "validation.json").is_file() for fold in plans[axis])]
    if missing:
        fit_judges(config, cache_dir, log, missing, max_rows, cross_fit=cross_fit)
    limit_threads()
    embedder = Embedder()
    judges: dict[str, Judge] = {}
    for axis, plan in plans.items():
        loaded = [axis_spec(axis).judge(judge_dir(config, axis, cache_dir, max_rows, fold), embedder) for fold in plan]
        judges[axis] = loaded[0] if plan == [None] else CrossFittedJudge(
            loaded, [prompt_text(t, axis=axis)[0] for t in _evaluated(config, axis)])
    return judges


def _evaluated(config: RunConfig, axis: str) -> list[dict[str, Any]]:
    from h3fusion.data import load_test

    return load_test(axis, config, getattr(config.evaluate, f"{axis}_n", None))

