"""runtime/backends/__init__.py: `load_backend` and the serving dtype, through the engine.

bfloat16 serving: weights and KV pool in bfloat16 (eager and compiled decode), the
sampler reading float32 logits; greedy text is compared with float32 only loosely
(bfloat16 rounds near-ties differently), exactness is checked within one dtype.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.backends import load_backend, serve_dtype
from runtime.backends.torch_backend import TorchBackend
from runtime.engine import Engine
from runtime.serve_app import ServeArgs
from runtime.settings import CompileSpec, EngineConfig
from tests.helpers import mixed_step_requests, perturbed_model, req, run_batched

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo" / "ode-tiny"


@pytest.mark.parametrize("name,dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_load_backend_puts_weights_in_the_dtype(name, dtype) -> None:
    backend = load_backend(ZOO, "torch", dtype=name)
    assert backend.dtype == dtype
    assert {p.dtype for p in backend.model.parameters()} == {dtype}


@pytest.mark.parametrize("bad", ["float16", "bf16", "", None, 32])
def test_unknown_dtypes_are_named(bad) -> None:
    with pytest.raises(ValueError, match="dtype=.*float32, bfloat16"):
        serve_dtype(bad)
    with pytest.raises(ValueError, match="dtype"):
        ServeArgs.from_dict({"dtype": bad})


def test_bfloat16_needs_the_torch_backend() -> None:
    with pytest.raises(ValueError, match="dtype='bfloat16'.*backend=torch"):
        ServeArgs.from_dict({"dtype": "bfloat16", "backend": "onnx"})
    with pytest.raises(ValueError, match="dtype='bfloat16'.*ONNX"):
        load_backend(ZOO, "onnx", dtype="bfloat16")


PROMPTS = ["In the beginning", "God said", "The earth was formless", "and there was light"]
STEPS = [2, 12, 5, 12]


def _requests() -> list:
    return [req(f"r{i}", prompt=p, steps=n, max_tokens=12) for i, (p, n) in enumerate(zip(PROMPTS, STEPS))]


def test_bfloat16_engine_serves_batched_mixed_steps_like_alone(arun) -> None:
    """bfloat16 weights and KV: a batch of mixed step counts gives each request its
    alone-run tokens, the pool is bfloat16 and the same byte budget holds twice the pages."""
    settings = EngineConfig(kv_cache_bytes=2**20, page_size=8)
    f32 = Engine.from_model_dir(ZOO, settings)
    bf16 = Engine.from_model_dir(ZOO, settings, dtype="bfloat16")
    assert bf16.runner.storage.k.dtype == torch.bfloat16 and bf16.backend.dtype == torch.bfloat16
    assert bf16.kv.num_pages == 2 * f32.kv.num_pages
    batched = [r[1] for r in arun(run_batched(bf16, _requests()), timeout=300)]
    assert bf16.stats().kv_used_bytes == 0
    for i, request in enumerate(_requests()):
        alone = arun(
            run_batched(Engine.from_model_dir(ZOO, settings, dtype="bfloat16"), [request]), timeout=300
        )
        assert alone[0][1] == batched[i], f"request {i} (steps {STEPS[i]})"
    reference = [r[1] for r in arun(run_batched(f32, _requests()), timeout=300)]
    agree = sum(a == b for x, y in zip(batched, reference) for a, b in zip(x, y))
    assert agree >= 0.5 * sum(len(x) for x in reference)  # the same model rounded: mostly the same text


def test_compiled_decode_in_bfloat16_gives_the_eager_bfloat16_tokens(tokenizer, arun, tmp_path) -> None:
    """The compiled decode path keys its artifacts by dtype and runs bfloat16 graphs: a
    whole-decode graph (2 steps) and block-by-block rows (4, 6) in one batch."""
    from tests.runtime.conftest import tiny_model_config

    model = perturbed_model(tiny_model_config(tokenizer.get_vocab_size(), "moe")).to(torch.bfloat16)
    settings = EngineConfig(kv_cache_bytes=2**20, page_size=8, max_batch_size=16, max_waiting=32)
    requests = mixed_step_requests()
    results = {}
    for compiled in (False, True):
        backend = TorchBackend(model, CompileSpec.parse([2], tmp_path) if compiled else None)
        assert backend.dtype == torch.bfloat16
        results[compiled] = [
            r[1] for r in arun(run_batched(Engine(backend, tokenizer, settings), requests), 300)
        ]
    assert backend.name == "torch-aot" and backend.compiled.graph_steps == {2}
    assert [len(t) for t in results[True]] == [10, 14, 7]
    same = sum(a == b for x, y in zip(results[True], results[False]) for a, b in zip(x, y))
    assert same >= 0.9 * 31, results  # bfloat16 kernels round differently: near-ties may flip
