"""Fixtures for runtime tests: a tiny tokenizer, tiny random LeanLMs, engines.

Everything is small enough that an engine test runs in well under a second
on CPU. Models get noise on every weight (as in tests/models) so that
zero-initialised branches do not make batched/alone comparisons vacuous.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer

from models.config import ModelConfig
from models.tokenizer import train_tokenizer
from runtime.backends.torch_backend import TorchBackend
from runtime.engine import Engine, EngineConfig
from runtime.policy import ModelProfile
from tests.helpers import perturbed_model

CORPUS = (
    "In the beginning the engine was idle, and the queue was empty. "
    "Then requests arrived: short ones and long ones, greedy ones and sampled ones. "
    "The scheduler admitted them first come, first served, and the model decoded "
    "every row in one batch, each with its own number of steps. Ünïcödé and emoji 🙂 too.\n"
) * 20


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=320)


def tiny_model_config(vocab_size: int, ffn: str = "moe", **overrides: Any) -> ModelConfig:
    """The tiny ODE-trunk config of the issue: steps in [2, 6]."""
    base: dict[str, Any] = dict(
        vocab_size=vocab_size,
        context_length=64,
        d_model=32,
        n_heads=4,
        d_ff=64,
        trunk="ode",
        min_steps=2,
        max_steps=6,
        ffn=ffn,
        n_experts=4,
        experts_top_k=2,
        tree_depth=2,
        base_width=16,
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def make_engine(tokenizer: Tokenizer) -> Callable[..., Engine]:
    """`make_engine(ffn="moe", profile=None, device="cpu", dtype=float32, **engine_config)` -> a
    not-yet-started Engine (the model, and so its KV pool, on `device` in `dtype`)."""

    def make(
        ffn: str = "moe",
        profile: ModelProfile | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> Engine:
        config = tiny_model_config(tokenizer.get_vocab_size(), ffn)
        settings = dict(kv_cache_bytes=2**20, page_size=8, max_batch_size=16, max_waiting=32)
        settings.update(kwargs)
        model = perturbed_model(config).to(device=device, dtype=dtype)
        return Engine(TorchBackend(model), tokenizer, EngineConfig(**settings), profile)

    return make


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
    """Run a coroutine on a fresh event loop with a safety timeout."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def arun() -> Callable[..., Any]:
    """`arun(coro)`: run a coroutine to completion (tests stay plain functions)."""
    return run
