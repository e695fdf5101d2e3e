"""Tier 1 and 2 numerics of LeanLM: cache, Euler trunk, mixed step counts."""

from __future__ import annotations

import itertools

import pytest
import torch

from models.kv_cache import KVCacheError, PagedKVCache
from models.layers import attention_mask

BLOCKS = ["prenorm", "parallel", "sas", "sasp"]
TRUNKS = ["stack", "ode"]
FFNS = ["dense", "moe", "tree"]
PARAMS = ["sp", "mup", "completep"]


def _settings(config, B):
    if config.ffn == "moe":
        return torch.tensor([config.experts_top_k, 1, 2][:B])
    if config.ffn == "tree":
        return torch.tensor([config.tree_depth, 0, 1][:B])
    return None


@pytest.mark.parametrize(
    ("block", "trunk", "ffn", "par"), list(itertools.product(BLOCKS, TRUNKS, FFNS, PARAMS))
)
def test_cached_decode_equals_full_forward(tiny, make_model, block, trunk, ffn, par):
    config = tiny(block=block, trunk=trunk, ffn=ffn, parameterisation=par)
    model = make_model(config)
    B, T, prefill = 3, 13, 5
    tokens = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    lo, hi = config.step_range
    steps = torch.tensor([hi, lo, (lo + hi) // 2])
    setting = _settings(config, B)
    with torch.no_grad():
        full = model(tokens, steps=steps, experts=setting).logits  # (B, T, V)
        cache = PagedKVCache(config, num_pages=64, page_size=4)  # pages smaller than T: crosses pages
        for b in range(B):
            cache.reserve(b, int(steps[b]), T)
        kv = cache.batch([0, 1, 2])
        parts = [
            model(tokens[:, :prefill], torch.arange(prefill).expand(B, prefill), steps, kv, setting).logits
        ]
        for t in range(prefill, T):
            parts.append(model(tokens[:, t : t + 1], torch.full((B, 1), t), steps, kv, setting).logits)
    incremental = torch.cat(parts, dim=1)
    assert incremental.shape == full.shape == (B, T, config.vocab_size)
    torch.testing.assert_close(incremental, full, rtol=0, atol=2e-5)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("n_shared", [1, 2])
def test_ode_trunk_equals_unrolled_euler_loop(tiny, make_model, block, n_shared):
    config = tiny(block=block, trunk="ode", n_shared_blocks=n_shared, min_steps=2, max_steps=7)
    model = make_model(config)
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    T = tokens.shape[1]
    for n in (2, 5, 7):
        with torch.no_grad():
            got = model(tokens, steps=n).logits
            # The reference: x <- x + h f_k(x), written out by hand.
            x = model.wte(tokens) + model.wpe(torch.arange(T))
            h = torch.full((2, 1, 1), config.horizon / n)
            mask = attention_mask(torch.zeros(2, dtype=torch.long), 0, T)
            empty = x.new_zeros(2, config.n_heads, 0, config.head_dim)
            for i in range(n):
                k = (i * n_shared) // n
                x = model.blocks[k](x, h, empty, empty, mask).x
            want = (model.norm_f(x) @ model.wte.weight.t()) * config.logit_mult
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ffn", FFNS)
@pytest.mark.parametrize("n_shared", [1, 2])
def test_rows_with_different_steps_equal_each_row_alone(tiny, make_model, ffn, n_shared):
    config = tiny(trunk="ode", ffn=ffn, block="sasp", n_shared_blocks=n_shared, min_steps=2, max_steps=6)
    model = make_model(config)
    tokens = torch.randint(0, config.vocab_size, (3, 10))
    steps = torch.tensor([6, 2, 4])
    setting = _settings(config, 3)
    with torch.no_grad():
        batched = model(tokens, steps=steps, experts=setting).logits
        for b in range(3):
            alone = model(
                tokens[b : b + 1],
                steps=steps[b : b + 1],
                experts=None if setting is None else setting[b : b + 1],
            ).logits
            torch.testing.assert_close(batched[b : b + 1], alone, rtol=0, atol=1e-5)


def test_uniform_batch_step_size_is_bit_identical_and_trainable(tiny, make_model):
    """A uniform batch reuses one cached h tensor: the same bits as a mixed batch's
    per-row division and as the traced (exported) computation, dense strides, and
    usable under autograd after inference made it."""
    from models.trunk import Forward, _cached_schedule, _schedule

    config = tiny(trunk="ode", min_steps=2, max_steps=6)
    x = torch.zeros(2, 1, config.d_model)
    _, mixed = _cached_schedule(config.n_blocks, config.horizon, (5, 3, 5), torch.float32, x.device)
    _, uniform = _cached_schedule(config.n_blocks, config.horizon, (5, 5), torch.float32, x.device)
    traced = Forward(
        torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), (5,), traced=True
    )
    _, in_graph = _schedule(config, traced, x)
    assert torch.equal(uniform[0], mixed[0]) and torch.equal(in_graph, uniform)
    assert uniform.shape == (2, 1, 1) and uniform.is_contiguous()
    model = make_model(config)
    tokens = torch.randint(0, config.vocab_size, (2, 6))
    _cached_schedule.cache_clear()
    with torch.inference_mode():
        model(tokens, steps=5)  # first use creates the cached constant
    loss = model(tokens, steps=5).logits.logsumexp(-1).mean()
    loss.backward()  # an inference tensor saved for backward would raise here
    assert all(p.grad is not None for p in model.blocks.parameters() if p.requires_grad)


def test_iteration_i_runs_only_rows_with_more_steps(tiny, make_model, monkeypatch):
    """No padding work: the number of block-row applications is sum(N_b)."""
    config = tiny(trunk="ode", min_steps=2, max_steps=6)
    model = make_model(config)
    rows_seen = []
    block = model.blocks[0]
    original = block.forward

    def counting(x, *args, **kwargs):
        rows_seen.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(block, "forward", counting)
    steps = torch.tensor([6, 2, 3, 2])
    with torch.no_grad():
        model(torch.zeros(4, 3, dtype=torch.long), steps=steps)
    assert rows_seen == [4, 4, 2, 1, 1, 1]
    assert sum(rows_seen) == int(steps.sum())


def test_euler_step_size_and_output_multiplier(tiny):
    config = tiny(trunk="ode", parameterisation="completep", base_depth=2, d_model=64, base_width=16)
    assert config.horizon == 2.0  # T = L_base: h = L_base / N is CompleteP's residual factor
    assert config.logit_mult == pytest.approx(16 / 64)
    assert config.attn_scale == pytest.approx(1 / config.head_dim)
    sp = tiny(trunk="stack", parameterisation="sp", n_layers=4)
    assert sp.horizon == 4.0  # h = 1 for every layer of an SP stack
    assert sp.attn_scale == pytest.approx(sp.head_dim**-0.5)
    assert sp.logit_mult == 1.0


def test_forward_shapes_and_last_only(tiny, make_model):
    config = tiny(trunk="ode", ffn="moe")
    model = make_model(config)
    tokens = torch.randint(0, config.vocab_size, (2, 7))
    out = model(tokens, steps=3)
    assert out.logits.shape == (2, 7, config.vocab_size)
    assert out.expert_counts.shape == (config.n_experts,)
    # Every token is routed to top_k experts at each of the 3 steps.
    assert int(out.expert_counts.sum()) == 2 * 7 * config.experts_top_k * 3
    last = model(tokens, steps=3, last_only=True).logits
    assert last.shape == (2, 1, config.vocab_size)
    torch.testing.assert_close(last[:, 0], out.logits[:, -1])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"steps": 7}, "steps"),
        ({"steps": 1}, "steps"),
        ({"experts": torch.tensor([3, 1])}, "experts_top_k"),
        ({"experts": torch.tensor([0, 1])}, "experts_top_k"),
        ({"positions": torch.full((2, 4), 40)}, "positions"),
    ],
)
def test_invalid_arguments_name_the_field(tiny, make_model, kwargs, field):
    model = make_model(tiny(trunk="ode", ffn="moe"))
    with pytest.raises(ValueError, match=field):
        model(torch.zeros(2, 4, dtype=torch.long), **kwargs)


