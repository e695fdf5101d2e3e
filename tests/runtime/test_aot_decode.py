"""Compiled decode steps (runtime/backends/aot_decode.py) against the eager model.

Two tiny models cover what changes the compiled graph: a prenorm + dense stack
(three blocks of one structure: one artifact) and a shared sasp + MoE ODE
trunk (experts routed inside the graph with data-dependent sizes). Each runs
in two modes: "graphs" (whole-decode graphs for the lowest and the middle
step count, every other count block by block) and "blocks" (per-block steps only).
Artifacts are compiled once per module into a temporary cache (~10-30 s each).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.executors import paged_attention
from models.kv_cache import PagedKVCache
from models.model import LeanLM
from runtime.backends.aot_decode import CompiledDecode
from runtime.backends.torch_backend import TorchBackend
from runtime.settings import CompileSpec
from tests.helpers import model_call, perturbed_model, tiny_config

TOL = 1e-4  # float32 both sides; fused kernels sum in a different order (~1e-6 in practice)

CONFIGS = {
    "stack-prenorm-dense": dict(trunk="stack", block="prenorm", ffn="dense"),
    "ode-sasp-moe": dict(trunk="ode", block="sasp", ffn="moe"),
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("aot-cache")


MODES = ("graphs", "blocks")


@pytest.fixture(scope="module")
def compiled(cache_dir) -> dict[tuple[str, str], tuple[LeanLM, TorchBackend]]:
    out = {}
    for name, overrides in CONFIGS.items():
        model = perturbed_model(tiny_config(**overrides))
        lo, hi = model.config.step_range
        for mode, steps in zip(MODES, ([lo, (lo + hi) // 2], [])):
            out[name, mode] = (
                model,
                TorchBackend(model, CompileSpec.parse(steps, cache_dir)),
            )
    return out


@pytest.fixture(params=[(name, mode) for name in CONFIGS for mode in MODES], ids="-".join)
def case(request, compiled):
    return compiled[request.param]


def test_paged_attention_matches_dense_attention_over_the_gathered_past() -> None:
    """The pool-reading attention (eager here) equals SDPA and the masked mean over [past, new]."""
    g = torch.Generator().manual_seed(0)
    pages, page, nh, hs = 9, 4, 2, 8
    pool_k, pool_v = (torch.randn(pages, page, nh, hs, generator=g) for _ in range(2))
    # Rows with pasts of 1, 4 (a full page), 6 and 11 tokens; -1 pads a row's unused pages.
    window = torch.tensor([[3, -1, -1], [0, -1, -1], [5, 2, -1], [7, 1, 8]])
    positions = torch.tensor([[1], [4], [6], [11]])
    R, P = window.shape
    q, k, v = (torch.randn(R, nh, 1, hs, generator=g) for _ in range(3))
    a, mean = paged_attention(q, k, v, pool_k, pool_v, window, positions, scale=0.3)
    for r in range(R):
        n, row_pages = int(positions[r]), window[r].clamp(min=0)
        # (nh, n, hs): the row's first n cached tokens, then the new one
        past_k, past_v = (
            pool[row_pages].reshape(P * page, nh, hs)[:n].transpose(0, 1) for pool in (pool_k, pool_v)
        )
        keys = torch.cat([past_k, k[r, :, 0, None]], 1)  # (nh, n + 1, hs)
        values = torch.cat([past_v, v[r, :, 0, None]], 1)
        want = torch.nn.functional.scaled_dot_product_attention(q[r], keys, values, scale=0.3)
        torch.testing.assert_close(a[r], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mean[r], values.mean(1, keepdim=True), atol=1e-5, rtol=1e-5)


def test_decode_head_copy_gives_the_models_logits(compiled) -> None:
    model, backend = compiled["stack-prenorm-dense", "blocks"]
    x = torch.randn(3, 1, model.config.d_model)
    with torch.inference_mode():
        head_t = backend.compiled.head_t
        torch.testing.assert_close(model.logits(x, head_t), model.logits(x), atol=TOL, rtol=TOL)


def test_one_artifact_per_block_structure_and_per_graph_step_count(compiled, cache_dir) -> None:
    model, backend = compiled["stack-prenorm-dense", "graphs"]
    assert model.config.n_blocks == 3 and backend.name == "torch-aot"
    assert len(set(key for key, _ in backend.compiled._blocks)) == 1
    assert len(list((cache_dir / "aot").glob("decode-step-*.pt2"))) == len(CONFIGS)
    # The stack has one step count (3), the ODE trunk graphs for 2 and 4.
    assert backend.compiled.graph_steps == {3}
    assert compiled["ode-sasp-moe", "graphs"][1].compiled.graph_steps == {2, 4}
    assert len(list((cache_dir / "aot").glob("decode-graph-*.pt2"))) == 3


def test_second_load_comes_from_the_cache(compiled, cache_dir) -> None:
    model, _ = compiled["ode-sasp-moe", "graphs"]
    again = CompiledDecode(model, cache_dir, graph_steps=[4, 2])
    assert again.compiled_keys == []  # nothing compiled: loaded from disk
    assert again.graph_steps == {2, 4}


@pytest.mark.parametrize(
    "steps, error",
    [
        ([7], r"compile_steps=\[7\]: each must be an integer in \[2, 6\]"),
        ([1, 3], r"compile_steps=\[1\]"),
        (["4"], r"compile_steps=\['4'\]"),
        ("some", r"compile_steps='some': must be 'all', 'auto'"),
    ],
)
def test_compile_steps_out_of_range_is_refused_by_name(compiled, cache_dir, steps, error) -> None:
    model, _ = compiled["ode-sasp-moe", "graphs"]
    with pytest.raises(ValueError, match=error):
        TorchBackend(model, CompileSpec.parse(steps, cache_dir))


def test_compile_steps_all_and_default(compiled, cache_dir, monkeypatch) -> None:
    """ "all" is the model's whole range; None is the step counts the policy picks by itself."""
    import runtime.backends.aot_decode as aot

    model, _ = compiled["ode-sasp-moe", "graphs"]
    seen = []
    monkeypatch.setattr(
        aot.CompiledDecode,
        "__init__",
        lambda self, m, cache, steps: seen.append(list(steps)) or setattr(self, "model", m),
    )
    TorchBackend(model, CompileSpec("all", cache_dir))
    TorchBackend(model, CompileSpec(cache_dir=cache_dir))
    assert seen == [[2, 3, 4, 5, 6], [2, 3, 6]]  # default 6; tiers fast 2, balanced 3, best 6
    with pytest.raises(ValueError, match=r"compile_steps=\[9\]: each must be an integer in \[2, 6\]"):
        TorchBackend(model, CompileSpec((9,), cache_dir))


