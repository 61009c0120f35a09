"""The report's plots (``<run>/plots/*.png``): per-axis headline rates, hhh, training curves, routing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from h3fusion import runs
from h3fusion.axes import hhh_formula
from h3fusion.config import RunConfig
from h3fusion.report.tables import FUSED, headline_columns, metric


def write_plots(results: dict, run: runs.Run, config: RunConfig) -> dict[str, Path]:
    """Draw every plot the run's files allow; returns {name: png path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = runs.plots_dir(run)
    plots.mkdir(parents=True, exist_ok=True)
    systems = results["systems"]
    names = list(systems)
    colours = ["tab:red" if n == FUSED else "tab:blue" if n.startswith("expert-") else "tab:gray" for n in names]
    out = {}

    headlines = headline_columns(results)
    fig, panels = plt.subplots(1, len(headlines), figsize=(13 * len(headlines) / 3, 0.35 * len(names) + 1.6),
                               sharey=True, squeeze=False)
    panels = panels[0]
    for panel, (title, axis, key, _) in zip(panels, headlines, strict=True):
        values = [metric(systems[n], axis, key) or 0.0 for n in names]
        panel.barh(range(len(names)), values, color=colours)
        panel.set_title(title.replace("·inf", "·informative"))
        panel.set_xlim(0, 1)
    panels[0].set_yticks(range(len(names)), names)
    panels[0].invert_yaxis()
    fig.suptitle("Per-axis scores (red: H3Fusion, blue: the experts)", y=1.02)
    out["axes"] = plots / "axes.png"
    fig.savefig(out["axes"], dpi=110, bbox_inches="tight")
    plt.close(fig)

    ranked = sorted((n for n in names if systems[n].get("hhh") is not None), key=lambda n: systems[n]["hhh"])
    fig, panel = plt.subplots(figsize=(7, 0.35 * len(ranked) + 1.2))
    panel.barh(range(len(ranked)), [systems[n]["hhh"] for n in ranked],
               color=["tab:red" if n == FUSED else "tab:gray" for n in ranked])
    panel.set_yticks(range(len(ranked)), ranked)
    panel.set_xlabel(f"hhh = {hhh_formula()}")
    out["hhh"] = plots / "hhh.png"
    fig.savefig(out["hhh"], dpi=110, bbox_inches="tight")
    plt.close(fig)

    curves = _training_curves(run, config)
    if curves:
        fig, panels = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 3.4), squeeze=False)
        for panel, (title, series) in zip(panels[0], curves.items(), strict=True):
            for label, (steps, values) in series.items():
                panel.plot(*_smooth(steps, values), label=label)
            panel.set_title(title)
            panel.set_xlabel("step (running mean of 5)")
            panel.legend(fontsize=8)
        out["training"] = plots / "training_curves.png"
        fig.savefig(out["training"], dpi=110, bbox_inches="tight")
        plt.close(fig)

    routing = {}
    for axis in config.experts:
        path = runs.routing_file(run, FUSED, axis)
        if path.is_file():
            stats = json.loads(path.read_text())
            routing.setdefault("experts", stats["experts"])
            routing.setdefault("axes", {}).update(stats["axes"])
    if routing:
        from h3fusion.routing_plots import plot_routing

        heatmap, intensity = plot_routing(routing, plots, title="H3Fusion routing on the evaluated test prompts")
        out["routing"], out["intensity"] = heatmap, intensity
    return out


def _smooth(steps: list[int], values: list[float], window: int = 5) -> tuple:
    """Running mean over ``window`` logged steps (only full windows: no edge artefacts)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2 * window:
        return steps, values
    return steps[window - 1:], np.convolve(values, np.ones(window) / window, mode="valid")


def _training_curves(run: runs.Run, config: RunConfig) -> dict:
    curves: dict = {}
    for axis in config.experts:
        path = runs.expert_dir(run, axis) / runs.EXPERT_MARKER
        if path.is_file():
            rows = [r for r in json.loads(path.read_text())["log_history"] if "loss" in r]
            curves.setdefault("experts: training loss", {})[axis] = ([r["step"] for r in rows], [r["loss"] for r in rows])
    path = runs.fused_dir(run) / runs.FUSE_MARKER
    if path.is_file():
        rows = [r for r in json.loads(path.read_text())["log_history"] if "lm_loss" in r]
        steps = [r["step"] for r in rows]
        curves["fusion: LM loss"] = {"lm": (steps, [r["lm_loss"] for r in rows])}
        curves["fusion: router"] = {"gate loss": (steps, [r["gate_loss"] for r in rows]),
                                    "router accuracy": (steps, [r["router_accuracy"] for r in rows])}
    return curves
