"""Paged KV cache: one pool of pages, one page list per (sequence, step).

Layout
------
The pool holds two tensors, `k` and `v`, each of shape

    (num_pages, page_size, nh, hs)

A *sequence* (one request) that runs `N` steps owns `N` page lists, one per
step, because every Euler step attends with its own keys and values (the
weights are shared, the activations are not). Each list covers the
sequence's reserved capacity, `ceil(capacity / page_size)` pages, so a
request's memory is proportional to `steps x tokens`, which is what makes
fewer steps cheaper in memory as well as in time.

Token position `p` of a sequence at step `i` lives at
`pool[pages[i][p // page_size], p % page_size]`.

For one forward call the cache is handed to the model as a `KVBatch`: a
(B, N_max, P) int64 block table (page ids, -1 where nothing is reserved) and
the step count each row's cache was built with. The model gathers the pages it
needs into a dense (R, nh, S, hs) past, runs the block, and scatters the new
keys and values back (`gather` / `scatter` below).

Misuse fails loudly: writing past a sequence's reservation, using a step count
different from the one the cache was built with, or reserving more pages than
are free all raise `KVCacheError` naming the sequence and the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from models.config import ModelConfig


class KVCacheError(RuntimeError):
    """The cache was misused (overflow, wrong step count) or is full."""


class KVCacheFullError(KVCacheError):
    """Not enough free pages for a reservation."""


@dataclass
class KVBatch:
    """Cache view for one forward call.

    Attributes:
        pool: the shared page pool.
        block_tables: (B, N_max, P) int64 page ids per row, step and page slot.
        cached_steps: (B,) int64 step count each row's cache holds.
        capacity: tokens each row's reserved pages hold, or None (derived
            from `block_tables` when needed); lets the per-forward overflow
            check run on Python ints.
    """

    pool: PagedKVCache
    block_tables: Tensor
    cached_steps: Tensor
    capacity: tuple[int, ...] | None = None

    def rows(self, index: list[int]) -> KVBatch:
        """The view of rows `index` (in that order)."""
        idx = torch.tensor(index)
        cap = None if self.capacity is None else tuple(self.capacity[i] for i in index)
        return KVBatch(self.pool, self.block_tables[idx], self.cached_steps[idx], cap)


@dataclass
class _Sequence:
    steps: int
    capacity: int  # tokens
    pages: list[list[int]]  # [step][page slot]


class PagedKVCache:
    """Owner of the KV page pool and of which sequence holds which pages."""

    def __init__(
        self,
        config: ModelConfig,
        num_pages: int,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages={num_pages}: must be >= 1")
        if page_size < 1:
            raise ValueError(f"page_size={page_size}: must be >= 1")
        self.config = config
        self.page_size = page_size
        self.num_pages = num_pages
        shape = (num_pages, page_size, config.n_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (pages, page, nh, hs)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(num_pages - 1, -1, -1))  # stack: pop() gives low ids first
        self._seqs: dict[object, _Sequence] = {}
        # Decode iterations usually repeat the previous batch: reuse its tables
        # until a reservation changes (`_version` counts reserve/release calls).
        self._version = 0
        self._last_batch: tuple[tuple[object, ...], int, KVBatch] | None = None

    # --- sizing ------------------------------------------------------------
    @staticmethod
    def bytes_per_token_step(config: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
        """Bytes one token occupies at one step: K and V of d values each."""
        return 2 * config.d_model * dtype.itemsize

    @classmethod
    def for_budget(
        cls,
        config: ModelConfig,
        budget_bytes: int,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """A pool of as many pages as fit in `budget_bytes`."""
        per_page = cls.bytes_per_token_step(config, dtype) * page_size
        num_pages = budget_bytes // per_page
        if num_pages < 1:
            raise ValueError(f"kv_cache_bytes={budget_bytes}: must hold at least one page ({per_page} bytes)")
        return cls(config, int(num_pages), page_size, dtype, device)

    @property
    def page_bytes(self) -> int:
        return self.bytes_per_token_step(self.config, self.k.dtype) * self.page_size

    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def used_bytes(self) -> int:
        return (self.num_pages - len(self._free)) * self.page_bytes

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_needed(self, steps: int, tokens: int) -> int:
        """Pages a reservation of `tokens` tokens at `steps` steps takes."""
        return steps * math.ceil(tokens / self.page_size)

    # --- reservations ------------------------------------------------------
    def reserve(self, seq_id: object, steps: int, tokens: int) -> None:
        """Reserve `steps` page lists covering `tokens` positions each."""
        if seq_id in self._seqs:
            raise KVCacheError(f"sequence {seq_id!r} already holds a reservation")
        if steps < 1 or tokens < 1:
            raise KVCacheError(f"sequence {seq_id!r}: steps={steps} and tokens={tokens} must be >= 1")
        need = self.pages_needed(steps, tokens)
        if need > len(self._free):
            raise KVCacheFullError(
                f"sequence {seq_id!r} needs {need} pages ({steps} steps x {tokens} tokens), "
                f"{len(self._free)} of {self.num_pages} are free"
            )
        per_step = need // steps
        pages = [[self._free.pop() for _ in range(per_step)] for _ in range(steps)]
        self._seqs[seq_id] = _Sequence(steps, tokens, pages)
        self._version += 1

    def release(self, seq_id: object) -> None:
        """Return a sequence's pages to the pool (a no-op if it holds none)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            for step_pages in seq.pages:
                self._free.extend(reversed(step_pages))
            self._version += 1
            self._last_batch = None

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def capacity(self, seq_id: object) -> int:
        return self._seqs[seq_id].capacity

    def batch(self, seq_ids: list[object]) -> KVBatch:
        """Block tables for the given sequences, in order.

        The returned tensors are shared with later calls for the same
        sequences; callers must not modify them.
        """
        if not seq_ids:
            raise KVCacheError("batch of zero sequences")
        key = tuple(seq_ids)
        last = self._last_batch
        if last is not None and last[0] == key and last[1] == self._version:
            return last[2]
        try:
            seqs = [self._seqs[s] for s in seq_ids]
        except KeyError as e:
            raise KVCacheError(f"sequence {e.args[0]!r} holds no reservation") from None
        n_max = max(s.steps for s in seqs)
        p_max = max(len(s.pages[0]) for s in seqs)
        table = torch.full((len(seqs), n_max, p_max), -1, dtype=torch.long)
        for b, s in enumerate(seqs):
            table[b, : s.steps, : len(s.pages[0])] = torch.tensor(s.pages, dtype=torch.long)
        steps = torch.tensor([s.steps for s in seqs], dtype=torch.long)
        capacity = tuple(len(s.pages[0]) * self.page_size for s in seqs)
        batch = KVBatch(self, table.to(self.k.device), steps.to(self.k.device), capacity)
        self._last_batch = (key, self._version, batch)
        return batch

    # --- tensor access (used by the model) ---------------------------------
    def gather(self, pages: Tensor) -> tuple[Tensor, Tensor]:
        """Dense past keys and values for rows whose pages are given.

        Args:
            pages: (R, P) page ids (-1 entries are read as page 0 and must be
                masked out by the caller).

        Returns:
            k, v: (R, nh, P * page_size, hs).
        """
        R, P = pages.shape
        # index_select on a flat index is ~3x faster than advanced indexing here.
        flat = pages.clamp(min=0).reshape(-1)  # (R * P,)
        S = P * self.page_size
        k = torch.index_select(self.k, 0, flat).view(R, S, *self.k.shape[2:])  # (R, S, nh, hs)
        v = torch.index_select(self.v, 0, flat).view(R, S, *self.v.shape[2:])
        return k.transpose(1, 2), v.transpose(1, 2)  # (R, nh, S, hs)

    def scatter(self, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Write new keys and values.

        Args:
            slots: (R, T) flat slot ids `page * page_size + offset`.
            k, v: (R, nh, T, hs).
        """
        nh, hs = self.k.shape[2:]
        flat_k = self.k.view(-1, nh, hs)  # (pages * page, nh, hs)
        flat_v = self.v.view(-1, nh, hs)
        idx = slots.reshape(-1)
        flat_k.index_copy_(0, idx, k.transpose(1, 2).reshape(-1, nh, hs).to(flat_k.dtype))
        flat_v.index_copy_(0, idx, v.transpose(1, 2).reshape(-1, nh, hs).to(flat_v.dtype))
