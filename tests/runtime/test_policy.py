"""Step policy and SLO controller tests."""

from __future__ import annotations

import pytest

from models.cost import CostModel
from runtime.policy import ModelProfile, StepPolicy, Tier, automatic_steps
from runtime.types import ComputeParams

from .conftest import tiny_model_config


@pytest.fixture
def moe_config():
    return tiny_model_config(300, "moe")  # steps in [2, 6], experts_top_k in [1, 2]


def test_default_tiers_without_profile(moe_config):
    tiers = ModelProfile.from_dict(moe_config, None).tiers
    assert tiers == {"fast": Tier(2), "balanced": Tier(3), "best": Tier(6)}


def test_profile_tiers_are_read_and_checked(moe_config):
    data = {"quality_tiers": {"fast": {"steps": 3, "experts": 1}, "best": {"steps": 6, "experts": None}}}
    profile = ModelProfile.from_dict(moe_config, data)
    assert profile.tiers["fast"] == Tier(3, 1) and profile.tiers["balanced"] == Tier(3)
    with pytest.raises(ValueError, match="quality_tiers.fast.steps=9"):
        ModelProfile.from_dict(moe_config, {"quality_tiers": {"fast": {"steps": 9}}})


def test_automatic_steps_are_the_default_the_slo_range_and_the_tiers(moe_config):
    """What the compiled backend builds whole-decode graphs for."""
    assert automatic_steps(moe_config) == [2, 3, 6]  # default 6; tiers 2, 3, 6
    assert automatic_steps(moe_config, default_steps=4) == [2, 3, 4, 6]
    profile = ModelProfile.from_dict(moe_config, {"quality_tiers": {"fast": {"steps": 5}}})
    assert automatic_steps(moe_config, profile) == [3, 5, 6]
    assert automatic_steps(moe_config, default_steps=4, slo_range=(4, 5)) == [2, 3, 4, 5, 6]


def test_precedence_explicit_quality_budget_default(moe_config):
    profile = ModelProfile.from_dict(moe_config, {"quality_tiers": {"fast": {"steps": 3, "experts": 1}}})
    policy = StepPolicy(moe_config, profile, default_steps=5)
    d = policy.decide(ComputeParams(steps=4, quality="fast"), 4, 8)
    assert (d.steps, d.experts, d.reason) == (4, 2, "explicit")
    d = policy.decide(ComputeParams(quality="fast"), 4, 8)
    assert (d.steps, d.experts, d.model_experts, d.reason) == (3, 1, 1, "quality:fast")
    d = policy.decide(ComputeParams(quality="fast", experts_top_k=2), 4, 8)
    assert (d.experts, d.model_experts) == (2, None)  # explicit experts beat the tier's
    d = policy.decide(ComputeParams(latency_budget_ms=50), 4, 8)
    assert (d.steps, d.reason) == (5, "latency_budget:uncalibrated")
    d = policy.decide(ComputeParams(), 4, 8)
    assert (d.steps, d.experts, d.model_experts, d.reason) == (5, 2, None, "default:fixed")


def _linear_cost_model() -> CostModel:
    # 1 ns per byte, nothing else: predicted time grows with the step count.
    return CostModel(
        a_bytes=1e-9, b_flops=0.0, c=0.0, r2_bytes=1, r2_flops=1, r2_both=1, n_samples=1, config_name="t"
    )


def test_latency_budget_picks_largest_fitting_steps(moe_config):
    cost = _linear_cost_model()
    policy = StepPolicy(moe_config, ModelProfile(ModelProfile.default_tiers(moe_config), cost))
    per_steps = {n: cost.predict_request_seconds(moe_config, n, 4, 8) for n in range(2, 7)}
    budget_ms = (per_steps[4] + per_steps[5]) / 2 * 1000
    d = policy.decide(ComputeParams(latency_budget_ms=budget_ms), 4, 8)
    assert (d.steps, d.reason) == (4, "latency_budget")
    d = policy.decide(ComputeParams(latency_budget_ms=per_steps[2] * 1000 / 10), 4, 8)
    assert (d.steps, d.reason) == (2, "latency_budget:min")
    d = policy.decide(ComputeParams(latency_budget_ms=1e9), 4, 8)
    assert d.steps == 6


def test_dense_model_reports_no_experts():
    config = tiny_model_config(300, "dense")
    d = StepPolicy(config).decide(ComputeParams(), 4, 8)
    assert (d.experts, d.model_experts) == (None, None)


# --- SLO controller: tests/runtime/test_slo_controller.py (against a simulated server) ---
