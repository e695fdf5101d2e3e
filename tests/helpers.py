"""Helpers shared by test modules (importable as `tests.helpers`; fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from models.config import ModelConfig
from models.model import LeanLM
from runtime.types import ComputeParams, GenerationRequest, RequestOutput, SamplingParams


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


# --- engine requests (tests/runtime/test_engine.py, test_aot_decode.py) ---
PROMPT = "The scheduler admitted them"


def req(
    rid: str, prompt: str = PROMPT, steps: int | None = None, max_tokens: int = 12, **kw
) -> GenerationRequest:
    """A greedy request that runs to max_tokens (ignore_eos); compute and sampling fields by name."""
    compute = {
        k: kw.pop(k) for k in ("experts_top_k", "expert_depth", "quality", "latency_budget_ms") if k in kw
    }
    sampling = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, "ignore_eos": True, **kw})
    return GenerationRequest(
        rid, prompt=prompt, sampling=sampling, compute=ComputeParams(steps=steps, **compute)
    )


def mixed_step_requests() -> list[GenerationRequest]:
    """Three greedy requests at 2, 6 (one expert) and 4 steps, of 10, 14 and 7 tokens: the
    tiny models' mix of a whole-decode graph (2) and block-by-block rows in one batch."""
    return [
        req("a", steps=2, max_tokens=10),
        req("b", prompt="In the beginning", steps=6, max_tokens=14, experts_top_k=1),
        req("c", prompt="every row", steps=4, max_tokens=7),
    ]


async def collect(stream) -> tuple[str, list[int], RequestOutput]:
    """Drain an engine stream: (joined text, token ids, last output)."""
    text, ids, last = [], [], None
    async for out in stream:
        text.append(out.text)
        ids.extend(out.token_ids)
        last = out
    return "".join(text), ids, last


async def run_alone(engine, request):
    """Start the engine, run one request to completion, stop it."""
    await engine.start()
    try:
        return await collect(engine.submit(request))
    finally:
        await engine.stop()


async def run_batched(engine, requests):
    """Start the engine, run the requests concurrently (one batch), stop it."""
    await engine.start()
    try:
        return await asyncio.gather(*(collect(engine.submit(r)) for r in requests))
    finally:
        await engine.stop()


# --- a local Ray Serve with the app (integration modules) ---
@contextlib.contextmanager
def local_serve(
    free_port: Callable[[], int],
    app_args: dict[str, Any],
    prefix: str,
    num_cpus: int = 2,
    system_config: dict[str, Any] | None = None,
    timeout_s: float = 240,
) -> Iterator[dict[str, int]]:
    """Ray + Serve on free 127.0.0.1 ports with the app deployed; always shut down.

    Yields:
        The ports: {"grpc", "http", "metrics"}.
    """
    from runtime.serve_app import deploy
    from runtime.serve_local import start_local, stop_local

    ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
    temp = Path("/tmp") / f"{prefix}-{ports['grpc']}"  # short: Ray's socket paths have a length limit
    try:
        start_local(
            ports["grpc"], ports["http"], ports["metrics"], num_cpus=num_cpus, temp_dir=str(temp),
            system_config=system_config,
        )  # fmt: skip
        deploy(app_args, timeout_s=timeout_s)
        yield ports
    finally:
        stop_local()
        shutil.rmtree(temp, ignore_errors=True)


def model_call(backend: Any) -> Callable[..., Any]:
    """A backend called with `LeanLM.forward`'s arguments (described and checked by
    `models.trunk.describe`), so tests compare backends with the model call for call."""
    from models.trunk import describe

    def call(
        tokens: Any,
        positions: Any = None,
        steps: Any = None,
        kv: Any = None,
        experts: Any = None,
        last_only: bool = False,
        last_index: Any = None,
    ) -> Any:
        return backend.forward(
            describe(backend.config, tokens, positions, steps, kv, experts, last_only, last_index)
        )

    return call
