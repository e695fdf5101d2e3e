"""OnnxBackend against LeanLM: same logits, cache contents, expert counts and tokens.

Three exported models cover the trunks, block kinds and FFN kinds that change
the step loop: a prenorm + dense stack (3 distinct blocks), a fully shared
sasp + MoE ODE trunk and a partially shared (2 blocks) sas + tree ODE trunk.
Each is exported once per module (export takes seconds per graph).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from models.checkpoint import WEIGHTS_FILE, save_model
from models.config import ModelConfig
from models.export import export_onnx
from models.kv_cache import KVCacheError, PagedKVCache
from models.model import LeanLM
from runtime.backends.onnx_backend import CPU, CUDA, OnnxBackend
from tests.helpers import model_call, perturbed_model, tiny_config

# float32 on both sides, but different kernels (ORT MatMul/Softmax vs torch
# SDPA) and, for MoE / tree, a different summation order (the ONNX FFN
# evaluates every group and combines with a weight matrix): ~1e-7 in practice.
TOL = 1e-4

CONFIGS = {
    "stack-prenorm-dense": dict(trunk="stack", block="prenorm", ffn="dense"),
    "ode-sasp-moe": dict(trunk="ode", block="sasp", ffn="moe", min_steps=2, max_steps=6),
    "ode-sas-tree": dict(trunk="ode", block="sas", ffn="tree", n_shared_blocks=2, min_steps=2, max_steps=6),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[LeanLM, Path, OnnxBackend]]:
    out = {}
    for name, overrides in CONFIGS.items():
        model = perturbed_model(tiny_config(**overrides))
        model_dir = save_model(model, tmp_path_factory.mktemp(name) / "model")
        export_onnx(model, model_dir, weights_file=model_dir / WEIGHTS_FILE)
        out[name] = (model, model_dir, OnnxBackend.from_model_dir(model_dir, providers=[CPU]))
    return out


@pytest.fixture(params=list(CONFIGS))
def case(request, exported):
    return exported[request.param]


ODE_CASES = ["ode-sasp-moe", "ode-sas-tree"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


def _assert_same(ref, got) -> None:
    assert _max_diff(ref.logits, got.logits) <= TOL
    if ref.expert_counts is None:
        assert got.expert_counts is None
    else:
        assert torch.equal(ref.expert_counts, got.expert_counts)


def _settings(config: ModelConfig, B: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Different steps and expert settings per row (the trained maxima for a stack / dense)."""
    lo, hi = config.step_range
    steps = torch.tensor([lo, hi, (lo + hi) // 2, hi][:B])
    options = next(iter(config.expert_options.values()), None)
    experts = None if options is None else torch.tensor([options[i % len(options)] for i in range(B)])
    return steps, experts


@torch.no_grad()
def test_full_forward_without_cache(case) -> None:
    model, _, backend = case
    assert backend.name == "onnx" and backend.provider == CPU
    tokens = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    _assert_same(model(tokens), model_call(backend)(tokens))
    got = model_call(backend)(tokens, last_only=True)
    assert got.logits.shape == (3, 1, 97)
    assert _max_diff(model(tokens, last_only=True).logits, got.logits) <= TOL
    # Right-padded rows: each row's logits at its own last real token.
    last = torch.tensor([10, 3, 0])
    got = model_call(backend)(tokens, last_only=True, last_index=last)
    full = model(tokens).logits
    assert _max_diff(full[torch.arange(3), last][:, None], got.logits) <= TOL
    assert _max_diff(model(tokens, last_only=True, last_index=last).logits, got.logits) <= TOL
    with pytest.raises(ValueError, match="last_index"):
        model_call(backend)(tokens, last_only=True, last_index=torch.tensor([11, 0, 0]))


@torch.no_grad()
@pytest.mark.parametrize("name", ODE_CASES)
def test_mixed_steps_and_experts_in_one_batch(exported, name: str) -> None:
    model, _, backend = exported[name]
    steps, experts = _settings(model.config, 4)
    assert len(set(steps.tolist())) > 1 and len(set(experts.tolist())) > 1
    tokens = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(2))
    ref = model(tokens, steps=steps, experts=experts)
    _assert_same(ref, model_call(backend)(tokens, steps=steps, experts=experts))
    # Each row of the mixed batch also equals that row run alone (ONNX side).
    for b in range(4):
        alone = model_call(backend)(tokens[b : b + 1], steps=steps[b : b + 1], experts=experts[b : b + 1])
        assert _max_diff(ref.logits[b : b + 1], alone.logits) <= TOL


@torch.no_grad()
def test_prefill_then_decode_with_paged_cache(case) -> None:
    """Rows with different prompt lengths, steps and experts; separate cache per backend."""
    model, _, backend = case
    c = model.config
    steps, experts = _settings(c, 2)
    prompts = [torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n)) for n in (7, 4)]
    caches = {}
    for name in ("torch", "onnx"):
        cache = PagedKVCache(c, num_pages=64, page_size=4)
        for b in range(2):
            cache.reserve(b, int(steps[b]), 20)
        caches[name] = cache
    run = {"torch": model, "onnx": model_call(backend)}
    last = []
    for b, prompt in enumerate(prompts):  # prefill one row at a time
        pos = torch.arange(prompt.shape[1])[None]
        sel = slice(b, b + 1)
        outs = {
            n: run[n](
                prompt,
                pos,
                steps[sel],
                kv=caches[n].batch([b]),
                experts=None if experts is None else experts[sel],
            )
            for n in run
        }
        _assert_same(outs["torch"], outs["onnx"])
        last.append(int(outs["torch"].logits[0, -1].argmax()))
    assert torch.allclose(caches["torch"].k, caches["onnx"].k, atol=TOL)
    tokens = torch.tensor(last)[:, None]  # (2, 1)
    positions = torch.tensor([[7], [4]])
    for _ in range(5):  # decode both rows together: different past lengths in one call
        outs = {
            n: run[n](tokens, positions, steps, kv=caches[n].batch([0, 1]), experts=experts, last_only=True)
            for n in run
        }
        _assert_same(outs["torch"], outs["onnx"])
        tokens = outs["torch"].logits[:, -1].argmax(-1, keepdim=True)
        positions = positions + 1
    assert torch.allclose(caches["torch"].k, caches["onnx"].k, atol=TOL)
    assert torch.allclose(caches["torch"].v, caches["onnx"].v, atol=TOL)


