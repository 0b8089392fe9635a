"""The vocabulary of findings: every code bncheck can report, defined once.

Each code has the severities it may carry, the group it belongs to and a one-line meaning.
Rules (diagnose, divergence, engine, diff) emit these codes; renderers, the conclusion logic,
GitHub annotations and ``fix``'s refusals ask the groups here instead of keeping their own
lists; the JSON schemas' enums and README's findings tables are tested against this module
(tests/test_findings_vocabulary.py). No torch.

Groups:
- ``stale``: the running statistics disagree with the data (one conclusion speaks for them);
- ``input``: the data reaching the first BN layer is not what training fed it;
- ``sample``: the sample itself is off (said first; no recalibration is advised on it);
- ``accuracy``: what labels say about the two modes;
- ``output``: model-level divergence of the outputs;
- ``layer``: other facts about one layer;
- ``lint``: what the checkpoint alone reveals;
- ``runtime``: how the model runs (TorchScript, torch.export, ranks);
- ``diff``: comparisons of two checkpoints (``bncheck diff``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FindingCode:
    code: str
    """The stable code in JSON, tables and annotations."""
    severities: tuple[str, ...]
    """The severities a finding with this code may carry."""
    group: str
    """What kind of evidence it is (see the module docstring)."""
    meaning: str
    """One line; README's findings table says more."""


_ALL = (
    FindingCode("stale-running-stats", ("error", "warning"), "stale",
                "running stats disagree with the data's population stats, well above the noise floor"),
    FindingCode("pseudo-frozen", ("error", "warning"), "stale",
                "momentum 0 (or frozen affine saved in train mode) and stale statistics"),
    FindingCode("never-updated", ("error", "warning"), "stale", "running mean 0 / var 1 exactly: never saw data"),
    FindingCode("unconverged-running-stats", ("error", "warning"), "stale",
                "too few EMA updates for the momentum: the initial value still dominates"),
    FindingCode("input-distribution", ("error",), "input",
                "the first BN layer sees inputs far from its running stats: check preprocessing"),
    FindingCode("non-finite-stats", ("error",), "layer", "NaN/Inf in running or batch statistics"),
    FindingCode("small-batch-noise", ("warning",), "layer", "batches too small for batch statistics to mean much"),
    FindingCode("dead-channels", ("warning", "info"), "layer", "near-zero running variance with real batch variance"),
    FindingCode("tracking-disabled", ("warning",), "layer", "track_running_stats=False: eval depends on the batch"),
    FindingCode("frozen-bn", ("info",), "layer", "FrozenBatchNorm-style layer, checked against the data"),
    FindingCode("counter-reset", ("info",), "layer",
                "num_batches_tracked 0 with real statistics (an EMA/SWA copy or a converter: not corruption)"),
    FindingCode("unused-layer", ("info",), "layer", "a BN module that never ran on this data"),
    FindingCode("bn-frozen-in-eval", ("info",), "layer",
                "stale-looking statistics kept on purpose (labels, or freeze_bn), no recalibration advice"),
    FindingCode("momentum-none", ("info",), "lint", "momentum=None: a cumulative average over all of training"),
    FindingCode("unusual-eps", ("warning", "info"), "lint", "eps outside the usual range"),
    FindingCode("output-divergence", ("error", "warning", "info"), "output",
                "train- and eval-mode outputs disagree far beyond batch noise"),
    FindingCode("unrepresentative-batches", ("warning",), "output",
                "batches not drawn alike explain the output divergence"),
    FindingCode("accuracy-gap", ("error",), "accuracy",
                "with labels, train mode beats eval mode beyond sampling error (McNemar)"),
    FindingCode("chance-accuracy", ("warning",), "sample", "with labels, neither mode beats chance"),
    FindingCode("unrepresentative-sample", ("warning", "info"), "sample",
                "without labels, eval mode puts nearly the whole sample in one class"),
    FindingCode("unmeasurable", ("warning",), "runtime",
                "a TorchScript layer whose batch statistics were unobservable"),
    FindingCode("traced-in-train-mode", ("error",), "runtime",
                "traced or exported in train mode: batch statistics always"),
    FindingCode("rank-divergent-stats", ("warning", "info"), "runtime", "ranks hold different running statistics"),
    FindingCode("stats-not-updated", ("error",), "diff", "statistics identical while the weights around them moved"),
    FindingCode("stats-moved-frozen-weights", ("warning",), "diff",
                "statistics moved while the weights stayed frozen"),
)

CODES: dict[str, FindingCode] = {entry.code: entry for entry in _ALL}


def in_group(*groups: str) -> tuple[str, ...]:
    """The codes of these groups, in definition order."""
    return tuple(entry.code for entry in _ALL if entry.group in groups)


def run_codes() -> tuple[str, ...]:
    """Every code a ``bncheck run`` (or ``fix``) result may hold."""
    return tuple(entry.code for entry in _ALL if entry.group != "diff")


STALE = in_group("stale")
"""Running statistics stale for this data: the group one conclusion speaks for."""
SAMPLE = in_group("sample")
"""The sample itself is off: said first, and never recalibrated on."""
