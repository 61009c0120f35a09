"""The axes a run aligns and scores, as data: one registry of (data module, judge module) per axis.

An axis is a data module (``h3fusion.data.<axis>``: its training and test sets, the test records'
prompt field ``PROMPT_FIELD``, the paper's evaluated subset ``PAPER_N``, the test set's name
``TEST_SET`` and ``references(config, records)``, the aligned answers the embedding drift compares
with) and a judge module (``h3fusion.judges.<axis>``: the offline judge and its fit, plus ``SPEC``, an
``AxisSpec`` saying how the judge's scores become the axis's rates, report columns and headline).
``evaluate`` and ``report`` loop over ``axis_spec(name)`` and know no axis by name, so a new axis is a
data module, a judge module and one ``register_axis`` line (``BUILTIN_AXES`` for the shipped ones).

hhh, the study's one number, is the mean over the axes that count in it (``AxisSpec.in_hhh``) of
each axis's headline rate, or 1 − it where lower is better (``hhh``).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from h3fusion.errors import H3FusionError

BUILTIN_AXES: dict[str, tuple[str, str]] = {
    "helpful": ("h3fusion.data.helpful", "h3fusion.judges.helpful"),
    "harmless": ("h3fusion.data.harmless", "h3fusion.judges.harmless"),
    "honest": ("h3fusion.data.honest", "h3fusion.judges.honest"),
}
"""axis -> (data module, judge module), in the paper's order (which also seeds each axis's bootstrap)."""

SCORED_ONLY_AXES: dict[str, tuple[str, str]] = {
    "overrefusal": ("h3fusion.data.overrefusal", "h3fusion.judges.overrefusal"),
}
"""Axes no expert aligns to, scored beside the others when ``evaluate.extra_axes`` names them."""

_REGISTRY: dict[str, tuple[str, str]] = {**BUILTIN_AXES, **SCORED_ONLY_AXES}
_SPECS: dict[str, AxisSpec] = {}


@dataclass(frozen=True)
class Column:
    """One column of the report's results table: ``key`` of the axis's results entry."""

    header: str
    key: str
    higher_is_better: bool | None  # None: no best (a count, such as answer length)


@dataclass(frozen=True)
class Figure:
    """One of a judge's validation figures as results.json shows it: ``key`` <- the record at ``path``; with
    ``label`` it is also written in the report's judges line, beside the paper's target ``target`` (a key of
    ``AxisSpec.targets``) formatted by ``target_format``."""

    key: str
    path: tuple[str, ...]
    label: str | None = None
    target: str | None = None
    target_format: str = "{:.2f}"


@dataclass(frozen=True)
class AxisSpec:
    """What evaluate and report need of one axis; its judge module fills it (``SPEC``), the registry adds the
    axis's name and modules."""

    judge: type
    """The offline judge (a fitted judge directory -> ``score``); ``judges.fit`` fits and loads it."""
    rates: type
    """The ``rates.AxisRates`` subclass: the axis's rates, raw and corrected for the judge's measured error."""
    columns: tuple[Column, ...]
    headline: str
    """The key of the axis's headline rate (one of ``columns``): its term of hhh, the comparisons' rate."""
    headline_text: str
    """The headline rate in words (the hhh formula's term, e.g. "win rate")."""
    short: str
    """The headline's short name in the comparison table's columns ("rel. <short>")."""
    summary: str
    """The headline's name in the evaluate log line ("<summary> 0.123")."""
    judge_records: Callable[[Any, list[dict]], list[dict]]
    """(judge, records) -> each record plus ``score`` and ``label`` (what the judgements files hold)."""
    metrics: Callable[[list[dict]], dict]
    """Judged records -> the axis's rates and ``n`` (a system's results entry for the axis)."""
    per_prompt: Callable[[list[dict]], Any]
    """Judged records -> the headline per prompt (an array whose mean is the headline rate)."""
    rerank_score: Callable[[dict], float]
    """One judged answer -> how good the judge finds it, higher is better (``ensemble-rerank``)."""
    figures: tuple[Figure, ...]
    targets: Mapping[str, float]
    """The paper's targets for the judge's figures (the judge's own ``targets_met`` checks them)."""
    user_fields: tuple[str, ...]
    """Fields a user's record takes from the test record with the same prompt when it lacks them."""
    prepare_user_record: Callable[[dict, str, str], dict]
    """(record with those fields, its prompt text, where it is for errors) -> the record the judge scores."""
    external: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    """``judges.<axis>`` choices other than "offline": name -> (config -> a judge)."""
    fitted_bytes: int = 1 << 20
    """About the disk one fit of the offline judge takes (for the message when a write is refused)."""
    cross_fit: bool = False
    """Whether a run evaluating more than the paper's subset scores it with cross-fitted judges."""
    in_hhh: bool = True
    """Whether the headline is a term of hhh."""
    oracle_axis: str | None = None
    """Whose expert answers this axis's prompts in ``oracle-routed`` (None: the axis's own; a scored-only axis
    names the expert its prompts belong with, e.g. over-refusal's safe requests: helpful)."""
    name: str = ""
    data: ModuleType | None = None
    judge_module: ModuleType | None = None

    @property
    def prompt_field(self) -> str:
        return self.data.PROMPT_FIELD

    @property
    def paper_n(self) -> int | None:
        """The paper's evaluated subset of the test set (the first N; None: all)."""
        return self.data.PAPER_N

    @property
    def test_set(self) -> str:
        return self.data.TEST_SET

    def references(self, config, records: list[dict]) -> list[str | None]:
        return self.data.references(config, records)

    @property
    def headline_column(self) -> Column:
        return next(c for c in self.columns if c.key == self.headline)

    @property
    def higher_is_better(self) -> bool:
        return bool(self.headline_column.higher_is_better)


