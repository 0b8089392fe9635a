"""Pure math on statistics tensors: no IO, no modules, no printing.

Notation per channel c: batch (or pooled population) statistics ``mu_B``, ``var_B``
(biased: BatchNorm normalizes with the biased estimate), running statistics ``mu_R``,
``var_R``, the layer's ``eps`` and affine weight ``gamma``. All quantities below are
dimensionless, so they compare across layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


def scale_ratio(batch_var: Tensor, running_var: Tensor, eps: float) -> Tensor:
    """``a = sqrt((var_B + eps) / (var_R + eps))``: 1 when the scales agree.

    It is the factor by which eval-mode outputs are too wide (a > 1) or too narrow (a < 1)
    compared with train mode. Misleading alone on dead channels, where both variances sit
    at eps scale and a tiny absolute change reads as a large ratio.
    """
    return torch.sqrt((batch_var + eps) / (running_var + eps))


def mean_shift(batch_mean: Tensor, running_mean: Tensor, running_var: Tensor, eps: float) -> Tensor:
    """``b = (mu_B - mu_R) / sqrt(var_R + eps)``: 0 when the means agree.

    The offset of eval-mode outputs in units of the running std. Signed; large values at
    the first BN layer usually mean the input is not normalized the way training was.
    """
    return (batch_mean - running_mean) / torch.sqrt(running_var + eps)


def normalization_error(scale: Tensor, shift: Tensor) -> Tensor:
    """``e = sqrt((a - 1)^2 + b^2)``.

    For inputs drawn from the batch distribution, the eval-mode normalized output is
    ``a * z + b`` where ``z`` is the train-mode one; the RMS of their difference is
    ``sqrt((a - 1)^2 + b^2)`` (Batch Renorm's r and d). Units: train-mode output stds.
    """
    return torch.sqrt((scale - 1.0) ** 2 + shift**2)


def gaussian_kl(scale: Tensor, shift: Tensor) -> Tensor:
    """``KL(batch || running) = 0.5 * (a^2 - 1 - 2 ln a + b^2)`` in nats, per channel.

    Treats both distributions as Gaussian; heavy tails or multi-modal channels make it
    an under-estimate of the real divergence.
    """
    return 0.5 * (scale**2 - 1.0 - 2.0 * torch.log(scale) + shift**2)


def channel_weights(gamma: Optional[Tensor], channels: int, like: Tensor) -> Tensor:
    """``|gamma|``, the weight a channel gets in the layer score; ones without affine.

    A channel whose gamma is 0 is ignored by everything downstream, so its drift does not
    matter. If every gamma is 0 (or not finite) the weights fall back to uniform.
    """
    if gamma is None:
        return torch.ones(channels, dtype=like.dtype, device=like.device)
    weights = gamma.detach().to(like).abs()
    if not torch.isfinite(weights).all() or float(weights.sum()) <= 0.0:
        return torch.ones(channels, dtype=like.dtype, device=like.device)
    return weights


def weighted_rms(values: Tensor, weights: Tensor) -> float:
    """``sqrt(sum(w * v^2) / sum(w))``; NaN when any value is not finite."""
    return float(torch.sqrt((weights * values**2).sum() / weights.sum()))


def weighted_geometric_mean(values: Tensor, weights: Tensor) -> float:
    """``exp(sum(w * ln v) / sum(w))`` for positive values (the typical scale ratio)."""
    return float(torch.exp((weights * torch.log(values)).sum() / weights.sum()))


@dataclass
class ChannelMoments:
    """Per-channel statistics of one layer's input, accumulated over groups in float64.

    A *group* is the smallest unit whose statistics arrive together: one sample when a
    hook sees the input (mean and variance over the sample's spatial positions), one
    whole batch when only the batch statistics are known (TorchScript buffer updates).

    Two things are pooled:

    * the population mean and biased variance over every value (Chan's parallel
      algorithm, so batches of any size combine exactly);
    * the spread of the group means and of the group second moments around their batch
      mean (Welford over groups). Groups are independent samples, so this spread gives
      the sampling noise of any estimate built from ``k`` groups as ``spread / k`` -- and
      because a group is a whole sample, the spatial correlation inside an image is in
      it, which a formula assuming independent pixels would miss.
    """

    channels: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    values: float = 0.0
    """Number of values pooled per channel (samples times spatial positions)."""
    groups: int = 0
    batches: int = 0
    group_size_values: float = 0.0
    """Values per group (last seen); used to scale noise to a batch size."""
    mean: Tensor = field(init=False)
    m2: Tensor = field(init=False)
    group_mean_mean: Tensor = field(init=False)
    group_mean_m2: Tensor = field(init=False)
    group_sq_mean: Tensor = field(init=False)
    group_sq_m2: Tensor = field(init=False)

    def __post_init__(self) -> None:
        zeros = lambda: torch.zeros(self.channels, dtype=torch.float64, device=self.device)  # noqa: E731
        self.mean, self.m2 = zeros(), zeros()
        self.group_mean_mean, self.group_mean_m2 = zeros(), zeros()
        self.group_sq_mean, self.group_sq_m2 = zeros(), zeros()

    def add_groups(self, group_means: Tensor, group_vars: Tensor, values_per_group: int) -> None:
        """Pool one batch given as ``G`` groups: ``group_means``/``group_vars`` are ``[G, C]``
        biased statistics, each over ``values_per_group`` values."""
        means = group_means.to(torch.float64)
        variances = group_vars.to(torch.float64)
        n_groups = means.shape[0]
        batch_values = float(n_groups * values_per_group)
        batch_mean = means.mean(0)
        deviation_sq = (means - batch_mean) ** 2
        batch_var = variances.mean(0) + deviation_sq.mean(0)
        # Chan: merge (values, mean, m2) with the batch's (batch_values, batch_mean, m2_b).
        total = self.values + batch_values
        delta = batch_mean - self.mean
        self.mean += delta * (batch_values / total)
        self.m2 += batch_var * batch_values + delta**2 * (self.values * batch_values / total)
        self.values = total
        # Group-level spread. Second moments are taken about the batch mean, which is what
        # BatchNorm subtracts; its O(1/G) bias is negligible next to the spread itself.
        self._merge_spread(means, variances + deviation_sq)
        self.groups += n_groups
        self.batches += 1
        self.group_size_values = float(values_per_group)

    def add_pooled(self, batch_mean: Tensor, batch_var: Tensor, values: float) -> None:
        """Pool one batch known only by its per-channel mean and biased variance over
        ``values`` values (e.g. BatchNorm's own batch statistics). It counts in the population
        moments, not in the group spread: the noise estimate keeps coming from the groups
        added with ``add_groups``, scaled to every value pooled."""
        mean = batch_mean.to(torch.float64)
        total = self.values + values
        delta = mean - self.mean
        self.mean += delta * (values / total)
        self.m2 += batch_var.to(torch.float64) * values + delta**2 * (self.values * values / total)
        self.values = total
        self.batches += 1

    def _merge_spread(self, means: Tensor, second: Tensor) -> None:
        n_b = means.shape[0]
        n_a = self.groups
        for attr_mean, attr_m2, x in (
            ("group_mean_mean", "group_mean_m2", means),
            ("group_sq_mean", "group_sq_m2", second),
        ):
            mean_b = x.mean(0)
            m2_b = ((x - mean_b) ** 2).sum(0)
            mean_a, m2_a = getattr(self, attr_mean), getattr(self, attr_m2)
            delta = mean_b - mean_a
            total = n_a + n_b
            setattr(self, attr_mean, mean_a + delta * (n_b / total))
            setattr(self, attr_m2, m2_a + m2_b + delta**2 * (n_a * n_b / total))

    def merge(self, other: ChannelMoments) -> None:
        """Pool another accumulator of the same channels into this one (Chan's merge), as if
        its groups had been added here: e.g. two calls of one shared BN module, or the same
        layer's moments from another process."""
        if other.values == 0:
            return
        total = self.values + other.values
        delta = other.mean.to(self.mean) - self.mean
        self.m2 += other.m2.to(self.m2) + delta**2 * (self.values * other.values / total)
        self.mean += delta * (other.values / total)
        self.values = total
        n_a, n_b = self.groups, other.groups
        if n_b:
            for attr_mean, attr_m2 in (("group_mean_mean", "group_mean_m2"), ("group_sq_mean", "group_sq_m2")):
                mean_a, m2_a = getattr(self, attr_mean), getattr(self, attr_m2)
                mean_b, m2_b = getattr(other, attr_mean).to(mean_a), getattr(other, attr_m2).to(m2_a)
                d = mean_b - mean_a
                setattr(self, attr_mean, mean_a + d * (n_b / (n_a + n_b)))
                setattr(self, attr_m2, m2_a + m2_b + d**2 * (n_a * n_b / (n_a + n_b)))
        self.groups += n_b
        self.batches += other.batches
        self.group_size_values = other.group_size_values or self.group_size_values

    @property
    def var(self) -> Tensor:
        """Pooled biased variance per channel."""
        return self.m2 / max(self.values, 1.0)

    def noise_variances(self, values_in_estimate: float) -> tuple[Tensor, Tensor]:
        """Sampling variance of the mean and of the variance estimated from
        ``values_in_estimate`` values (e.g. one batch, or everything pooled).

        NaN when fewer than two groups were seen: one group has no spread to measure.
        """
        if self.groups < 2:
            nan = torch.full((self.channels,), math.nan, dtype=torch.float64, device=self.device)
            return nan, nan
        k = max(values_in_estimate / self.group_size_values, 1.0)
        var_of_group_means = self.group_mean_m2 / (self.groups - 1)
        var_of_group_second = self.group_sq_m2 / (self.groups - 1)
        return var_of_group_means / k, var_of_group_second / k


def noise_floor(
    moments: ChannelMoments,
    running_var: Tensor,
    eps: float,
    weights: Tensor,
    values_in_estimate: float,
) -> float:
    """Expected layer score from sampling noise alone, for an estimate over that many values.

    Delta method per channel: the mean-shift noise is ``sd(mean) / sqrt(var_R + eps)``,
    the scale-ratio noise ``sd(var) / (2 a (var_R + eps))``; the channel's expected
    squared error is their sum of squares, and the layer floor is their |gamma|-weighted
    RMS -- the same aggregation as the score, so ``score / floor`` reads as a z-like ratio.
    """
    var_mean, var_var = moments.noise_variances(values_in_estimate)
    denom = running_var.to(torch.float64) + eps
    scale = scale_ratio(moments.var, running_var.to(torch.float64), eps)
    shift_noise_sq = var_mean / denom
    scale_noise_sq = var_var / (4.0 * scale**2 * denom**2)
    return weighted_rms(torch.sqrt(shift_noise_sq + scale_noise_sq), weights)


def softmax_divergence(train_logits: Tensor, eval_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``KL(p_train || p_eval)``, Jensen-Shannon divergence (nats) and top-1 agreement.

    Train mode is the reference: it is what the model did while it learned. KL is
    unbounded (a confident eval-mode mistake can give tens of nats); JS is bounded by ln 2.
    """
    log_p = torch.log_softmax(train_logits.to(torch.float64), dim=-1)
    log_q = torch.log_softmax(eval_logits.to(torch.float64), dim=-1)
    p, q = log_p.exp(), log_q.exp()
    kl = (p * (log_p - log_q)).sum(-1)
    log_m = torch.log((p + q) / 2.0)
    js = 0.5 * ((p * (log_p - log_m)).sum(-1) + (q * (log_q - log_m)).sum(-1))
    agree = (train_logits.argmax(-1) == eval_logits.argmax(-1)).to(torch.float64)
    return kl, js, agree


NORM_CHUNK = 1 << 21
"""Elements converted to float64 at once by ``squared_norms`` (16 MiB): a segmentation output
of a batch is hundreds of MiB, and three float64 copies of it would be the run's peak."""


def squared_norms(train_out: Tensor, eval_out: Tensor) -> tuple[float, float]:
    """``(||eval - train||^2, ||train||^2)``, summed in float64 a chunk at a time so batches
    add up to a relative L2."""
    t, e = train_out.detach().reshape(-1), eval_out.detach().reshape(-1)
    diff = ref = 0.0
    for start in range(0, t.numel(), NORM_CHUNK):
        tc = t[start:start + NORM_CHUNK].to(torch.float64)
        ec = e[start:start + NORM_CHUNK].to(torch.float64)
        diff += float(((ec - tc) ** 2).sum())
        ref += float((tc**2).sum())
    return diff, ref


def _log_binomial_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def _summed(logs: list[float]) -> float:
    if not logs:
        return 0.0
    top = max(logs)
    if top == -math.inf:
        return 0.0
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def binomial_tail(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``, summed exactly in log space (no normal
    approximation: the counts here are often small). 1 for ``k <= 0``, 0 for ``k > n``."""
    if k <= 0:
        return 1.0
    return _summed([_log_binomial_pmf(i, n, p) for i in range(k, n + 1)])


def mcnemar_p(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar test on paired right/wrong outcomes: ``only_first`` samples one
    mode got right and the other wrong, ``only_second`` the reverse. Under "both modes are
    equally accurate" each discordant sample is a fair coin, so the p-value is twice the
    binomial tail of the smaller count (capped at 1). Samples both modes got right (or both
    wrong) carry no information about the difference -- which is why a paired test needs far
    fewer samples than comparing two accuracies as if independent. 1 when nothing is discordant."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    smaller = min(only_first, only_second)
    return min(1.0, 2.0 * _summed([_log_binomial_pmf(i, n, 0.5) for i in range(smaller + 1)]))


def class_iou(confusion: Mapping[int, int], classes: int) -> tuple[Optional[float], ...]:
    """Per-class intersection over union from a streamed confusion matrix (``truth * classes +
    predicted`` -> pixels); None for a class that is neither in the masks nor predicted."""
    matrix = torch.zeros(classes * classes, dtype=torch.float64)
    for cell, count in confusion.items():
        matrix[cell] = count
    matrix = matrix.reshape(classes, classes)
    hits = matrix.diagonal()
    union = matrix.sum(0) + matrix.sum(1) - hits
    return tuple(float(h / u) if u > 0 else None for h, u in zip(hits, union))


def mean_iou(per_class: tuple[Optional[float], ...]) -> Optional[float]:
    """Mean IoU over the classes present (in the masks or the predictions)."""
    present = [v for v in per_class if v is not None]
    return sum(present) / len(present) if present else None
