"""Paged KV cache: a page allocator (bookkeeping) and a page storage (tensors), kept apart.

Layout
------
The storage holds two tensors, `k` and `v`, each of shape

    (num_pages + 1, page_size, nh, hs)

(`nh` = `ModelConfig.kv_heads_per_step`: the attention heads of a LeanLM
step; for a looped stack such as Ouro, whose step is one loop over L layers
with grouped-query attention, L x kv heads, layer l owning heads
[l * kv, (l + 1) * kv), so a step's page holds every layer of that loop)

in the model's dtype and on its device. A *sequence* (one request) that runs
`N` steps owns `N` page lists, one per step, because every Euler step attends
with its own keys and values (the weights are shared, the activations are
not). Each list covers the sequence's reserved capacity,
`ceil(capacity / page_size)` pages, so a request's memory is proportional to
`steps x tokens`, which is what makes fewer steps cheaper in memory as well as
in time.

Token position `p` of a sequence at step `i` lives at
`storage[pages[i][p // page_size], p % page_size]`.

The last page (`num_pages`) is the *scratch page*: it belongs to no
sequence and no window ever reads it; the runner points the padding tokens of
a right-padded forward at it (`KVStorage.scratch_slot`), so padding can never
overwrite a real token's keys and values.

The split (as vLLM splits its block manager from its KV tensors):

    PageAllocator   reservations, free list, page ids per (sequence, step);
                    plain Python, no tensors: what the scheduler reasons about
    KVStorage       the page tensors, `gather` and `scatter`: what the
                    executors touch (models/executors.py)
    PagedKVCache    both together, for single-process callers (LeanLM.generate,
                    tests, the model benchmark); `batch(ids)` gives a `KVBatch`

For one forward call the cache is handed to the model as a `KVBatch`: a
(B, N_max, P) int64 block table (page ids, -1 where nothing is reserved) and
the step count each row's cache was built with; models/trunk.py turns it into
the per-step views the executors read.

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


def bytes_per_token_step(config: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one token occupies at one step: K and V of `kv_heads_per_step x head_dim` values each
    (d for a LeanLM; layers x kv heads x head size for a looped stack, models/ouro.py)."""
    return 2 * config.kv_heads_per_step * config.head_dim * dtype.itemsize


