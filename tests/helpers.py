"""Helpers shared by test modules (importable as `tests.helpers`; fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from models.config import ModelConfig
from models.model import LeanLM


def tiny_config(**overrides) -> ModelConfig:
    """A model small enough that every test runs in milliseconds."""
    base = dict(
        vocab_size=97,
        context_length=40,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_layers=3,
        base_width=16,
        n_experts=4,
        experts_top_k=2,
        tree_depth=2,
    )
    if overrides.get("trunk") == "ode":
        base.update(min_steps=2, max_steps=6)
    base.update(overrides)
    return ModelConfig(**base)


def perturbed_model(config: ModelConfig, seed: int = 0) -> LeanLM:
    """A model whose zero-initialised weights (W_Q, dW_V) are made non-zero.

    Equivalence tests on a freshly initialised SAS block would pass
    vacuously (uniform attention everywhere), so every weight gets noise.
    """
    torch.manual_seed(seed)
    model = LeanLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model
