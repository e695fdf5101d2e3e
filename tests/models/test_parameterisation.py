"""CompleteP / muP / SP: groups, multipliers and inits against the table."""

from __future__ import annotations

import math

import pytest
import torch

from models.model import LeanLM
from models.parameterisation import adamw_eps, build_optimizer, param_groups

LR, WD, EPS, SIGMA = 1e-2, 0.1, 1e-8, 0.02


@pytest.mark.parametrize("width", [64, 128])
@pytest.mark.parametrize("depth", [4, 8])
def test_completep_matches_the_table(tiny, width, depth):
    base_width, base_depth = 32, 2
    config = tiny(
        parameterisation="completep",
        trunk="stack",
        n_layers=depth,
        d_model=width,
        n_heads=4,
        d_ff=4 * width,
        base_width=base_width,
        base_depth=base_depth,
        init_std=SIGMA,
        vocab_size=4096,
        context_length=256,
    )
    m_n, m_l = width / base_width, depth / base_depth
    model = LeanLM(config)
    # Residual branch multiplier L_base / L is the Euler step h = T / N.
    assert config.horizon / depth == pytest.approx(base_depth / depth)
    assert config.attn_scale == pytest.approx(1 / config.head_dim)
    assert config.logit_mult == pytest.approx(1 / m_n)
    assert adamw_eps(config, EPS) == pytest.approx(EPS / (m_n * m_l))

    groups = {g["name"]: g for g in param_groups(model, LR, WD)}
    assert groups["hidden"]["lr"] == pytest.approx(LR / m_n)
    assert groups["hidden"]["weight_decay"] == pytest.approx(WD * m_n)
    assert groups["embedding"]["lr"] == pytest.approx(LR)
    assert groups["gains"]["lr"] == pytest.approx(LR) and groups["gains"]["weight_decay"] == 0
    # Every parameter is in exactly one group.
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    hidden = {id(p) for p in groups["hidden"]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in hidden) == (name.startswith("blocks.") and p.dim() >= 2), name

    # Init variances: hidden sigma^2 / m_N, embeddings sigma^2 (large matrices: tight estimate).
    mlp = model.blocks[0].ffn.up.weight
    assert mlp.std().item() == pytest.approx(SIGMA / math.sqrt(m_n), rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(SIGMA, rel=0.05)
    assert model.blocks[0].norm1.weight.eq(1).all()

    optim = build_optimizer(model, LR, WD, EPS)
    assert optim.defaults["eps"] == pytest.approx(EPS / (m_n * m_l))


@pytest.mark.parametrize("width", [64, 128])
def test_mup_and_sp_columns(tiny, width):
    mup = tiny(parameterisation="mup", d_model=width, n_heads=4, base_width=32, n_layers=4)
    sp = tiny(parameterisation="sp", d_model=width, n_heads=4, base_width=32, n_layers=4)
    m_n = width / 32
    assert mup.horizon == 4 and sp.horizon == 4  # no depth scaling: h = 1 per layer
    assert adamw_eps(mup, EPS) == pytest.approx(EPS / m_n)
    assert adamw_eps(sp, EPS) == EPS
    g_mup = {g["name"]: g for g in param_groups(LeanLM(mup), LR, WD)}
    g_sp = {g["name"]: g for g in param_groups(LeanLM(sp), LR, WD)}
    assert g_mup["hidden"]["lr"] == pytest.approx(LR / m_n)
    assert g_mup["hidden"]["weight_decay"] == pytest.approx(WD * m_n)
    assert g_sp["hidden"]["lr"] == LR and g_sp["hidden"]["weight_decay"] == WD
    assert sp.attn_scale == pytest.approx(sp.head_dim**-0.5)
    assert sp.logit_mult == 1.0 and mup.logit_mult == pytest.approx(1 / m_n)


def test_output_multiplier_is_applied_at_inference(tiny):
    config = tiny(parameterisation="completep", d_model=64, base_width=16)
    model = LeanLM(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 5))
    with torch.no_grad():
        logits = model(tokens).logits
        model.config.base_width = 64  # same weights, m_N = 1: logits 4x larger
        unscaled = model(tokens).logits
    torch.testing.assert_close(unscaled, logits * 4)


def test_sas_zero_inits(tiny):
    model = LeanLM(tiny(block="sas", parameterisation="completep"))
    d = model.config.d_model
    for i, block in enumerate(model.blocks):
        attn = block.attn
        assert attn.qk.weight[:d].eq(0).all()  # W_Q = 0
        assert attn.qk.weight[d:].std() > 0
        assert (attn.v_delta is not None) == (i == 0)  # only the first block keeps a value matrix
        for gain in (attn.alpha, attn.beta, attn.gamma):
            assert gain.eq(1).all()
    assert model.blocks[0].attn.v_delta.weight.eq(0).all()


def test_fresh_sas_block_starts_as_alpha_identity(tiny):
    """W_Q = 0 makes A = C, so alpha I + beta A - gamma C = I at init."""
    config = tiny(block="sasp", norm="none", ffn="dense")
    model = LeanLM(config).eval()
    attn = model.blocks[1].attn
    x = torch.randn(2, 6, config.d_model)
    empty = x.new_zeros(2, config.n_heads, 0, config.head_dim)
    from models.layers import attention_mask

    out, _, _ = attn(x, empty, empty, attention_mask(torch.zeros(2, dtype=torch.long), 0, 6))
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-6)
