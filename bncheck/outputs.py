"""How far the model's outputs move between train and eval mode, tallied over batches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

from .batches import tensors
from .metrics import softmax_divergence, squared_norms
from .report import OutputDivergence


def is_logits(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and value.dim() == 2 and value.shape[1] >= 2


def logits_of(value: Any) -> Any:
    """Classifier logits inside a model output object (``ModelOutput.logits``, a dict's
    ``logits``), else the output itself."""
    if isinstance(value, dict) and is_logits(value.get("logits")):
        return value["logits"]
    inner = getattr(value, "logits", None)
    return inner if is_logits(inner) else value


@dataclass
class OutputTally:
    """Output divergence between modes, summed over batches (plain sums, so tallies from
    several processes add up)."""

    kind: Optional[str] = None
    samples: int = 0
    kl: float = 0.0
    js: float = 0.0
    agree: float = 0.0
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    labeled: int = 0
    train_correct: int = 0
    eval_correct: int = 0

    def add(self, out_train: Any, out_eval: Any, labels: Optional[Tensor]) -> None:
        out_train, out_eval = logits_of(out_train), logits_of(out_eval)
        if is_logits(out_train) and is_logits(out_eval) and out_train.shape == out_eval.shape:
            kind = "classifier"
        else:
            kind = "tensor"
        if self.kind not in (None, kind):
            self.kind = "none"
        if self.kind == "none":
            return
        self.kind = kind
        if kind == "classifier":
            kl, js, agree = softmax_divergence(out_train, out_eval)
            self.kl += float(kl.sum())
            self.js += float(js.sum())
            self.agree += float(agree.sum())
            self.samples += out_train.shape[0]
            self._add_tensor_pair(out_train, out_eval)
            if labels is not None and labels.dim() == 1 and labels.shape[0] == out_train.shape[0]:
                labels = labels.to(out_train.device)
                self.labeled += labels.shape[0]
                self.train_correct += int((out_train.argmax(-1) == labels).sum())
                self.eval_correct += int((out_eval.argmax(-1) == labels).sum())
            return
        train_parts, eval_parts = tensors(out_train), tensors(out_eval)
        if not train_parts or len(train_parts) != len(eval_parts) or any(
            a.shape != b.shape for a, b in zip(train_parts, eval_parts)
        ):
            self.kind = "none"
            return
        for a, b in zip(train_parts, eval_parts):
            self._add_tensor_pair(a, b)

    def _add_tensor_pair(self, a: Tensor, b: Tensor) -> None:
        if a.is_floating_point() or a.is_complex():
            diff, ref = squared_norms(a, b)
            self.diff_sq += diff
            self.ref_sq += ref

    def result(self) -> OutputDivergence:
        if self.kind in (None, "none"):
            return OutputDivergence(kind="none")
        rel = math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq > 0 else None
        if self.kind == "tensor":
            return OutputDivergence(kind="tensor", relative_l2=rel)
        n = max(self.samples, 1)
        return OutputDivergence(
            kind="classifier",
            kl=self.kl / n,
            js=self.js / n,
            top1_agreement=self.agree / n,
            relative_l2=rel,
            train_accuracy=self.train_correct / self.labeled if self.labeled else None,
            eval_accuracy=self.eval_correct / self.labeled if self.labeled else None,
        )


def output_gap(output: OutputDivergence) -> Optional[float]:
    """The output gap between modes that a fix tries to close: mean KL for classifiers,
    relative L2 otherwise; None when there is none to close."""
    value = output.kl if output.kind == "classifier" else output.relative_l2
    return value if value is not None and math.isfinite(value) and value > 0 else None
