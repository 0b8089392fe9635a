"""``BNDriftCallback``: BN drift caught while a Lightning model trains.

At the end of each validation (every ``every_n_epochs`` epochs; never during the sanity
check, when no step has been trained) it diagnoses the module on a held sample, logs
``bncheck/max_score``, ``bncheck/output_agreement`` and the worst layers' scores to every
logger of the trainer (and to ``trainer.callback_metrics``, so ``ModelCheckpoint`` or
``EarlyStopping`` can monitor them), keeps the result on ``callback.last_check``/``last_report``,
warns from ``warn_on`` and, from ``fail_on``, stops the fit with the finding in the message.

Works with ``lightning`` (``lightning.pytorch``) or the older ``pytorch_lightning`` package:
``pip install 'bncheck[lightning]'``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional

from bncheck.monitor import CheckHistory, DriftCheck, check_drift, check_levels

try:  # the unified package first; the callback must subclass the Trainer's own Callback
    from lightning.pytorch import Callback
    from lightning.pytorch.utilities import rank_zero_only
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback
        from pytorch_lightning.utilities import rank_zero_only
    except ImportError:
        raise ImportError(
            "bncheck.integrations.lightning needs Lightning: pip install 'bncheck[lightning]'"
        ) from None


class BNDriftWarning(UserWarning):
    """Emitted when a check finds BN drift at or above ``warn_on``."""


class BNDriftCallback(CheckHistory, Callback):
    """Diagnose BN drift on ``sample`` at the end of validation.

    Args:
        sample: what ``bncheck.analyze`` takes -- a tensor, an ``(inputs, labels)`` pair, a
            DataLoader or a list of batches; held out of training, from the data the model
            will be evaluated on. Moved to the module's device batch by batch.
        every_n_epochs: check at epochs 0, N, 2N, ...
        fail_on: ``"error"`` (default), ``"warning"``, or ``None``: stop the fit when a
            finding reaches this severity.
        warn_on: emit a ``BNDriftWarning`` from this severity (default ``"warning"``).
        log_layers: how many of the worst layers to log by name.
        batch_size, num_batches, thresholds, ignore, attribute: as for ``bncheck.analyze``.

    The model's parameters, buffers, modes, gradients and the random number generators are
    left exactly as they were.

    >>> from bncheck.integrations.lightning import BNDriftCallback
    >>> import torch
    >>> callback = BNDriftCallback(torch.randn(64, 3, 32, 32), every_n_epochs=1)
    >>> callback.last_report is None
    True
    """

    def __init__(
        self,
        sample: Any,
        *,
        every_n_epochs: int = 1,
        fail_on: Optional[str] = "error",
        warn_on: Optional[str] = "warning",
        log_layers: int = 5,
        batch_size: int = 32,
        num_batches: Optional[int] = None,
        thresholds: Any = None,
        ignore: Sequence[str] = (),
        attribute: int = 0,
    ) -> None:
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive integer, got {every_n_epochs!r}")
        check_levels(fail_on, warn_on)
        self.sample = sample
        self.every_n_epochs = every_n_epochs
        self.fail_on = fail_on
        self.warn_on = warn_on
        self.log_layers = log_layers
        self.options = {"batch_size": batch_size, "num_batches": num_batches, "thresholds": thresholds,
                        "ignore": ignore, "attribute": attribute}
        self.checks: list[DriftCheck] = []
        """Every check of this fit, oldest first."""
        self.stopped_reason: Optional[str] = None

    def state_dict(self) -> dict[str, Any]:  # nothing worth resuming: checks are cheap to redo
        return {}

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        check = check_drift(pl_module, self.sample, step=trainer.current_epoch, fail_on=self.fail_on,
                            warn_on=self.warn_on, top=self.log_layers, **self.options)
        self.checks.append(check)
        self._log(trainer, check)
        message = check.message.replace(f"at step {check.step}", f"at epoch {check.step}", 1)
        if check.failed:
            self.stopped_reason = message
            trainer.should_stop = True
            _warn(f"{message}; stopping the fit (BNDriftCallback fail_on={self.fail_on!r}; "
                  "fail_on=None only warns)")
        elif check.should_warn:
            _warn(message)

    def _log(self, trainer: Any, check: DriftCheck) -> None:
        import torch

        metrics = check.metrics()
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        _log_to_loggers(trainer, metrics)


@rank_zero_only
def _warn(message: str) -> None:
    warnings.warn(message, BNDriftWarning, stacklevel=3)


@rank_zero_only
def _log_to_loggers(trainer: Any, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
