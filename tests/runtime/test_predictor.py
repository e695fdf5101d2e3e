"""The end-to-end latency predictor (runtime/predictor.py) on recorded and simulated traces.

Traces are replayed with a fake clock, so every answer is exact arithmetic of
the trace, never a wall-clock measurement.
"""

from __future__ import annotations

import random

import pytest

from models.cost import CostModel
from runtime.policy import ModelProfile, StepPolicy
from runtime.predictor import DEFAULT_MARGIN, MIN_RATIOS, TRANSPORT_S, LatencyPredictor, batch_bucket
from runtime.types import ComputeParams, InvalidRequestError, IterationStats, OverloadedError, RequestStats

from .conftest import tiny_model_config

COST = CostModel(
    a_bytes=2.5e-10, b_flops=0.0, c=5e-4, r2_bytes=1, r2_flops=1, r2_both=1, n_samples=1, config_name="t"
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def config():
    return tiny_model_config(300, "moe")  # steps in [2, 6]


def iteration(hist: dict[int, int], prefills: int, waiting: int = 0) -> IterationStats:
    rows = sum(hist.values())
    return IterationStats(
        batch_size=rows, num_prefill=prefills, num_decode=rows - prefills, steps_histogram=dict(hist),
        expert_token_counts=[], kv_used_bytes=0, kv_capacity_bytes=1, num_waiting=waiting,
        num_running=rows, duration_s=0.0,
    )  # fmt: skip


class Backend:
    """A simulated engine whose iteration period is known: scale x (a D + b F) + c + d B."""

    def __init__(self, pred: LatencyPredictor, a=2.0, b=1.5, c=8e-4, d=5e-5) -> None:
        self.pred, self.a, self.b, self.c, self.d = pred, a, b, c, d
        self.scale = 1.0

    def period(self, hist: dict[int, int], prefills: int) -> float:
        model, prefill, _, rows = self.pred._features(iteration(hist, prefills))
        return self.scale * (self.a * model + self.b * prefill + self.c + self.d * rows)

    def run(self, clock: Clock, iterations: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        for _ in range(iterations):
            rows = rng.randint(1, 16)
            hist: dict[int, int] = {}
            for _ in range(rows):
                n = rng.randint(2, 6)
                hist[n] = hist.get(n, 0) + 1
            prefills = min(rows, rng.choice((0, 0, 0, 1, 2)))
            clock.t += self.period(hist, prefills)
            self.pred.on_stats(iteration(hist, prefills))


def test_batch_buckets():
    assert [batch_bucket(b) for b in (1, 1.5, 2, 3, 4, 8, 9, 32, 100)] == [1, 2, 2, 4, 4, 8, 16, 32, 128]


def test_period_regression_recovers_a_known_trace(config):
    """Iterations of many batch sizes and step mixes: the fitted terms are the trace's."""
    clock = Clock()
    pred = LatencyPredictor(config, COST, clock=clock)
    backend = Backend(pred)
    backend.run(clock, 300)
    a, b, c, d = pred.theta
    assert a == pytest.approx(2.0, rel=0.05) and b == pytest.approx(1.5, rel=0.1)
    assert c == pytest.approx(8e-4, rel=0.15) and d == pytest.approx(5e-5, abs=2e-5)
    # A request joining 7 running rows at 3 steps: its period is that 8-row, mixed iteration.
    pred.on_stats(iteration({3: 7}, 0))
    p = pred.predict(6, 8, 16, batch=8)
    truth = backend.period({3: 7, 6: 1}, 0)
    assert p.batch == 8 and p.period_s == pytest.approx(truth, rel=0.03)
    assert p.model_s == pytest.approx(p.queue_s + p.first_s + 15 * p.period_s)
    assert p.queue_s == pytest.approx(0.5 * pred.last_period_s)  # waits for the iteration in flight


def test_online_correction_converges_after_a_slowdown(config):
    """The backend becomes 3x slower: within ~150 iterations the prediction follows."""
    clock = Clock()
    pred = LatencyPredictor(config, COST, clock=clock)
    backend = Backend(pred)
    backend.run(clock, 200, seed=1)
    mix = {4: 5}

    def probe() -> None:  # one more iteration at `mix`, with the period the backend takes
        clock.t += backend.period(mix, 0)
        pred.on_stats(iteration(mix, 0))

    probe()
    before = pred.predict(4, 8, 16, batch=6).period_s
    assert before == pytest.approx(backend.period({4: 6}, 0), rel=0.05)
    backend.scale = 3.0
    backend.run(clock, 30, seed=2)
    probe()
    assert pred.predict(4, 8, 16, batch=6).period_s < 0.8 * backend.period({4: 6}, 0)  # still learning
    backend.run(clock, 170, seed=3)
    probe()
    after = pred.predict(4, 8, 16, batch=6).period_s
    assert after == pytest.approx(backend.period({4: 6}, 0), rel=0.08)


def _finish(pred: LatencyPredictor, p, prompt: int, generated: int, total: float, i: int) -> None:
    pred.on_stats(
        RequestStats(
            request_id=f"r{i}", queue_time_s=0.0, ttft_s=0.0, itl_s=[], total_s=total, steps=p.steps,
            experts=None, policy_reason="explicit", prompt_tokens=prompt, generated_tokens=generated,
            finish_reason="length", predicted_s=p.predicted_s,
        )
    )  # fmt: skip


def test_request_ratios_correct_the_prediction_for_the_tokens_generated(config):
    """Requests that stop early are compared with the prediction for what they generated."""
    clock = Clock()
    pred = LatencyPredictor(config, COST, clock=clock)
    for i in range(MIN_RATIOS + 4):
        p = pred.predict(4, 8, 32)
        pred.commit(p, 8)
        generated = 8 + i  # fewer than the 32 predicted for
        _finish(pred, p, 8, generated, 1.25 * p.model_for(generated), i)
        pred.on_stats(iteration({4: 1}, 0))  # the queue it left behind is gone
    p = pred.predict(4, 8, 32)
    assert p.source == "steps=4,batch<=1"
    assert p.predicted_s == pytest.approx(1.25 * p.model_s)
    assert p.bound_s == pytest.approx(1.25 * p.model_s + TRANSPORT_S)
    snap = pred.snapshot()
    assert snap["ratios"]["steps=4,batch<=1"]["median"] == pytest.approx(1.25)
    assert snap["recent"][-1]["request_id"] == f"r{MIN_RATIOS + 3}"


# Steps dominate: 20x the bytes rate, a fifth of the intercept.
STEPPY = CostModel(
    a_bytes=5e-9, b_flops=0.0, c=1e-4, r2_bytes=1, r2_flops=1, r2_both=1, n_samples=1, config_name="t"
)


def _policy(config, cost: CostModel = COST, **kwargs) -> StepPolicy:
    return StepPolicy(config, ModelProfile(ModelProfile.default_tiers(config), cost), **kwargs)


def test_budget_is_checked_at_the_upper_quantile_of_the_error(config):
    """Ratios spread 1.0..1.6: the median would pick more steps than the p95 bound allows."""
    policy = _policy(config, STEPPY)
    pred = policy.predictor
    for i in range(40):
        for n in range(2, 7):
            p = pred.predict(n, 8, 16)
            pred.commit(p, 8)
            _finish(pred, p, 8, 16, (1.0 + 0.6 * i / 39) * p.model_s, i)
            pred.on_stats(iteration({n: 1}, 0))
    pred.on_stats(iteration({4: 1}, 0, waiting=0))
    pred._last_busy = False
    central = {n: pred.predict(n, 8, 16).predicted_s for n in range(2, 7)}
    bounds = {n: pred.predict(n, 8, 16).bound_s for n in range(2, 7)}
    budget = (central[6] + TRANSPORT_S) * 1000  # n=6 fits at the median
    want = max(n for n in range(2, 7) if bounds[n] <= budget / 1000)
    assert want < 6
    d = policy.decide(ComputeParams(latency_budget_ms=budget), 8, 16)
    assert (d.steps, d.reason) == (want, "latency_budget")


def test_budget_below_the_minimum_runs_at_the_minimum_by_default(config):
    d = _policy(config).decide(ComputeParams(latency_budget_ms=0.5), 8, 16)
    assert (d.steps, d.reason) == (2, "latency_budget:min")


def test_budget_below_the_minimum_is_rejected_when_asked(config):
    policy = _policy(config, budget_unmet="reject")
    with pytest.raises(InvalidRequestError, match="latency_budget_ms=0.5") as e:
        policy.decide(ComputeParams(latency_budget_ms=0.5), 8, 16)
    assert e.value.field == "latency_budget_ms" and "idle" in e.value.allowed
    # A loaded server: 31 rows running, 40 waiting. The idle server would meet this budget.
    pred = policy.predictor
    pred.on_stats(iteration({6: 31}, 0, waiting=40))
    idle = pred.predict(2, 8, 16, idle=True).bound_s
    assert pred.predict(2, 8, 16, batch=32).bound_s > 2 * idle
    with pytest.raises(OverloadedError, match="latency_budget_ms=.* cannot be met now"):
        policy.decide(ComputeParams(latency_budget_ms=1.2 * idle * 1000), 8, 16, batch=32)


def test_fresh_predictor_uses_the_default_margin(config):
    pred = LatencyPredictor(config, COST, clock=Clock())
    p = pred.predict(3, 8, 16)
    assert p.source == "default" and p.bound_s == pytest.approx(DEFAULT_MARGIN * p.model_s + TRANSPORT_S)
    with pytest.raises(ValueError, match="quantile"):
        LatencyPredictor(config, COST, quantile=1.0)


def test_repeated_batch_shapes_are_priced_once_with_the_same_result(config, monkeypatch):
    """The per-iteration features remember a batch shape's model time: same value, one pricing."""
    pred = LatencyPredictor(config, COST, clock=Clock())
    calls = []
    real = pred.batch.model_seconds
    monkeypatch.setattr(pred.batch, "model_seconds", lambda *a: calls.append(a) or real(*a))
    first = pred._features(iteration({4: 3, 6: 1}, 0))
    again = pred._features(iteration({6: 1, 4: 3}, 0))
    other = pred._features(iteration({4: 4}, 0))
    assert len(calls) == 2  # the repeated shape (in any order) was priced once
    assert first[0] == again[0] == real(4.0, {4: 0.75, 6: 0.25}, pred._context())
    assert other[0] == real(4.0, {4: 1.0}, pred._context()) != first[0]
    with_prefill = pred._features(iteration({4: 3, 6: 1}, 1))  # 3 decode rows: a new shape
    assert len(calls) == 3 and with_prefill[1] > 0 == first[1]
