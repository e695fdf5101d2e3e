"""The arrival generator follows the requested rate; prompt sets are deterministic and bounded."""

from __future__ import annotations

import random
import statistics

import pytest

from loadtest.arrivals import (
    LengthSpec,
    build_prompts,
    ks_critical_value,
    ks_statistic_exponential,
    poisson_schedule,
)


@pytest.mark.parametrize("rate", [0.5, 5.0, 200.0])
def test_poisson_gaps_match_the_exponential_distribution(rate: float) -> None:
    n = 4000
    offsets = poisson_schedule(rate, n, duration_s=1e9, seed=7)
    gaps = [b - a for a, b in zip([0.0, *offsets], offsets, strict=False)]
    assert len(gaps) == n
    # Mean gap 1/rate; its standard error is (1/rate)/sqrt(n) ~ 1.6 %, so 6 % is ~4 sigma.
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.06)
    # KS against Exponential(rate) passes at alpha = 1 % ...
    d = ks_statistic_exponential(gaps, rate)
    assert d < ks_critical_value(n, 0.01)
    # ... and the test has power: the same gaps are rejected against a 20 % wrong rate.
    assert ks_statistic_exponential(gaps, rate * 1.2) > ks_critical_value(n, 0.01)


def test_ks_statistic_matches_a_hand_computed_value() -> None:
    # One sample at the median of Exp(1): F = 0.5, so D = max(1 - 0.5, 0.5 - 0) = 0.5.
    assert ks_statistic_exponential([0.6931471805599453], 1.0) == pytest.approx(0.5)
    # Uniform draws pushed through the inverse CDF are exactly exponential.
    rng = random.Random(1)
    assert ks_statistic_exponential([rng.expovariate(3.0) for _ in range(2000)], 3.0) < 0.04


def test_schedule_is_deterministic_and_bounded_by_count_and_duration() -> None:
    a = poisson_schedule(10.0, 50, 100.0, seed=3)
    assert a == poisson_schedule(10.0, 50, 100.0, seed=3)
    assert a != poisson_schedule(10.0, 50, 100.0, seed=4)
    assert len(a) == 50 and a == sorted(a)
    short = poisson_schedule(10.0, 10_000, 2.0, seed=3)
    assert short[-1] <= 2.0 and 8 <= len(short) <= 40  # ~20 expected in 2 s at 10/s
    with pytest.raises(ValueError, match="rate"):
        poisson_schedule(0.0, 5, 1.0)


def test_prompt_lengths_follow_their_spec_and_repeat_with_the_seed() -> None:
    uni = LengthSpec.parse("uniform:3:9")
    prompts = build_prompts(200, uni, "synthetic", seed=5)
    lengths = [len(p.split()) for p in prompts]
    assert min(lengths) == 3 and max(lengths) == 9
    assert prompts == build_prompts(200, uni, "synthetic", seed=5)
    assert {len(p.split()) for p in build_prompts(20, LengthSpec.parse("fixed:7"))} == {7}
    logn = [len(p.split()) for p in build_prompts(400, LengthSpec.parse("lognormal:16:4:48"), seed=1)]
    assert 4 <= min(logn) and max(logn) <= 48 and 13 <= statistics.median(logn) <= 19
    with pytest.raises(ValueError, match="prompt length"):
        LengthSpec.parse("gauss:3")


def test_bible_prompts_come_from_the_corpus() -> None:
    prompts = build_prompts(5, LengthSpec.parse("fixed:12"), "bible", seed=0)
    assert prompts == build_prompts(5, LengthSpec.parse("fixed:12"), "bible", seed=0)
    assert all(len(p.split()) == 12 for p in prompts)
    assert len(set(prompts)) == 5
