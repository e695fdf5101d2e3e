"""runtime/settings.py: EngineConfig's own checks and CompileSpec's parsing."""

from __future__ import annotations

import math

import pytest

from models.config import ModelConfig
from runtime.settings import CompileSpec, EngineConfig


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3", None])
def test_max_consecutive_failures_must_be_a_positive_integer(value) -> None:
    with pytest.raises(ValueError, match="max_consecutive_failures"):
        EngineConfig(max_consecutive_failures=value)


@pytest.mark.parametrize("value", [-0.1, math.inf, math.nan, True, "5", None])
def test_inline_decode_ms_must_be_a_finite_number_at_least_zero(value) -> None:
    with pytest.raises(ValueError, match="inline_decode_ms"):
        EngineConfig(inline_decode_ms=value)


def test_defaults_and_valid_values_construct() -> None:
    assert EngineConfig().max_consecutive_failures == 3
    assert EngineConfig(inline_decode_ms=0, max_consecutive_failures=1).inline_decode_ms == 0


def test_slo_range_defaults_to_the_model_range() -> None:
    mc = ModelConfig(name="t", vocab_size=64, context_length=32, d_model=16, n_heads=2, d_ff=32,
                     trunk="ode", min_steps=2, max_steps=6)  # fmt: skip
    assert EngineConfig().slo_range(mc) is None
    assert EngineConfig(slo_target_itl_ms=10).slo_range(mc) == (2, 6)
    assert EngineConfig(slo_target_itl_ms=10, slo_min_steps=3).slo_range(mc) == (3, 6)


def test_compile_spec_parse_and_graph_steps() -> None:
    mc = ModelConfig(name="t", vocab_size=64, context_length=32, d_model=16, n_heads=2, d_ff=32,
                     trunk="ode", min_steps=2, max_steps=6)  # fmt: skip
    assert CompileSpec.parse("all").graph_steps(mc) == (2, 3, 4, 5, 6)
    assert CompileSpec.parse("3,5").graph_steps(mc) == (3, 5)
    with pytest.raises(ValueError, match="compile_steps"):
        CompileSpec.parse("3,9").graph_steps(mc)
    with pytest.raises(ValueError, match="compile_steps"):
        CompileSpec.parse("fast")
