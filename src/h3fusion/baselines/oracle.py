"""``oracle-routed``: every axis's test prompts answered by that axis's own expert, the ceiling of routing.

A router that always sent an axis's prompts to that axis's expert would answer exactly like this, so
comparing H3Fusion with it separates what H3Fusion loses to its router (H3Fusion vs oracle-routed)
from what the experts themselves cannot do (oracle-routed vs the best single expert). Like
``ensemble-rerank`` it knows each prompt's axis, so it is a diagnostic, not a deployable system; it
generates nothing: ``evaluate`` assembles it from the experts' answers and judgements.
"""

from __future__ import annotations

ORACLE = "oracle-routed"


def oracle_expert(axis: str) -> str:
    """The system whose answers oracle-routed gives on ``axis``: its own expert's, or for an axis no expert aligns
    to, the expert its spec names (``AxisSpec.oracle_axis``)."""
    from h3fusion.axes import axis_spec

    return f"expert-{axis_spec(axis).oracle_axis or axis}"
