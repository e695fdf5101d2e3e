"""Step policy and SLO controller tests."""

from __future__ import annotations

import pytest

from models.cost import CostModel
from runtime.policy import ModelProfile, SLOController, StepPolicy, Tier, automatic_steps
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


# --- SLO controller ------------------------------------------------------------
def simulate(ctrl: SLOController, load: float, windows: int, per_step_s: float = 0.001) -> list[int]:
    """Feed ITLs of a server whose decode time is load x per_step x steps; log N per window."""
    history = []
    for _ in range(windows):
        for _ in range(ctrl.window):
            ctrl.observe(load * per_step_s * ctrl.steps)
        history.append(ctrl.steps)
    return history


def test_slo_controller_lowers_under_overload_and_restores():
    # Target 8 ms: at load 1, 8 steps (8 ms) sit inside the band; at load 2 only 4 fit.
    ctrl = SLOController(0.008, min_steps=2, max_steps=8, window=16, hysteresis=0.1)
    assert ctrl.steps == 8
    assert simulate(ctrl, load=1.0, windows=5) == [8] * 5  # steady and in band: no change
    overloaded = simulate(ctrl, load=2.0, windows=10)
    assert overloaded[0] == 7  # one step per window, not a jump
    assert all(b - a in (-1, 0) for a, b in zip(overloaded, overloaded[1:]))
    # Settles at the largest N whose ITL is within target * (1 + h): 2 ms * 4 = 8 ms.
    assert overloaded[-1] == 4 and overloaded[-4:] == [4] * 4
    # Load goes away (the other tenants left): back up to the maximum, one step a window.
    restored = simulate(ctrl, load=0.5, windows=10)
    assert restored[:4] == [5, 6, 7, 8] and restored[-1] == 8 and max(restored) == 8


def test_slo_controller_is_bounded():
    ctrl = SLOController(0.001, min_steps=3, max_steps=6, window=4)
    assert simulate(ctrl, load=100.0, windows=10)[-1] == 3
    ctrl = SLOController(10.0, min_steps=3, max_steps=6, window=4, initial_steps=3)
    assert simulate(ctrl, load=1.0, windows=10)[-1] == 6


def test_slo_controller_does_not_oscillate_near_the_target():
    # 7 steps -> 7 ms, 8 steps -> 8 ms, target 7.5 ms with h=0.05: the raise rule
    # predicts 8 steps would miss the band, so N stays at 7 instead of flapping.
    ctrl = SLOController(0.0075, min_steps=2, max_steps=8, window=8, hysteresis=0.05, initial_steps=7)
    history = simulate(ctrl, load=1.0, windows=30)
    assert set(history) == {7} and ctrl.changes == 0


def test_slo_controller_lowers_while_requests_queue_even_if_itl_is_fine():
    """Overload shows up as a growing queue before it shows in ITL: lower, never raise, while queued."""
    ctrl = SLOController(0.020, min_steps=2, max_steps=8, window=8, hysteresis=0.1)
    history = []
    for _ in range(4):  # ITL at half the target, but requests wait during the whole window
        for _ in range(ctrl.window):
            ctrl.observe(0.010, waiting=3)
        history.append(ctrl.steps)
    assert history == [7, 6, 5, 4]
    # Waiting in only a minority of the window is not saturation: ITL headroom raises again.
    for i in range(ctrl.window):
        ctrl.observe(0.002, waiting=1 if i < 2 else 0)
    assert ctrl.steps == 5


def test_slo_controller_rejects_bad_settings():
    with pytest.raises(ValueError, match="target_itl_s"):
        SLOController(0, 1, 2)
    with pytest.raises(ValueError, match="min_steps"):
        SLOController(1, 3, 2)
