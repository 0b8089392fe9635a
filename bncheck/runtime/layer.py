"""One BN layer as a runtime found it, with every fact the later stages need resolved once.

Stages downstream (the statistics pass, scoring, recalibration, attribution) read these
fields and never ask what kind of model the layer lives in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

HOOKS = "hooks"
"""Access strategy: forward hooks see the layer's input (eager modules, exported programs)."""
BUFFERS = "buffers"
"""Access strategy: no hooks reach the layer (TorchScript); its batch statistics are read back
from its buffer update after each train-mode forward."""


@dataclass(frozen=True)
class BNLayer:
    name: str
    """Qualified name from ``named_modules()``."""
    module: nn.Module
    type_name: str
    """The class the user wrote (``BatchNorm2d``, ``BatchNormAct2d``), whatever wraps it now."""
    kind: str
    """``batchnorm`` (has a train mode) or ``frozen`` (buffers only: FrozenBatchNorm2d)."""
    access: str = HOOKS
    """How its input statistics are measured: ``hooks`` or ``buffers`` (buffer deltas)."""
    momentum: Optional[float] = 0.1
    """The update factor as saved (None: cumulative average). What the model does in training,
    so every finding reasons from it."""
    momentum_from: str = "module"
    """Where ``momentum`` came from: ``module`` (its attribute), ``graph`` (a constant traced
    into its graph) or ``default`` (nothing said: PyTorch's 0.1)."""
    applied_momentum: Optional[float] = None
    """The factor its buffer update applies in this run, when bncheck changed it (1.0 on a
    measuring twin); None: the saved ``momentum``."""
    traced_training: Optional[bool] = None
    """``training`` frozen into the layer's graph by tracing or export; None when the layer
    follows its module's flag. True: it normalizes with batch statistics even in eval mode."""
    frozen_by: Optional[str] = None
    """The module that keeps this layer in eval mode on purpose (a QAT fused ConvBn module after
    ``freeze_bn_stats``: ``freeze_bn=True``, its BN stays in eval through ``model.train()``)."""
    native: bool = False
    """Its forward is BatchNorm's own: with momentum 1 its buffers hold exactly each train-mode
    call's batch mean and unbiased variance (the statistics pass may read them there)."""

    @property
    def by_buffers(self) -> bool:
        """Measured from buffer updates (no hooks): its variance arrives unbiased per batch."""
        return self.access == BUFFERS

    @property
    def update_momentum(self) -> Optional[float]:
        """The factor its buffers move by in this run."""
        return self.momentum if self.applied_momentum is None else self.applied_momentum

    def buffer(self, name: str) -> Optional[Tensor]:
        value = getattr(self.module, name, None)
        return value if isinstance(value, Tensor) else None

    @property
    def running_mean(self) -> Optional[Tensor]:
        return self.buffer("running_mean")

    @property
    def running_var(self) -> Optional[Tensor]:
        return self.buffer("running_var")

    @property
    def weight(self) -> Optional[Tensor]:
        return self.buffer("weight")

    @property
    def eps(self) -> float:
        return float(getattr(self.module, "eps", 1e-5))

    @property
    def track_running_stats(self) -> bool:
        return bool(getattr(self.module, "track_running_stats", True)) and self.running_mean is not None

    @property
    def channels(self) -> int:
        for tensor in (self.running_mean, self.weight):
            if tensor is not None and not isinstance(tensor, nn.parameter.UninitializedTensorMixin):
                return int(tensor.numel())
        return int(getattr(self.module, "num_features", 0) or 0)
