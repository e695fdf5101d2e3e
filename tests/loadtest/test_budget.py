"""The budget sweep's arithmetic and report (loadtest/budget.py), on made-up samples."""

from __future__ import annotations

import argparse

import pytest

from loadtest import budget
from loadtest.budget import Sample
from loadtest.sweep import r_squared


def _s(point: str, e2e_ms: float, steps: int, budget_ms: float | None = None, warmup: bool = False,
       code: str = "OK", predicted_ms: float | None = None) -> Sample:  # fmt: skip
    return Sample(
        point=point, concurrency=4, budget_ms=budget_ms, steps=steps, e2e_s=e2e_ms / 1000,
        predicted_s=None if predicted_ms is None else predicted_ms / 1000, code=code, warmup=warmup,
        policy_reason="latency_budget" if budget_ms else "explicit",
    )  # fmt: skip


def test_oracle_is_the_most_steps_with_95_percent_within():
    fixed = {2: [0.05] * 20, 3: [0.07] * 19 + [0.2], 4: [0.09] * 18 + [0.2, 0.2]}
    assert budget.oracle_steps(fixed, 100) == 3  # N=4 has 90 % within 100 ms, N=3 95 %
    assert budget.oracle_steps(fixed, 250) == 4
    assert budget.oracle_steps(fixed, 40) is None


def test_point_excludes_warmup_and_counts_failures_as_misses():
    samples = [_s("1.3x", 500, 2, 100, warmup=True)] + [_s("1.3x", 90, 3, 100) for _ in range(8)]
    samples += [_s("1.3x", 20, 3, 100, code="DEADLINE_EXCEEDED"), _s("1.3x", 110, 4, 100)]
    p = budget.summarize(samples, 4, "budget", "1.3x", 100)
    assert p.requests == 10 and p.ok == 9
    assert p.within == pytest.approx(0.8) and p.warmup_within == 0.0
    assert p.mean_steps == pytest.approx((8 * 3 + 4) / 9)


def test_verdicts_only_judge_budgets_the_server_can_meet():
    low = budget.Point(4, "budget", "1x", 10, 10, 50, 60, 2.0, budget_ms=50, factor=1.0, within=0.5,
                       oracle_steps=None)  # fmt: skip
    ok = budget.Point(4, "budget", "2x", 10, 10, 80, 95, 5.5, budget_ms=100, factor=2.0, within=0.96,
                      oracle_steps=6)  # fmt: skip
    v = budget.verdicts([low, ok], {4: 50.0}, 0.93)
    assert v["within_budget"] and v["steps_vs_oracle"] and v["r2"] and v["within_budget_worst"] == 0.96
    ok.mean_steps = 4.5
    assert not budget.verdicts([low, ok], {4: 50.0}, 0.5)["steps_vs_oracle"]
    ok.oracle_steps = None  # no fixed setting met this budget: not judged
    assert budget.verdicts([low, ok], {4: 50.0}, 0.5)["within_budget_worst"] is None


def test_report_files(tmp_path):
    samples = [_s(f"N={n}", 40 * n, n, predicted_ms=41 * n) for n in (2, 3) for _ in range(5)]
    samples += [_s("2x", 100, 3, 160) for _ in range(5)]
    points = [
        budget.summarize([s for s in samples if s.point == f"N={n}"], 4, "steps", f"N={n}") for n in (2, 3)
    ]
    bp = budget.summarize(samples[-5:], 4, "budget", "2x", 160)
    bp.factor, bp.oracle_steps = 2.0, 3
    measured = [s.e2e_s for s in samples[:10]]
    r2 = r_squared(measured, [s.predicted_s for s in samples[:10]])
    assert r2 is not None and 0.9 < r2 < 1.0
    report = budget.BudgetReport("tiny", (2, 3), [*points, bp], samples, {4: 80.0}, r2, r2,
                                 budget.verdicts([*points, bp], {4: 80.0}, r2))  # fmt: skip
    paths = budget.write(report, tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    md = (tmp_path / "budget.md").read_text()
    assert "| 4 | 160.0 ms | 2 | 100.0 % |" in md and "| 3 | 120.0 / 123.0 |" in md


def test_flags_register_on_the_loadtest_parser():
    from loadtest.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--budget-sweep", "--budget-concurrency", "1,8", "--stats-url", "http://x/stats"])
    assert args.budget_sweep and budget._floats(args.budget_concurrency) == [1.0, 8.0]
