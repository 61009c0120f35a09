"""`h3fusion routing`: routing diagnostics of a finished MoE model on held-out prompts of each axis.

Writes ``routing.json`` (``moe.routing.routing_stats``: per-layer heat-map, per-prompt intensity,
router accuracy) and its plots into ``<model>/routing/`` (or a directory of your choice). Reads a
model only: nothing here trains or changes it.
"""

from __future__ import annotations

from pathlib import Path

from h3fusion.config import RunConfig
from h3fusion.errors import H3FusionError

SOURCES = ("pool", "test")
"""pool: held-out prompts of the training distribution; test: the axes' test prompts (``fusion.heldout_prompts``)."""


def check_routing(config: RunConfig, model_dir: Path | None = None, out: Path | None = None,
                  source: str = "pool") -> tuple[Path, dict]:
    """Routing statistics of ``model_dir`` (default: the run's fused model) on ``source`` prompts, written with
    their plots to ``out`` (default: ``<model>/routing``); returns (out, statistics)."""
    from h3fusion.fusion import heldout_prompts
    from h3fusion.io import write_json
    from h3fusion.models import load_model
    from h3fusion.moe.modeling import H3FusionForCausalLM
    from h3fusion.moe.routing import routing_stats
    from h3fusion.routing_plots import plot_routing
    from h3fusion.runs import fused_dir, routing_check_dir

    if source not in SOURCES:
        raise H3FusionError(f"--source {source!r}: choose pool or test")
    model_dir = model_dir or fused_dir(config)
    loaded, tokenizer = load_model(str(model_dir))
    if not isinstance(loaded, H3FusionForCausalLM):
        raise H3FusionError(f"{model_dir} is not an h3fusion MoE model (it loads as {type(loaded).__name__})")
    stats = routing_stats(loaded, tokenizer, heldout_prompts(config, tokenizer, source))
    out = out or routing_check_dir(model_dir)
    write_json(out / "routing.json", stats)
    plot_routing(stats, out, title=f"routing of held-out prompts: {model_dir}")
    return out, stats