def test_dense_model_rejects_expert_setting(tiny, make_model):
    model = make_model(tiny())
    with pytest.raises(ValueError, match="experts"):
        model(torch.zeros(1, 2, dtype=torch.long), experts=torch.tensor([1]))


def test_cache_misuse_raises(tiny, make_model):
    config = tiny(trunk="ode")
    model = make_model(config)
    cache = PagedKVCache(config, num_pages=32, page_size=4)
    cache.reserve("a", 4, 8)
    kv = cache.batch(["a"])
    with pytest.raises(KVCacheError, match="built with 4 steps"):
        model(torch.zeros(1, 2, dtype=torch.long), steps=5, kv=kv)
    with pytest.raises(KVCacheError, match="overflows its reservation of 8 tokens"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[8]]), steps=4, kv=kv)
    with pytest.raises(KVCacheError, match="rows"):
        model(torch.zeros(2, 1, dtype=torch.long), steps=4, kv=kv)


def test_generate_matches_argmax_of_full_forward(tiny, make_model):
    config = tiny(trunk="ode", block="sas", ffn="tree")
    model = make_model(config)
    prompt = [5, 17, 3, 9]
    out = model.generate(prompt, max_new_tokens=8, steps=3)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]), steps=3).logits[0, -1].argmax()))
    assert out == seq[len(prompt) :]
    with pytest.raises(ValueError, match="context_length"):
        model.generate(prompt, max_new_tokens=100)