@torch.no_grad()
def test_greedy_decode_tokens_identical(case) -> None:
    model, _, backend = case
    c = model.config
    n = int(c.min_steps)  # not the default: the step count is a per-call choice
    prompt = [5, 17, 42, 8, 63]

    def greedy(forward) -> list[int]:
        cache = PagedKVCache(c, num_pages=n * 6, page_size=4)
        cache.reserve(0, n, len(prompt) + 16)
        ids, pos, out = torch.tensor([prompt]), torch.arange(len(prompt))[None], []
        for _ in range(16):
            logits = forward(ids, pos, n, kv=cache.batch([0]), last_only=True).logits
            out.append(int(logits[0, -1].argmax()))
            ids, pos = torch.tensor([[out[-1]]]), pos[:, -1:] + 1
        return out

    assert greedy(model_call(backend)) == greedy(model) == model.generate(prompt, 16, steps=n)


def test_argument_errors_match_torch(exported) -> None:
    model, _, backend = exported["ode-sasp-moe"]
    tokens = torch.zeros(1, 3, dtype=torch.long)
    for kwargs in (
        dict(steps=99),
        dict(experts=torch.tensor([3])),
        dict(positions=torch.tensor([[0, 1, 40]])),
    ):
        with pytest.raises(ValueError) as ref:
            model(tokens, **kwargs)
        with pytest.raises(ValueError) as got:
            model_call(backend)(tokens, **kwargs)
        assert str(got.value) == str(ref.value)
    cache = PagedKVCache(model.config, num_pages=8, page_size=4)
    cache.reserve(0, 3, 4)
    with pytest.raises(KVCacheError, match="built with 3 steps"):
        model_call(backend)(tokens, steps=4, kv=cache.batch([0]))


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "copy"))


def test_missing_files_raise_file_not_found(exported, tmp_path: Path) -> None:
    d = _copy(exported["ode-sas-tree"][1], tmp_path)
    (d / "onnx" / "block_1.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="block_1.onnx"):
        OnnxBackend.from_model_dir(d)
    shutil.rmtree(d / "onnx")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        OnnxBackend.from_model_dir(d)


def test_manifest_mismatch_raises_value_error(exported, tmp_path: Path) -> None:
    d = _copy(exported["ode-sasp-moe"][1], tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["norm_eps"] = 1e-6  # still a valid config, but not the exported one
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config_hash"):
        OnnxBackend.from_model_dir(d)
    config["norm_eps"] = 1e-5
    (d / "config.json").write_text(json.dumps(config))
    OnnxBackend.from_model_dir(d)  # restored: loads again
    weights = d / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="different weights"):
        OnnxBackend.from_model_dir(d)


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="needs a CPU-only onnxruntime")
def test_requested_cuda_falls_back_with_warning(exported, caplog) -> None:
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning):  # ORT's own warning
        backend = OnnxBackend.from_model_dir(exported["ode-sasp-moe"][1], providers=[CUDA, CPU])
    assert backend.provider == CPU
    assert any("requested but sessions run on" in r.message for r in caplog.records)