def register_axis(name: str, data_module: str, judge_module: str) -> None:
    """Make ``name`` an axis: its data module and judge module by their import paths."""
    _REGISTRY[name] = (data_module, judge_module)
    _SPECS.pop(name, None)


def unregister_axis(name: str) -> None:
    """Forget an axis ``register_axis`` added (the shipped ones stay)."""
    if name not in BUILTIN_AXES and name not in SCORED_ONLY_AXES:
        _REGISTRY.pop(name, None)
        _SPECS.pop(name, None)


def axis_names() -> tuple[str, ...]:
    """Every registered axis, the built-in ones first in the paper's order."""
    return tuple(_REGISTRY)


def _known(name: str) -> tuple[str, str]:
    if name not in _REGISTRY:
        raise H3FusionError(f"unknown axis {name!r}; choose from {list(_REGISTRY)}")
    return _REGISTRY[name]


def data_module(name: str) -> ModuleType:
    """The axis's data module (imports nothing of its judge)."""
    return importlib.import_module(_known(name)[0])


def axis_spec(name: str) -> AxisSpec:
    """The axis's spec (its judge module's ``SPEC`` with the axis's name and modules)."""
    if name not in _SPECS:
        data_path, judge_path = _known(name)
        judge = importlib.import_module(judge_path)
        _SPECS[name] = dataclasses.replace(judge.SPEC, name=name, data=importlib.import_module(data_path),
                                           judge_module=judge)
    return _SPECS[name]


def hhh_axes() -> list[str]:
    """The axes whose headline is a term of hhh, in registry order."""
    return [name for name in _REGISTRY if axis_spec(name).in_hhh]


def hhh(headlines: Mapping[str, Any]):
    """hhh from each axis's headline rate (floats or arrays of replicates): the mean over ``hhh_axes`` of the
    rate, or 1 − it where lower is better; None unless every one of them is given."""
    terms = []
    for name in hhh_axes():
        value = headlines.get(name)
        if value is None:
            return None
        terms.append(value if axis_spec(name).higher_is_better else 1 - value)
    return sum(terms) / len(terms)


def hhh_of(rates: Mapping[str, Mapping[str, Any] | None]):
    """hhh from each axis's rates ({axis: {key: value}}, e.g. a results entry): its headline rate per axis."""
    return hhh({name: (rates.get(name) or {}).get(axis_spec(name).headline) for name in hhh_axes()})


def hhh_formula() -> str:
    """The hhh formula in words, as the report and its plots state it."""
    return "mean(" + ", ".join(("" if axis_spec(a).higher_is_better else "1 − ") + axis_spec(a).headline_text
                               for a in hhh_axes()) + ")"
