"""``BNDriftTrainerCallback``: BN drift caught while a Hugging Face ``Trainer`` trains.

At each evaluation it diagnoses the model on a few batches of the evaluation dataloader (or a
sample you give), adds ``eval_bncheck/max_score``, ``eval_bncheck/output_agreement`` and the worst
layers' scores to the evaluation metrics (so ``metric_for_best_model`` and
``EarlyStoppingCallback`` can use them, and ``trainer.evaluate()`` returns them), records them in
``trainer.state.log_history``, warns from ``warn_on`` and, from ``fail_on``, stops training with
the finding in the warning. The model's parameters, buffers, modes, gradients and random number
generators are left exactly as they were (``bncheck.check_drift``).

ResNet, MobileNet, EfficientNet, ConvNeXt-with-BN, RegNet, audio models with BatchNorm: any model
the Trainer runs on batches of ``pixel_values``/``input_values``/``inputs``... with ``labels``.
Needs ``transformers``: ``pip install 'bncheck[hub]'``.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from typing import Any, Optional

from bncheck.monitor import CheckHistory, DriftCheck, check_drift, check_levels

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - depends on what is installed
    raise ImportError("bncheck.integrations.transformers needs transformers: pip install 'bncheck[hub]'") from None


class BNDriftWarning(UserWarning):
    """Emitted when a check finds BN drift at or above ``warn_on``."""


class BNDriftTrainerCallback(CheckHistory, TrainerCallback):
    """Diagnose BN drift at each evaluation of a ``transformers.Trainer``.

    Args:
        sample: what ``bncheck.analyze`` takes (a tensor, a list of batches, a DataLoader);
            None: the first ``num_batches`` batches of the Trainer's evaluation dataloader.
        num_batches: batches of the evaluation dataloader to check (default 4).
        fail_on: ``"error"`` (default), ``"warning"``, or ``None``: stop training when a
            finding reaches this severity.
        warn_on: emit a ``BNDriftWarning`` from this severity (default ``"warning"``).
        log_layers: how many of the worst layers to report by name.
        batch_size, thresholds, ignore, attribute: as for ``bncheck.analyze`` (``batch_size``
            only matters for a ``sample`` given as one tensor).

    >>> from bncheck.integrations.transformers import BNDriftTrainerCallback
    >>> BNDriftTrainerCallback(num_batches=2).last_report is None
    True
    """

    def __init__(
        self,
        sample: Any = None,
        *,
        num_batches: int = 4,
        fail_on: Optional[str] = "error",
        warn_on: Optional[str] = "warning",
        log_layers: int = 5,
        batch_size: int = 32,
        thresholds: Any = None,
        ignore: Sequence[str] = (),
        attribute: int = 0,
    ) -> None:
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
        check_levels(fail_on, warn_on)
        self.sample = sample
        self.num_batches = num_batches
        self.fail_on = fail_on
        self.warn_on = warn_on
        self.log_layers = log_layers
        self.options = {"batch_size": batch_size, "thresholds": thresholds, "ignore": ignore, "attribute": attribute}
        self.checks: list[DriftCheck] = []
        """Every check of this training run, oldest first."""
        self.stopped_reason: Optional[str] = None

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, metrics: Any = None,
                    eval_dataloader: Any = None, **kwargs: Any) -> Any:
        if model is None:
            return control
        sample = self.sample
        if sample is None:
            if eval_dataloader is None:
                return control
            sample = [_plain(batch) for batch in itertools.islice(eval_dataloader, self.num_batches)]
        check = check_drift(model, sample, step=state.global_step, fail_on=self.fail_on, warn_on=self.warn_on,
                            top=self.log_layers, **self.options)
        self.checks.append(check)
        numbers = check.metrics(prefix="eval_bncheck/")
        if isinstance(metrics, dict):
            metrics.update(numbers)
        state.log_history.append({**numbers, "step": state.global_step})
        if not state.is_world_process_zero:
            return control
        if check.failed:
            self.stopped_reason = check.message
            control.should_training_stop = True
            warnings.warn(f"{check.message}; stopping training (BNDriftTrainerCallback fail_on={self.fail_on!r}; "
                          "fail_on=None only warns)", BNDriftWarning, stacklevel=2)
        elif check.should_warn:
            warnings.warn(check.message, BNDriftWarning, stacklevel=2)
        return control


def _plain(batch: Any) -> Any:
    """A Trainer batch (a ``BatchEncoding``/``BatchFeature`` or dict) as a plain dict."""
    return dict(batch) if hasattr(batch, "keys") and not isinstance(batch, dict) else batch
