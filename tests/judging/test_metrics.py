"""The pure math, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from bncheck.judging.metrics import (
    ChannelMoments,
    channel_weights,
    gaussian_kl,
    mean_shift,
    noise_floor,
    normalization_error,
    scale_ratio,
    softmax_divergence,
    squared_norms,
    weighted_geometric_mean,
    weighted_rms,
)
from bncheck.measuring.statistics import per_sample_stats


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_scale_ratio_is_sqrt_of_variance_ratio_with_eps() -> None:
    # sqrt((4 + 0) / (1 + 0)) = 2; with eps = 1: sqrt(5 / 2)
    assert scale_ratio(t(4.0), t(1.0), 0.0).item() == pytest.approx(2.0)
    assert scale_ratio(t(4.0), t(1.0), 1.0).item() == pytest.approx(math.sqrt(5 / 2))
    assert scale_ratio(t(1.0), t(1.0), 1e-5).item() == pytest.approx(1.0)


def test_mean_shift_in_running_std_units() -> None:
    # (3 - 1) / sqrt(4) = 1; negative when the batch mean is below the running mean
    assert mean_shift(t(3.0), t(1.0), t(4.0), 0.0).item() == pytest.approx(1.0)
    assert mean_shift(t(-1.0), t(1.0), t(4.0), 0.0).item() == pytest.approx(-1.0)


def test_normalization_error_and_kl_by_hand() -> None:
    a, b = t(2.0, 1.0), t(1.0, 0.0)
    # e = sqrt((2-1)^2 + 1^2) = sqrt(2); agreement gives 0
    assert normalization_error(a, b).tolist() == pytest.approx([math.sqrt(2), 0.0])
    # KL = 0.5 (a^2 - 1 - 2 ln a + b^2) = 0.5 (4 - 1 - 2 ln 2 + 1) = 2 - ln 2
    assert gaussian_kl(a, b).tolist() == pytest.approx([2 - math.log(2), 0.0])


def test_normalization_error_is_rms_of_output_difference() -> None:
    # Inputs ~ batch distribution; eval output minus train output has RMS e.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=gen, dtype=torch.float64) * 3.0 + 5.0
    mu_b, var_b = x.mean(), x.var(unbiased=False)
    mu_r, var_r = torch.tensor(4.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)
    train_out = (x - mu_b) / var_b.sqrt()
    eval_out = (x - mu_r) / var_r.sqrt()
    rms = ((eval_out - train_out) ** 2).mean().sqrt()
    e = normalization_error(scale_ratio(var_b, var_r, 0.0), mean_shift(mu_b, mu_r, var_r, 0.0))
    assert float(e) == pytest.approx(float(rms), rel=1e-9)


def test_weights_and_weighted_summaries() -> None:
    assert weighted_rms(t(1.0, 3.0), t(1.0, 0.0)) == pytest.approx(1.0)
    assert weighted_rms(t(1.0, 3.0), t(1.0, 1.0)) == pytest.approx(math.sqrt(5.0))
    assert weighted_geometric_mean(t(2.0, 0.5), t(1.0, 1.0)) == pytest.approx(1.0)
    assert weighted_geometric_mean(t(4.0, 1.0), t(1.0, 1.0)) == pytest.approx(2.0)
    like = t(0.0, 0.0)
    assert channel_weights(t(-2.0, 1.0), 2, like).tolist() == [2.0, 1.0]
    assert channel_weights(t(0.0, 0.0), 2, like).tolist() == [1.0, 1.0]  # all-zero gamma: uniform
    assert channel_weights(None, 2, like).tolist() == [1.0, 1.0]
    assert math.isnan(weighted_rms(t(float("nan"), 1.0), t(1.0, 1.0)))


def test_per_sample_stats_shapes_and_values() -> None:
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 2, 2)
    mean, var, positions = per_sample_stats(x)
    assert positions == 4 and mean.shape == (2, 3)
    # sample 0, channel 0 holds 0,1,2,3: mean 1.5, biased var 1.25
    assert mean[0, 0].item() == pytest.approx(1.5) and var[0, 0].item() == pytest.approx(1.25)
    flat = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mean, var, positions = per_sample_stats(flat)
    assert positions == 1 and torch.equal(mean, flat) and not var.any()


def test_channel_moments_pool_exactly_like_one_big_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    chunks = [torch.randn(n, 4, 5, 5, generator=gen) * 2 + 3 for n in (7, 16, 3)]
    moments = ChannelMoments(4)
    for chunk in chunks:
        moments.add_groups(*per_sample_stats(chunk))
    everything = torch.cat(chunks).transpose(0, 1).reshape(4, -1).double()
    assert torch.allclose(moments.mean, everything.mean(1), atol=1e-6)
    assert torch.allclose(moments.var, everything.var(1, unbiased=False), atol=1e-5)
    assert moments.values == 26 * 25 and moments.groups == 26 and moments.batches == 3


def test_group_spread_gives_variance_of_sample_means() -> None:
    # Hand example: 1 channel, per-sample means 1, 2, 3, 6 (variance 0 inside samples).
    moments = ChannelMoments(1)
    moments.add_groups(t(1.0, 2.0)[:, None], t(0.0, 0.0)[:, None], 1)
    moments.add_groups(t(3.0, 6.0)[:, None], t(0.0, 0.0)[:, None], 1)
    var_of_means, _ = moments.noise_variances(values_in_estimate=1)
    # sample variance (n-1) of 1,2,3,6 = (4 + 1 + 0 + 9) / 3 = 14/3 ; mean of 4 values: /4
    assert var_of_means.item() == pytest.approx(14 / 3)
    assert moments.noise_variances(values_in_estimate=4)[0].item() == pytest.approx(14 / 12)


def test_pooled_batches_count_in_the_moments_but_not_in_the_spread() -> None:
    # Hand example, 1 channel: groups {1, 2} and {3, 6} (spread 14/3 as above), then a batch
    # known only by its statistics: 4 values with mean 8, biased variance 2.
    moments = ChannelMoments(1)
    moments.add_groups(t(1.0, 2.0)[:, None], t(0.0, 0.0)[:, None], 1)
    moments.add_groups(t(3.0, 6.0)[:, None], t(0.0, 0.0)[:, None], 1)
    moments.add_pooled(t(8.0), t(2.0), 4.0)
    # every value: 1, 2, 3, 6 and four values of mean 8, variance 2 (sum of squares 4*(64+2)=264)
    mean = (12 + 32) / 8
    var = (1 + 4 + 9 + 36 + 264) / 8 - mean**2
    assert moments.mean.item() == pytest.approx(mean) and moments.var.item() == pytest.approx(var)
    assert moments.values == 8 and moments.groups == 4 and moments.batches == 3
    assert moments.noise_variances(values_in_estimate=8)[0].item() == pytest.approx(14 / 3 / 8)


def test_noise_floor_matches_sampling_theory_for_iid_data() -> None:
    # iid N(0, 1) values: the mean of n values has sd 1/sqrt(n), the variance sd sqrt(2/n).
    # Expected layer noise floor: sqrt(1/n + 2/n / 4) = sqrt(1.5 / n).
    gen = torch.Generator().manual_seed(2)
    moments = ChannelMoments(64)
    for _ in range(8):
        moments.add_groups(*per_sample_stats(torch.randn(32, 64, 4, 4, generator=gen)))
    ones = torch.ones(64, dtype=torch.float64)
    floor = noise_floor(moments, ones, 0.0, ones, moments.values)
    assert floor == pytest.approx(math.sqrt(1.5 / moments.values), rel=0.15)
    # one batch of 32 samples: 32 * 16 values
    assert noise_floor(moments, ones, 0.0, ones, 32 * 16) == pytest.approx(math.sqrt(1.5 / 512), rel=0.15)


def test_noise_floor_sees_spatial_correlation() -> None:
    # Each sample is one value repeated over 16 positions: effectively 1 value, not 16.
    gen = torch.Generator().manual_seed(3)
    moments = ChannelMoments(64)
    for _ in range(8):
        per_sample = torch.randn(32, 64, 1, 1, generator=gen)
        moments.add_groups(*per_sample_stats(per_sample.expand(32, 64, 4, 4)))
    ones = torch.ones(64, dtype=torch.float64)
    floor = noise_floor(moments, ones, 0.0, ones, moments.values)
    independent_pixels = math.sqrt(1.5 / moments.values)
    assert floor > 3 * independent_pixels


def test_noise_unknown_with_a_single_group() -> None:
    moments = ChannelMoments(2)
    moments.add_groups(t(1.0, 2.0)[None], t(1.0, 1.0)[None], 10)
    assert torch.isnan(moments.noise_variances(10)[0]).all()


def test_softmax_divergence_by_hand() -> None:
    same = torch.tensor([[1.0, 2.0, 0.5]])
    kl, js, agree = softmax_divergence(same, same)
    assert kl.item() == pytest.approx(0.0, abs=1e-12) and js.item() == pytest.approx(0.0, abs=1e-12)
    assert agree.item() == 1.0
    # p = (1/2, 1/2), q = (3/4, 1/4): KL = 0.5 ln(2/3) + 0.5 ln 2 = 0.5 ln(4/3)
    p_logits = torch.tensor([[0.0, 0.0]])
    q_logits = torch.tensor([[math.log(3.0), 0.0]])
    kl, js, agree = softmax_divergence(p_logits, q_logits)
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3))
    m = (0.625, 0.375)
    js_hand = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])
    )
    assert js.item() == pytest.approx(js_hand)
    _, _, agree = softmax_divergence(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    assert agree.item() == 0.0


def test_squared_norms_add_up_to_relative_l2() -> None:
    diff, ref = squared_norms(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 5.0]))
    assert (diff, ref) == (1.0, 25.0)


def test_per_sample_stats_fast_path_matches_exact_in_every_layout() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 5, 6, 7, generator=gen) * 2 + 1
    exact_var, exact_mean = torch.var_mean(x.flatten(2).double(), dim=2, correction=0)
    for layout in (x, x.contiguous(memory_format=torch.channels_last), x.half(), x[:, :, ::2, :]):
        mean, var, positions = per_sample_stats(layout)
        assert positions == layout.shape[2] * layout.shape[3]
        if layout.shape == x.shape:
            tol = 1e-2 if layout.dtype == torch.float16 else 1e-4
            assert torch.allclose(mean.double(), exact_mean, atol=tol)
            assert torch.allclose(var.double(), exact_var, rtol=tol, atol=tol)


def test_per_sample_stats_survive_cancellation() -> None:
    # mean 1e4, std 1: E[x^2] - mean^2 in float32 would be noise; the exact path is used.
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 32, 32, generator=gen) + 1e4
    _, var, _ = per_sample_stats(x)
    exact = torch.var_mean(x.flatten(2).double(), dim=2, correction=0)[0]
    assert torch.allclose(var.double(), exact, rtol=1e-3)


def test_merging_two_accumulators_equals_pooling_everything_in_one() -> None:
    from bncheck.judging.metrics import ChannelMoments

    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(n, 3, 5, generator=gen) * s + m for n, s, m in ((4, 1.0, 0.0), (6, 2.0, 3.0), (3, 0.5, -1))]
    one, a, b = ChannelMoments(3), ChannelMoments(3), ChannelMoments(3)
    for i, x in enumerate(parts):
        mean, var = x.mean(2), x.var(2, correction=0)
        one.add_groups(mean, var, 5)
        (a if i < 2 else b).add_groups(mean, var, 5)
    a.merge(b)
    everything = torch.cat(parts).transpose(0, 1).reshape(3, -1).double()
    torch.testing.assert_close(a.mean, everything.mean(1))
    torch.testing.assert_close(a.var, everything.var(1, correction=0))
    for attr in ("group_mean_mean", "group_mean_m2", "group_sq_mean", "group_sq_m2"):
        torch.testing.assert_close(getattr(a, attr), getattr(one, attr))
    assert (a.values, a.groups, a.batches) == (one.values, one.groups, one.batches)
