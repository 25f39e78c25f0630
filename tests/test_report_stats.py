"""Paired statistics of the comparison report, against hand computations.

Student-t quantiles from a printed table: t(0.975, 1) = 12.706, t(0.8, 1) = 1.376,
t(0.975, 2) = 4.303, t(0.8, 2) = 1.061; normal: z(0.975) = 1.960, z(0.8) = 0.842.
"""

from __future__ import annotations

import math

import pytest

from moebal.report.stats import (
    format_paired,
    minimum_detectable_effect,
    paired_difference,
    scaled_difference,
    t_interval,
)


def test_three_pairs_by_hand():
    # d = a - b = [1, 2, 0]: mean 1, sd 1
    p = paired_difference({0: 10.0, 1: 12.0, 2: 11.0}, {0: 9.0, 1: 10.0, 2: 11.0})
    assert p.seeds == (0, 1, 2) and p.n == 3
    assert p.mean_diff == pytest.approx(1.0)
    assert p.sd == pytest.approx(1.0)
    half = 4.303 / math.sqrt(3)  # 2.484
    assert p.ci_low == pytest.approx(1 - half, abs=1e-3)
    assert p.ci_high == pytest.approx(1 + half, abs=1e-3)
    assert p.mde == pytest.approx((4.303 + 1.061) / math.sqrt(3), abs=1e-3)  # 3.097
    assert p.mean_a == pytest.approx(11.0) and p.mean_b == pytest.approx(10.0)
    assert p.known and p.spans_zero and p.sign == 0


def test_two_pairs_by_hand():
    # d = [1, 3]: mean 2, sd sqrt(2), standard error 1
    p = paired_difference({0: 1.0, 1: 3.0}, {0: 0.0, 1: 0.0})
    assert p.sd == pytest.approx(math.sqrt(2))
    assert (p.ci_low, p.ci_high) == pytest.approx((2 - 12.706, 2 + 12.706), abs=1e-3)
    assert p.mde == pytest.approx(12.706 + 1.376, abs=1e-3)


def test_interval_beside_zero_gives_the_sign():
    lower = paired_difference({0: 9.50, 1: 9.52, 2: 9.49}, {0: 9.56, 1: 9.58, 2: 9.57})
    assert lower.ci_high < 0 and not lower.spans_zero and lower.sign == -1
    higher = paired_difference({0: 2.0, 1: 2.1, 2: 2.2}, {0: 1.0, 1: 1.0, 2: 1.1})
    assert higher.ci_low > 0 and higher.sign == 1


def test_identical_differences_have_a_zero_width_interval():
    p = paired_difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})
    assert p.sd == 0.0 and p.ci_low == p.ci_high == 1.0 and p.mde == 0.0
    assert p.sign == 1


def test_one_pair_knows_no_noise():
    p = paired_difference({0: 9.0}, {0: 10.0})
    assert p.n == 1 and p.mean_diff == pytest.approx(-1.0)
    assert all(math.isnan(x) for x in (p.sd, p.ci_low, p.ci_high, p.mde))
    assert not p.known and p.spans_zero and p.sign == 0
    assert "seed noise unknown" in format_paired(p)


def test_only_seeds_with_both_values_pair():
    p = paired_difference({0: 1.0, 1: None, 2: 3.0, 3: 4.0}, {0: 0.0, 1: 1.0, 2: float("nan"), 4: 2.0})
    assert p.seeds == (0,)
    empty = paired_difference({0: 1.0}, {1: 1.0})
    assert empty.n == 0 and math.isnan(empty.mean_diff)
    assert format_paired(empty) == "no shared seed"


def test_mde_tends_to_the_normal_formula():
    n = 2000
    assert minimum_detectable_effect(1.0, n) == pytest.approx((1.960 + 0.842) / math.sqrt(n), rel=2e-3)
    assert minimum_detectable_effect(2.0, 3) == pytest.approx(2 * minimum_detectable_effect(1.0, 3))
    assert math.isnan(minimum_detectable_effect(1.0, 1))
    assert math.isnan(minimum_detectable_effect(float("nan"), 5))


def test_t_interval_needs_two_values_and_a_sane_level():
    assert all(math.isnan(x) for x in t_interval([1.0]))
    lo, hi = t_interval([0.0, 2.0], confidence=0.5)  # t(0.75, 1) = 1.000
    assert (lo, hi) == pytest.approx((0.0, 2.0), abs=1e-3)
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], confidence=1.5)
    with pytest.raises(ValueError, match="power"):
        minimum_detectable_effect(1.0, 3, power=0.0)


def test_scaled_difference_tests_a_ratio():
    # "a at most half of b": d = a - 0.5 b = [1 - 2, 1.2 - 2.1] = [-1, -0.9]
    p = scaled_difference({0: 1.0, 1: 1.2}, {0: 4.0, 1: 4.2}, 0.5)
    assert p.mean_diff == pytest.approx(-0.95)
    assert p.sd == pytest.approx(math.sqrt(0.005))
    assert p.mean_a == pytest.approx(1.1) and p.mean_b == pytest.approx(4.1)
    with pytest.raises(ValueError, match="factor"):
        scaled_difference({0: 1.0}, {0: 1.0}, 0.0)


def test_format_names_every_number():
    p = paired_difference({0: 10.0, 1: 12.0, 2: 11.0}, {0: 9.0, 1: 10.0, 2: 11.0})
    assert format_paired(p) == "1 (95% CI -1.48 to 3.48, n=3, sd 1, MDE 3.1)"
    assert format_paired(p, unit=" s").endswith("MDE 3.1 s)")