@torch.no_grad()
@pytest.mark.parametrize("pattern", ["mixed", "uniform"])
def test_decode_matches_eager_with_mixed_steps_and_experts(case, pattern) -> None:
    """Prefill (eager in both) then 9 decode steps of 3 rows with different past lengths,
    step counts (all the middle one with "uniform") and expert settings; crosses page
    boundaries (page_size 4), so the window grows from 1 page. Logits, expert counts,
    greedy tokens and the KV pool agree. With graphs, "mixed" runs two graph groups
    and one row block by block, "uniform" one graph call for all rows."""
    model, backend = case
    c = model.config
    lo, hi = c.step_range
    mid = (lo + hi) // 2
    steps = torch.tensor([hi, lo, mid] if pattern == "mixed" else [mid] * 3)
    options = next(iter(c.expert_options.values()), None)
    experts = None if options is None else torch.tensor([options[0], options[-1], options[0]])
    prompts = [[5, 17, 42], [8], [63, 1, 2, 3, 4, 5]]
    caches = {}
    for name, forward in (("eager", model), ("aot", model_call(backend))):
        cache = PagedKVCache(c, num_pages=128, page_size=4)
        for b, p in enumerate(prompts):
            cache.reserve(b, int(steps[b]), len(p) + 10)
            sel = slice(b, b + 1)
            forward(
                torch.tensor([p]),
                torch.arange(len(p))[None],
                steps[sel],
                kv=cache.batch([b]),
                experts=None if experts is None else experts[sel],
                last_only=True,
            )
        caches[name] = cache
    cur = torch.tensor([[3], [9], [27]])
    pos = torch.tensor([[len(p)] for p in prompts])
    for _ in range(9):
        ref = model(cur, pos, steps, kv=caches["eager"].batch([0, 1, 2]), experts=experts, last_only=True)
        got = model_call(backend)(cur, pos, steps, caches["aot"].batch([0, 1, 2]), experts, True)
        assert float((ref.logits - got.logits).abs().max()) <= TOL
        if ref.expert_counts is None:
            assert got.expert_counts is None
        else:
            assert torch.equal(ref.expert_counts, got.expert_counts)
        nxt = ref.logits[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(nxt, got.logits[:, -1].argmax(-1, keepdim=True))
        cur, pos = nxt, pos + 1
    assert torch.allclose(caches["eager"].k, caches["aot"].k, atol=TOL)
    assert torch.allclose(caches["eager"].v, caches["aot"].v, atol=TOL)


@torch.no_grad()
def test_single_row_single_page(case) -> None:
    """R = 1 and P = 1: the sizes torch.export would specialise if the graph let it."""
    model, backend = case
    c = model.config
    n = int(c.min_steps)
    outs = []
    for forward in (model, model_call(backend)):
        cache = PagedKVCache(c, num_pages=8, page_size=16)
        cache.reserve(0, n, 8)
        step = torch.tensor([n])
        forward(
            torch.tensor([[4, 5]]),
            torch.arange(2)[None],
            step,
            kv=cache.batch([0]),
            experts=None,
            last_only=True,
        )
        out = forward(
            torch.tensor([[6]]), torch.tensor([[2]]), step, kv=cache.batch([0]), experts=None, last_only=True
        )
        outs.append(out.logits)
    assert float((outs[0] - outs[1]).abs().max()) <= TOL


def test_tree_ffn_is_refused_by_name(cache_dir) -> None:
    model = perturbed_model(tiny_config(trunk="ode", block="sas", ffn="tree"))
    with pytest.raises(ValueError, match="compile.*ffn='tree'"):
        TorchBackend(model, CompileSpec(cache_dir=cache_dir))


def test_pool_reading_executor_needs_a_cache() -> None:
    from models.executors import PoolExecutor
    from models.trunk import describe, run_forward

    model = perturbed_model(tiny_config())
    fwd = describe(model.config, torch.zeros(1, 1, dtype=torch.long), steps=3)
    with pytest.raises(ValueError, match="needs a cache view"):
        run_forward(PoolExecutor(model), model.config, fwd)


def test_engine_with_compiled_decode_gives_the_eager_tokens(tokenizer, arun, cache_dir) -> None:
    """Concurrent requests with different step counts and expert settings through the
    engine: the compiled backend yields exactly the eager backend's greedy tokens and text."""
    from runtime.engine import Engine, EngineConfig
    from tests.helpers import mixed_step_requests, run_batched
    from tests.runtime.conftest import tiny_model_config

    model = perturbed_model(tiny_model_config(tokenizer.get_vocab_size(), "moe"))
    settings = dict(kv_cache_bytes=2**20, page_size=8, max_batch_size=16, max_waiting=32)
    requests = mixed_step_requests()
    results = {}
    for compiled in (False, True):
        # A graph for 2 steps; the requests at 6 and 4 run block by block in the same batch.
        graphs = [2] if compiled else None
        backend = TorchBackend(model, CompileSpec.parse(graphs, cache_dir) if compiled else None)
        engine = Engine(backend, tokenizer, EngineConfig(**settings))
        results[compiled] = arun(run_batched(engine, requests))
        assert engine.stats().kv_used_bytes == 0
    assert [r[1] for r in results[True]] == [r[1] for r in results[False]]
    assert [r[0] for r in results[True]] == [r[0] for r in results[False]]
    assert [len(r[1]) for r in results[True]] == [10, 14, 7]
