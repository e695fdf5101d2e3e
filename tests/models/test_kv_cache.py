"""Paged KV cache bookkeeping."""

from __future__ import annotations

import pytest
import torch

from models.kv_cache import KVCacheError, KVCacheFullError, PagedKVCache


def test_reservation_is_steps_times_tokens(tiny):
    config = tiny(trunk="ode")
    cache = PagedKVCache(config, num_pages=100, page_size=4)
    per_page = 4 * 2 * config.d_model * 4
    assert cache.page_bytes == per_page and cache.capacity_bytes == 100 * per_page
    cache.reserve("a", steps=6, tokens=10)  # 3 pages per step
    assert cache.used_bytes == 18 * per_page
    cache.reserve("b", steps=2, tokens=10)
    assert cache.used_bytes == 24 * per_page
    cache.release("a")
    assert cache.used_bytes == 6 * per_page
    cache.release("a")  # idempotent
    cache.release("b")
    assert cache.used_bytes == 0 and cache.free_pages == 100


def test_full_pool_and_double_reserve(tiny):
    cache = PagedKVCache(tiny(trunk="ode"), num_pages=10, page_size=4)
    cache.reserve("a", 4, 8)  # 8 pages
    with pytest.raises(KVCacheFullError, match="needs 6 pages"):
        cache.reserve("b", 3, 8)
    with pytest.raises(KVCacheError, match="already holds"):
        cache.reserve("a", 1, 1)
    with pytest.raises(KVCacheError, match="holds no reservation"):
        cache.batch(["zzz"])


def test_for_budget_and_block_tables(tiny):
    config = tiny(trunk="ode")
    cache = PagedKVCache.for_budget(config, budget_bytes=10 * 4 * 2 * config.d_model * 4 + 5, page_size=4)
    assert cache.num_pages == 10
    cache.reserve(1, 2, 5)
    cache.reserve(2, 3, 3)
    kv = cache.batch([1, 2])
    assert kv.block_tables.shape == (2, 3, 2)
    assert kv.cached_steps.tolist() == [2, 3]
    assert kv.block_tables[0, 2].tolist() == [-1, -1]  # row 0 has no third step
    assert kv.block_tables[1, :, 1].tolist() == [-1, -1, -1]  # 3 tokens fit one page
    used = kv.block_tables[kv.block_tables >= 0]
    assert len(set(used.tolist())) == used.numel() == 7  # no page shared
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        PagedKVCache.for_budget(config, budget_bytes=10)


def test_scatter_then_gather_round_trip(tiny):
    config = tiny(trunk="ode")
    cache = PagedKVCache(config, num_pages=8, page_size=2)
    k = torch.randn(1, config.n_heads, 3, config.head_dim)
    v = torch.randn_like(k)
    slots = torch.tensor([[4 * 2 + 0, 4 * 2 + 1, 6 * 2 + 0]])  # pages 4 and 6
    cache.scatter(slots, k, v)
    gk, gv = cache.gather(torch.tensor([[4, 6]]))
    torch.testing.assert_close(gk[:, :, :3], k)
    torch.testing.assert_close(gv[:, :, :3], v)


def test_batch_tables_are_reused_until_a_reservation_changes(tiny):
    config = tiny(trunk="ode")
    cache = PagedKVCache(config, num_pages=12, page_size=2)
    cache.reserve("a", 2, 3)
    cache.reserve("b", 2, 3)
    first = cache.batch(["a", "b"])
    assert cache.batch(["a", "b"]) is first  # a decode loop over the same rows
    assert cache.batch(["b", "a"]) is not first  # other order, other tables
    cache.release("a")
    cache.reserve("a", 3, 1)  # same id, new pages and step count
    again = cache.batch(["a", "b"])
    assert again is not first
    assert again.cached_steps.tolist() == [3, 2]
    assert again.block_tables[0, 2, 0] >= 0 and again.block_tables[0, 0, 1] == -1
