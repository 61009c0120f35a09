"""``h3fusion-unfused``: the MoE as ``build`` left it, before fusion training — a diagnostic system.

Its experts are the aligned experts exactly and its router is only initialised (``moe.router_init``), so
between ``oracle-routed`` and H3Fusion it splits what H3Fusion loses to routing in two: what the router as
initialised loses against perfect routing (h3fusion-unfused vs oracle-routed), and what fusion training adds
or costs on top (H3Fusion vs h3fusion-unfused). It generates like any MoE system (``<run>/moe/``, with the
run's ``moe.expert_bias`` and ``moe.top_k``), and its routing files show the router before fusion moved it.
Off by default (``baselines.unfused``): it costs one more system's generation.
"""

from __future__ import annotations

UNFUSED = "h3fusion-unfused"