# ----------------------------------------------------------------------------
# Storage: the tensors
# ----------------------------------------------------------------------------
class KVStorage:
    """The page tensors of one pool (plus the scratch page), and the two ways to touch them."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        """Wrap page tensors `k`, `v`, each (pages, page_size, nh, hs); the last page is scratch.

        Compiled graphs wrap their pool inputs this way, so the same trunk loop
        writes into them (models/trunk.py).
        """
        self.k, self.v = k, v
        self.page_size = k.shape[1]  # symbolic inside a traced graph

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVStorage:
        """Zeroed storage for `num_pages` allocatable pages and the scratch page."""
        shape = (num_pages + 1, page_size, config.kv_heads_per_step, config.head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def scratch_slot(self) -> int:
        """A flat slot no window reads: where padding tokens' keys and values go."""
        return (self.k.shape[0] - 1) * self.page_size

    def gather(self, pages: Tensor) -> tuple[Tensor, Tensor]:
        """Dense keys and values of the given pages.

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
        k, v = k.transpose(1, 2).reshape(-1, nh, hs), v.transpose(1, 2).reshape(-1, nh, hs)
        if k.dtype != flat_k.dtype:  # an alias of a no-op cast keeps a compiled graph from writing in place
            k, v = k.to(flat_k.dtype), v.to(flat_v.dtype)
        flat_k.index_copy_(0, idx, k)
        flat_v.index_copy_(0, idx, v)


# ----------------------------------------------------------------------------
# Allocator: the bookkeeping
# ----------------------------------------------------------------------------
@dataclass
class _Sequence:
    steps: int
    capacity: int  # tokens
    pages: list[list[int]]  # [step][page slot]


class PageAllocator:
    """Which sequence holds which pages; no tensors (the scheduler's view of the KV pool).

    Attributes:
        num_pages: allocatable pages (the scratch page is not among them).
        page_size: tokens per page.
        page_bytes: bytes of one page in the storage (for reporting).
        version: changes whenever a reservation is made or released, so
            callers can reuse block tables built for an unchanged set.
    """

    def __init__(self, num_pages: int, page_size: int, page_bytes: int = 0) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages={num_pages}: must be >= 1")
        if page_size < 1:
            raise ValueError(f"page_size={page_size}: must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.page_bytes = page_bytes
        self.version = 0
        self._free = list(range(num_pages - 1, -1, -1))  # stack: pop() gives low ids first
        self._seqs: dict[object, _Sequence] = {}

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
        self.version += 1

    def grow_pages(self, seq_id: object, tokens: int) -> int:
        """Pages `grow(seq_id, tokens)` would take (0 when its lists already cover `tokens`)."""
        seq = self._seqs[seq_id]
        return seq.steps * max(0, math.ceil(tokens / self.page_size) - len(seq.pages[0]))

    def grow(self, seq_id: object, tokens: int) -> int:
        """Extend each of a sequence's page lists to cover `tokens` positions (pages on demand).

        Every step's list grows by the same number of pages, so a sequence
        crossing a page boundary takes one page per step.

        Returns:
            Pages taken (0 when its lists already cover `tokens`).

        Raises:
            KVCacheError: the sequence holds no reservation.
            KVCacheFullError: fewer pages are free than the growth takes (nothing is taken).
        """
        if seq_id not in self._seqs:
            raise KVCacheError(f"sequence {seq_id!r} holds no reservation")
        need = self.grow_pages(seq_id, tokens)
        if need == 0:
            return 0
        if need > len(self._free):
            raise KVCacheFullError(
                f"sequence {seq_id!r} needs {need} more pages to hold {tokens} tokens, "
                f"{len(self._free)} of {self.num_pages} are free"
            )
        seq = self._seqs[seq_id]
        per_step = need // seq.steps
        for step_pages in seq.pages:
            step_pages.extend(self._free.pop() for _ in range(per_step))
        seq.capacity = self._held_tokens(seq)
        self.version += 1
        return need

    def release(self, seq_id: object) -> None:
        """Return a sequence's pages to the pool (a no-op if it holds none)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            for step_pages in seq.pages:
                self._free.extend(reversed(step_pages))
            self.version += 1

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def capacity(self, seq_id: object) -> int:
        """Tokens the sequence's reservation holds (its page lists' length x page size)."""
        return self._held_tokens(self._seqs[seq_id])

    def steps(self, seq_id: object) -> int:
        return self._seqs[seq_id].steps

    def reservation(self, seq_id: object) -> tuple[int, int] | None:
        """(steps, capacity in tokens) of the sequence's reservation, or None when it holds none."""
        seq = self._seqs.get(seq_id)
        return None if seq is None else (seq.steps, self._held_tokens(seq))

    def _held_tokens(self, seq: _Sequence) -> int:
        """Tokens a sequence's page lists hold (each step's list has the same length)."""
        return len(seq.pages[0]) * self.page_size

    def pages(self, seq_id: object) -> list[list[int]]:
        """The sequence's page ids per step (do not modify)."""
        try:
            return self._seqs[seq_id].pages
        except KeyError:
            raise KVCacheError(f"sequence {seq_id!r} holds no reservation") from None


@dataclass
class KVBatch:
    """Cache view for one forward call.

    Attributes:
        storage: the page tensors.
        block_tables: (B, N_max, P) int64 page ids per row, step and page slot.
        cached_steps: (B,) int64 step count each row's cache holds.
        capacity: tokens each row's reserved pages hold, or None (derived
            from `block_tables` when needed); lets the per-forward overflow
            check run on Python ints.
    """

    storage: KVStorage
    block_tables: Tensor
    cached_steps: Tensor
    capacity: tuple[int, ...] | None = None

    def rows(self, index: list[int]) -> KVBatch:
        """The view of rows `index` (in that order)."""
        idx = torch.tensor(index, device=self.block_tables.device)
        cap = None if self.capacity is None else tuple(self.capacity[i] for i in index)
        return KVBatch(self.storage, self.block_tables[idx], self.cached_steps[idx], cap)


def block_tables(
    allocator: PageAllocator, seq_ids: list[object], device: torch.device | str = "cpu"
) -> Tensor:
    """(B, N_max, P) int64 page ids of the given sequences, -1 where a row reserves nothing."""
    if not seq_ids:
        raise KVCacheError("batch of zero sequences")
    pages = [allocator.pages(s) for s in seq_ids]
    n_max = max(len(p) for p in pages)
    p_max = max(len(p[0]) for p in pages)
    table = torch.full((len(pages), n_max, p_max), -1, dtype=torch.long)
    for b, p in enumerate(pages):
        table[b, : len(p), : len(p[0])] = torch.tensor(p, dtype=torch.long)
    return table.to(device)


class PagedKVCache:
    """A `PageAllocator` and its `KVStorage` in one object, for single-process callers."""

    def __init__(
        self,
        config: ModelConfig,
        num_pages: int,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        page_bytes = bytes_per_token_step(config, dtype) * page_size
        self.allocator = PageAllocator(num_pages, page_size, page_bytes)
        self.storage = KVStorage.allocate(config, num_pages, page_size, dtype, device)
        self.page_size = page_size
        self.num_pages = num_pages
        # Decode iterations usually repeat the previous batch: reuse its tables
        # until a reservation changes (the allocator's version).
        self._last_batch: tuple[tuple[object, ...], int, KVBatch] | None = None

    bytes_per_token_step = staticmethod(bytes_per_token_step)

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
        return cls(config, pages_for_budget(config, budget_bytes, page_size, dtype), page_size, dtype, device)

    @property
    def k(self) -> Tensor:
        return self.storage.k

    @property
    def v(self) -> Tensor:
        return self.storage.v

    @property
    def page_bytes(self) -> int:
        return self.allocator.page_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.allocator.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_bytes

    @property
    def free_pages(self) -> int:
        return self.allocator.free_pages

    def pages_needed(self, steps: int, tokens: int) -> int:
        return self.allocator.pages_needed(steps, tokens)

    def reserve(self, seq_id: object, steps: int, tokens: int) -> None:
        self.allocator.reserve(seq_id, steps, tokens)

    def release(self, seq_id: object) -> None:
        self.allocator.release(seq_id)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self.allocator

    def capacity(self, seq_id: object) -> int:
        return self.allocator.capacity(seq_id)

    def batch(self, seq_ids: list[object]) -> KVBatch:
        """Block tables for the given sequences, in order.

        The returned tensors are shared with later calls for the same
        sequences; callers must not modify them.
        """
        key = tuple(seq_ids)
        last = self._last_batch
        if last is not None and last[0] == key and last[1] == self.allocator.version:
            return last[2]
        a = self.allocator
        tables = block_tables(a, list(seq_ids), self.storage.device)
        steps = torch.tensor([a.steps(s) for s in seq_ids], dtype=torch.long, device=self.storage.device)
        batch = KVBatch(self.storage, tables, steps, tuple(a.capacity(s) for s in seq_ids))
        self._last_batch = (key, a.version, batch)
        return batch

    def gather(self, pages: Tensor) -> tuple[Tensor, Tensor]:
        return self.storage.gather(pages)

    def scatter(self, slots: Tensor, k: Tensor, v: Tensor) -> None:
        self.storage.scatter(slots, k, v)


def pages_for_budget(
    config: ModelConfig, budget_bytes: int, page_size: int, dtype: torch.dtype = torch.float32
) -> int:
    """Pages of `page_size` tokens that fit in `budget_bytes` in `dtype`.

    Raises:
        ValueError: the budget holds no page (names kv_cache_bytes).
    """
    per_page = bytes_per_token_step(config, dtype) * page_size
    num_pages = budget_bytes // per_page
    if num_pages < 1:
        raise ValueError(f"kv_cache_bytes={budget_bytes}: must hold at least one page ({per_page} bytes)")
    return int(num_pages)
