"""Causal attribution, the arithmetic: how much of the train/eval output gap recalibrating
some layers removes, from the tally of an eval pass with those layers' statistics replaced
(``measuring.passes.recalibrated_tally`` runs it)."""

from __future__ import annotations

from typing import Optional

from bncheck.measuring.outputs import OutputTally, output_gap


def gap_share(tally: Optional[OutputTally], gap: float) -> Optional[float]:
    """Share of the output ``gap`` that closes: 1 = all of it, 0 = no effect, negative = the
    outputs diverge more (other layers were tuned to the replaced statistics). None when
    nothing could be replaced."""
    if tally is None:
        return None
    fixed = output_gap(tally.result())
    return 1.0 - (fixed or 0.0) / gap
