"""CUDA tests of the model, the runner and the engine (`cuda` marker).

The `cuda` ones run where torch sees a GPU (scripts/gpu_check.sh runs them on a device machine) and are
skipped, with the reason shown, everywhere else (tests/conftest.py): CPU CI has no GPU. Each
compares the CUDA path with something it must equal: the same model on CPU (logits within
float32 tolerance) or the same requests on the same device alone vs batched (greedy tokens
identical, seeded sampling reproducible).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from runtime.backends.torch_backend import TorchBackend
from runtime.engine import Engine
from runtime.types import RequestOutput
from tests.helpers import perturbed_model, req
from tests.runtime.conftest import tiny_model_config

DEVICE = torch.device("cuda")
# The engine tests run on CPU too (in CI), so the bodies a GPU session runs are tested ones.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def _mixed(tag: str) -> list:
    return [req(f"{tag}{i}", steps=s, max_tokens=10) for i, s in enumerate((2, 6, 4, 6))]


async def _collect(engine: Engine, request) -> list[int]:
    ids: list[int] = []
    async for out in engine.submit(request):
        assert isinstance(out, RequestOutput)
        ids.extend(out.token_ids)
    return ids


@pytest.mark.cuda
@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_cuda_logits_match_cpu_in_float32(tokenizer, ffn):
    import dataclasses

    from models.trunk import Forward

    cpu = TorchBackend(perturbed_model(tiny_model_config(tokenizer.get_vocab_size(), ffn)))
    gpu = TorchBackend(perturbed_model(tiny_model_config(tokenizer.get_vocab_size(), ffn)).to(DEVICE))
    tokens = torch.randint(1, tokenizer.get_vocab_size(), (2, 9), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(9).expand(2, 9)
    fwd = Forward(tokens=tokens, positions=positions, steps=(6, 3))
    want = cpu.forward(fwd).logits
    on_gpu = dataclasses.replace(fwd, tokens=tokens.to(DEVICE), positions=positions.to(DEVICE))
    got = gpu.forward(on_gpu).logits
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_pool_follows_the_model_onto_its_device(make_engine, dtype, device):
    engine = make_engine(device=device, dtype=dtype)
    assert engine.runner.storage.k.device.type == device and engine.runner.storage.k.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_alone_equals_batched_with_mixed_steps(make_engine, arun, dtype, device):
    async def go() -> tuple[list[list[int]], list[list[int]]]:
        engine = make_engine(device=device, dtype=dtype)
        await engine.start()
        try:
            alone = [await _collect(engine, r) for r in _mixed("a")]
            batched = await asyncio.gather(*(_collect(engine, r) for r in _mixed("b")))
            assert engine.kv.free_pages == engine.kv.num_pages
            return alone, list(batched)
        finally:
            await engine.stop()

    alone, batched = arun(go(), timeout=120)
    assert all(len(a) == 10 for a in alone)
    assert alone == batched


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_is_reproducible(make_engine, arun, device):
    async def go() -> list[list[int]]:
        engine = make_engine(device=device)
        await engine.start()
        try:
            return [
                await _collect(engine, req(f"s{i}", steps=4, max_tokens=12, temperature=0.9, seed=7))
                for i in range(2)
            ]
        finally:
            await engine.stop()

    first, second = arun(go(), timeout=120)
    assert first == second and len(first) == 12
