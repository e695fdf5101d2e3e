"""Tests of the analytic cost model and its calibration (`models/cost.py`)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.config import ModelConfig
from models.cost import (
    ACT_SCORE_PASSES,
    Cost,
    CostModel,
    CostSample,
    block_param_counts,
    decode_cost,
    design_grid,
    fit_cost_model,
    param_counts,
    prefill_cost,
    request_cost,
)


def ode(**kw: object) -> ModelConfig:
    base: dict[str, object] = {"trunk": "ode", "min_steps": 2, "max_steps": 12}
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


CONFIGS = [
    ode(block="sasp", ffn="moe"),
    ode(block="prenorm", ffn="dense"),
    ode(block="sas", ffn="tree", n_shared_blocks=2),
    ode(block="parallel", ffn="moe", n_experts=8, experts_top_k=3, norm="layernorm"),
]


def close(x: float, y: float, rel: float = 1e-9) -> bool:
    return math.isclose(x, y, rel_tol=rel, abs_tol=1e-6)


# ----------------------------------------------------------------------------
# Cost arithmetic
# ----------------------------------------------------------------------------
def test_cost_add_and_scalar_mul() -> None:
    a, b = Cost(1.0, 2.0), Cost(10.0, 20.0)
    assert a + b == Cost(11.0, 22.0)
    assert a * 3 == Cost(3.0, 6.0) == 3 * a
    with pytest.raises(TypeError):
        _ = a * a  # type: ignore[operator]


# ----------------------------------------------------------------------------
# Parameter counts
# ----------------------------------------------------------------------------
def test_param_counts_by_hand_parallel_layernorm_untied() -> None:
    cfg = ModelConfig(
        vocab_size=100, context_length=32, d_model=16, n_heads=2, d_ff=40,
        n_layers=3, block="parallel", norm="layernorm", tie_embeddings=False,
    )  # fmt: skip
    d, f = 16, 40
    block = 4 * d * d + 2 * d * f + 1 * (2 * d)  # QKVO, up+down, one shared layernorm (w+b)
    counts = param_counts(cfg)
    assert counts["embedding"] == 100 * d
    assert counts["positions"] == 32 * d
    assert counts["head"] == 100 * d
    assert counts["final_norm"] == 2 * d
    assert counts["block_first"] == counts["block_rest"] == block
    assert counts["trunk"] == 3 * block
    assert counts["total"] == 2 * 100 * d + 32 * d + 2 * d + 3 * block


def test_param_counts_sas_first_block_has_value_matrix_and_norm_none_final_rmsnorm() -> None:
    cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, n_layers=4, block="sas", norm="none")
    d = 32
    first, rest = block_param_counts(cfg, 0), block_param_counts(cfg, 1)
    assert first["attention"] == 3 * d * d
    assert rest["attention"] == 2 * d * d
    assert first["scalars"] == rest["scalars"] == 3 * 4 + 2
    assert first["norm"] == 0
    counts = param_counts(cfg)
    assert counts["head"] == 0  # tied by default
    assert counts["final_norm"] == d  # rmsnorm fallback when norm="none"
    assert counts["trunk"] == first["total"] + 3 * rest["total"]
    with pytest.raises(ValueError, match="block index"):
        block_param_counts(cfg, 4)


def test_tree_param_counts_grow_as_node_count() -> None:
    d, f = 16, 24
    for depth in range(6):
        cfg = ode(d_model=d, n_heads=2, d_ff=f, ffn="tree", tree_depth=depth)
        assert param_counts(cfg)["ffn"] == d * depth + (2 ** (depth + 1) - 1) * 2 * d * f


def test_moe_param_counts() -> None:
    cfg = ode(ffn="moe", n_experts=8, experts_top_k=2)
    assert param_counts(cfg)["ffn"] == 128 * 8 + 8 * 2 * 128 * 512


# ----------------------------------------------------------------------------
# Analytic costs
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.block}-{c.ffn}-{c.n_blocks}")
def test_decode_cost_is_linear_in_steps(cfg: ModelConfig) -> None:
    # Multiples of n_blocks so every distinct block runs an equal share of steps.
    n = 2 * cfg.n_blocks
    c0, c1, c2, c3 = (decode_cost(cfg, k * n, batch=4, context=50) for k in range(4))
    for field in ("flops", "bytes"):
        d1 = getattr(c1, field) - getattr(c0, field)
        assert d1 > 0
        assert close(getattr(c2, field) - getattr(c1, field), d1)
        assert close(getattr(c3, field) - getattr(c2, field), d1)


def test_steps_zero_is_embedding_and_head_only() -> None:
    cfg = ode()
    c0 = decode_cost(cfg, 0, batch=3, context=10)
    v, d = cfg.vocab_size, cfg.d_model
    assert c0.flops == 3 * 2 * v * d
    assert c0.bytes == 4 * (v * d + d + 3 * 2 * d + 3 * v)  # head, final norm, gathers, logits


def test_sas_reads_exactly_two_d_squared_fewer_weights_per_non_first_block() -> None:
    common = {"d_model": 64, "n_heads": 4, "d_ff": 128, "n_layers": 5}
    pre, sas = ModelConfig(block="prenorm", **common), ModelConfig(block="sas", **common)
    d, h, layers = 64, 4, 5
    for dtype in (2, 4):
        b_pre = decode_cost(pre, layers, batch=2, context=30, dtype_bytes=dtype).bytes
        b_sas = decode_cost(sas, layers, batch=2, context=30, dtype_bytes=dtype).bytes
        # Block 0 keeps its value matrix (saves d^2); the other blocks save 2 d^2 each;
        # SAS blocks add 3 per-head scalars and 2 gains. Activations are the same.
        expected = dtype * (d * d + (layers - 1) * 2 * d * d - layers * (3 * h + 2))
        assert b_pre - b_sas == expected


def test_moe_top1_costs_fewer_flops_than_top2() -> None:
    cfg = ode(ffn="moe", n_experts=4, experts_top_k=2)
    one, two = (decode_cost(cfg, 6, batch=8, context=40, experts=k) for k in (1, 2))
    assert one.flops < two.flops
    assert two.flops - one.flops == 6 * 8 * 4 * cfg.d_model * cfg.d_ff  # one more expert pair
    assert one.bytes < two.bytes
    assert decode_cost(cfg, 6, 8, 40) == two  # None = the trained top-k


def test_moe_weight_bytes_follow_expected_distinct_experts() -> None:
    cfg = ode(ffn="moe", n_experts=8, experts_top_k=2, d_model=32, n_heads=2, d_ff=64)
    pair = 4 * 2 * 32 * 64  # bytes of one expert (up + down)

    def step_bytes(batch: int) -> float:
        return decode_cost(cfg, 1, batch, 0, experts=2).bytes - decode_cost(cfg, 0, batch, 0, experts=2).bytes

    # Expected distinct experts touched by `batch` tokens routed uniformly to k of E.
    def touched(batch: int) -> float:
        return 8 * (1 - (1 - 2 / 8) ** batch)

    assert touched(1) == 2
    # Removing the expert term leaves fixed weights + per-row traffic: affine in batch.
    rest = [step_bytes(b) - pair * touched(b) for b in range(1, 8)]
    diffs = [b - a for a, b in zip(rest, rest[1:], strict=False)]
    assert all(close(d, diffs[0]) for d in diffs) and diffs[0] > 0
    # A large batch touches (almost) every expert, never more.
    assert step_bytes(4096) - rest[0] - 4095 * diffs[0] == pytest.approx(8 * pair)


def test_tree_flops_linear_in_depth() -> None:
    per_depth = [
        decode_cost(ode(ffn="tree", tree_depth=depth), 4, batch=2, context=20).flops for depth in range(7)
    ]
    steps = [b - a for a, b in zip(per_depth, per_depth[1:], strict=False)]
    assert all(s > 0 for s in steps)
    assert all(close(s, steps[0]) for s in steps)
    # And within one model, truncation depth t costs t + 1 node pairs.
    cfg = ode(ffn="tree", tree_depth=4)
    trunc = [decode_cost(cfg, 4, 2, 20, experts=t).flops for t in range(5)]
    node_pair_flops = 4 * 2 * 4 * cfg.d_model * cfg.d_ff  # steps x batch x (2 matmuls x 2 FLOPs/MAC)
    assert all(close(b - a, node_pair_flops) for a, b in zip(trunc, trunc[1:], strict=False))


def test_tree_weight_bytes_grow_sublinearly_in_batch_up_to_node_count() -> None:
    cfg = ode(ffn="tree", tree_depth=3)
    per_step = [decode_cost(cfg, 1, b, 0).bytes - decode_cost(cfg, 0, b, 0).bytes for b in (1, 1000)]
    pair = 2 * cfg.d_model * cfg.d_ff * 4
    # One token reads one node per level (4); a large batch reads nearly all 15.
    one_row_weights = 4 * pair
    assert per_step[0] > one_row_weights
    assert per_step[1] < 1000 * per_step[0]


def test_kv_bytes_linear_in_context() -> None:
    cfg = ode(block="sasp", ffn="moe")
    steps, batch = 5, 3
    costs = [decode_cost(cfg, steps, batch, s).bytes for s in range(0, 200, 25)]
    diffs = [b - a for a, b in zip(costs, costs[1:], strict=False)]
    # Per cached token: K and V read (2 d) and attention scores (H per pass), per row and step.
    slope = 4 * steps * batch * (2 * cfg.d_model + ACT_SCORE_PASSES * cfg.n_heads)
    assert all(d == 25 * slope for d in diffs)


def test_prefill_attention_is_causal_quadratic() -> None:
    cfg = ode()
    flops = [prefill_cost(cfg, 3, p).flops for p in (8, 16, 32, 64)]
    second = [flops[i + 2] - 2 * flops[i + 1] + flops[i] for i in range(2)]
    assert all(s > 0 for s in second)
    # Token j attends to j + 1 keys: sum = P(P+1)/2, 4 d FLOPs per key per step.
    quad = lambda p: 3 * 4 * cfg.d_model * p * (p + 1) / 2  # noqa: E731
    lin = [f - quad(p) for f, p in zip(flops, (8, 16, 32, 64), strict=True)]
    head = 2 * cfg.vocab_size * cfg.d_model
    assert close((lin[1] - head) / 16, (lin[0] - head) / 8)


def test_request_cost_equals_prefill_plus_decode_loop() -> None:
    cfg = ode(ffn="tree", tree_depth=2)
    prompt, new, batch = 20, 9, 4
    looped = prefill_cost(cfg, 7, prompt, experts=1)
    for i in range(new - 1):
        looped = looped + decode_cost(cfg, 7, batch, prompt + i, experts=1)
    got = request_cost(cfg, 7, prompt, new, batch=batch, experts=1)
    assert close(got.flops, looped.flops) and close(got.bytes, looped.bytes)
    assert request_cost(cfg, 7, prompt, 1) == prefill_cost(cfg, 7, prompt)


def test_invalid_arguments_raise_with_names() -> None:
    cfg = ode(ffn="moe", experts_top_k=2)
    with pytest.raises(ValueError, match="experts_top_k"):
        decode_cost(cfg, 4, 1, 10, experts=3)
    with pytest.raises(ValueError, match="expert_depth"):
        decode_cost(ode(ffn="tree", tree_depth=2), 4, 1, 10, experts=-1)
    with pytest.raises(ValueError, match="context"):
        decode_cost(cfg, 4, 1, cfg.context_length)
    with pytest.raises(ValueError, match="batch"):
        decode_cost(cfg, 4, 0, 10)
    with pytest.raises(ValueError, match="context_length"):
        request_cost(cfg, 4, 200, 100)


@settings(max_examples=40, deadline=None)
@given(
    block=st.sampled_from(["prenorm", "parallel", "sas", "sasp"]),
    ffn=st.sampled_from(["dense", "moe", "tree"]),
    steps=st.integers(1, 12),
    batch=st.integers(1, 32),
    context=st.integers(0, 254),
)
def test_costs_positive_and_batch_shares_weights(
    block: str, ffn: str, steps: int, batch: int, context: int
) -> None:
    cfg = ode(block=block, ffn=ffn)
    one = decode_cost(cfg, steps, 1, context)
    many = decode_cost(cfg, steps, batch, context)
    assert one.flops > 0 and one.bytes > 0
    assert close(many.flops, batch * one.flops)  # FLOPs are per row
    assert many.bytes <= batch * one.bytes + 1e-6  # weights are read once per batch


# ----------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------
def synthetic(cfg: ModelConfig, a: float, b: float, c: float) -> list[CostSample]:
    samples = []
    for steps, batch, context, experts in design_grid(cfg):
        cost = decode_cost(cfg, steps, batch, context, experts)
        samples.append(CostSample(steps, batch, context, experts, a * cost.bytes + b * cost.flops + c))
    return samples


def test_fit_recovers_known_coefficients() -> None:
    cfg = ode(block="sasp", ffn="moe")
    a, b, c = 2e-11, 5e-12, 3e-4
    model = fit_cost_model(cfg, synthetic(cfg, a, b, c))
    assert math.isclose(model.a_bytes, a, rel_tol=1e-6)
    assert math.isclose(model.b_flops, b, rel_tol=1e-6)
    assert math.isclose(model.c, c, rel_tol=1e-6)
    assert model.r2_both > 1 - 1e-9
    assert model.n_samples == len(design_grid(cfg))
    assert model.config_name == cfg.name


@pytest.mark.parametrize("truth", ["bytes", "flops"])
def test_single_feature_fit_names_the_right_winner(truth: str) -> None:
    cfg = ode(block="prenorm", ffn="tree", tree_depth=3)
    a, b = (1e-10, 0.0) if truth == "bytes" else (0.0, 1e-10)
    model = fit_cost_model(cfg, synthetic(cfg, a, b, 1e-3))
    r2_true, r2_other = (
        (model.r2_bytes, model.r2_flops) if truth == "bytes" else (model.r2_flops, model.r2_bytes)
    )
    assert r2_true > 1 - 1e-9
    assert r2_other < r2_true - 1e-3
    assert model.r2_both > 1 - 1e-9


def test_fit_drops_a_feature_with_negative_coefficient() -> None:
    cfg = ode(block="sasp", ffn="moe")
    # Time that falls as FLOPs rise would need b < 0; the fit must clamp it.
    model = fit_cost_model(cfg, synthetic(cfg, 1e-10, -1e-12, 1e-3))
    assert model.a_bytes >= 0 and model.b_flops == 0.0
    assert 0.0 <= model.r2_both <= 1.0


def test_fit_needs_three_samples() -> None:
    cfg = ode()
    with pytest.raises(ValueError, match="at least 3 samples"):
        fit_cost_model(cfg, synthetic(cfg, 1e-10, 0.0, 0.0)[:2])


def make_model(cfg: ModelConfig) -> CostModel:
    return fit_cost_model(cfg, synthetic(cfg, 5e-11, 1e-11, 2e-4))


def test_max_steps_within_monotone_in_budget_and_none_when_nothing_fits() -> None:
    cfg = ode(block="sasp", ffn="moe")
    model = make_model(cfg)
    kw = {"batch": 4, "context": 0, "new_tokens": 16, "prompt_tokens": 32}
    lo_t = model.predict_request_seconds(cfg, 2, 32, 16, batch=4)
    hi_t = model.predict_request_seconds(cfg, 12, 32, 16, batch=4)
    assert model.max_steps_within(cfg, lo_t * 0.99, **kw) is None
    assert model.max_steps_within(cfg, lo_t, **kw) == 2
    assert model.max_steps_within(cfg, hi_t * 10, **kw) == 12
    previous = 0
    for budget in [lo_t + (hi_t - lo_t) * i / 50 for i in range(51)]:
        got = model.max_steps_within(cfg, budget, **kw)
        assert got is not None and got >= previous
        assert model.predict_request_seconds(cfg, got, 32, 16, batch=4) <= budget
        if got < 12:
            assert model.predict_request_seconds(cfg, got + 1, 32, 16, batch=4) > budget
        previous = got
    assert model.max_steps_within(cfg, hi_t, **kw, step_range=(3, 5)) == 5


def test_predictions_add_up() -> None:
    cfg = ode()
    model = make_model(cfg)
    total = model.predict_request_seconds(cfg, 6, 10, 5, batch=2)
    parts = model.seconds(prefill_cost(cfg, 6, 10)) + sum(
        model.predict_decode_seconds(cfg, 6, 2, 10 + i) for i in range(4)
    )
    assert math.isclose(total, parts, rel_tol=1e-9)
    # A running request with nothing left to prefill: decode iterations only.
    running = model.predict_remaining_seconds(cfg, 6, 30, 0, 3, batch=2)
    assert math.isclose(running, sum(model.predict_decode_seconds(cfg, 6, 2, 30 + i) for i in range(3)))


def test_cost_model_json_round_trip() -> None:
    cfg = ode()
    model = make_model(cfg)
    again = CostModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again == model
    with pytest.raises(ValueError, match="unknown cost model key"):
        CostModel.from_dict({**model.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="missing key"):
        CostModel.from_dict({k: v for k, v in model.to_dict().items() if k != "a_bytes"})


# ----------------------------------------------------------------------------
# Calibration grid
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [*CONFIGS, ode(ffn="tree", tree_depth=4, context_length=100), ModelConfig()])
def test_design_grid_is_small_valid_and_spread(cfg: ModelConfig) -> None:
    grid = design_grid(cfg)
    assert 3 <= len(grid) <= 40
    assert len(set(grid)) == len(grid)
    low, high = cfg.step_range
    steps = {g[0] for g in grid}
    assert {low, high} <= steps and all(low <= s <= high for s in steps)
    assert len(steps) == min(4, high - low + 1)
    assert all(0 <= g[2] < cfg.context_length for g in grid)
    assert {g[1] for g in grid} == {1, 4, 16}
    options = next(iter(cfg.expert_options.values()), [None])
    assert {min(options), max(options)} <= {g[3] for g in grid}  # type: ignore[type-var]
    for point in grid:  # every point is a valid decode iteration
        decode_cost(cfg, *point)
