"""The model runner: the KV pool, and one iteration's rows -> batch descriptions -> forwards -> tokens.

    engine (event loop)                 runner
    scheduler.schedule() -> rows  --->  prepare(rows): group, build `Forward`s
                                        (reads the allocator; host only)
    worker thread (or inline)     --->  execute(plan): backend.forward per
                                        group, then sampling -> tokens

Ownership. The runner owns the KV pool as two objects
(models/kv_cache.py): the `PageAllocator` (reservations, free list; the
scheduler reserves and releases through it and never sees a tensor) and the
`KVStorage` (the page tensors, in the backend's dtype and on its device: a
bfloat16 model's pool is bfloat16, so the same byte budget holds twice the
tokens).

Rows. A `Row` is one sequence's part of an iteration: its new tokens, the
position of the first, its step count and expert setting, and how to sample
its next token. Any mix works: a whole prompt (start 0), a chunk of a long
prompt or several draft tokens against an existing cache (start > 0), one
decode token. `prepare` runs the one-token rows as one forward and packs the
others, by new-token count, into forwards of right-padded rows while a
forward's padded size stays within `max_padding` x its real tokens (so a long
prompt does not make short ones pay for its length, and equal-length rows
share one forward; `pack_rows`); a padded
token is fed the row's last position and its keys and values go to the
storage's scratch slot, never read. Each forward is a `models.trunk.Forward`:
tokens and positions (B, T), per-row step counts, expert settings, and the
cache view (slots to write and pages to read at every step) built from the
allocator's block tables, which are reused while the same rows repeat (a
decode loop).

`execute` only reads what `prepare` built, so it can run in a worker thread
while the event loop keeps changing the scheduler and allocator state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from models.config import ModelConfig
from models.kv_cache import (
    KVCacheError,
    KVStorage,
    PageAllocator,
    block_tables,
    bytes_per_token_step,
    pages_for_budget,
)
from models.trunk import CacheView, Forward
from runtime.backends import Backend
from runtime.sampling import Draw, LogitAdjust, sample_rows
from runtime.speculation import DraftRound, SpecOutcome, SpecPlan
from runtime.speculation import plan as plan_speculation
from runtime.types import InvalidRequestError, SamplingParams, TokenLogprob


@dataclass
class Row:
    """One sequence's share of an iteration (built by the engine from its `Sequence`).

    Attributes:
        request_id: the sequence (its KV reservation's id).
        tokens: the new token ids (at least one).
        start: position of the first new token = tokens already cached.
        steps: the sequence's step count (its reservation's).
        experts: expert setting, or None for the trained maximum.
        sampling, generator, adjust: how the next token is drawn.
        generated: ids generated so far, for rows whose penalties read them.
        draft: this iteration runs a speculative round for the row
            (runtime/speculation.py): `tokens` is then the one fed token.
        exit_threshold: the request's exit-gate threshold (models with an
            exit gate), or None.
        exit_early: its generated tokens stop looping at their exit loop
            (`exit_mode` "stop_early"; applied to one-token rows only).
    """

    request_id: str
    tokens: list[int]
    start: int
    steps: int
    experts: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None
    adjust: LogitAdjust | None = None
    generated: list[int] = field(default_factory=list)
    draft: DraftRound | None = None
    exit_threshold: float | None = None
    exit_early: bool = False


@dataclass
class IterationResult:
    """What one iteration produced, per request id.

    Attributes:
        tokens: one token per ordinary row.
        spec: the round of each speculating row (its tokens are there, not in `tokens`).
        loops: loops computed for the token of each row with an exit threshold.
    """

    tokens: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    expert_counts: list[int] = field(default_factory=list)
    duration_s: float = 0.0
    spec: dict[str, SpecOutcome] = field(default_factory=dict)
    loops: dict[str, int] = field(default_factory=dict)


class Plan(list[tuple[Forward, list[Row]]]):
    """One iteration: each forward with the rows it holds, in row order.

    Attributes:
        spec: the later draft forwards and the verifications when rows
            speculate (`runtime.speculation.SpecPlan`; its first draft rows are
            among the forwards here), else None.
    """

    spec: SpecPlan | None = None


def pack_rows(rows: list[Row], max_padding: float = 2.0) -> list[list[Row]]:
    """Split rows into forwards of right-padded rows.

    The one-token rows (the decode batch) form one forward of their own: it
    is the iteration's common case and the compiled decode's fast path (one
    new token per row). The other rows are sorted by new-token count and
    packed while a group's padded size (longest row x rows) stays within
    `max_padding` x its real tokens: one forward for typical mixed lengths,
    separate ones when a long row would make many short ones pay for its length.
    """
    single = [r for r in rows if len(r.tokens) == 1]
    groups: list[list[Row]] = [single] if single else []
    first = len(groups)
    real = 0
    for row in sorted((r for r in rows if len(r.tokens) != 1), key=lambda r: len(r.tokens)):
        n = len(row.tokens)
        if len(groups) > first and n * (len(groups[-1]) + 1) <= max_padding * (real + n):
            groups[-1].append(row)
            real += n
        else:
            groups.append([row])
            real = n
    return groups


@dataclass
class _ViewMemo:
    """The last decode forward's cache view and what it was built from."""

    key: tuple[str, ...]  # the rows' request ids
    version: int  # the allocator's version then
    pages: int  # P
    starts: list[int]  # each row's position then
    view: CacheView


