"""Step policy and SLO controller tests."""

from __future__ import annotations

import pytest

from models.cost import CostModel
from runtime.policy import ModelProfile, StepPolicy, Tier, automatic_steps
from runtime.predictor import DEFAULT_MARGIN, TRANSPORT_S
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


def _budget_policy(config, **kwargs):
    profile = ModelProfile(ModelProfile.default_tiers(config), _linear_cost_model())
    return StepPolicy(config, profile, **kwargs)


def test_latency_budget_picks_largest_steps_whose_bound_fits(moe_config):
    """A fresh predictor bounds with the cost model x the default margin + the client hop."""
    bounds = {n: _budget_policy(moe_config).predictor.predict(n, 4, 8).bound_s for n in range(2, 7)}
    assert all(bounds[n] < bounds[n + 1] for n in range(2, 6))
    policy = _budget_policy(moe_config)
    d = policy.decide(ComputeParams(latency_budget_ms=(bounds[4] + bounds[5]) / 2 * 1000), 4, 8)
    assert (d.steps, d.reason) == (4, "latency_budget")
    assert d.predicted_s == pytest.approx((bounds[4] - TRANSPORT_S) / DEFAULT_MARGIN)  # the median, 1 so far
    d = _budget_policy(moe_config).decide(ComputeParams(latency_budget_ms=bounds[2] * 1000 / 10), 4, 8)
    assert (d.steps, d.reason) == (2, "latency_budget:min")
    d = _budget_policy(moe_config).decide(ComputeParams(latency_budget_ms=1e9), 4, 8)
    assert d.steps == 6


def test_every_calibrated_decision_carries_a_prediction(moe_config):
    policy = _budget_policy(moe_config)
    for compute in (ComputeParams(steps=3), ComputeParams(quality="best"), ComputeParams()):
        d = policy.decide(compute, 4, 8)
        assert d.predicted_s is not None and d.predicted_s > 0
    assert StepPolicy(moe_config).decide(ComputeParams(steps=3), 4, 8).predicted_s is None  # uncalibrated
    assert policy.snapshot()["predictor"]["period_model"]["model"] == 1.0  # the prior: the cost model


def test_unmet_budget_mode_is_checked(moe_config):
    with pytest.raises(ValueError, match="latency_budget_unmet='drop'"):
        _budget_policy(moe_config, budget_unmet="drop")


def test_dense_model_reports_no_experts():
    config = tiny_model_config(300, "dense")
    d = StepPolicy(config).decide(ComputeParams(), 4, 8)
    assert (d.experts, d.model_experts) == (None, None)


# --- SLO controller: tests/runtime/test_slo_controller.py (against a simulated server) ---


def test_from_settings_carries_the_budget_mode_batch_limits_and_the_controller(moe_config):
    """The engine builds its policy from EngineConfig alone: every setting reaches it."""
    from runtime.settings import EngineConfig

    profile = ModelProfile.from_dict(moe_config, {"cost_model": _linear_cost_model().to_dict()})
    settings = EngineConfig(latency_budget_unmet="reject", max_batch_size=5, max_prefills=2, default_steps=4)
    policy = StepPolicy.from_settings(moe_config, profile, settings)
    assert policy.budget_unmet == "reject" and policy.fixed_steps == 4 and policy.slo is None
    assert (policy.predictor.max_batch, policy.predictor.max_prefills) == (5, 2)
    controlled = EngineConfig(slo_target_itl_ms=20, slo_max_steps=5)
    slo = StepPolicy.from_settings(moe_config, profile, controlled).slo
    assert slo is not None and (slo.min_steps, slo.max_steps) == (2, 5)
    with pytest.raises(ValueError, match="latency_budget_unmet"):
        StepPolicy.from_settings(moe_config, profile, EngineConfig(latency_budget_unmet="drop"))
