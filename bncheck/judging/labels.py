"""What detection labels can vouch for, read from the pooled output alone (no torch: the
renderers ask it too)."""

from __future__ import annotations

from typing import Optional

from bncheck.reporting.report import OutputDivergence

DETECTION_VOUCHING_RECALL = 0.1
"""Train-mode recall of the target boxes below which a detector's labels vouch for nothing (a
label space the model does not use -- category ids numbered otherwise -- or an untrained head
gives recall 0 in both modes: no sign that eval mode is fine)."""


def labels_elsewhere(output: OutputDivergence) -> Optional[float]:
    """Share of the target boxes that train-mode boxes sit on under another label, when that is
    most of them and the recall (labels compared) is under ``DETECTION_VOUCHING_RECALL``: the
    targets are numbered unlike the model's classes (COCO category ids vs 0-based classes)."""
    if output.kind != "detection" or not output.objects or output.train_located is None \
            or output.train_accuracy is None or output.train_accuracy >= DETECTION_VOUCHING_RECALL:
        return None
    located = output.train_located / output.objects
    return located if located >= 0.5 else None