class ModelRunner:
    """Owns the KV pool; turns rows into batch descriptions and runs them (see the module docstring)."""

    def __init__(self, backend: Backend, kv_cache_bytes: int, page_size: int = 16) -> None:
        """Size the KV pool for `backend`'s model in its dtype and on its device.

        Raises:
            ValueError: the budget holds no page (names kv_cache_bytes).
        """
        self.backend = backend
        config: ModelConfig = backend.config
        self.config = config
        dtype, device = backend.dtype, backend.device
        num_pages = pages_for_budget(config, kv_cache_bytes, page_size, dtype)
        self.allocator = PageAllocator(num_pages, page_size, bytes_per_token_step(config, dtype) * page_size)
        self.storage = KVStorage.allocate(config, num_pages, page_size, dtype, device)
        self.device = torch.device(device)
        self._full_setting = None if config.expert_setting is None else config.expert_setting.default
        # Block tables of the last forward's rows, reused while the rows and the allocator repeat.
        self._tables: tuple[tuple[str, ...], int, torch.Tensor] | None = None
        # The last decode forward's cache view (`_cache_view`).
        self._view: _ViewMemo | None = None

    def check_fits(self, steps: int, prompt_tokens: int, max_tokens: int, draft_steps: int = 0) -> None:
        """Refuse at submission a request whose reservation could never fit the pool.

        Args:
            draft_steps: the steps of its speculative draft's entries (0: none).

        Raises:
            InvalidRequestError: naming `max_tokens`, with how many would fit.
        """
        a = self.allocator
        tokens = prompt_tokens + max_tokens
        need = a.pages_needed(steps, tokens) + (a.pages_needed(draft_steps, tokens) if draft_steps else 0)
        if need > a.num_pages:
            fit = a.num_pages // (steps + draft_steps) * a.page_size - prompt_tokens
            raise InvalidRequestError(
                "max_tokens",
                max_tokens,
                f"at steps={steps}{f' with draft_steps={draft_steps}' if draft_steps else ''} the KV cache "
                f"({a.capacity_bytes} bytes) holds at most "
                f"{max(fit, 0)} new tokens after this {prompt_tokens}-token prompt",
            )

    # --- event loop ------------------------------------------------------------
    def prepare(self, rows: list[Row], max_padding: float = 2.0) -> Plan:
        """This iteration's forwards (host work only; reads the allocator, never the storage).

        Raises:
            KVCacheError: a row without a reservation, with another step count
                than its reservation's, or reaching past it.
        """
        if any(r.draft is not None for r in rows):
            return plan_speculation(self, rows, max_padding)
        return Plan((self.describe(group), group) for group in pack_rows(rows, max_padding))

    def describe(self, rows: list[Row], all_logits: bool = False) -> Forward:
        """One forward's batch description for `rows` (right-padded to the longest).

        Args:
            all_logits: logits of every position (B, T, V) instead of each row's last.
        """
        a = self.allocator
        lens: list[int] = []
        ids: list[str] = []
        steps_list: list[int] = []
        starts: list[int] = []
        any_experts = any_exit = False
        last = 0
        for r in rows:  # one pass: this runs for every row of every iteration
            n = len(r.tokens)
            held = a.reservation(r.request_id)
            if held is None:
                raise KVCacheError(f"sequence {r.request_id!r} holds no reservation")
            held_steps, capacity = held
            if held_steps != r.steps:
                raise KVCacheError(
                    f"row {r.request_id!r}: its cache holds {held_steps} steps, the row asks for "
                    f"{r.steps}; a sequence keeps its step count"
                )
            end = r.start + n - 1
            if n < 1 or end >= capacity:
                raise KVCacheError(
                    f"row {r.request_id!r}: positions {r.start}..{end} overflow its reservation "
                    f"of {capacity} tokens"
                )
            if end > last:
                last = end
            lens.append(n)
            ids.append(r.request_id)
            steps_list.append(r.steps)
            starts.append(r.start)
            any_experts = any_experts or r.experts is not None
            any_exit = any_exit or r.exit_threshold is not None
        T = max(lens)
        padded = min(lens) < T
        if T == 1:
            tokens = torch.tensor([r.tokens for r in rows])  # (B, 1) int64
        else:
            tokens = torch.tensor([r.tokens + [0] * (T - len(r.tokens)) for r in rows])  # (B, T) int64
        start = torch.tensor(starts, dtype=torch.long)  # (B,)
        if T == 1:
            positions = start[:, None]  # (B, 1)
        else:
            positions = start[:, None] + torch.arange(T)[None, :]  # (B, T)
        pad = last_index = None
        if padded:
            n = torch.tensor(lens, dtype=torch.long)
            pad = torch.arange(T)[None, :] >= n[:, None]  # (B, T) padding tokens
            positions = torch.minimum(positions, (start + n - 1)[:, None])  # pads repeat the last position
            last_index = n - 1  # (B,)
        experts = None
        if any_experts:
            experts = torch.tensor([self._full_setting if r.experts is None else r.experts for r in rows])
        key = tuple(ids)
        tables = self._block_tables(key)
        P = -(-(last + 1) // a.page_size)  # pages covering the furthest new token
        dev = self.device
        if dev.type != "cpu":
            tokens, positions = tokens.to(dev), positions.to(dev)
            experts = None if experts is None else experts.to(dev)
            pad = None if pad is None else pad.to(dev)
            last_index = None if last_index is None else last_index.to(dev)
        cache = self._cache_view(key, starts, T, P, tables, positions, pad)
        steps = tuple(steps_list)
        exit_threshold = exit_early = None
        if any_exit:  # above 1: never reached, the row's ordinary output
            thresholds = [2.0 if r.exit_threshold is None else r.exit_threshold for r in rows]
            exit_threshold = torch.tensor(thresholds, dtype=torch.float32, device=dev)
            if T == 1 and any(r.exit_early for r in rows):  # a prompt (chunk) runs every loop
                exit_early = torch.tensor([r.exit_early for r in rows], dtype=torch.bool, device=dev)
        return Forward(
            tokens,
            positions,
            steps,
            experts,
            cache,
            last_index,
            last_only=not all_logits,
            exit_threshold=exit_threshold,
            exit_early=exit_early,
        )

    def _cache_view(
        self,
        key: tuple[str, ...],
        starts: list[int],
        T: int,
        P: int,
        tables: torch.Tensor,
        positions: torch.Tensor,
        pad: torch.Tensor | None,
    ) -> CacheView:
        """The forward's cache view; a decode that follows a decode of the same rows reuses it.

        When the same rows decode again with the allocator unchanged and no row's new token
        starts a page, each row writes the slot after its previous one and reads the same
        pages: `slots + 1` and the same windows, one tensor op instead of the ~7 of
        `CacheView.from_tables` (~40-120 us per iteration at N = 12 on this CPU).
        """
        page = self.allocator.page_size
        version = self.allocator.version
        memo = self._view
        if (
            T == 1
            and memo is not None
            and memo.key == key
            and memo.version == version
            and memo.pages == P
            and all(s == m + 1 and s % page for s, m in zip(starts, memo.starts))
        ):
            view = CacheView(self.storage, memo.view.slots + 1, memo.view.windows)
        else:
            view = CacheView.from_tables(self.storage, tables[:, :, :P], positions, pad)
        self._view = _ViewMemo(key, version, P, starts, view) if T == 1 else None
        return view

    def _block_tables(self, ids: tuple[str, ...]) -> torch.Tensor:
        last = self._tables
        if last is not None and last[0] == ids and last[1] == self.allocator.version:
            return last[2]
        tables = block_tables(self.allocator, list(ids), self.device)
        self._tables = (ids, self.allocator.version, tables)
        return tables

    # --- worker thread -------------------------------------------------------------
    def execute(self, plan: Plan) -> IterationResult:
        """Run the forwards and draw one token per row (touches only what `prepare` built)."""
        t0 = time.perf_counter()
        result = IterationResult()
        counts: torch.Tensor | None = None
        spec = getattr(plan, "spec", None)
        for fwd, rows in plan:
            out = self.backend.forward(fwd)
            if out.loops_run is not None:
                for row, loops in zip(rows, out.loops_run):
                    if row.exit_threshold is not None:
                        result.loops[row.request_id] = loops
            logits = out.logits[:, -1, :]
            if spec is not None:  # the first draft forward's rows share the plan's forwards
                own = [b for b, r in enumerate(rows) if id(r) not in spec.first]
                drafts = logits.detach().float().cpu()
                for b, r in enumerate(rows):
                    rnd = spec.first.get(id(r))
                    if rnd is not None:
                        rnd.draft(drafts[b])
                if len(own) < len(rows):
                    rows = [rows[b] for b in own]
                    logits = logits[torch.tensor(own, dtype=torch.long, device=logits.device)]
            draws = (
                sample_rows(
                    logits,
                    [r.sampling for r in rows],
                    [r.generator for r in rows],
                    [r.adjust for r in rows],
                    [r.generated for r in rows],
                )
                if rows
                else []
            )
            for row, draw in zip(rows, draws):
                if not isinstance(draw, Draw):
                    result.errors[row.request_id] = draw
                    continue
                result.tokens[row.request_id] = draw.token
                if draw.logprob is not None:
                    result.logprobs[row.request_id] = draw.logprob
            if out.expert_counts is not None:
                c = out.expert_counts.detach().to("cpu", torch.long)
                counts = c if counts is None else counts + c
        if spec is not None:
            result.spec, errors, more = spec.run(self)
            result.errors.update(errors)
            if more is not None:
                counts = more if counts is None else counts + more
        result.expert_counts = [] if counts is None else counts.tolist()
        result.duration_s = time.perf_counter() - t0
        return result
