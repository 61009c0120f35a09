"""Stage 0 (data): the one training record type all three axes produce."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SFTExample:
    """One supervised example: the prompt is built from instruction/input, the loss covers response."""

    axis: str
    """helpful, harmless or honest (the fusion stage's gate label)."""
    instruction: str
    input: str
    response: str
    source: str
    """Dataset name and row id, e.g. ``alpaca:1234`` or ``truthfulqa:17:2`` (question 17, answer 2)."""
