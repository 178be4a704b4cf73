"""The percentile bootstrap over seeds (and items) and the verdict on an interval."""

from __future__ import annotations

import pytest

from robustunlearn.study.stats import (
    CONTRADICTED,
    INCONCLUSIVE,
    NOT_MEASURED,
    ONE_SEED,
    SUPPORTED,
    Interval,
    bootstrap_interval,
    verdict,
)


def test_bootstrap_over_seeds_matches_the_hand_computed_quantiles():
    # Seeds 0, 1, 2, 3: a resample's sum S of 4 draws has P(S <= 1) = (1 + 4) / 4^4 = 1.95% < 2.5%
    # and P(S <= 2) = (1 + 4 + 10) / 256 = 5.9% > 2.5%, so the 2.5% quantile of the mean S / 4 is
    # 2 / 4 = 0.5; by symmetry the 97.5% one is 10 / 4 = 2.5.
    interval = bootstrap_interval([0.0, 1.0, 2.0, 3.0])
    assert interval == Interval(mean=1.5, low=0.5, high=2.5, seeds=4)
    assert interval.as_list() == [0.5, 2.5]


def test_bootstrap_over_seeds_and_items_matches_the_hand_computed_quantiles():
    # Seed A has items (0, 2), seed B (1, 1): a drawn seed's item-resampled mean is 0, 1 or 2 with
    # probabilities 1/8, 3/4, 1/8 (A drawn half the time, then its items: 1/4, 1/2, 1/4). The mean
    # of two draws is 0 with probability 1/64 = 1.6% < 2.5% and at most 0.5 with 13/64 = 20%, so
    # the interval is [0.5, 1.5]; over seeds only (both seed means are 1) it would be [1, 1].
    assert bootstrap_interval([[0.0, 2.0], [1.0, 1.0]]) == Interval(mean=1.0, low=0.5, high=1.5, seeds=2)
    assert bootstrap_interval([1.0, 1.0]) == Interval(mean=1.0, low=1.0, high=1.0, seeds=2)
    # seeds given as one number each are one-item seeds: the same as listing that item
    assert bootstrap_interval([[0.0], [1.0], [2.0], [3.0]]) == bootstrap_interval([0.0, 1.0, 2.0, 3.0])


def test_bootstrap_is_deterministic_and_seeded():
    samples = [0.12, 0.31, 0.27, 0.05, 0.4, 0.22]
    first = bootstrap_interval(samples)
    assert bootstrap_interval(samples) == first
    assert bootstrap_interval(list(samples)) == first
    assert first.low is not None and first.high is not None and first.low < first.mean < first.high
    assert bootstrap_interval(samples, seed=1) != first  # the resampling seed is what fixes it
    assert bootstrap_interval(samples, confidence=0.5).low > first.low  # a narrower interval


def test_one_seed_has_no_interval_and_none_is_an_error():
    assert bootstrap_interval([0.3]) == Interval(mean=0.3, low=None, high=None, seeds=1)
    assert bootstrap_interval([[0.1, 0.5]]).low is None  # items alone give no interval over seeds
    with pytest.raises(ValueError, match="no samples"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="no item values"):
        bootstrap_interval([[0.1], []])


def test_negated_interval():
    assert Interval(0.2, 0.1, 0.4, 3).negated() == Interval(-0.2, -0.4, -0.1, 3)
    assert Interval(0.2, None, None, 1).negated() == Interval(-0.2, None, None, 1)


@pytest.mark.parametrize(
    ("difference", "expected", "found"),
    [
        (Interval(-0.3, -0.4, -0.1, 5), "lower", SUPPORTED),
        (Interval(-0.3, -0.4, -0.1, 5), "higher", CONTRADICTED),
        (Interval(0.3, 0.1, 0.4, 5), "higher", SUPPORTED),
        (Interval(0.3, 0.1, 0.4, 5), "lower", CONTRADICTED),
        (Interval(0.1, -0.1, 0.3, 5), "lower", INCONCLUSIVE),
        (Interval(0.0, 0.0, 0.0, 5), "higher", INCONCLUSIVE),  # an interval at 0 does not exclude it
        (Interval(-0.3, None, None, 1), "lower", ONE_SEED),
        (None, "lower", NOT_MEASURED),
    ],
)
def test_verdict(difference, expected, found):
    assert verdict(difference, expected) == found
